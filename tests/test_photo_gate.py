"""The inputs a clinic really sends: the gate's photo detector on Derm7pt's clinical photos
(fitted on the train split, measured on the valid split) and on dermoscopy of a source it never
saw, refused rows that leave without a risk, and a threshold that holds the target sensitivity on
every source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermsight.data.readers import derm7pt_clinical_photos
from dermsight.data.schema import DIAGNOSES
from dermsight.imaging.batches import load_square
from dermsight.evaluation.calibration import choose_threshold, choose_threshold_every_source
from dermsight.inference.ood import REFUSAL, BlockGate, OODGate
from dermsight.inference.predictor import WITHHELD_COLUMNS, Predictor, no_quality, withhold_refused
from dermsight.models.bundle import load_bundle
from dermsight.training.photo_gate import (
    _logistic_regression,
    fit_photo_detector,
    gate_images,
    image_photo_features,
    photo_network,
    shared_dermoscopy,
)

# Of the valid split's photos, the share a detector fitted with 200 train-split photos refuses: 92% measured
# (the old picture statistics + trees: 65%; the shipped detector, fitted on all ~410: README, Results).
PHOTOS_REFUSED = 0.85


@pytest.fixture(scope="module")
def photo_sets(shared):
    """The photo network's features under the default bundle's preprocessing: the detector's
    training images without one whole dermoscopy source (isic2017) and with 200 Derm7pt
    train-split photos; and held out: that source, 128 px SIIM-ISIC 2020 test images, and the
    valid split's photos."""
    prep = load_bundle(None).preprocessing
    network = photo_network(prep)
    dermoscopy = shared_dermoscopy(shared, per_source=100)
    items, frame = gate_images(dermoscopy[dermoscopy["family"] != "isic2017"], [shared / "derm7pt"], max_photos=200)
    features, rows = image_photo_features(items, prep, network)
    frame = frame.iloc[rows].reset_index(drop=True)
    unseen_source = dermoscopy.loc[dermoscopy["family"] == "isic2017", "image_ref"].tolist()
    test_128 = sorted(str(p) for p in (shared / "isic2020" / "test_128").glob("*.jpg"))[:100]
    valid = derm7pt_clinical_photos(shared / "derm7pt", split="valid")["clinical_ref"].tolist()
    held_out = {name: image_photo_features(refs, prep, network)[0] for name, refs in
                (("isic2017", unseen_source), ("test_128", test_128), ("valid photos", valid))}
    return network, features, frame, held_out


def test_derm7pt_splits_are_disjoint_cases(shared):
    train = derm7pt_clinical_photos(shared / "derm7pt", split="train")
    valid = derm7pt_clinical_photos(shared / "derm7pt", split="valid")
    assert set(train["image_id"]).isdisjoint(valid["image_id"])
    assert len(train) + len(valid) == len(derm7pt_clinical_photos(shared / "derm7pt"))


def test_photo_detector_refuses_held_out_clinical_photos_and_keeps_unseen_dermoscopy(photo_sets, tmp_path):
    network, features, frame, held_out = photo_sets
    assert frame.groupby(["kind", "group"])["fold"].nunique().max() == 1  # a case and its re-takes share a fold
    detector, _ = fit_photo_detector(network, features, (frame["kind"] != "dermoscopy").to_numpy(), frame["fold"].to_numpy())
    gate = OODGate((1,), [BlockGate(np.zeros(1), np.eye(1), np.eye(1))], threshold=np.inf, photo=detector)
    gate.save(tmp_path)
    loaded = OODGate.load(tmp_path).photo
    np.testing.assert_array_equal(loaded.probability_of(held_out["valid photos"]), detector.probability_of(held_out["valid photos"]))
    refused = {name: np.mean(loaded.probability_of(x) > loaded.threshold) for name, x in held_out.items()}
    # Photos of cases it never saw (with 200 training photos; the shipped detector, all ~400: README, Results).
    assert refused["valid photos"] >= PHOTOS_REFUSED, refused
    assert refused["isic2017"] <= 0.05 and refused["test_128"] <= 0.05, refused  # a source and a size it never saw


