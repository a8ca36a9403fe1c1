"""Accuracy of bundles per source, sources the model never saw first.

    python bench/accuracy.py bundles/default [runs/other-bundle ...]

Prints JSON: for each bundle, every shared source with how it was held out (see
dermsight.evaluation.held_out: a source left out of training whole, a source the bundle never
trained on, unseen patients of a training source, or grouped CV within a source), with
melanoma AUC, sensitivity/specificity at the shipped threshold, share flagged, ECE and
balanced accuracy; then HAM10000 7-class balanced accuracy and melanoma AUC (HAM's "akiec"
holds actinic keratoses and intraepithelial carcinoma, so its truth is AK or SCC and its
probability P(AK) + P(SCC)), the 9-class teaching set's balanced accuracy over its 8 ISIC
codes, and the pooled out-of-fold figures, all recomputed from the predictions. Images the
bundle trained on are scored by their out-of-fold predictions; the others by the bundle.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from dermsight.data import readers
from dermsight.data.dataset import deduplicate, load_sources
from dermsight.evaluation.evaluate import evaluate_predictions
from dermsight.evaluation.held_out import load_out_of_fold, out_of_fold_predictions
from dermsight.evaluation.metrics import multiclass_summary
from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import Bundle, load_bundle

DATA = Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))

HAM_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"]
SOURCES = ["ham10000", "isic9/train", "isic2020", "isic2019", "isic2017", "derm7pt"]
PER_SOURCE_KEYS = ("source", "name", "held_out", "images", "melanomas", "auc", "sensitivity", "specificity", "flagged",
                   "mean_risk", "melanoma_rate", "ece_melanoma", "balanced_accuracy")


def restricted_accuracy(rows: pd.DataFrame, classes: list[str], merge: dict[str, str] | None = None) -> float:
    """Balanced accuracy when predictions are restricted to `classes` (argmax over them);
    `merge` maps a code onto the class that holds it, in the truth and in the probabilities."""
    merge = merge or {}
    truth = rows["diagnosis"].replace(merge)
    probabilities = rows[classes].copy()
    for code, into in merge.items():
        if code in rows:
            probabilities[into] += rows[code]
    predicted = np.asarray(classes)[probabilities.to_numpy().argmax(axis=1)]
    return float(balanced_accuracy_score(truth, predicted))


def isic9_accuracy(oof: pd.DataFrame, classes: list[str]) -> dict | None:
    """Every image of the 9-class teaching set (most are copies of ISIC 2019 / HAM10000 images and
    sit in the table under that source), scored against the teaching set's own folder labels
    (its two keratosis folders are both BKL: 8 codes)."""
    folder = DATA / "isic9" / "train"
    if not folder.exists():
        return None
    teaching = readers.read_class_folders(folder).records[["image_id", "diagnosis"]]
    rows = oof.drop(columns="diagnosis").merge(teaching, on="image_id")
    return {"images": int(len(rows)), "of": int(len(teaching)), "balanced_accuracy_8_codes": restricted_accuracy(rows, classes)}


def per_source(bundle: Bundle, oof: pd.DataFrame, n_boot: int = 200) -> list[dict]:
    """Every shared labelled image: out-of-fold where the bundle trained on it, scored otherwise."""
    truth = deduplicate(load_sources([str(DATA / s) for s in SOURCES])).records
    truth = truth[truth["image_ref"].notna() & truth["diagnosis"].notna()].reset_index(drop=True)
    trained = truth["image_id"].isin(set(oof["image_id"]))
    tables = [out_of_fold_predictions(bundle, oof[oof["image_id"].isin(set(truth["image_id"]))].reset_index(drop=True))]
    if not trained.all():
        tables.append(Predictor(bundle).predict_records(truth[~trained], progress=False)[0])
    result = evaluate_predictions(pd.concat(tables, ignore_index=True), truth, bundle, n_boot=n_boot)
    return [{key: row.get(key) for key in PER_SOURCE_KEYS} for row in result["per_source"]]


def bundle_accuracy(path: Path) -> dict:
    bundle = load_bundle(path)
    oof = load_out_of_fold(bundle)
    ham = oof[oof["source"] == "ham10000"]
    teaching = oof[oof["source"] == "class_folders"]
    present = [c for c in bundle.classes if c != "UNK"]
    labelled = oof[oof["diagnosis"].isin(present)]
    return {
        "bundle": bundle.name,
        "mode": bundle.training.get("config", {}).get("mode"),
        "validation": bundle.metrics.get("validation"),
        "per_source": per_source(bundle, oof),
        "ham10000": {
            "images": int(len(ham)),
            "balanced_accuracy_7_class": restricted_accuracy(ham, HAM_CLASSES, {"SCC": "AK"}),
            "melanoma_auc": float(roc_auc_score(ham["diagnosis"] == "MEL", ham["MEL"])),
        },
        "isic9_only_images": {
            "images": int(len(teaching)),
            "balanced_accuracy_8_codes": restricted_accuracy(teaching, present) if len(teaching) else None,
        },
        "isic9_all_images": isic9_accuracy(oof, present),
        "pooled_out_of_fold": {
            "images": int(len(oof)),
            "balanced_accuracy": multiclass_summary(labelled["diagnosis"], labelled[present], present)["balanced_accuracy"],
            "melanoma_auc": float(roc_auc_score(oof["diagnosis"] == "MEL", oof["MEL"])),
            "fold_summary": bundle.metrics.get("fold_summary"),
        },
        "training_seconds": bundle.training.get("duration_seconds"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", type=Path, nargs="*", default=[Path("bundles/default")],
                        help="Bundle directories (default: bundles/default).")
    print(json.dumps([bundle_accuracy(p) for p in parser.parse_args().bundles], indent=1))
