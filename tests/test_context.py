"""Patient context ("ugly duckling") features: pure function and on real multi-image patients."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermsight.data.sources import read_source
from dermsight.inference.context import CONTEXT_COLUMNS, RELATIVE_COLUMNS, patient_context, relative_features
from dermsight.inference.predictor import Predictor


def test_the_odd_lesion_out_gets_the_highest_distance_and_score():
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    embeddings = np.stack([base + 0.05 * rng.normal(size=64) for _ in range(5)] + [rng.normal(size=64)])
    risk = np.array([0.05, 0.04, 0.06, 0.05, 0.03, 0.40])
    context = patient_context(pd.Series(["p"] * 6), embeddings, risk)
    assert context["embedding_distance"].idxmax() == 5
    assert context["ugly_duckling_score"].idxmax() == 5
    assert context["risk_rank"].tolist() == [3.0, 5.0, 2.0, 3.0, 6.0, 1.0]
    assert context["distance_z"].mean() == pytest.approx(0.0, abs=1e-9)
    assert (context["patient_lesions"] == 6).all()


def _expected_context(embeddings: np.ndarray, risk: np.ndarray) -> dict[str, list[float]]:
    """The context of one patient's rows, written out lesion by lesion with numpy."""
    k = len(risk)
    distance, rank = [], []
    for i in range(k):
        others = np.delete(embeddings, i, axis=0)
        mean = (others / np.linalg.norm(others, axis=1, keepdims=True)).mean(axis=0)
        distance.append(1.0 - embeddings[i] @ mean / (np.linalg.norm(embeddings[i]) * np.linalg.norm(mean)))
        rank.append(1.0 + sum(r > risk[i] for r in risk))  # ties share the best rank
    logit = np.log(risk / (1 - risk))
    distance_z = (np.array(distance) - np.mean(distance)) / np.std(distance)
    risk_z = (logit - logit.mean()) / logit.std()
    return {"patient_lesions": [float(k)] * k, "embedding_distance": distance, "distance_z": list(distance_z),
            "risk_rank": rank, "risk_z": list(risk_z), "ugly_duckling_score": list((distance_z + risk_z) / 2)}


def test_context_by_value_on_a_hand_made_patient():
    """Two patients interleaved, one unknown row: every column, row by row, against the
    definitions computed independently (cosine distance to the mean of the others,
    z-scores within the patient, ranks with ties, the mean of the two z-scores)."""
    embeddings = np.array([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 1.0],
                           [2.0, 2.0, 0.0], [0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])
    risk = np.array([0.10, 0.30, 0.10, 0.80, 0.20, 0.05, 0.60, 0.50])
    patients = pd.Series(["a", "b", "a", "a", "b", "b", "a", None])
    context = patient_context(patients, embeddings, risk)
    assert list(context.columns) == list(CONTEXT_COLUMNS)
    for patient in ("a", "b"):
        rows = np.flatnonzero(patients == patient)
        expected = _expected_context(embeddings[rows], risk[rows])
        for column in CONTEXT_COLUMNS:
            assert context.loc[rows, column].tolist() == pytest.approx(expected[column], abs=1e-12), (patient, column)
    # Patient a, by hand: risks 0.10, 0.10, 0.80, 0.60 rank 3, 3, 1, 2; lesion 3 ([0, 2, 0]) is the odd one out.
    a = np.flatnonzero(patients == "a")
    assert context.loc[a, "risk_rank"].tolist() == [3.0, 3.0, 1.0, 2.0]
    assert context.loc[a, "embedding_distance"].idxmax() == 3 and context.loc[a, "ugly_duckling_score"].idxmax() == 3
    assert context.loc[7, "patient_lesions"] == 1 and context.loc[7, "risk_rank"] == 1
    assert context.loc[7, ["embedding_distance", "distance_z", "risk_z", "ugly_duckling_score"]].isna().all()


def test_single_lesion_and_unknown_patients_fall_back_cleanly():
    embeddings = np.eye(3)
    context = patient_context(pd.Series(["a", None, "b"]), embeddings, np.array([0.2, 0.5, 0.9]))
    assert context["patient_lesions"].tolist() == [1.0, 1.0, 1.0]
    assert context["risk_rank"].tolist() == [1.0, 1.0, 1.0]
    assert context[["embedding_distance", "distance_z", "risk_z", "ugly_duckling_score"]].isna().all().all()


