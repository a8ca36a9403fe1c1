"""Evaluate a model bundle: join a prediction table (the `dermsight predict` CSV layout) with
labelled truth records and compute everything the evaluation report shows.

Bad input is accounted for, never silently dropped: a prediction row that cannot be evaluated
(no image id, a probability that is missing or outside [0, 1], a duplicate, an image missing
from the truth, a truth row without a usable diagnosis) is left out with its reason, and the
result's "ignored" section counts every such row with examples. Input that cannot be evaluated
at all (a missing class column, no melanoma among the matched rows) raises EvaluationError.

The result is a JSON-ready dict (see `evaluate_predictions`); `dermsight.evaluation.report`
renders it as report.json and a self-contained report.html.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from dermsight.data.dataset import group_ids
from dermsight.data.schema import CLASS_NAMES, CLASSES, DIAGNOSES, Problem
from dermsight.evaluation.calibration import choose_threshold
from dermsight.evaluation.metrics import (
    CI_PERCENTILES,
    binary_summary,
    multiclass_summary,
    official_scores,
    reliability_curve,
    subgroup_table,
)
from dermsight.evaluation.held_out import HeldOutError, held_out_kinds, load_out_of_fold, per_source
from dermsight.models.bundle import Bundle

FORMAT_VERSION = 1
AGE_BANDS: tuple[str, ...] = ("<30", "30-50", "50-70", ">=70", "unknown")
SUBGROUP_COLUMNS: tuple[str, ...] = ("sex", "age_band", "site", "source")
TRUTH_CONTEXT: tuple[str, ...] = ("patient_id", "lesion_id", "age", "sex", "site", "source", "image_ref")
N_WORST_FALSE_NEGATIVES = 8
MAX_CURVE_POINTS = 600
# Probabilities are compared at the precision the `predict` CSV (and out_of_fold.csv.gz) carries, and the
# threshold is rounded alike, so a table evaluates the same in memory and after a round trip through CSV.
DECIMALS = 6
EXAMPLES = 5

# Why a prediction row was left out, in the order the checks run.
REASONS: dict[str, str] = {
    "missing_image_id": "prediction row without an image id",
    "invalid_probability": "a class probability or melanoma_risk is missing, not a number, or outside [0, 1]",
    "duplicate_prediction": "image scored more than once with identical probabilities; one copy kept",
    "conflicting_predictions": "image scored more than once with different probabilities; every copy left out",
    "unscored_image": "image could not be read, so it was never scored",
    "no_truth": "prediction for an image that is not in the truth data",
    "unlabelled": "the truth data has no diagnosis for the image",
    "unknown_class": f"the truth diagnosis is not one of {' '.join(DIAGNOSES)}",
    "conflicting_truth": "the truth data lists the image more than once with different diagnoses",
}

_CONFLICT = "\x00conflict"


class EvaluationError(ValueError):
    """Input that cannot be evaluated at all; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Joining predictions and truth, with accounting


def _image_ids(frame: pd.DataFrame, what: str) -> pd.Series:
    for column in ("image", "image_id", "image_name"):
        if column in frame.columns:
            ids = frame[column].astype(object).where(frame[column].notna(), None)
            return ids.map(lambda v: None if v is None or str(v).strip() == "" else str(v).strip())
    columns = ", ".join(map(str, frame.columns)) or "none"
    raise EvaluationError(f"{what} has no image id column (expected 'image' or 'image_id'); columns: {columns}")


