"""Rewrites of an exported ONNX graph that keep its function: the static-padding fold.

Models exported from timm's TensorFlow-style EfficientNets compute their "same" padding at
run time (Shape -> Ceil -> Pad on every stride-2 conv). The padding only depends on the fixed
image size, so it can be folded into constants: ONNX Runtime then fuses each Pad into its Conv
(``dermsight.inference.onnx_session`` serves the folded graph), and int8 quantization
(:mod:`dermsight.models.quantize`) folds before it calibrates.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


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
