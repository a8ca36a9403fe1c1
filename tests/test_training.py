"""Embed-mode training end to end on a small real subset: bundle, ONNX, cache, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermsight.evaluation.calibration import choose_threshold
from dermsight.inference.predictor import PREDICTION_COLUMNS, Predictor
from dermsight.models.bundle import load_bundle
from dermsight.models.metadata import METADATA_FEATURES, encode_metadata
from dermsight.training import embeddings as embeddings_module
from dermsight.training.config import TrainConfig
from dermsight.training.train import train


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def small_config(shared, cache_dir, tmp_path_factory):
    return TrainConfig(
        sources=[str(shared / "ham10000"), str(shared / "isic9" / "train")],
        output=tmp_path_factory.mktemp("bundles") / "small",
        max_images=300,
        folds=3,
        views=("identity",),
        cache_dir=cache_dir,
        progress=False,
    )


@pytest.fixture(scope="module")
def small_bundle(small_config):
    return train(small_config)


def test_bundle_is_complete_and_loads_without_torch_objects(small_bundle):
    bundle = load_bundle(small_bundle.path)
    for name in ("bundle.json", "model.onnx", "weights.pt", "MODEL_CARD.md", "out_of_fold.csv.gz"):
        assert (bundle.path / name).exists(), name
    assert "MEL" in bundle.classes and bundle.metadata_features == list(METADATA_FEATURES)
    assert 0.0 < bundle.melanoma_threshold < 1.0
    assert bundle.temperature > 0
    melanoma = bundle.metrics["pooled"]["melanoma"]
    # A frozen ImageNet backbone on 400 images still separates melanoma far better than chance.
    assert melanoma["auc"]["value"] > 0.65
    assert set(bundle.metrics["pooled"]["multiclass"]["per_class"]) == set(bundle.classes)
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert "not a diagnosis" in card and "HAM10000" in card and "dermsight train" in card


def test_out_of_fold_predictions_never_share_groups_across_folds(small_bundle):
    oof = pd.read_csv(small_bundle.path / "out_of_fold.csv.gz")
    assert len(oof) == small_bundle.training["n_images"]
    lesion_folds = oof.dropna(subset=["lesion_id"]).groupby("lesion_id")["fold"].nunique()
    assert (lesion_folds == 1).all()
    probabilities = oof[small_bundle.classes].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_threshold_is_the_highest_reaching_target_sensitivity_out_of_fold(small_bundle):
    """Not merely a threshold reaching 0.90 (a threshold set too low does too): the highest one,
    one melanoma's out-of-fold risk, with the sensitivity and specificity the bundle records."""
    oof = pd.read_csv(small_bundle.path / "out_of_fold.csv.gz")
    melanoma = (oof["diagnosis"] == "MEL").astype(int)
    # The CSV keeps 6 decimals, and rounding keeps the order: the same choice, rounded.
    chosen = choose_threshold(melanoma, oof["MEL"], 0.90)
    recorded = small_bundle.threshold
    assert recorded["melanoma"] == pytest.approx(chosen["threshold"], abs=5e-7)
    assert recorded["sensitivity"] == chosen["sensitivity"] >= 0.90
    assert recorded["specificity"] == pytest.approx(chosen["specificity"], abs=1 / (melanoma == 0).sum())
    above = oof.loc[(melanoma == 1) & (oof["MEL"] > chosen["threshold"]), "MEL"].min()
    assert (oof.loc[melanoma == 1, "MEL"] >= above).mean() < 0.90  # the next melanoma up misses the target