def _diagnosis(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip().upper()
    return text or None


class _Accounting:
    """Rows left out, per reason, with a few example image ids."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.details: dict[str, list[str]] = {}

    def add(self, reason: str, ids: Sequence, details: Sequence[str] = ()) -> None:
        ids = [str(i) for i in ids]
        if not ids:
            return
        self.rows[reason] = self.rows.get(reason, 0) + len(ids)
        self.examples.setdefault(reason, []).extend(i for i in ids[:EXAMPLES] if i not in self.examples.get(reason, []))
        self.examples[reason] = self.examples[reason][:EXAMPLES]
        self.details.setdefault(reason, []).extend(details[:EXAMPLES])

    def to_list(self) -> list[dict]:
        out = []
        for reason in REASONS:
            if reason in self.rows:
                entry = {
                    "reason": reason,
                    "rows": self.rows[reason],
                    "description": REASONS[reason],
                    "examples": self.examples[reason],
                }
                if self.details.get(reason):
                    entry["details"] = self.details[reason][:EXAMPLES]
                out.append(entry)
        return out


def eval_classes(bundle: Bundle, diagnoses: pd.Series | None = None) -> list[str]:
    """The classes scored: the bundle's (UNK aside) plus any class present in the truth, in CLASSES order."""
    present = set(diagnoses.dropna()) if diagnoses is not None else set()
    return [c for c in CLASSES if c in bundle.classes or c in present]


def join_predictions(
    predictions: pd.DataFrame,
    truth: pd.DataFrame,
    bundle: Bundle,
    unscored: Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, dict, list[str]]:
    """One row per evaluable image: image, the class probabilities, melanoma_risk, diagnosis,
    melanoma (0/1) and the truth's context columns. Returns (frame, ignored, warnings)."""
    if not isinstance(predictions, pd.DataFrame) or not isinstance(truth, pd.DataFrame):
        raise EvaluationError("predictions and truth must be data frames")
    required = [c for c in bundle.classes if c in CLASSES]
    missing = [c for c in required if c not in predictions.columns]
    if missing:
        raise EvaluationError(
            f"the predictions lack the probability column(s) {', '.join(missing)} of the bundle's classes; "
            f"expected the `dermsight predict` layout (image, {', '.join(CLASSES)}, melanoma_risk, ...)"
        )
    if "diagnosis" not in truth.columns:
        raise EvaluationError(f"the truth data has no 'diagnosis' column; columns: {', '.join(map(str, truth.columns))}")
    account = _Accounting()
    warnings: list[str] = []
    n_input = len(predictions)

    # Truth: one row per image id, diagnosis normalised; conflicting duplicates marked.
    truth = truth.copy()
    truth["_image"] = _image_ids(truth, "the truth data")
    truth["diagnosis"] = truth["diagnosis"].map(_diagnosis)
    truth_without_id = int(truth["_image"].isna().sum())
    truth = truth[truth["_image"].notna()]
    duplicated_truth = truth["_image"].duplicated(keep=False)
    truth_duplicates = 0
    if duplicated_truth.any():
        labels = truth[duplicated_truth].groupby("_image")["diagnosis"].agg(lambda d: set(d.dropna()))
        conflicting = labels[labels.map(len) > 1].index
        truth = truth.sort_values("diagnosis", na_position="last", kind="stable")  # a labelled copy first
        truth_duplicates = int(truth["_image"].duplicated().sum())
        truth = truth.drop_duplicates("_image").sort_index()
        truth.loc[truth["_image"].isin(conflicting), "diagnosis"] = _CONFLICT
        warnings.append(f"the truth data lists {truth_duplicates} image(s) more than once; one row per image used")
    truth = truth.set_index("_image")
    classes = eval_classes(bundle, truth["diagnosis"][truth["diagnosis"].isin(CLASSES)])

    # Predictions: ids, then numeric probabilities in [0, 1], then duplicates.
    frame = pd.DataFrame({"image": _image_ids(predictions, "the predictions")})
    predicted_ids = [*frame["image"].dropna(), *(unscored or {})]
    for code in classes:
        frame[code] = pd.to_numeric(predictions[code], errors="coerce") if code in predictions.columns else 0.0
    risk_column = "melanoma_risk" if "melanoma_risk" in predictions.columns else "MEL"
    frame["melanoma_risk"] = pd.to_numeric(predictions[risk_column], errors="coerce")
    for column in ("above_threshold", "looks_dermoscopic"):  # the Predictor's flags, checked below
        if column in predictions.columns:
            frame[column] = _as_bool(predictions[column])
    account.add("missing_image_id", [f"data row {i + 1}" for i in np.flatnonzero(frame["image"].isna())])
    frame = frame[frame["image"].notna()]
    values = frame[[*classes, "melanoma_risk"]].to_numpy(dtype=float)
    valid = np.isfinite(values).all(axis=1) & (values >= 0).all(axis=1) & (values <= 1).all(axis=1)
    bad = frame[~valid]
    account.add(
        "invalid_probability",
        bad["image"],
        [f"{image}: {_bad_values(row, classes)}" for image, (_, row) in zip(bad["image"], bad.iterrows())],
    )
    frame = frame[valid].copy()
    for column in [*classes, "melanoma_risk"]:  # exactly what writing and reading the CSV gives
        frame[column] = [float(f"{v:.{DECIMALS}f}") for v in frame[column]]
    repeated = frame["image"].duplicated(keep=False)
    if repeated.any():
        copies = frame[repeated]
        spread = copies.groupby("image")[[*classes, "melanoma_risk"]].agg(lambda v: v.max() - v.min()).max(axis=1)
        conflicting = set(spread[spread > 1e-9].index)
        identical = copies[~copies["image"].isin(conflicting)]
        account.add("duplicate_prediction", identical.loc[identical["image"].duplicated(), "image"])
        account.add("conflicting_predictions", copies.loc[copies["image"].isin(conflicting), "image"])
        frame = frame[~frame["image"].isin(conflicting)].drop_duplicates("image")
    if unscored:
        account.add("unscored_image", list(unscored), [f"{k}: {v}" for k, v in list(unscored.items())[:EXAMPLES]])

    # Join.
    in_truth = frame["image"].isin(truth.index)
    account.add("no_truth", frame.loc[~in_truth, "image"])
    frame = frame[in_truth]
    diagnosis = truth.loc[frame["image"], "diagnosis"].to_numpy()
    known = pd.Series(diagnosis).isin(DIAGNOSES).to_numpy()
    account.add("unlabelled", frame.loc[pd.isna(diagnosis), "image"])
    account.add("conflicting_truth", frame.loc[diagnosis == _CONFLICT, "image"])
    unknown = ~pd.isna(diagnosis) & (diagnosis != _CONFLICT) & ~known
    account.add(
        "unknown_class", frame.loc[unknown, "image"], [f"{i}: {d!r}" for i, d in zip(frame.loc[unknown, "image"], diagnosis[unknown])]
    )
    frame = frame[known].reset_index(drop=True)
    context = truth.reindex(columns=[c for c in truth.columns if c not in frame.columns]).loc[frame["image"]]
    frame = pd.concat([frame, context.reset_index(drop=True)], axis=1)
    frame["melanoma"] = (frame["diagnosis"] == "MEL").astype(int)
    for column in TRUTH_CONTEXT:
        if column not in frame.columns:
            frame[column] = None
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")

    # Consistency of the prediction table with this bundle.
    if "above_threshold" in frame.columns and len(frame):
        risk = frame["melanoma_risk"].to_numpy()
        threshold = bundle.melanoma_threshold
        disagree = (frame["above_threshold"].to_numpy() != (risk >= threshold)) & (np.abs(risk - threshold) > 1e-5)
        if disagree.any():
            warnings.append(
                f"the predictions' above_threshold disagrees with this bundle's threshold {threshold:.4f} on "
                f"{int(disagree.sum())} image(s): were they made with another bundle?"
            )
    if risk_column == "melanoma_risk" and "MEL" in predictions.columns and len(frame):
        gap = np.abs(frame["melanoma_risk"] - frame["MEL"])
        if (gap > 1e-4).any():
            n = int((gap > 1e-4).sum())
            warnings.append(f"melanoma_risk differs from the MEL probability on {n} image(s); melanoma_risk used")

    # Truth rows that were not evaluated.
    left = truth[~truth.index.isin(set(frame["image"]))]
    unpredicted = left[~left.index.isin(set(predicted_ids))]
    not_evaluated = {
        "rows": int(len(left)),
        "prediction_left_out": int(len(left) - len(unpredicted)),
        "no_prediction": int(len(unpredicted)),
        "unlabelled": int(unpredicted["diagnosis"].isna().sum()),
        "no_image": int(unpredicted["image_ref"].isna().sum()) if "image_ref" in unpredicted.columns else None,
        "duplicate_rows_merged": truth_duplicates,
        "without_image_id": truth_without_id,
    }
    ignored = {
        "prediction_rows": n_input + len(unscored or {}),
        "rows": sum(account.rows.values()),
        "reasons": account.to_list(),
        "truth_rows_not_evaluated": not_evaluated,
    }
    return frame, ignored, warnings


def _as_bool(values: pd.Series) -> pd.Series:
    if values.dtype == bool:
        return values
    return values.astype(str).str.strip().str.lower().isin(("true", "1", "1.0", "yes"))


def _bad_values(row: pd.Series, classes: list[str]) -> str:
    parts = [f"{c}={row[c]}" for c in [*classes, "melanoma_risk"] if not (0 <= row[c] <= 1)]
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Metrics


def age_band(age) -> str:
    """<30, 30-50, 50-70, >=70 or unknown."""
    if age is None or not np.isfinite(age):
        return "unknown"
    return "<30" if age < 30 else "30-50" if age < 50 else "50-70" if age < 70 else ">=70"


def _groups(frame: pd.DataFrame) -> np.ndarray | None:
    has_ids = frame[["patient_id", "lesion_id"]].notna().to_numpy().any()
    return group_ids(frame[["patient_id", "lesion_id"]].reset_index(drop=True)) if has_ids else None


def _json(value):
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(value)
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _thin(*arrays: np.ndarray) -> list[list[float]]:
    """At most MAX_CURVE_POINTS evenly spaced points (end points kept), rounded for JSON."""
    n = len(arrays[0])
    keep = np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).round().astype(int)) if n > MAX_CURVE_POINTS else np.arange(n)
    return [np.round(a[keep].astype(float), 5).tolist() for a in arrays]


