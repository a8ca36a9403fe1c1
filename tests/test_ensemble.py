"""The fold-network ensemble as one graph: averaged logits, member outputs, the spread as an
uncertainty in the prediction table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pandas as pd
import pytest
from onnx import numpy_helper

from dermsight.inference.onnx_session import ParallelSession
from dermsight.inference.predictor import Predictor
from dermsight.models.ensemble import merge_member_graphs

MEL_SHIFT = 1.5


@pytest.fixture(scope="module")
def ensemble_bundle(tiny_bundle, tmp_path_factory):
    """tiny_bundle's graph and a copy whose melanoma logit is MEL_SHIFT higher, as a 2-member bundle."""
    folder = tmp_path_factory.mktemp("ensemble") / "bundle"
    shutil.copytree(tiny_bundle, folder, ignore=shutil.ignore_patterns("ood_gate.npz", "weights.pt"))
    config = json.loads((folder / "bundle.json").read_text())
    second = onnx.load(str(tiny_bundle / "model.onnx"))
    bias = next(i for i in second.graph.initializer if i.name == "head.bias")
    values = numpy_helper.to_array(bias).copy()
    values[config["classes"].index("MEL")] += MEL_SHIFT
    bias.CopyFrom(numpy_helper.from_array(values, "head.bias"))
    onnx.save(second, str(folder / "second.onnx"))
    merge_member_graphs([tiny_bundle / "model.onnx", folder / "second.onnx"], folder / "model.onnx")
    (folder / "second.onnx").unlink()
    config["training"]["members"] = 2
    (folder / "bundle.json").write_text(json.dumps(config))
    return folder


def test_ensemble_graph_averages_its_members(tiny_bundle, ensemble_bundle, lesion_images):
    config = json.loads((ensemble_bundle / "bundle.json").read_text())
    mel, size = config["classes"].index("MEL"), config["preprocessing"]["size"]
    rng = np.random.default_rng(0)
    feeds = {"image": rng.normal(size=(3, 3, size, size)).astype(np.float32),
             "metadata": np.zeros((3, len(config["metadata_features"])), np.float32)}
    single = ParallelSession(tiny_bundle / "model.onnx").run(None, feeds)
    merged = dict(zip(["logits", "embedding", "cam", "gate_features", "member_logits", "member_embeddings"],
                      ParallelSession(ensemble_bundle / "model.onnx").run(
                          ["logits", "embedding", "cam", "gate_features", "member_logits", "member_embeddings"], feeds)))
    np.testing.assert_allclose(merged["member_logits"][:, 0], single[0], atol=1e-5)
    shift = np.zeros(single[0].shape[1], np.float32)
    shift[mel] = MEL_SHIFT
    np.testing.assert_allclose(merged["member_logits"][:, 1], single[0] + shift, atol=1e-5)
    np.testing.assert_allclose(merged["logits"], single[0] + shift / 2, atol=1e-5)
    np.testing.assert_allclose(merged["cam"], single[2], atol=1e-5)  # the shift is in the bias, not the map
    assert merged["gate_features"].shape[1] == 2 * single[3].shape[1]
    unit = single[1] / np.linalg.norm(single[1], axis=1, keepdims=True)
    np.testing.assert_allclose(merged["embedding"], np.concatenate([unit, unit], axis=1) / np.sqrt(2), atol=1e-5)


def test_predictor_reports_the_members_spread(ensemble_bundle, tiny_bundle, lesion_images):
    images = [p.read_bytes() for p in lesion_images]
    meta = pd.DataFrame({"age": [50.0] * len(images), "patient_id": ["P1"] * len(images)})
    table, scores, _ = Predictor(ensemble_bundle).predict_images(images, meta)
    single_table, single, _ = Predictor(tiny_bundle).predict_images(images, meta)
    assert scores.member_probabilities.shape == (len(images), 2, scores.probabilities.shape[1])
    mel = Predictor(ensemble_bundle).classes.index("MEL")
    members = scores.member_probabilities[:, :, mel]
    assert (members[:, 1] > members[:, 0]).all()  # the second member's melanoma logit is higher
    np.testing.assert_allclose(members[:, 0], single.probabilities[:, mel], atol=1e-5)
    np.testing.assert_allclose(table["risk_spread"], members.std(axis=1), atol=1e-6)
    assert "risk_spread" not in single_table.columns and single.member_probabilities.shape[1] == 1
