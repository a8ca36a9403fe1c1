"""The inputs a clinic really sends: the gate's photo detector on Derm7pt's clinical photos
(fitted on the train split, measured on the valid split), and a threshold that holds the
target sensitivity on every source."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermsight.data.readers import derm7pt_clinical_photos, read_ham10000
from dermsight.evaluation.calibration import choose_threshold, choose_threshold_every_source
from dermsight.inference.ood import OODGate, fit_ood_gate, fit_photo_detector
from dermsight.inference.predictor import Predictor


@pytest.fixture(scope="module")
def gate_features(tiny_bundle, shared):
    predictor = Predictor(tiny_bundle)
    ham = read_ham10000(shared / "ham10000").records.sample(400, random_state=1)
    dermoscopy, _ = predictor.gate_features(ham["image_ref"].tolist(), progress=False)
    train = derm7pt_clinical_photos(shared / "derm7pt", split="train").head(160)
    valid = derm7pt_clinical_photos(shared / "derm7pt", split="valid")
    photos_train, _ = predictor.gate_features(train["clinical_ref"].tolist(), progress=False)
    photos_valid, _ = predictor.gate_features(valid["clinical_ref"].tolist(), progress=False)
    block_sizes = Predictor(tiny_bundle).ood_gate.block_sizes
    return dermoscopy, photos_train, photos_valid, block_sizes


def test_derm7pt_splits_are_disjoint_cases(shared):
    train = derm7pt_clinical_photos(shared / "derm7pt", split="train")
    valid = derm7pt_clinical_photos(shared / "derm7pt", split="valid")
    assert set(train["image_id"]).isdisjoint(valid["image_id"])
    assert len(train) + len(valid) == len(derm7pt_clinical_photos(shared / "derm7pt"))


def test_photo_detector_refuses_held_out_clinical_photos(gate_features, tmp_path):
    dermoscopy, photos_train, photos_valid, block_sizes = gate_features
    fit_rows, test_rows = np.arange(300), np.arange(300, 400)
    folds = np.arange(300) % 3
    gate = fit_ood_gate(dermoscopy[fit_rows], block_sizes, folds)
    gate.photo = fit_photo_detector(dermoscopy[fit_rows], folds, photos_train)
    gate.save(tmp_path)
    loaded = OODGate.load(tmp_path)
    np.testing.assert_allclose(loaded.photo.probability(photos_valid), gate.photo.probability(photos_valid))
    detector = loaded.photo
    refused_photos = np.mean(detector.probability(photos_valid) > detector.threshold)  # the detector alone
    refused_dermoscopy = np.mean(detector.probability(dermoscopy[test_rows]) > detector.threshold)
    assert refused_photos >= 0.8  # clinical photos of cases it never saw
    assert refused_dermoscopy <= 0.05  # held-out dermoscopy (never in the fit) passes
    assert not loaded.accepts(photos_valid).mean() > 1 - refused_photos  # the gate refuses at least what the detector does


def test_threshold_every_source_holds_the_target_on_each_source():
    rng = np.random.default_rng(0)
    sources = np.repeat(["a", "b", "c"], [600, 400, 50])
    y = np.concatenate([rng.random(600) < 0.2, rng.random(400) < 0.3, rng.random(50) < 0.2]).astype(int)
    risk = rng.random(1050) * 0.3 + 0.5 * y
    risk[sources == "b"] -= 0.2  # a source whose risks run low (another camera)
    pooled = choose_threshold(y, risk, 0.9)
    every = choose_threshold_every_source(y, risk, sources, 0.9)
    assert every["threshold"] <= pooled["threshold"]
    assert set(every["per_source"]) == {"a", "b"}  # "c" has too few melanomas to set one
    for source in ("a", "b"):
        rows = sources == source
        assert np.mean(risk[rows & (y == 1)] >= every["threshold"]) >= 0.9
    assert np.mean(risk[(sources == "b") & (y == 1)] >= pooled["threshold"]) < 0.9  # the pooled one fails "b"
    assert pd.Series(every).get("sensitivity") >= 0.9
