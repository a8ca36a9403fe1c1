"""Every metric the evaluation report shows, computed on a joined frame (`join.join_predictions`):
the official ISIC scores, melanoma detection with cluster-bootstrap intervals, the multi-class
summary, calibration, subgroups, curves and the lowest-risk melanomas. The metric functions
themselves are in `dermsight.evaluation.metrics`."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from dermsight.data.dataset import group_ids
from dermsight.data.schema import CLASS_NAMES, DIAGNOSES
from dermsight.evaluation.held_out import per_source
from dermsight.evaluation.join import DECIMALS, EvaluationError, eval_classes
from dermsight.evaluation.metrics import (
    balanced_accuracy_ci,
    binary_summary,
    multiclass_summary,
    official_scores,
    reliability_curve,
    subgroup_table,
)
from dermsight.evaluation.verdicts import threshold_check
from dermsight.models.bundle import Bundle

AGE_BANDS: tuple[str, ...] = ("<30", "30-50", "50-70", ">=70", "unknown")
SUBGROUP_COLUMNS: tuple[str, ...] = ("sex", "age_band", "site", "source")
N_WORST_FALSE_NEGATIVES = 8
MAX_CURVE_POINTS = 600


def age_band(age) -> str:
    """<30, 30-50, 50-70, >=70 or unknown."""
    if age is None or not np.isfinite(age):
        return "unknown"
    return "<30" if age < 30 else "30-50" if age < 50 else "50-70" if age < 70 else ">=70"


def compute_metrics(
    frame: pd.DataFrame,
    bundle: Bundle,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_count: int = 30,
    min_positives: int = 5,
) -> dict:
    """All metrics on a joined frame (see `join_predictions`)."""
    y = frame["melanoma"].to_numpy()
    if len(frame) == 0:
        raise EvaluationError("no prediction could be matched to a labelled truth row (see the ignored rows)")
    if y.min() == y.max():
        kind = "melanoma" if y.min() == 0 else "non-melanoma"
        raise EvaluationError(f"the {len(frame)} evaluable image(s) include no {kind}: melanoma metrics need both")
    classes = eval_classes(bundle, frame["diagnosis"])
    risk = frame["melanoma_risk"].to_numpy(dtype=float)
    threshold = round(bundle.melanoma_threshold, DECIMALS)
    groups = _groups(frame)

    onehot = (frame["diagnosis"].to_numpy()[:, None] == np.asarray(classes)[None, :]).astype(float)
    truth_onehot = pd.DataFrame(onehot, index=frame["image"], columns=classes)
    try:
        official = official_scores(truth_onehot, frame.set_index("image")[classes])
    except ValueError as err:
        raise EvaluationError(f"the official ISIC scorer cannot score these predictions: {err}") from None
    melanoma = binary_summary(y, risk, threshold, groups=groups, n_boot=n_boot, seed=seed)
    multiclass = _multiclass(frame, bundle, classes, official, groups, n_boot, seed)
    diagnoses = frame["diagnosis"].value_counts()
    sources = per_source(frame, classes, threshold, n_boot=n_boot, seed=seed) if "held_out" in frame.columns else []
    return {
        "per_source": sources,
        "data": {
            "images": int(len(frame)),
            "melanomas": int(y.sum()),
            "diagnoses": {c: int(diagnoses.get(c, 0)) for c in DIAGNOSES if diagnoses.get(c, 0)},
            "sources": {str(k): int(v) for k, v in frame["source"].fillna("unknown").value_counts().items()},
            "patients": int(frame["patient_id"].nunique()),
            "lesions": int(frame["lesion_id"].nunique()),
            "groups": int(len(set(groups))) if groups is not None else int(len(frame)),
            "bootstrap_unit": "patient/lesion group" if groups is not None else "image (no patient or lesion ids)",
            "not_dermoscopic": int((~frame["looks_dermoscopic"]).sum()) if "looks_dermoscopic" in frame.columns else None,
            "classes": classes,
        },
        "official": official,
        "melanoma": melanoma,
        "multiclass": multiclass,
        "threshold_check": threshold_check(bundle, melanoma, y, risk),
        "calibration": _calibration(bundle, melanoma, multiclass, y, risk),
        "subgroups": {
            "min_count": min_count,
            "min_positives": min_positives,
            "rows": _subgroups(frame, threshold, min_count, min_positives),
        },
        "curves": _curves(y, risk, threshold, melanoma),
        "worst_false_negatives": _worst_false_negatives(frame, classes, threshold),
    }


def _groups(frame: pd.DataFrame) -> np.ndarray | None:
    has_ids = frame[["patient_id", "lesion_id"]].notna().to_numpy().any()
    return group_ids(frame[["patient_id", "lesion_id"]].reset_index(drop=True)) if has_ids else None


def _multiclass(frame: pd.DataFrame, bundle: Bundle, classes: list[str], official: dict, groups, n_boot: int, seed: int) -> dict:
    """`multiclass_summary` over the images of the scored classes, with a bootstrap interval of
    its balanced accuracy and each class's name, AP and whether the bundle predicts it."""
    labelled = frame["diagnosis"].isin(classes).to_numpy()
    multiclass = multiclass_summary(frame.loc[labelled, "diagnosis"], frame.loc[labelled, classes], classes)
    y_index = pd.Index(classes).get_indexer(frame.loc[labelled, "diagnosis"])
    predicted = frame.loc[labelled, classes].to_numpy(dtype=float).argmax(axis=1)
    low, high = balanced_accuracy_ci(y_index, predicted, groups[labelled] if groups is not None else None, n_boot, seed)
    multiclass["balanced_accuracy_ci"] = {"value": multiclass["balanced_accuracy"], "ci_low": low, "ci_high": high}
    multiclass["excluded_unk"] = int((~labelled).sum())
    for code, row in multiclass["per_class"].items():
        row["name"] = CLASS_NAMES[code]
        row["average_precision"] = official["per_class"].get(code, {}).get("ap")
        row["predicted_by_bundle"] = code in bundle.classes
    return multiclass


