"""Out-of-fold predictions are out of fold: every record's logits come from a model that never
trained on its fold, in embed mode (linear heads on cached embeddings) and in finetune mode
(one network per fold). The OOD gate's held-out thresholds are tested in test_ood_gate.py."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dermsight.data.dataset import assign_folds, group_ids
from dermsight.evaluation.metrics import balanced_accuracy
from dermsight.training import embed_mode, finetune
from dermsight.training.config import TrainConfig


def shuffled_label_features(seed: int = 0, n: int = 150, width: int = 200, n_classes: int = 3):
    """(2, n, width) features of two nearly identical views and labels that have nothing to do
    with them: with more features than training rows a head fits its own rows perfectly, and
    can do no better than chance on rows it never saw."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, width)).astype(np.float32)
    features = np.stack([base, base + 0.1 * rng.standard_normal((n, width)).astype(np.float32)])
    labels = rng.permutation(np.arange(n) % n_classes)
    folds = rng.permutation(np.arange(n) % 4)
    return features, labels, folds


def test_embed_heads_score_only_rows_they_never_fitted():
    features, labels, folds = shuffled_label_features()
    config = TrainConfig(sources=[], progress=False)  # the default head (l2, class weighting, loss)
    in_sample = embed_mode.tta_logits(embed_mode.fit_head(features, labels, 3, config), features)
    assert balanced_accuracy(labels, in_sample.argmax(1), 3) > 0.95  # memorised: a leak would show
    oof = embed_mode.out_of_fold_logits(features, labels, folds, 3, config)
    assert np.abs(oof).sum(axis=1).min() > 0  # every row was scored
    assert balanced_accuracy(labels, oof.argmax(1), 3) < 0.5  # chance is 1/3


