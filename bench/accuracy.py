"""Accuracy of bundles from their grouped out-of-fold predictions, per source dataset.

    python bench/accuracy.py bundles/default [runs/other-bundle ...]

Prints JSON: for each bundle, HAM10000 7-class balanced accuracy and melanoma AUC
(lesion-grouped folds; the 7 HAM classes: HAM's "akiec" holds actinic keratoses and
intraepithelial carcinoma, so its truth is AK or SCC and its probability P(AK) + P(SCC)), the
9-class teaching set's balanced accuracy over its 8 ISIC codes (its two keratosis
folders are both BKL), and the pooled figures. No images are read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from dermsight.data import readers
from dermsight.models.bundle import load_bundle

DATA = Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))

HAM_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"]


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


def bundle_accuracy(path: Path) -> dict:
    bundle = load_bundle(path)
    oof = pd.read_csv(bundle.path / "out_of_fold.csv.gz")
    ham = oof[oof["source"] == "ham10000"]
    teaching = oof[oof["source"] == "class_folders"]
    present = [c for c in bundle.classes if c != "UNK"]
    return {
        "bundle": bundle.name,
        "mode": bundle.training.get("config", {}).get("mode"),
        "validation": bundle.metrics.get("validation"),
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
        "pooled": {
            "images": int(len(oof)),
            "balanced_accuracy": bundle.metrics["pooled"]["multiclass"]["balanced_accuracy"],
            "melanoma_auc": bundle.metrics["pooled"]["melanoma"]["auc"]["value"],
            "fold_summary": bundle.metrics.get("fold_summary"),
        },
        "training_seconds": bundle.training.get("duration_seconds"),
    }


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or [Path("bundles/default")]
    print(json.dumps([bundle_accuracy(p) for p in paths], indent=1))
