"""What every section of bench/run.py shares: where the data and the driver are, how much
work each section does (Settings), timing and rounding, records of the shared images, and
running a command (or a torch section in a child process) with its peak memory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _server import dermsight_command  # noqa: F401  (re-exported for the sections)

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
RUN_PY = BENCH / "run.py"
DATA = Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets"))
# The allocator settings of scripts/env.sh, for the torch sections (see dermsight.allocator).
TORCH_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}


class Settings:
    """How much work each section does; --quick only checks that the code runs."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.ceiling_batch = 32
        self.ceiling_warmup, self.ceiling_runs = (1, 3) if quick else (3, 20)
        self.sweep_rounds = 1 if quick else 5
        self.warmup_seconds = 2.0 if quick else 5.0
        self.test_images = 500 if quick else None  # None: all 5,545 of test_128
        self.originals_passes = 1 if quick else 3
        self.paired_rounds = 1 if quick else 3
        self.paired_ceiling_seconds = 1.0 if quick else 4.0
        self.naive_images = 30 if quick else 300
        self.api_idle_requests = 10 if quick else 100
        self.api_step_uploads = 20 if quick else 200  # uploads of the in-process CPU-per-step measurement
        self.api_clients = 8
        self.api_requests_per_client = 4 if quick else 25
        # Paced clients: each sends one request every 8 / rate seconds, at these total rates.
        self.api_paced_rates = (8.0,) if quick else (8.0, 32.0, 64.0)
        self.api_paced_seconds = 3.0 if quick else 20.0
        # The bench's API key on the production server: a per-key limit no client of the bench
        # reaches (`dermsight serve`'s default, 20 requests/s with bursts of 120, would answer
        # the closed-loop clients 429 within seconds).
        self.api_rate_limit, self.api_burst = 1000.0, 1000
        self.train_max_images = 2000 if quick else None  # warm run; None: the whole training set
        self.train_cold = not quick  # quick: the cold time is estimated from a small cold embedding
        self.cold_sample = 96
        self.finetune_warmup, self.finetune_steps = (1, 2) if quick else (2, 10)
        self.second_run_images = 300 if quick else None


def now() -> float:
    return time.perf_counter()


def rounded(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def shared_sources(specs: list[str]) -> list[str]:
    """The bundle's training sources (recorded as ../shared/datasets/X) under this DATA."""
    out = []
    for spec in specs:
        fmt, _, path = spec.rpartition(":") if ":" in spec and not spec.startswith("/") else ("", "", spec)
        tail = path.split("datasets/", 1)[1] if "datasets/" in path else path
        out.append(f"{fmt + ':' if fmt else ''}{DATA / tail}")
    return out


def load_bundle(model: Path | None):
    """The bundle at `model` (None: bundles/default)."""
    from dermsight.models.bundle import load_bundle as load

    return load(model)


def test_128_records(limit: int | None):
    """The SIIM-ISIC 2020 test_128 records (with patients, age, sex, site), as `predict` reads them."""
    from dermsight.data.inputs import records_from_inputs

    records, _ = records_from_inputs([str(DATA / "isic2020")])
    records = records[records["image_ref"].str.contains("/test_128/", regex=False)].reset_index(drop=True)
    return records.iloc[:limit].reset_index(drop=True) if limit else records


def originals_records():
    from dermsight.data.inputs import records_from_inputs

    records, _ = records_from_inputs([str(DATA / "isic2020" / "train_originals")])
    return records


def warm_page_cache(paths) -> None:
    """Read the files once: the batch figures are steady-state, not first-read-from-disk."""
    for path in paths:
        Path(path).read_bytes()


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None,
                 timeout: float | None = None) -> dict:
    """Run a command; its wall time, exit code, peak RSS and output tail.

    The peak is VmHWM from /proc, polled every 20 ms (summed over the child's process tree),
    not wait4's ru_maxrss: Linux carries the forking parent's high-water mark into the
    child's, so a big benchmark process would inflate every child's figure."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = now()
        process = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = None if timeout is None else started + timeout
        peak = 0.0
        while True:
            peak = max(peak, process_tree_memory(process.pid)["peak_rss_mb"])
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if deadline and now() > deadline:
                process.kill()
                pid, status, _ = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        seconds = now() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "seconds": seconds,
            "returncode": process.returncode,
            "peak_rss_mb": peak,
            "stdout": out.read().decode(errors="replace")[-2000:],
            "stderr": err.read().decode(errors="replace")[-2000:],
        }


def process_tree_memory(pid: int) -> dict:
    """VmRSS and VmHWM (peak) in MB of `pid` plus all its descendants (from /proc)."""
    todo, tree = [pid], []
    while todo:
        current = todo.pop()
        tree.append(current)
        try:  # children of every thread of `current`
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    rss = hwm = 0.0
    for member in tree:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss += int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
        hwm += int(fields.get("VmHWM", "0 kB").split()[0]) / 1024
    return {"processes": len(tree), "rss_mb": rss, "peak_rss_mb": hwm}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def child_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "DERMSIGHT_DATA": str(DATA), **(extra or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_child_section(name: str, args: argparse.Namespace, allocator: str = "env") -> dict:
    """A torch section in its own process, with the allocator set up as `allocator` says:
    env (scripts/env.sh's variables before start), mallopt (what `dermsight train` does when
    they are unset: dermsight.allocator) or default (glibc's defaults)."""
    cmd = [sys.executable, str(RUN_PY), "--child", name, "--allocator", allocator]
    if args.quick:
        cmd.append("--quick")
    if args.model:
        cmd += ["--model", str(args.model)]
    if getattr(args, "naive", None):
        cmd += ["--naive", args.naive]
    env = {k: v for k, v in child_env().items() if k not in TORCH_MALLOC}
    if allocator == "env":
        env.update(TORCH_MALLOC)
    result = run_measured(cmd, env=env)
    if result["returncode"] != 0:
        raise RuntimeError(f"child section {name} failed: {result['stderr'][-1500:]}")
    payload = json.loads(result["stdout"].strip().splitlines()[-1])
    payload["process_peak_rss_mb"] = rounded(result["peak_rss_mb"], 1)
    return payload