class MemorisingHead:
    """Knows the label of every row it was fitted on (row ids in feature column 0), nothing else."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, n_classes: int):
        self.n_classes = n_classes
        self.known = {int(row): int(label) for row, label in zip(features[0, :, 0], labels)}

    def logits(self, view: np.ndarray) -> np.ndarray:
        out = np.zeros((len(view), self.n_classes), np.float32)
        for i, row in enumerate(view[:, 0]):
            if int(row) in self.known:
                out[i, self.known[int(row)]] = 10.0
        return out


def test_each_embed_fold_head_fits_exactly_the_other_folds(monkeypatch):
    rng = np.random.default_rng(1)
    n, n_classes = 90, 3
    folds = rng.choice([3, 7, 11, 12], size=n)  # uneven folds with ids that are not positions
    labels = rng.integers(0, n_classes, size=n)
    features = np.concatenate([np.broadcast_to(np.arange(n, dtype=np.float32)[None, :, None], (2, n, 1)),
                               rng.standard_normal((2, n, 5)).astype(np.float32)], axis=2)
    fitted: list[set[int]] = []

    def memorising_head(train_features, train_labels, k, config):
        assert train_features.shape[0] == 2 and len(train_labels) == train_features.shape[1]
        np.testing.assert_array_equal(train_labels, labels[train_features[0, :, 0].astype(int)])  # rows, labels aligned
        fitted.append(set(train_features[0, :, 0].astype(int).tolist()))
        return MemorisingHead(train_features, train_labels, k)

    monkeypatch.setattr(embed_mode, "fit_head", memorising_head)
    oof = embed_mode.out_of_fold_logits(features, labels, folds, n_classes, TrainConfig(sources=[], progress=False))
    assert fitted == [set(np.flatnonzero(folds != fold).tolist()) for fold in sorted(set(folds))]
    leaked = np.flatnonzero(np.abs(oof).sum(axis=1) > 0)
    assert not len(leaked), f"rows {leaked.tolist()} were scored by a head fitted on them"


class MemorisingNetwork:
    """A stand-in fold network: knows the label of every image (uint8 square) it trained on."""

    def __init__(self, squares: np.ndarray, labels: np.ndarray, n_classes: int):
        self.n_classes = n_classes
        self.known = {digest(square): int(label) for square, label in zip(squares, labels)}

    def logits(self, squares: np.ndarray) -> np.ndarray:
        out = np.zeros((len(squares), self.n_classes), np.float32)
        for i, square in enumerate(squares):
            if digest(square) in self.known:
                out[i, self.known[digest(square)]] = 10.0
        return out


def digest(square: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(square).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def ham_records(ham):
    """72 real HAM10000 nevi, melanomas and keratoses in three lesion-grouped folds (several images of
    some lesions)."""
    records = ham.records[ham.records["diagnosis"].isin(["NV", "MEL", "BKL"])]
    lesions = records["lesion_id"].drop_duplicates().sample(60, random_state=0)
    chosen = records[records["lesion_id"].isin(lesions)].head(72).reset_index(drop=True)
    return assign_folds(chosen, 3, seed=0)


@pytest.mark.parametrize("int8", [False, True])
def test_finetune_fold_networks_never_train_on_the_fold_they_predict(ham_records, monkeypatch, tmp_path, int8):
    """The fold loop of finetune mode with the networks replaced by memorising stand-ins: the
    real records, decoding, fold split and out-of-fold assembly; float and int8 paths."""
    classes = sorted(ham_records["diagnosis"].unique())
    decoded: dict = {}
    calls: list[dict] = []
    real_decode = finetune.decode_all

    def decode_all(records, prep, progress):
        decoded["squares"], decoded["ok"] = real_decode(records, prep, progress)
        return decoded["squares"], decoded["ok"]

    def rows_of(squares: np.ndarray) -> set[int]:
        index = {digest(square): row for row, square in enumerate(decoded["squares"][decoded["ok"]])}
        return {index[digest(square)] for square in squares}

    def train_one_model(squares, metadata, labels, classes_, config, checkpoint, validation=None, **_):
        assert len(squares) == len(metadata) == len(labels)
        calls.append({"train": rows_of(squares), "validation": rows_of(validation[0]) if validation else None})
        return MemorisingNetwork(squares, labels, len(classes_)), 1

    monkeypatch.setattr(finetune, "decode_all", decode_all)
    monkeypatch.setattr(finetune, "train_one_model", train_one_model)
    monkeypatch.setattr(finetune, "export_onnx", lambda net, path, size: None)
    monkeypatch.setattr(finetune, "predict_logits", lambda net, squares, *_, **__: net.logits(squares))
    monkeypatch.setattr(finetune, "quantize_network", lambda net, path, squares, metadata, config: net)
    monkeypatch.setattr(finetune, "graph_logits", lambda graph, squares, *_, **__: graph.logits(squares))
    config = TrainConfig(sources=[], output=tmp_path / "ft", mode="finetune", image_size=32, folds=3, int8=int8,
                         progress=False)
    records, labels, oof, net, _ = finetune.cross_validate_and_fit(ham_records, classes, config, tmp_path / "run")

    assert len(records) == len(ham_records) and decoded["ok"].all()
    assert len({digest(square) for square in decoded["squares"]}) == len(records)  # images tell rows apart
    folds = records["fold"].to_numpy()
    assert len(calls) == 3 + 1  # a network per fold, then the refit on every image
    for fold, call in zip(sorted(set(folds)), calls):
        held_out = set(np.flatnonzero(folds == fold).tolist())
        assert call["train"] | call["validation"] == set(range(len(records))) - held_out, f"fold {fold} saw its held-out images"
        assert not call["validation"] & call["train"]  # early stopping looks at images the network did not fit
        assert call["validation"] and not call["validation"] & held_out  # ...and never at the fold it predicts
        groups = group_ids(records)
        assert not set(groups[sorted(call["validation"])]) & set(groups[sorted(call["train"])])  # no lesion on both sides
    assert calls[-1]["train"] == set(range(len(records)))
    # In sample the stand-in is perfect, so any held-out image it had seen would be scored right.
    in_sample = net.logits(decoded["squares"][decoded["ok"]])
    assert balanced_accuracy(labels, in_sample.argmax(1), len(classes)) == 1.0
    leaked = np.flatnonzero(np.abs(oof).sum(axis=1) > 0)
    assert not np.isnan(oof).any() and not len(leaked), f"{len(leaked)} images scored by a network trained on them"