def test_onnx_graph_is_the_fitted_head(small_config, small_bundle):
    """The exported graph scores like the head `train` fitted: that head (refitted here from the
    cached embeddings, deterministically), applied in float64 to the graph's own embeddings and the
    encoded metadata, with the bundle's temperature, gives the Predictor's probabilities to 1e-4.
    A head folded in wrongly (metadata columns, bias, standardisation, temperature) cannot pass."""
    from dermsight.imaging.batches import iter_batches
    from dermsight.inference.predictor import softmax
    from dermsight.training import embed_mode
    from dermsight.training.train import load_training_records

    records, classes = load_training_records(small_config)
    features, errors = embed_mode.embed_features(records, small_config)
    keep = np.array([i not in errors for i in range(len(records))])
    records, features = records[keep].reset_index(drop=True), features[:, keep]
    labels = records["diagnosis"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    head = embed_mode.fit_head(features, labels, len(classes), small_config)

    bundle = load_bundle(small_bundle.path)
    assert bundle.classes == classes and bundle.views == ["identity"]
    predictor = Predictor(bundle)
    subset = records.iloc[:64].reset_index(drop=True)
    metadata = encode_metadata(subset, bundle.metadata_features)
    batches = list(iter_batches(subset["image_ref"].tolist(), bundle.preprocessing, 64, views=tuple(bundle.views)))
    assert [i for batch in batches for i in batch.indices] == list(range(64))
    parts = [predictor.score_views(batch.images, metadata[batch.indices]) for batch in batches]
    probabilities = np.concatenate([part.probabilities for part in parts])
    embeddings = np.concatenate([part.embeddings for part in parts])
    inputs = np.hstack([embeddings, metadata]).astype(np.float64)
    logits = inputs @ head.weight.T.astype(np.float64) + head.bias.astype(np.float64)
    expected = softmax(logits / bundle.temperature, axis=1)
    np.testing.assert_allclose(probabilities, expected, atol=1e-4, rtol=0)
    # The graph's embeddings are the backbone's that the head was fitted on (cached as float16).
    np.testing.assert_allclose(embeddings, features[0, :64, : embeddings.shape[1]], rtol=1e-2, atol=2e-3)

    table, errors = predictor.predict_records(subset, progress=False)
    assert not errors
    assert list(table.columns[: len(PREDICTION_COLUMNS)]) == list(PREDICTION_COLUMNS)
    np.testing.assert_allclose(table[classes].to_numpy(), expected, atol=1e-4, rtol=0)
    assert list(table["predicted_class"]) == [classes[k] for k in expected.argmax(axis=1)]


def test_cam_is_exact_decomposition_of_the_melanoma_logit(small_bundle, shared):
    """mean(cam) + metadata part + bias equals the melanoma logit, for one view, with metadata
    that is not all zeros (age, sex, site and a patient's image count all set)."""
    import onnxruntime as ort

    from dermsight.imaging.decode import decode_file

    bundle = load_bundle(small_bundle.path)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    image = bundle.preprocessing(decode_file(next((shared / "ham10000" / "images").glob("*.jpg"))))[None]
    patient = pd.DataFrame({"age": [55.0] * 3, "sex": ["male"] * 3, "site": ["torso"] * 3,
                            "patient_id": ["P1"] * 3, "image_id": ["a", "b", "c"]})
    metadata = encode_metadata(patient, bundle.metadata_features)[:1]
    assert np.count_nonzero(metadata) == 4
    logits, cam = session.run(["logits", "cam"], {"image": image, "metadata": metadata})
    import torch

    state = torch.load(bundle.path / "weights.pt")
    mel = bundle.classes.index("MEL")
    bias = float(state["head.bias"].float().numpy()[mel])
    metadata_weights = state["head.weight"].float().numpy()[mel, -metadata.shape[1]:]
    metadata_terms = metadata_weights * metadata[0]
    # weights.pt keeps float16: the bias and each metadata weight are off by at most half a float16
    # step (2**-11 relative); the rest is float32 rounding. The gap measured with zero metadata was
    # 1.3e-4; a wrong term would be far larger.
    tolerance = (abs(bias) + np.abs(metadata_terms).sum()) * 2**-11 + 1e-5
    assert abs(logits[0, mel] - (cam[0, mel].mean() + metadata_terms.sum() + bias)) <= tolerance


def test_melanoma_heat_map_ignores_a_shift_shared_by_every_class(small_bundle, shared, tmp_path):
    """The Predictor's melanoma map is melanoma's cam less the mean of the classes' cams (the
    centred logit the softmax reads): a head whose every class gains the same image weights gives
    the same probabilities, and must give the same map (a fitted multinomial head is centred
    already; a fine-tuned one is not)."""
    import shutil

    import torch

    from dermsight.models.network import DermSightNet, export_onnx

    shifted = tmp_path / "shifted"
    shutil.copytree(small_bundle.path, shifted)
    bundle = load_bundle(shifted)
    net = DermSightNet.from_bundle(bundle)
    with torch.no_grad():
        net.head.weight[:, : net.n_features] += torch.randn(net.n_features, generator=torch.Generator().manual_seed(0))
    export_onnx(net, bundle.onnx_path, bundle.preprocessing.size)
    images = [path.read_bytes() for path in sorted((shared / "ham10000" / "images").glob("*.jpg"))[:2]]
    metadata = pd.DataFrame({"age": [55.0, None], "sex": ["male", None], "site": ["torso", None]})
    _, original, _ = Predictor(small_bundle.path).predict_images(images, metadata)
    _, shifted_scores, _ = Predictor(shifted).predict_images(images, metadata)
    np.testing.assert_allclose(shifted_scores.probabilities, original.probabilities, atol=2e-3)
    scale = np.abs(original.melanoma_cam).max()
    np.testing.assert_allclose(shifted_scores.melanoma_cam, original.melanoma_cam, atol=0.02 * scale)


def test_missing_metadata_is_encoded_not_dropped(shared):
    frame = pd.DataFrame(
        {"age": [50.0, np.nan], "sex": ["female", None], "site": ["torso", None], "patient_id": ["p1", None], "image_id": ["a", "b"]}
    )
    encoded = pd.DataFrame(encode_metadata(frame), columns=METADATA_FEATURES)
    assert encoded.loc[0, "age_over_100"] == pytest.approx(0.5) and encoded.loc[0, "age_missing"] == 0
    assert encoded.loc[1, ["age_missing", "sex_missing", "site_missing", "patient_images_missing"]].tolist() == [1, 1, 1, 1]
    assert encoded.loc[0, "site_torso"] == 1 and encoded.loc[0, "sex_female"] == 1


def test_retraining_reuses_the_embedding_cache_and_is_deterministic(small_config, small_bundle, monkeypatch, tmp_path):
    def no_embedding(*args, **kwargs):
        raise AssertionError("a second run must not re-embed cached images")

    monkeypatch.setattr(embeddings_module, "_embed_uncached", no_embedding)
    again = train(TrainConfig(**{**small_config.__dict__, "output": tmp_path / "again"}))
    first = json.loads((small_bundle.path / "bundle.json").read_text())
    second = json.loads((again.path / "bundle.json").read_text())
    assert first["metrics"] == second["metrics"]
    assert first["threshold"] == second["threshold"]
    assert first["calibration"] == second["calibration"]


def test_binary_label_space_uses_the_same_path(small_config, tmp_path):
    bundle = train(TrainConfig(**{**small_config.__dict__, "binary": True, "output": tmp_path / "binary"}))
    assert bundle.classes == ["MEL", "UNK"]
    assert bundle.metrics["pooled"]["melanoma"]["auc"]["value"] > 0.65


def test_focal_loss_down_weights_easy_examples():
    import torch

    from dermsight.training.losses import FocalLoss, balanced_class_weights

    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])
    target = torch.tensor([0, 0])
    per_example = [FocalLoss(gamma=2.0)(logits[i : i + 1], target[i : i + 1]).item() for i in range(2)]
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert per_example[0] / ce[0].item() < 0.001  # confident and right: almost no loss
    assert per_example[1] / ce[1].item() > 0.2
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([2 / 3, 2.0, 0.0])


