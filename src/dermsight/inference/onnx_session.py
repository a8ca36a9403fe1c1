"""ONNX Runtime sessions configured for a small CPU machine.

Every setting is deliberate (bench/run.py measures them):

* ``intra_op_num_threads`` = the cores (``DERMSIGHT_THREADS`` overrides): one thread per
  core; more only time-slice against each other and against image decoding.
* ``inter_op_num_threads`` = 1 with sequential execution: the graph is a chain of convs,
  there is nothing to run side by side.
* ``ORT_ENABLE_ALL`` graph optimisation: conv + bias + activation fusion and the NCHWc
  blocked layout of MLAS (the fast x86 conv kernels).
* Thread spinning off: after each operator ONNX Runtime's idle threads would busy-wait for
  the next one, burning the core that the decode threads of `iter_batches` (and the
  API's request handling) need; on the 2-core machine spinning lost 10-20% both in batch
  scoring and in the bare forward pass. ``DERMSIGHT_ORT_SPIN=1`` turns it back on.
* Runs of 8 rows: the batch scorer feeds ONNX Runtime a few rows at a time
  (:func:`run_in_chunks`): as fast per image as batch 32 or faster, and far lighter on memory.
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
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dermsight.cache import default_cache_dir

FOLD_VERSION = 1  # bump when static_padding_model changes what it writes


def default_threads() -> int:
    return int(os.environ.get("DERMSIGHT_THREADS", os.cpu_count() or 1))


def rows_per_run() -> int:
    """How many input rows (images x views) one `session.run` gets (``DERMSIGHT_ORT_ROWS``
    overrides). Measured with bench/run.py's `ceiling.rows_sweep` on the 2-core machine:
    idle, at 144 px, 8 rows ran at 467 images/s (1: 328, 4: 437, 16: 464, 32: 455, 64: 434);
    busy, at 224 px, small runs held up best (4: 104, 8: 95, 32: 80). Eight is near the
    best in both, and resident memory grows with the run size (a bare 224 px session
    peaked at ~190 MB with 8 rows, ~780 MB with 64)."""
    return max(1, int(os.environ.get("DERMSIGHT_ORT_ROWS", ROWS_PER_RUN)))


ROWS_PER_RUN = 8


def run_in_chunks(
    session: ort.InferenceSession, outputs: list[str], feeds: dict[str, np.ndarray], rows: int | None = None
) -> list[np.ndarray]:
    """`session.run(outputs, feeds)` on consecutive slices of at most `rows` rows of every
    input (all inputs share the batch axis), outputs concatenated along it: the same
    numbers as one big run, faster and in less memory (see :func:`rows_per_run`)."""
    rows = rows or rows_per_run()
    total = len(next(iter(feeds.values())))
    if total <= rows:
        return session.run(outputs, feeds)
    parts = [session.run(outputs, {k: v[i : i + rows] for k, v in feeds.items()}) for i in range(0, total, rows)]
    return [np.concatenate([part[j] for part in parts]) for j in range(len(outputs))]


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    spin = os.environ.get("DERMSIGHT_ORT_SPIN", "0")
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin == "1" else "0")
    options.log_severity_level = 3
    return options


def create_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session on the model at `path` (its static-padding form when that applies)."""
    path = Path(path)
    model = optimised_model_path(path)
    options = session_options(threads)
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