def _balanced_accuracy_ci(y: np.ndarray, predicted: np.ndarray, groups, n_boot: int, seed: int) -> tuple[float, float]:
    """Cluster-bootstrap 95% interval of the mean per-class recall."""
    if n_boot <= 0 or len(y) == 0:
        return math.nan, math.nan
    codes = pd.factorize(np.asarray(groups, dtype=object))[0] if groups is not None else np.arange(len(y))
    n_groups, k = codes.max() + 1, int(max(y.max(), predicted.max())) + 1
    correct = (y == predicted).astype(float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        weight = drawn[codes].astype(float)
        support = np.bincount(y, weights=weight, minlength=k)
        hits = np.bincount(y, weights=weight * correct, minlength=k)
        values.append((hits[support > 0] / support[support > 0]).mean())
    low, high = np.percentile(values, CI_PERCENTILES)
    return float(low), float(high)


def _threshold_check(bundle: Bundle, melanoma: dict, y: np.ndarray, risk: np.ndarray) -> dict:
    target = bundle.threshold.get("target_sensitivity")
    sensitivity = melanoma["sensitivity"]
    check = {
        "threshold": bundle.melanoma_threshold,
        "threshold_compared": round(bundle.melanoma_threshold, DECIMALS),
        "target_sensitivity": target,
        "validation_sensitivity": bundle.threshold.get("sensitivity"),
        "validation_specificity": bundle.threshold.get("specificity"),
        "sensitivity": sensitivity,
        "specificity": melanoma["specificity"],
        "here": choose_threshold(y, risk, target) if target else None,
    }
    value, high = sensitivity["value"], sensitivity["ci_high"]
    if target is None:
        check["holds"], check["verdict"] = None, "the bundle records no target sensitivity"
    elif value >= target:
        check["holds"] = True
        check["verdict"] = f"holds: sensitivity {value:.1%} reaches the target {target:.0%}"
    elif high is not None and high >= target:
        check["holds"] = False
        check["verdict"] = (
            f"below target: sensitivity {value:.1%} < {target:.0%}, though the target lies within the 95% interval "
            f"({melanoma['positives']} melanomas is too few to tell)"
        )
    else:
        check["holds"] = False
        interval = f" (95% CI up to {high:.1%})" if high is not None else ""
        check["verdict"] = (
            f"does not hold: sensitivity {value:.1%}{interval} is below the target {target:.0%}; "
            f"a threshold of {check['here']['threshold']:.4f} would reach it on this data"
        )
    return check


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

    labelled = frame["diagnosis"].isin(classes).to_numpy()
    multiclass = multiclass_summary(frame.loc[labelled, "diagnosis"], frame.loc[labelled, classes], classes)
    y_index = pd.Index(classes).get_indexer(frame.loc[labelled, "diagnosis"])
    predicted = frame.loc[labelled, classes].to_numpy(dtype=float).argmax(axis=1)
    low, high = _balanced_accuracy_ci(y_index, predicted, groups[labelled] if groups is not None else None, n_boot, seed)
    multiclass["balanced_accuracy_ci"] = {"value": multiclass["balanced_accuracy"], "ci_low": low, "ci_high": high}
    multiclass["excluded_unk"] = int((~labelled).sum())
    for code, row in multiclass["per_class"].items():
        row["name"] = CLASS_NAMES[code]
        row["average_precision"] = official["per_class"].get(code, {}).get("ap")
        row["predicted_by_bundle"] = code in bundle.classes

    reliability = reliability_curve(y, risk, 10)
    calibration = {
        "temperature": bundle.temperature,
        "ece_melanoma": melanoma["ece"],
        "ece_top_label": multiclass["ece_top_label"],
        "brier_melanoma": float(np.mean((risk - y) ** 2)),
        "mean_melanoma_risk": float(risk.mean()),
        "melanoma_rate": float(y.mean()),
        "reliability": reliability.to_dict(orient="records"),
    }

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

    fpr, tpr, _ = roc_curve(y, risk)
    precision, recall, _ = precision_recall_curve(y, risk)
    fpr, tpr = _thin(fpr, tpr)
    precision, recall = _thin(precision, recall)
    melanomas = frame[frame["melanoma"] == 1].sort_values("melanoma_risk", kind="stable").head(N_WORST_FALSE_NEGATIVES)
    worst = [
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
        "threshold_check": _threshold_check(bundle, melanoma, y, risk),
        "calibration": calibration,
        "subgroups": {"min_count": min_count, "min_positives": min_positives, "rows": table.to_dict(orient="records")},
        "curves": {
            "roc": {"fpr": fpr, "tpr": tpr},
            "pr": {"recall": recall, "precision": precision},
            "operating_point": {
                "threshold": threshold,
                "fpr": 1 - melanoma["specificity"]["value"] if melanoma["specificity"]["value"] is not None else None,
                "tpr": melanoma["sensitivity"]["value"],
                "precision": melanoma["ppv"],
            },
        },
        "worst_false_negatives": worst,
    }


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


def _bundle_info(bundle: Bundle) -> dict:
    return {
        "name": bundle.name,
        "path": str(bundle.path),
        "version": bundle.version,
        "classes": bundle.classes,
        "threshold": bundle.melanoma_threshold,
        "target_sensitivity": bundle.threshold.get("target_sensitivity"),
        "temperature": bundle.temperature,
    }


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
    result = {
        "kind": "dermsight-evaluation",
        "format_version": FORMAT_VERSION,
        "mode": "external",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bundle": _bundle_info(bundle),
        "ignored": ignored,
        "warnings": warnings,
        **metrics,
    }
    return _json(result)


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

    classes = metrics["data"]["classes"]
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
    summary = {}
    for key in ("melanoma_auc", "balanced_accuracy"):
        values = [f[key] for f in per_fold if f[key] is not None]
        summary[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values)), "folds": len(values)} if values else None
    result = {
        "kind": "dermsight-evaluation",
        "format_version": FORMAT_VERSION,
        "mode": "cross-validation",
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bundle": _bundle_info(bundle),
        "ignored": ignored,
        "warnings": warnings,
        **metrics,
        "cross_validation": {
            "source": str(path),
            "validation": bundle.metrics.get("validation", "out-of-fold, patient/lesion-grouped"),
            "folds": len(per_fold),
            "per_fold": per_fold,
            "fold_summary": summary,
            "note": "the threshold and the temperature were fitted on these out-of-fold predictions",
        },
    }
    return _json(result)
