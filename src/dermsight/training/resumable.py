"""Interruption-safe training: the run folder, its log of sessions, atomic checkpoints, the
signals that ask for one, and the random states a resumed run needs to draw exactly what an
uninterrupted run would.

A run folder holds `run.json` (the recipe, the command, every session's seconds and how it
ended) and one checkpoint per network. `dermsight train` writes a checkpoint every
`--checkpoint-minutes` and when SIGTERM or SIGINT arrives (at the end of the optimizer step
under way), then stops; the same command, or `dermsight train --resume RUN_DIR`, goes on from
there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

RUN_LOG = "run.json"
# Settings a resumed run may change: they do not alter the weights the run reaches (restart_epochs
# extends a finished schedule without touching its first cycle; see finetune.warmup_cosine).
RESUMABLE_CHANGES = frozenset({"progress", "checkpoint_minutes", "restart_epochs", "run_dir", "cache_dir", "output"})


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing its checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, signal_name: str, checkpoint: Path, where: str):
        self.signal_name, self.checkpoint, self.where = signal_name, checkpoint, where
        self.exit_code = 128 + int(signal.Signals[signal_name])
        super().__init__(f"stopped by {signal_name} at {where}; checkpoint {checkpoint}")


class RecipeMismatch(ValueError):
    """The run folder holds a run of another recipe."""


class StopSignals:
    """While inside, SIGTERM and SIGINT only set `requested` (the signal's name), so the loop can
    finish its step and checkpoint; a second SIGINT interrupts at once. Outside the main thread
    (where Python cannot install handlers) signals keep their usual effect."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C twice: stop now

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class CheckpointClock:
    """Due every `minutes` of wall time since the last checkpoint (never when `minutes` is 0)."""

    def __init__(self, minutes: float):
        self.interval = minutes * 60.0
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.interval > 0 and time.monotonic() - self.last >= self.interval

    def reset(self) -> None:
        self.last = time.monotonic()


def random_states() -> dict:
    """Python's, NumPy's and torch's global generator states (dropout, stochastic depth)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_random_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save_atomically(state: dict, path: Path) -> None:
    """torch.save into a temporary file beside `path`, flushed to disk, then renamed over it: a
    crash mid-write leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def default_run_dir(output: Path, cache_dir: Path) -> Path:
    """Where a run keeps its checkpoints: with $DERMSIGHT_CACHE set, under `cache_dir`/runs (out of
    the work tree), named by the bundle's resolved path so the same command finds it again;
    otherwise beside the bundle (`<output>.checkpoints`)."""
    if os.environ.get("DERMSIGHT_CACHE"):
        key = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:10]
        return cache_dir / "runs" / f"{output.name}-{key}"
    return output.with_name(output.name + ".checkpoints")


class RunLog:
    """`run.json` of a run folder: the recipe, and one entry per session (`dermsight train`
    invocation) with its seconds, kept current at every checkpoint, and how it ended."""

    def __init__(self, folder: Path, recipe: dict, command: str | None, spent: float = 0.0, defaults: dict | None = None):
        """Open (or start) the run's log and begin a session; `spent`: its seconds before this.
        A setting the stored recipe lacks (an option added since it was written) reads as its
        value in `defaults`."""
        self.folder, self.path = folder, folder / RUN_LOG
        previous = json.loads(self.path.read_text()) if self.path.exists() else None
        if previous is not None:
            stored = {**(defaults or {}), **previous["recipe"]}
            changed = sorted(
                key for key in set(recipe) | set(stored)
                if key not in RESUMABLE_CHANGES and recipe.get(key) != stored.get(key)
            )
            if changed:
                details = "; ".join(f"{k}: {stored.get(k)!r} -> {recipe.get(k)!r}" for k in changed)
                raise RecipeMismatch(
                    f"run folder {folder} holds a run of another recipe ({details}); resume it with its own "
                    "options (dermsight train --resume RUN_DIR), or choose another --output"
                )
        self.data = previous or {"recipe": recipe, "command": command, "sessions": []}
        self.data["recipe"] = recipe
        self.started = time.perf_counter() - spent
        self.data["sessions"].append({"started": _now(), "seconds": 0.0, "ended": "running"})
        self.save()

    @classmethod
    def load_recipe(cls, folder: Path) -> dict:
        """The recipe stored in a run folder (for `--resume RUN_DIR`)."""
        path = folder / RUN_LOG
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: {folder} is not a dermsight run folder")
        return json.loads(path.read_text())["recipe"]

    @property
    def resumes(self) -> int:
        """Sessions after the first: how many times the run was taken up again."""
        return len(self.data["sessions"]) - 1

    @property
    def total_seconds(self) -> float:
        return float(sum(s["seconds"] for s in self.data["sessions"]))

    def save(self, ended: str | None = None) -> None:
        """Record this session's seconds so far (and how it ended), atomically."""
        session = self.data["sessions"][-1]
        session["seconds"] = round(time.perf_counter() - self.started, 1)
        if ended:
            session["ended"] = ended
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        temporary.replace(self.path)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
