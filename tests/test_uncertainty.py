"""The ensemble's uncertainty: the members' spread, called unsure above the bundle's fitted level."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import DEFAULT_BUNDLE, load_bundle


@pytest.fixture(scope="module")
def records(isic2020):
    """60 real ISIC 2020 images with their metadata (test_128: melanomas and benign lesions)."""
    frame = isic2020.records
    frame = frame[frame["image_ref"].str.contains("test_128", na=False)]
    return frame.sort_values("image_id").head(60).reset_index(drop=True)


def test_unsure_is_the_spread_above_the_fitted_level(records):
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert bundle.unsure_level is not None and "bench/uncertainty.py" in bundle.uncertainty["method"]
    table, errors = Predictor(bundle).predict_records(records, progress=False)
    assert not errors and len(table) == len(records)
    assert table.columns.get_loc("unsure") == table.columns.get_loc("risk_spread") + 1
    np.testing.assert_array_equal(table["unsure"], table["risk_spread"] > bundle.unsure_level)
    assert 0 < table["unsure"].sum() < len(table)  # the level separates real images, it does not flag all or none


def test_a_bundle_without_a_level_reports_its_spread_but_calls_nothing_unsure(records, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, copy, ignore=shutil.ignore_patterns("out_of_fold.csv.gz"))
    config = json.loads((copy / "bundle.json").read_text())
    del config["uncertainty"]
    (copy / "bundle.json").write_text(json.dumps(config))
    table, _ = Predictor(copy).predict_records(records.head(8), progress=False)
    assert "risk_spread" in table.columns and "unsure" not in table.columns
