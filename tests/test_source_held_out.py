"""Sources the model never saw: leave-one-source-out folds, held-out kinds, the per-source
report, and evaluation that never scores a training image with the network that saw it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dermsight.cli import app
from dermsight.data.dataset import build_dataset
from dermsight.evaluation.held_out import held_out_kinds, load_out_of_fold


@pytest.fixture(scope="module")
def source_folded(shared):
    specs = [shared / "isic9" / "train", shared / "isic2020" / "train_extra.csv", shared / "derm7pt", shared / "isic2017"]
    return build_dataset([str(s) for s in specs], n_folds=4, seed=0, by_source=True).records


def test_source_folds_hold_each_smaller_source_out_whole(source_folded):
    records = source_folded[source_folded["image_ref"].notna() & source_folded["diagnosis"].notna()]
    folds_of = records.groupby("source")["fold"].unique()
    largest = records["source"].value_counts().idxmax()
    assert largest == "class_folders"
    assert sorted(folds_of[largest]) == [0, 1, 2, 3]  # the largest source is split over every fold
    others = [s for s in folds_of.index if s != largest]
    assert sorted(others) == ["derm7pt", "isic2020", "isic_archive"]
    assert all(len(folds_of[s]) == 1 for s in others)  # each other source sits whole in one fold
    assert len({int(folds_of[s][0]) for s in others}) == len(others)  # ... a fold of its own
    for source in others:
        fold = int(folds_of[source][0])
        training = records[records["fold"] != fold]  # what the network that scores `source` trains on
        assert not (training["source"] == source).any()
        assert training["image_id"].isin(records.loc[records["source"] == source, "image_id"]).sum() == 0
    # no patient or lesion on both sides of any split
    assert (source_folded.groupby("group")["fold"].nunique() == 1).all()


def test_held_out_kinds_follow_how_the_bundle_trained():
    oof = pd.DataFrame({
        "image_id": ["h1", "h2", "d1", "e1"], "source": ["ham10000", "ham10000", "derm7pt", "isic2020"],
        "patient_id": [None, None, None, "P1"], "lesion_id": ["L1", "L2", "D1", None],
    })
    frame = pd.DataFrame({
        "image": ["h1", "d1", "x1", "x2", "x3"], "source": ["ham10000", "derm7pt", "isic_archive", "isic2020", "isic2020"],
        "patient_id": [None, None, None, "P9", "P1"], "lesion_id": ["L1", "D1", None, None, None],
    })
    plain = SimpleNamespace(training={"sources": ["derm7pt", "ham10000", "isic2020"], "config": {"source_folds": False}})
    folded = SimpleNamespace(training={"sources": ["derm7pt", "ham10000", "isic2020"], "config": {"source_folds": True}})
    assert held_out_kinds(plain, frame, oof).tolist() == [
        "grouped_cv", "grouped_cv", "external_source", "unseen_images", "seen_patient",
    ]
    assert held_out_kinds(folded, frame, oof).tolist() == [
        "grouped_cv", "left_out_source", "external_source", "unseen_images", "seen_patient",
    ]


def test_evaluate_reports_every_source_and_never_scores_training_images_in_sample(shared, trained_bundle, tmp_path):
    from dermsight.models.bundle import load_bundle

    bundle = load_bundle(trained_bundle)
    oof = load_out_of_fold(bundle).set_index("image_id")
    # Derm7pt and a HAM10000 slice: the HAM images are in the bundle's training data
    ham_slice = tmp_path / "ham"
    ham_slice.mkdir()
    meta = pd.read_csv(shared / "ham10000" / "HAM10000_metadata.csv")
    trained_ham = meta[meta["image_id"].isin(oof.index)]
    pick = pd.concat([trained_ham[trained_ham.dx == "mel"].head(40), trained_ham[trained_ham.dx != "mel"].head(160)])
    pick.to_csv(ham_slice / "HAM10000_metadata.csv", index=False)
    (ham_slice / "images").symlink_to(shared / "ham10000" / "images")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["evaluate", "--model", str(trained_bundle), str(shared / "derm7pt"), str(ham_slice),
                                      "-o", str(out), "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {r["source"]: r for r in report["per_source"]}
    assert rows["derm7pt"]["held_out"] in ("external_source", "left_out_source")
    assert rows["derm7pt"]["images"] == 616 and rows["derm7pt"]["melanomas"] == 151
    assert rows["ham10000"]["held_out"] == "grouped_cv" and rows["ham10000"]["images"] == len(pick)
    assert report["per_source"][0]["source"] == "derm7pt"  # never-seen sources lead
    predictions = pd.read_csv(out / "predictions.csv").set_index("image")
    in_training = predictions.index.intersection(oof.index)
    assert len(in_training) >= len(pick)
    np.testing.assert_allclose(predictions.loc[in_training, "MEL"], oof.loc[in_training, "MEL"], atol=1e-6)
    html = (out / "report.html").read_text()
    assert "Sources the model never saw" in html and html.index("Derm7pt") < html.index("All evaluated images, pooled")
