"""Patient context ("ugly duckling") features: pure function and on real multi-image patients."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dermsight.data.sources import read_source
from dermsight.inference.context import patient_context
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


def test_single_lesion_and_unknown_patients_fall_back_cleanly():
    embeddings = np.eye(3)
    context = patient_context(pd.Series(["a", None, "b"]), embeddings, np.array([0.2, 0.5, 0.9]))
    assert context["patient_lesions"].tolist() == [1.0, 1.0, 1.0]
    assert context["risk_rank"].tolist() == [1.0, 1.0, 1.0]
    assert context[["embedding_distance", "distance_z", "risk_z", "ugly_duckling_score"]].isna().all().all()


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
        assert sorted(rows["risk_rank"]) == sorted(rows["melanoma_risk"].rank(ascending=False, method="min"))
        assert rows["risk_rank"].min() == 1
        assert rows["risk_z"].mean() == pytest.approx(0.0, abs=1e-6)
        top = rows.loc[rows["melanoma_risk"].idxmax()]
        assert top["risk_rank"] == 1 and top["risk_z"] == rows["risk_z"].max()
    # Real lesions of one patient differ: distances are positive and not all equal.
    assert (table["embedding_distance"] > 0).all()
    assert table.groupby("patient_id")["embedding_distance"].nunique().min() > 1
