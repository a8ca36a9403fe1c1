"""ONNX Runtime on a small CPU machine: one single-threaded run per core.

Every setting is deliberate (bench/run.py measures them):

* Single-threaded runs, side by side (:class:`ParallelSession`). ONNX Runtime's own
  intra-op threads meet at a barrier after every operator: on 2 cores, whenever a decode
  thread or a request handler takes one core, the other waits there. Independent runs
  with one thread each never wait for each other. Measured on the 2-core machine with
  the default int8 graph: two streams of 1-thread runs did 930-960 images/s at 1-8
  rows per run, one 2-thread session 565-856 (its best at 16 rows); the Predictor on
  test_128 went from 309 to 345 images/s with the same outputs, bit for bit.
* Runs of at most 8 rows (``DERMSIGHT_ORT_ROWS`` overrides): a 1-thread run is as fast
  per row at 1 row as at 32 (461-489 images/s), and small runs are light on memory; a
  call's rows are split so that every core gets a share (one image's two views run side
  by side).
* ``inter_op_num_threads`` = 1 with sequential execution: the graph is a chain of convs.
* ``ORT_ENABLE_ALL`` graph optimisation: conv + bias + activation fusion and the NCHWc
  blocked layout of MLAS (the fast x86 conv kernels).
* Static padding: models exported from timm's TensorFlow-style EfficientNets compute
  their "same" padding at run time (Shape -> Ceil -> Pad on every stride-2 conv). The
  padding only depends on the fixed image size, so it is folded into constants once (see
  :func:`dermsight.models.graph_rewrite.static_padding_model`); ONNX Runtime then fuses
  each Pad into its Conv and keeps the whole backbone in the blocked layout instead of
  converting back and forth around every Pad: the same outputs (bit for bit on the
  default bundle), 15-30% faster. The folded graph is checked against the original once
  and cached by content hash under ``$DERMSIGHT_CACHE/onnx`` (a second start skips the
  folding).
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dermsight.cache import default_cache_dir
from dermsight.models.graph_rewrite import static_padding_model

FOLD_VERSION = 1  # bump when static_padding_model changes what it writes
ROWS_PER_RUN = 8


def default_streams() -> int:
    """Runs in flight at once: one per core (``DERMSIGHT_THREADS`` overrides)."""
    return max(1, int(os.environ.get("DERMSIGHT_THREADS", os.cpu_count() or 1)))


def rows_per_run() -> int:
    """The most input rows (images x views) one single-threaded run gets."""
    return max(1, int(os.environ.get("DERMSIGHT_ORT_ROWS", ROWS_PER_RUN)))


def session_options(exact_int8: bool = True) -> ort.SessionOptions:
    """Single-threaded runs, every graph optimisation, and (unless `exact_int8` is False: the
    benchmarks' comparison only) the exact int8 kernel explained below."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # int8 graphs: x86 CPUs without VNNI (AVX2 only, e.g. AMD EPYC Milan) run U8S8 products in a
    # 16-bit saturating kernel by default, which moved the shipped ensemble's melanoma risks by up
    # to 0.25 (a median 0.02) and flagged 84% instead of 59% of benign HAM10000 images. The exact
    # U8U8 kernel gives every CPU the numbers the bundle was validated with; a no-op with VNNI.
    options.add_session_config_entry("session.x64quantprecision", "1" if exact_int8 else "0")
    return options


class ParallelSession:
    """The model at `path` (its static-padding form when that applies) behind one ONNX
    Runtime session whose runs are single-threaded, `streams` of them at a time on a small
    pool shared by every caller (pipelined batches, concurrent API requests), so the cores
    stay busy without ever waiting on each other."""

    def __init__(self, path: Path | str, streams: int | None = None, rows: int | None = None, exact_int8: bool = True):
        path = Path(path)
        self.streams = streams or default_streams()
        self.rows = rows or rows_per_run()
        self.session = _inference_session(path, session_options(exact_int8))
        self._pool = ThreadPoolExecutor(self.streams, thread_name_prefix="onnx-run")

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, outputs: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """`InferenceSession.run(outputs, feeds)` (None: every output) with the rows (every
        input shares the batch axis) split into runs spread over the streams; outputs
        concatenated in order: the numbers of one run over all the rows."""
        total = len(next(iter(feeds.values())))
        rows = max(1, min(self.rows, math.ceil(total / self.streams)))
        runs = [
            self._pool.submit(self.session.run, outputs, {name: value[start : start + rows] for name, value in feeds.items()})
            for start in range(0, max(total, 1), rows)
        ]
        parts = [run.result() for run in runs]
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([part[j] for part in parts]) for j in range(len(parts[0]))]


def _inference_session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    model = optimised_model_path(path)
    if model != path:
        try:
            return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception:  # a cache entry pruned or damaged meanwhile: the original graph still works
            pass
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cache_root() -> Path:
    return default_cache_dir() / "onnx"


def optimised_model_path(path: Path) -> Path:
    """`path`, or its cached static-padding form. Falls back to `path` itself when the
    graph has nothing to fold, `onnx` is not installed, or the cache is not writable."""
    try:
        data = path.read_bytes()
    except OSError:
        return path  # let ONNX Runtime report the missing file
    digest = hashlib.sha256(data).hexdigest()[:32]
    root = _cache_root()
    cached, plain_marker = root / f"{digest}.v{FOLD_VERSION}.onnx", root / f"{digest}.v{FOLD_VERSION}.unchanged"
    if cached.exists():
        return cached
    if plain_marker.exists():
        return path
    try:
        folded = static_padding_model(data)
    except ImportError:
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
        if folded is None:
            plain_marker.touch()
            return path
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(folded)
        tmp.replace(cached)
        _prune_cache(root)
        return cached
    except OSError:
        if folded is None:
            return path
        fallback = Path(os.environ.get("TMPDIR", "/tmp")) / f"dermsight-{digest}.v{FOLD_VERSION}.onnx"
        try:
            fallback.write_bytes(folded)
            return fallback
        except OSError:
            return path


CACHE_KEEP = 16  # folded graphs kept (newest first): every retrained bundle adds one


def _prune_cache(root: Path) -> None:
    entries = sorted(root.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[CACHE_KEEP:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".unchanged").unlink(missing_ok=True)