def test_relative_features_by_value_on_hand_made_patients():
    """Patient a: four lesions, two at one site, lesion 3 the odd one out; patient b alone;
    an unknown patient counts as alone. Percentiles, ratios and distances by hand."""
    embeddings = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [1.0, 0.05, 0.0], [0.0, 1.0, 1.0], [0.3, 0.3, 0.3], [1.0, 1.0, 0.0]])
    risk = np.array([0.10, 0.20, 0.10, 0.60, 0.50, 0.30])
    patients = pd.Series(["a", "a", "a", "a", "b", None])
    sites = pd.Series(["back", "back", "face", None, "back", "back"])
    axes = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    features = relative_features(patients, sites, risk, embeddings, axes)
    assert set(RELATIVE_COLUMNS) <= set(features.columns) and len(features) == 6
    assert features["risk_percentile"].tolist()[:4] == pytest.approx([1 / 6, 2 / 3, 1 / 6, 1.0])  # ranks 1.5, 3, 1.5, 4 of 4
    assert features["risk_percentile_site"].tolist()[:4] == pytest.approx([0.0, 1.0, 0.5, 0.5])  # back: 2 lesions; face, none: alone
    assert features["log_risk_ratio"].tolist()[:4] == pytest.approx(list(np.log(risk[:4] / 0.25)))
    unit = embeddings[:4] / np.linalg.norm(embeddings[:4], axis=1, keepdims=True)
    centre = unit.mean(axis=0)
    distance = 1 - unit @ centre / np.linalg.norm(centre)
    assert features["mean_distance"].tolist()[:4] == pytest.approx(list(distance))
    assert features["distance_ratio"].tolist()[:4] == pytest.approx(list(distance / distance.mean()))
    assert features["log_outlier_factor"].idxmax() == 3 and features.loc[3, "log_outlier_factor"] > 0.5
    assert features["axis1_percentile"].tolist()[:4] == pytest.approx([1.0, 1 / 3, 2 / 3, 0.0])  # x of the unit vectors
    assert features.loc[3, "feature_extremity"] == pytest.approx(1.0)  # lowest on x, highest on z
    for alone in (4, 5):  # b, and the unknown patient: neutral
        assert features.loc[alone, ["risk_percentile", "risk_percentile_site", "axis1_percentile"]].tolist() == [0.5] * 3
        assert features.loc[alone, ["log_risk_ratio", "mean_distance", "log_outlier_factor", "feature_extremity"]].tolist() == pytest.approx([0.0] * 4)
        assert features.loc[alone, "distance_ratio"] == 1.0


def test_a_two_image_patient_after_a_lone_one_with_risks_at_zero_and_one():
    """A lone lesion first must not stop the patients after it; two images are enough for
    context; risks of exactly 0 and 1 give finite logits (clipped), and equal distances a
    z-score of 0, not NaN. By hand: the pair's distances are 1 and 1 (orthogonal embeddings),
    its logits -/+13.8, so risk_z -1 / +1 and the score -0.5 / +0.5."""
    ids = pd.Series(["alone", "pair", "pair"])  # patients are taken in id order: "alone" first
    context = patient_context(ids, np.eye(3), np.array([0.3, 0.0, 1.0]))
    assert context["patient_lesions"].tolist() == [1.0, 2.0, 2.0]
    pair = context.loc[[1, 2]]
    np.testing.assert_allclose(pair["embedding_distance"], [1.0, 1.0])
    np.testing.assert_allclose(pair["distance_z"], [0.0, 0.0])
    np.testing.assert_allclose(pair["risk_z"], [-1.0, 1.0])
    np.testing.assert_allclose(pair["ugly_duckling_score"], [-0.5, 0.5])
    assert pair["risk_rank"].tolist() == [2.0, 1.0]


@pytest.fixture(scope="module")
def test_128_patients(shared):
    records = read_source(f"isic2020:{shared / 'isic2020' / 'test_128.csv'}").records
    counts = records["patient_id"].value_counts()
    chosen = counts[(counts >= 4) & (counts <= 12)].index[:3]
    return records[records["patient_id"].isin(chosen)].reset_index(drop=True)


def test_context_on_real_multi_image_patients(trained_bundle, test_128_patients):
    table, errors = Predictor(trained_bundle).predict_records(test_128_patients, progress=False)
    assert not errors and len(table) == len(test_128_patients)
    for patient, rows in table.groupby("patient_id"):
        k = len(rows)
        assert (rows["patient_lesions"] == k).all()
        # row by row: each image's own rank and z-scores, and the score is their mean
        assert rows["risk_rank"].tolist() == rows["melanoma_risk"].rank(ascending=False, method="min").tolist()
        risk = rows["melanoma_risk"].clip(1e-6, 1 - 1e-6).to_numpy()
        logit = np.log(risk / (1 - risk))
        assert rows["risk_z"].tolist() == pytest.approx(list((logit - logit.mean()) / logit.std()), abs=1e-6)
        distance = rows["embedding_distance"].to_numpy()
        assert rows["distance_z"].tolist() == pytest.approx(list((distance - distance.mean()) / distance.std()),
                                                            abs=1e-6)
        assert rows["ugly_duckling_score"].tolist() == pytest.approx(
            list((rows["distance_z"] + rows["risk_z"]) / 2), abs=1e-12)
        top = rows.loc[rows["melanoma_risk"].idxmax()]
        assert top["risk_rank"] == 1 and top["risk_z"] == rows["risk_z"].max()
    # Real lesions of one patient differ: distances are positive and not all equal.
    assert (table["embedding_distance"] > 0).all()
    assert table.groupby("patient_id")["embedding_distance"].nunique().min() > 1
