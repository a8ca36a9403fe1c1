"""Several member networks (the fold networks of a leave-one-source-out run) as one ONNX graph.

The members' graphs are copied side by side, unchanged (their int8 weights and activation
ranges included), behind the shared inputs ``image`` and ``metadata``. The ensemble's outputs
keep the single network's names, so the Predictor, the gate and the heat maps run it as any
bundle graph:

- ``logits``: the mean of the members' logits;
- ``embedding``: the members' L2-normalised embeddings side by side, divided by sqrt(K), so a
  cosine similarity between two images is the mean of the members' similarities;
- ``cam``: the mean of the members' class activation maps;
- ``gate_features``: the members' gate features side by side (the gate's blocks repeat);
- ``member_logits`` (N, K, C) and ``member_embeddings`` (N, K, F): each member's own outputs,
  for the spread across members (an uncertainty) and for scoring an image with the member
  that never saw it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

MEMBER_OUTPUTS = ("logits", "embedding", "cam", "gate_features")


def merge_member_graphs(paths: list[Path], out_path: Path) -> None:
    """Write the ensemble graph of the member graphs at `paths` (same inputs and outputs)."""
    import onnx
    from onnx import TensorProto, compose, helper

    if len(paths) < 2:
        raise ValueError("an ensemble needs at least two member graphs")
    members = [onnx.load(str(p)) for p in paths]
    opsets = {d.domain: d.version for m in members for d in m.opset_import}
    nodes, initializers, value_info = [], [], []
    for k, model in enumerate(members):
        prefixed = compose.add_prefix(model, prefix=f"m{k}_", rename_inputs=False, rename_outputs=True)
        graph = prefixed.graph
        nodes.extend(graph.node)
        initializers.extend(graph.initializer)
        value_info.extend(graph.value_info)
    k_members = len(members)

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"ensemble_{output}", **attrs))
        return output

    axes1 = "ensemble_axes_1"
    initializers.append(helper.make_tensor(axes1, TensorProto.INT64, [1], [1]))
    initializers.append(helper.make_tensor("ensemble_scale", TensorProto.FLOAT, [], [1.0 / math.sqrt(k_members)]))
    # logits and cams: mean over members (Sum / K keeps every shape)
    initializers.append(helper.make_tensor("ensemble_inverse_k", TensorProto.FLOAT, [], [1.0 / k_members]))
    for name in ("logits", "cam"):
        total = node("Sum", [f"m{k}_{name}" for k in range(k_members)], f"ensemble_{name}_sum")
        node("Mul", [total, "ensemble_inverse_k"], name)
    # member outputs stacked on axis 1
    for name, stacked in (("logits", "member_logits"), ("embedding", "member_embeddings")):
        parts = [node("Unsqueeze", [f"m{k}_{name}", axes1], f"m{k}_{name}_axis1") for k in range(k_members)]
        node("Concat", parts, stacked, axis=1)
    normalised = [
        node("LpNormalization", [f"m{k}_embedding"], f"m{k}_embedding_unit", axis=1, p=2) for k in range(k_members)
    ]
    joined = node("Concat", normalised, "ensemble_embedding_joined", axis=1)
    node("Mul", [joined, "ensemble_scale"], "embedding")
    node("Concat", [f"m{k}_gate_features" for k in range(k_members)], "gate_features", axis=1)

    first = members[0].graph
    shapes = {o.name: o for o in first.output}
    logits, embedding, cam, gate = (_dims(shapes[name]) for name in MEMBER_OUTPUTS)
    declared = {
        "logits": logits,
        "embedding": [embedding[0], _times(embedding[1], k_members)],
        "cam": cam,
        "gate_features": [gate[0], _times(gate[1], k_members)],
        "member_logits": [logits[0], k_members, logits[1]],
        "member_embeddings": [embedding[0], k_members, embedding[1]],
    }
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in declared.items()]
    graph = helper.make_graph(nodes, "dermsight_ensemble", list(first.input), outputs, initializers, value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = members[0].ir_version
    onnx.checker.check_model(model)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out_path)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _times(dim, k: int):
    return dim * k if isinstance(dim, int) else f"{dim}_x{k}"


def member_spread(member_probabilities: np.ndarray, class_index: int) -> np.ndarray:
    """Standard deviation across members of one class's probability: (N, K, C) -> (N,)."""
    return member_probabilities[:, :, class_index].std(axis=1)