def test_multi_task_network_is_one_distribution_with_the_melanoma_heads_risk(shared, tmp_path):
    """--melanoma-head: the graph's melanoma probability is sigmoid(b), b the melanoma head's logit
    (melanoma minus not melanoma), the other classes share 1 - sigmoid(b) in the class head's
    proportions, the cams are the class head's (each decomposes its class logit exactly), and the
    ONNX graph says the same."""
    import onnxruntime as ort
    import torch

    from dermsight.imaging.decode import decode_file
    from dermsight.imaging.preprocess import Preprocessing
    from dermsight.models.network import DermSightNet, export_onnx

    torch.manual_seed(0)
    n_metadata, mel = len(METADATA_FEATURES), 0
    net = DermSightNet.create("efficientnet_lite0", n_metadata, 9, pretrained=False, melanoma_index=mel).eval()
    with torch.no_grad():
        net.head.weight.normal_(0, 0.05)
        net.head.bias.normal_(0, 1.0)
    prep = Preprocessing(size=64)
    files = sorted((shared / "ham10000" / "images").glob("*.jpg"))[:3]
    images = torch.from_numpy(np.stack([prep(decode_file(f)) for f in files]))
    patient = pd.DataFrame({"age": [55.0, 30.0, None], "sex": ["male", "female", None], "site": ["torso", None, "head/neck"]})
    metadata = torch.from_numpy(encode_metadata(patient, METADATA_FEATURES))
    with torch.no_grad():
        logits, _, cam, _ = net(images, metadata)
        raw, _, raw_cam, _ = net(images, metadata, raw=True)
    b = raw[:, 9] - raw[:, 10] - np.log(8)  # the balanced melanoma head on the nine classes' footing
    probabilities = logits.exp()
    np.testing.assert_allclose(probabilities.sum(dim=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities[:, mel], torch.sigmoid(b), rtol=1e-5)
    others = torch.softmax(raw[:, 1:9], dim=1) * (1 - torch.sigmoid(b))[:, None]
    np.testing.assert_allclose(probabilities[:, 1:], others, rtol=1e-4, atol=1e-7)
    weight, bias = net.head.weight.detach(), net.head.bias.detach()
    np.testing.assert_allclose(cam, raw_cam[:, :9])  # the melanoma head's maps are not shown
    metadata_part = metadata @ weight[:9, -n_metadata:].T + bias[:9]
    np.testing.assert_allclose(cam.mean(dim=(2, 3)) + metadata_part, raw[:, :9], rtol=1e-4, atol=1e-5)
    export_onnx(net, tmp_path / "net.onnx", 64)
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    graph_logits, graph_cam = session.run(["logits", "cam"], {"image": images.numpy(), "metadata": metadata.numpy()})
    np.testing.assert_allclose(graph_logits, logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(graph_cam, cam, rtol=1e-3, atol=1e-4)
    # Both heads with nothing to say (a uniform class head, a melanoma head at 1 : 1, as balanced
    # training starts out) give every class 1/9: melanoma is not favoured by the second head.
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        np.testing.assert_allclose(net(images, metadata)[0].exp(), 1 / 9, rtol=1e-5)


def test_melanoma_head_trains_on_both_targets_and_ships_one_distribution(shared, cache_dir, tmp_path):
    """A multi-task int8 run: its loss is the class head's plus the melanoma head's (each by its
    own target), the bundle is an ordinary nine-class bundle whose held-out probabilities the
    Predictor reproduces, and its float weights rebuild the multi-task network."""
    import torch

    from dermsight.models.network import DermSightNet
    from dermsight.training.losses import MelanomaHeadLoss

    logits = torch.tensor([[2.0, 0.5, -1.0, 0.3, -0.2], [0.0, 1.0, 0.3, -1.0, 1.0]])  # 3 classes + the melanoma pair
    target = torch.tensor([1, 2])  # melanoma is class 1: a melanoma, then not
    loss = MelanomaHeadLoss(torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), 3, 1)(logits, target)
    expected = torch.nn.functional.cross_entropy(logits[:, :3], target) + torch.nn.functional.cross_entropy(
        logits[:, 3:], torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected.item())

    config = TrainConfig(
        sources=[str(shared / "ham10000")], output=tmp_path / "m", mode="finetune", image_size=64, epochs=1,
        batch_size=16, folds=3, validation_folds=1, refit=False, int8=True, max_images=120, cache_dir=cache_dir,
        progress=False, melanoma_head=True, source_prior=True,
    )
    bundle = train(config)
    assert "UNK" not in bundle.classes and len(bundle.classes) >= 3 and bundle.training["config"]["melanoma_head"]
    oof = pd.read_csv(bundle.path / "out_of_fold.csv.gz", dtype={"image_id": str})
    np.testing.assert_allclose(oof[bundle.classes].sum(axis=1), 1.0, atol=1e-4)
    held_out = oof.assign(image_ref=[str(shared / "ham10000" / "images" / f"{i}.jpg") for i in oof["image_id"]])
    table, errors = Predictor(bundle.path).predict_records(held_out, progress=False)
    assert not errors
    assert np.abs(table[bundle.classes].to_numpy() - oof[bundle.classes].to_numpy()).max() < 1e-4
    assert "from a melanoma-vs-rest head beside the class head" in (bundle.path / "MODEL_CARD.md").read_text()
    net = DermSightNet.from_bundle(bundle)
    assert net.melanoma_index == bundle.classes.index("MEL") and net.head.out_features == len(bundle.classes) + 2
    with pytest.raises(ValueError, match="--melanoma-head needs --mode finetune and the ISIC classes"):
        train(TrainConfig(sources=config.sources, output=tmp_path / "b", mode="finetune", binary=True, melanoma_head=True,
                          cache_dir=cache_dir, progress=False))
    with pytest.raises(ValueError, match="--melanoma-head composes balanced heads"):
        train(TrainConfig(sources=config.sources, output=tmp_path / "u", mode="finetune", melanoma_head=True,
                          class_weighting=False, cache_dir=cache_dir, progress=False))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--mode", "finetune", "--binary", "--melanoma-head"], "--melanoma-head needs --mode finetune and the ISIC classes"),
        (["--melanoma-head"], "--melanoma-head needs --mode finetune"),
        (["--int8"], "--int8 needs --mode finetune"),
        (["--mode", "fine-tune"], "unknown mode 'fine-tune'"),
    ],
)
def test_train_refuses_options_that_cannot_go_together_with_a_clear_error(shared, tmp_path, options, message):
    """Before anything is read or written: exit 2 and one line that names the options, no traceback."""
    from typer.testing import CliRunner

    from dermsight.cli import app as cli

    result = CliRunner().invoke(cli, ["train", str(shared / "ham10000"), "-o", str(tmp_path / "b"), *options])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_finetune_mode_trains_resumes_and_exports(shared, cache_dir, tmp_path):
    config = TrainConfig(
        sources=[str(shared / "ham10000")], output=tmp_path / "ft", mode="finetune", image_size=64, epochs=1,
        batch_size=16, folds=2, max_images=96, cache_dir=cache_dir, progress=False, views=("identity",),
    )
    bundle = train(config)
    assert (Path(bundle.training["run_dir"]) / "final.pt").exists() and bundle.training["resumes"] == 0
    assert not (bundle.path / "checkpoints").exists()
    assert bundle.training["config"]["mode"] == "finetune"
    table, errors = Predictor(bundle.path).predict_records(
        pd.read_csv(bundle.path / "out_of_fold.csv.gz").head(4).assign(
            image_ref=lambda f: [str(shared / "ham10000" / "images" / f"{i}.jpg") for i in f["image_id"]]
        ),
        progress=False,
    )
    assert not errors and len(table) == 4


