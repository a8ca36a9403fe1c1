"""Evaluate a model bundle: a prediction table (the `dermsight predict` CSV layout) against
labelled truth records, or the bundle's own cross-validation, into everything the evaluation
report shows.

The steps have a module each: joining predictions with the truth and accounting for every row
left out (`join`), the metrics of the joined frame (`joined_metrics`, using `metrics`), the
threshold verdict (`verdicts`) and the JSON-ready result (`results`); `dermsight.evaluation.report`
renders it as report.json and a self-contained report.html.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from dermsight.data.schema import CLASSES, DIAGNOSES, Problem
from dermsight.evaluation.held_out import (
    HeldOutError,
    held_out_kinds,
    load_out_of_fold,
    out_of_fold_predictions,
)
from dermsight.evaluation.join import EXAMPLES, EvaluationError, join_predictions
from dermsight.evaluation.joined_metrics import compute_metrics
from dermsight.evaluation.metrics import multiclass_summary
from dermsight.evaluation.results import evaluation_result
from dermsight.inference.prediction_files import write_predictions
from dermsight.inference.predictor import Predictor
from dermsight.inference.score_cache import open_score_cache
from dermsight.models.bundle import Bundle


def evaluate_predictions(
    predictions: pd.DataFrame,
    truth: pd.DataFrame,
    bundle: Bundle,
    *,
    unscored: Mapping[str, str] | None = None,
    reading_problems: Sequence[Problem] = (),
    n_boot: int = 1000,
    seed: int = 0,
    min_count: int = 30,
    min_positives: int = 5,
) -> dict:
    """Evaluate a prediction table against truth records, at the bundle's threshold.

    `predictions`: the `dermsight predict` layout (image or image_id, one probability column per
    class, melanoma_risk optional; above_threshold/looks_dermoscopic used when present).
    `truth`: schema records (image_id, diagnosis, and where known patient_id, lesion_id, age,
    sex, site, source, image_ref). `unscored`: {image_id: error} of images the Predictor could
    not read; `reading_problems`: what the readers skipped, both only counted in "ignored".

    Returns a JSON-ready dict: kind, mode, created, bundle, data, ignored, warnings, official
    (ISIC scorer; UNK rows one-hot all zero), melanoma (binary_summary at the bundle threshold,
    cluster bootstrap by patient/lesion group), multiclass (multiclass_summary + a bootstrap
    interval of balanced accuracy), threshold_check, calibration, subgroups (sex, age band,
    site, source; too_small flags), curves (ROC, PR, operating point), worst_false_negatives.
    Raises EvaluationError when nothing usable is left or a required column is missing.
    """
    frame, ignored, warnings = join_predictions(predictions, truth, bundle, unscored)
    frame = _with_held_out(frame, bundle, ignored)
    skipped = [p for p in reading_problems if p.skipped]
    ignored["while_reading"] = {
        kind: sum(p.kind == kind for p in skipped) for kind in sorted({p.kind for p in skipped})
    }
    metrics = compute_metrics(frame, bundle, n_boot=n_boot, seed=seed, min_count=min_count, min_positives=min_positives)
    return evaluation_result("external", bundle, ignored, warnings, metrics)


def evaluate_cv(
    bundle: Bundle,
    *,
    image_refs: Mapping[str, str] | None = None,
    only_images: set[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_count: int = 30,
    min_positives: int = 5,
) -> dict:
    """The bundle's grouped cross-validation, from its out_of_fold.csv.gz: everything
    `evaluate_predictions` reports, plus per-fold melanoma AUC and balanced accuracy with their
    mean and sd over folds (population sd, as in bundle.json). The threshold and temperature
    were fitted on these same predictions, so the threshold check holds by construction.
    `image_refs` ({image_id: path}) serves the false-negative thumbnails; `only_images`
    restricts the report to those images (e.g. HAM10000's share of a multi-source CV)."""
    path = bundle.path / "out_of_fold.csv.gz"
    try:
        oof = load_out_of_fold(bundle)
    except HeldOutError as err:
        raise EvaluationError(str(err)) from None
    needed = ["image_id", "diagnosis", "fold", *[c for c in bundle.classes if c in CLASSES]]
    missing = [c for c in needed if c not in oof.columns]
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {', '.join(missing)}")
    if only_images is not None:
        oof = oof[oof["image_id"].isin(only_images)]
        if oof.empty:
            raise EvaluationError(f"none of the given images is in {path}: they were not part of this bundle's training data")
    truth = oof.drop(columns=[c for c in DIAGNOSES if c in oof.columns])
    if image_refs:
        truth["image_ref"] = truth["image_id"].map(image_refs)
    predictions = oof[["image_id", *[c for c in bundle.classes if c in CLASSES]]]
    frame, ignored, warnings = join_predictions(predictions, truth, bundle)
    frame = _with_held_out(frame, bundle, ignored, oof)
    ignored["while_reading"] = {}
    metrics = compute_metrics(frame, bundle, n_boot=n_boot, seed=seed, min_count=min_count, min_positives=min_positives)

    per_fold = _per_fold(frame, metrics["data"]["classes"])
    summary = {}
    for key in ("melanoma_auc", "balanced_accuracy"):
        values = [f[key] for f in per_fold if f[key] is not None]
        summary[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values)), "folds": len(values)} if values else None
    cross_validation = {
        "source": str(path),
        "validation": bundle.metrics.get("validation", "out-of-fold, patient/lesion-grouped"),
        "folds": len(per_fold),
        "per_fold": per_fold,
        "fold_summary": summary,
        "note": "the threshold and the temperature were fitted on these out-of-fold predictions",
    }
    return evaluation_result("cross-validation", bundle, ignored, warnings, metrics, cross_validation=cross_validation)