def _calibration(bundle: Bundle, melanoma: dict, multiclass: dict, y: np.ndarray, risk: np.ndarray) -> dict:
    return {
        "temperature": bundle.temperature,
        "ece_melanoma": melanoma["ece"],
        "ece_top_label": multiclass["ece_top_label"],
        "brier_melanoma": float(np.mean((risk - y) ** 2)),
        "mean_melanoma_risk": float(risk.mean()),
        "melanoma_rate": float(y.mean()),
        "reliability": reliability_curve(y, risk, 10).to_dict(orient="records"),
    }


def _subgroups(frame: pd.DataFrame, threshold: float, min_count: int, min_positives: int) -> list[dict]:
    subgroups_frame = frame.assign(
        sex=frame["sex"].fillna("unknown"),
        site=frame["site"].fillna("unknown"),
        source=frame["source"].fillna("unknown"),
        age_band=pd.Categorical([age_band(a) for a in frame["age"]], categories=list(AGE_BANDS), ordered=True),
    )
    table = subgroup_table(
        subgroups_frame, "melanoma_risk", "melanoma", list(SUBGROUP_COLUMNS), threshold, min_count, min_positives
    )
    table["value"] = table["value"].astype(str)
    return table.to_dict(orient="records")


def _thin(*arrays: np.ndarray) -> list[list[float]]:
    """At most MAX_CURVE_POINTS evenly spaced points (end points kept), rounded for JSON."""
    n = len(arrays[0])
    keep = np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).round().astype(int)) if n > MAX_CURVE_POINTS else np.arange(n)
    return [np.round(a[keep].astype(float), 5).tolist() for a in arrays]


def _curves(y: np.ndarray, risk: np.ndarray, threshold: float, melanoma: dict) -> dict:
    fpr, tpr, _ = roc_curve(y, risk)
    precision, recall, _ = precision_recall_curve(y, risk)
    fpr, tpr = _thin(fpr, tpr)
    precision, recall = _thin(precision, recall)
    return {
        "roc": {"fpr": fpr, "tpr": tpr},
        "pr": {"recall": recall, "precision": precision},
        "operating_point": {
            "threshold": threshold,
            "fpr": 1 - melanoma["specificity"]["value"] if melanoma["specificity"]["value"] is not None else None,
            "tpr": melanoma["sensitivity"]["value"],
            "precision": melanoma["ppv"],
        },
    }


def _worst_false_negatives(frame: pd.DataFrame, classes: list[str], threshold: float) -> list[dict]:
    """The melanomas with the lowest risk, whether the threshold missed them."""
    melanomas = frame[frame["melanoma"] == 1].sort_values("melanoma_risk", kind="stable").head(N_WORST_FALSE_NEGATIVES)
    return [
        {
            "image": row.image,
            "melanoma_risk": float(row.melanoma_risk),
            "missed": bool(row.melanoma_risk < threshold),
            "predicted_class": classes[int(np.argmax([getattr(row, c) for c in classes]))],
            "patient_id": row.patient_id,
            "lesion_id": row.lesion_id,
            "source": row.source,
            "image_ref": row.image_ref,
        }
        for row in melanomas.itertuples(index=False)
    ]
