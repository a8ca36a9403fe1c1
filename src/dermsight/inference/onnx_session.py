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
  :func:`static_padding_model`); ONNX Runtime then fuses each Pad into its Conv and keeps
  the whole backbone in the blocked layout instead of converting back and forth around
  every Pad: the same outputs (bit for bit on the default bundle), 15-30% faster. The
  folded graph is checked against the original once and cached by
  content hash under ``$DERMSIGHT_CACHE/onnx`` (a second start skips the folding).
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

FOLD_VERSION = 1  # bump when static_padding_model changes what it writes
ROWS_PER_RUN = 8


def default_streams() -> int:
    """Runs in flight at once: one per core (``DERMSIGHT_THREADS`` overrides)."""
    return max(1, int(os.environ.get("DERMSIGHT_THREADS", os.cpu_count() or 1)))


def rows_per_run() -> int:
    """The most input rows (images x views) one single-threaded run gets."""
    return max(1, int(os.environ.get("DERMSIGHT_ORT_ROWS", ROWS_PER_RUN)))


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class ParallelSession:
    """The model at `path` (its static-padding form when that applies) behind one ONNX
    Runtime session whose runs are single-threaded, `streams` of them at a time on a small
    pool shared by every caller (pipelined batches, concurrent API requests), so the cores
    stay busy without ever waiting on each other."""

    def __init__(self, path: Path | str, streams: int | None = None, rows: int | None = None):
        path = Path(path)
        self.streams = streams or default_streams()
        self.rows = rows or rows_per_run()
        self.session = _inference_session(path)
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


def _inference_session(path: Path) -> ort.InferenceSession:
    model = optimised_model_path(path)
    options = session_options()
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


def static_padding_model(data: bytes) -> bytes | None:
    """The serialized model with every run-time-computed Pad amount replaced by a constant,
    or None when there is nothing to fold. Folding happens only when the graph's inputs are
    static apart from the batch dimension, and the amounts are checked to be the same at
    two batch sizes; the folded graph's outputs are compared with the original's before it
    is used. Needs the `onnx` package (ImportError otherwise)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    pads = [n for n in graph.node if n.op_type == "Pad" and len(n.input) > 1 and n.input[1] not in constants]
    if not pads:
        return None
    initializers = {t.name for t in graph.initializer}
    feeds_shapes = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims[1:]):
            return None  # a free spatial size: the padding really depends on the input
        elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds_shapes[value.name] = ([d.dim_value for d in dims[1:]], elem)

    def feeds(batch: int, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        return {name: rng.standard_normal((batch, *dims)).astype(elem) for name, (dims, elem) in feeds_shapes.items()}

    probe = onnx.load_from_string(data)
    names = [n.input[1] for n in pads]
    existing = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(names):
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = [session.run(names, feeds(batch, batch)) for batch in (1, 2)]
    if any(not np.array_equal(a, b) for a, b in zip(*values)):
        return None  # padding that changes with the batch: leave the graph alone
    for node, name, value in zip(pads, names, values[0]):
        constant = f"{name}__static"
        if constant not in {t.name for t in graph.initializer}:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), constant))
        node.input[1] = constant
    _prune(graph)
    folded = model.SerializeToString()

    check = feeds(2, 7)
    reference = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, check)
    candidate = ort.InferenceSession(folded, options, providers=["CPUExecutionProvider"]).run(None, check)
    if any(a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(reference, candidate)):
        return None
    return folded


def _prune(graph) -> None:
    """Drop nodes and initializers no graph output depends on any more."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    unused = [t for t in graph.initializer if t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