def test_detector_applies_the_fitted_regression_to_the_network_of_the_images(photo_sets, shared):
    """numpy applies the fitted scaler and regression to the same probabilities as scikit-learn,
    and the detector's own network run on decoded images gives the features it was fitted on."""
    network, features, frame, held_out = photo_sets
    is_photo = (frame["kind"] != "dermoscopy").to_numpy()
    detector, _ = fit_photo_detector(network, features, is_photo, frame["fold"].to_numpy())
    model = _logistic_regression().fit(features, is_photo)
    x = np.concatenate(list(held_out.values()))
    np.testing.assert_allclose(detector.probability_of(x), model.predict_proba(x)[:, 1], rtol=1e-5, atol=1e-6)  # float32 input
    prep = load_bundle(None).preprocessing
    valid = derm7pt_clinical_photos(shared / "derm7pt", split="valid")["clinical_ref"].tolist()[:8]
    squares = np.stack([prep.normalise(load_square(Path(ref).read_bytes(), prep, ref, no_quality(1)[0])) for ref in valid])
    np.testing.assert_allclose(detector.probability(squares), detector.probability_of(held_out["valid photos"][:8]), atol=1e-5)


def test_refused_rows_leave_with_their_reason_and_no_risk(trained_bundle, clinical_photos, lesion_images):
    """`dermsight predict`'s table: a refused real photo keeps its row, looks_dermoscopic False and the
    reason code, and no probability, risk, class, differential or decision; accepted rows are untouched."""
    predictor = Predictor(trained_bundle)
    records = pd.DataFrame({"image_id": ["lesion", "photo"], "image_ref": [str(lesion_images[0]), str(clinical_photos[0])],
                            "patient_id": None, "age": None, "sex": None, "site": None, "patient_images": None})
    table, errors = predictor.predict_records(records, progress=False)
    assert not errors and table["looks_dermoscopic"].tolist() == [True, False]
    out = withhold_refused(table)
    assert out["refusal"].tolist() == ["", REFUSAL]
    assert list(out.columns[out.columns.get_loc("looks_dermoscopic"):][:2]) == ["looks_dermoscopic", "refusal"]
    withheld = [*DIAGNOSES, *WITHHELD_COLUMNS]
    withheld = [c for c in withheld if c in out.columns]
    assert out.loc[1, withheld].isna().all(), out.loc[1, withheld]
    pd.testing.assert_frame_equal(out.loc[[0], table.columns], table.loc[[0]], check_dtype=False)


def test_every_engine_withholds_refused_outputs(trained_bundle, clinical_photos, lesion_images):
    """Library users of the batch engines get the table as it leaves DermSight: the local engine and
    the steps Ray and Spark share (decode_rows -> RowScorer -> table_rows -> finish_table) both give
    the refused photo its reason and no model output, in the same table."""
    from engine_tables import assert_same_table

    from dermsight.inference.engine_steps import RowScorer, decode_rows, engine_rows, finish_table, table_rows
    from dermsight.inference.engines import get_engine

    records = pd.DataFrame({"image_id": ["lesion", "photo"], "image_ref": [str(lesion_images[0]), str(clinical_photos[0])],
                            "patient_id": None, "age": None, "sex": None, "site": None, "patient_images": None})
    local, errors, bundle = get_engine("local").predict(records, trained_bundle, batch_size=32, cache=False, warn=print)
    predictor = Predictor(bundle)
    decoded = decode_rows(engine_rows(records), bundle.preprocessing, tuple(bundle.metadata_features))
    shared, shared_errors = finish_table(table_rows(RowScorer(predictor)(decoded), bundle, False), False)
    withheld = [c for c in (*DIAGNOSES, *WITHHELD_COLUMNS) if c in local.columns]
    for table in (local, shared):
        assert table["refusal"].tolist() == ["", REFUSAL]
        assert table.loc[1, withheld].isna().all() and table.loc[0, withheld].notna().all()
    assert not errors and not shared_errors
    assert_same_table(shared, local)


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