def _per_fold(frame: pd.DataFrame, classes: list[str]) -> list[dict]:
    """Melanoma AUC and balanced accuracy of each fold (None where undefined)."""
    per_fold = []
    for fold, rows in frame.groupby("fold", sort=True):
        y = rows["melanoma"].to_numpy()
        labelled = rows[rows["diagnosis"].isin(classes)]
        entry = {
            "fold": int(fold),
            "images": int(len(rows)),
            "melanomas": int(y.sum()),
            "melanoma_auc": roc_auc_score(y, rows["melanoma_risk"]) if 0 < y.sum() < len(y) else None,
            "balanced_accuracy": multiclass_summary(labelled["diagnosis"], labelled[classes], classes)["balanced_accuracy"]
            if len(labelled)
            else None,
        }
        per_fold.append(entry)
    return per_fold


def _with_held_out(frame: pd.DataFrame, bundle: Bundle, ignored: dict, oof: pd.DataFrame | None = None) -> pd.DataFrame:
    """`frame` with a `held_out` kind per row (see dermsight.evaluation.held_out); rows whose
    patient or lesion the bundle trained on are left out of every figure and counted."""
    if oof is None:
        try:
            oof = load_out_of_fold(bundle)
        except HeldOutError:
            oof = pd.DataFrame(columns=["image_id", "source", "patient_id", "lesion_id"])
    # An image the bundle trained on belongs to the source it was trained as (a copy in two sources is
    # filed under the first one read, which depends on the order the sources are given in).
    trained_as = oof.set_index("image_id")["source"]
    frame = frame.assign(source=frame["image"].map(trained_as).fillna(frame["source"]))
    frame = frame.assign(held_out=held_out_kinds(bundle, frame, oof))
    seen = frame["held_out"] == "seen_patient"
    if seen.any():
        ignored["seen_in_training"] = {
            "rows": int(seen.sum()),
            "description": "images of a patient or lesion the bundle trained on: not a held-out prediction",
            "examples": frame.loc[seen, "image"].head(EXAMPLES).tolist(),
        }
    return frame[~seen].reset_index(drop=True)


@dataclass(frozen=True)
class LabelledScores:
    """Predictions for labelled records (`score_labelled`): the table, {image_id: error} of the
    unreadable images, how many images took their out-of-fold prediction, where the table went."""

    table: pd.DataFrame
    unscored: dict[str, str]
    out_of_fold: int
    path: Path


def score_labelled(
    bundle: Bundle, records: pd.DataFrame, *, batch_size: int, output: Path, warn: Callable[[str], None]
) -> LabelledScores:
    """Predictions for the labelled records with an image: an image the bundle trained on takes
    its out-of-fold prediction (from a network that never saw it; the shipped one did), every
    other image is scored by the Predictor (with the score cache; `warn` hears when it is
    unavailable). The table is also saved as OUTPUT/predictions.csv (the `predict` layout) for
    re-evaluation with --predictions."""
    labelled = records[records["image_ref"].notna() & records["diagnosis"].notna()].reset_index(drop=True)
    if labelled.empty:
        raise EvaluationError("DATA holds no labelled record with an image file to score")
    try:
        oof = load_out_of_fold(bundle)
    except HeldOutError:
        oof = pd.DataFrame(columns=["image_id", *bundle.classes])
    trained = labelled["image_id"].isin(set(oof["image_id"]))
    parts, unscored = [], {}
    if trained.any():
        parts.append(out_of_fold_predictions(bundle, oof[oof["image_id"].isin(set(labelled["image_id"]))].reset_index(drop=True)))
    if not trained.all():
        predictor = Predictor(bundle)
        table, unscored = predictor.predict_records(labelled[~trained], batch_size=batch_size, cache=open_score_cache(bundle, warn))
        parts.append(table)
    table = pd.concat(parts, ignore_index=True)
    path = output / "predictions.csv"
    write_predictions(table, path)
    return LabelledScores(table, unscored, int(trained.sum()), path)