def test_int8_bundle_is_calibrated_on_the_graph_it_ships(shared, cache_dir, tmp_path):
    """--int8: the shipped graph is quantized, and the out-of-fold probabilities the temperature
    and threshold were fitted on are what that very graph gives on its held-out fold."""
    from dermsight.models.quantize import is_quantized

    config = TrainConfig(
        sources=[str(shared / "ham10000")], output=tmp_path / "q", mode="finetune", image_size=64, epochs=1,
        batch_size=16, folds=3, validation_folds=1, refit=False, int8=True, max_images=120, cache_dir=cache_dir,
        progress=False,
    )
    bundle = train(config)
    assert is_quantized(bundle.onnx_path) and bundle.training["config"]["int8"]
    assert "session.x64quantprecision" in (bundle.path / "MODEL_CARD.md").read_text()  # for those running model.onnx themselves
    assert bundle.onnx_path.stat().st_size < 0.4 * (Path(bundle.training["run_dir"]) / "fold0.pt").stat().st_size
    oof = pd.read_csv(bundle.path / "out_of_fold.csv.gz", dtype={"image_id": str})
    assert set(oof["fold"]) == {0}
    held_out = oof.assign(image_ref=[str(shared / "ham10000" / "images" / f"{i}.jpg") for i in oof["image_id"]])
    table, errors = Predictor(bundle.path).predict_records(held_out, progress=False)
    assert not errors
    assert np.abs(table[bundle.classes].to_numpy() - oof[bundle.classes].to_numpy()).max() < 1e-4  # float OOF: off by 0.5
    with pytest.raises(ValueError, match="--int8 needs --mode finetune"):
        train(TrainConfig(sources=config.sources, output=tmp_path / "e", int8=True, cache_dir=cache_dir, progress=False))
