"""Join a prediction table (the `dermsight predict` CSV layout) with labelled truth records, and
account for every row that cannot be evaluated.

Bad input is accounted for, never silently dropped: a prediction row that cannot be evaluated
(no image id, a probability that is missing or outside [0, 1], a duplicate, an image missing
from the truth, a truth row without a usable diagnosis) is left out with its reason, and the
"ignored" section counts every such row with examples. Input that cannot be evaluated at all
(a missing class column) raises EvaluationError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from dermsight.data.schema import CLASSES, DIAGNOSES
from dermsight.models.bundle import Bundle

TRUTH_CONTEXT: tuple[str, ...] = ("patient_id", "lesion_id", "age", "sex", "site", "source", "image_ref")
# Probabilities are compared at the precision the `predict` CSV (and out_of_fold.csv.gz) carries, and the
# threshold is rounded alike, so a table evaluates the same in memory and after a round trip through CSV.
DECIMALS = 6
EXAMPLES = 5

# Why a prediction row was left out, in the order the checks run.
REASONS: dict[str, str] = {
    "missing_image_id": "prediction row without an image id",
    "refused": "the image was refused as not dermoscopic, so it has no risk (`dermsight predict`'s refusal column)",
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
    truth, truth_duplicates, truth_without_id = _truth_by_image(truth)
    if truth_duplicates:
        warnings.append(f"the truth data lists {truth_duplicates} image(s) more than once; one row per image used")
    classes = eval_classes(bundle, truth["diagnosis"][truth["diagnosis"].isin(CLASSES)])
    frame, risk_column = _prediction_frame(predictions, classes, account)
    predicted_ids = [*frame["image"].dropna(), *(unscored or {})]
    frame = _valid_predictions(frame, classes, account)
    if unscored:
        account.add("unscored_image", list(unscored), [f"{k}: {v}" for k, v in list(unscored.items())[:EXAMPLES]])
    frame = _with_truth(frame, truth, account)
    warnings.extend(_consistency_warnings(frame, predictions, risk_column, bundle))
    ignored = {
        "prediction_rows": len(predictions) + len(unscored or {}),
        "rows": sum(account.rows.values()),
        "reasons": account.to_list(),
        "truth_rows_not_evaluated": _not_evaluated(truth, frame, predicted_ids, truth_duplicates, truth_without_id),
    }
    return frame, ignored, warnings


def _truth_by_image(truth: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """Truth indexed by image id, one row per image (a labelled copy kept; images whose copies
    disagree marked as conflicting), diagnoses normalised; with the count of duplicate rows
    merged and of rows without an image id."""
    truth = truth.copy()
    truth["_image"] = _image_ids(truth, "the truth data")
    truth["diagnosis"] = truth["diagnosis"].map(_diagnosis)
    without_id = int(truth["_image"].isna().sum())
    truth = truth[truth["_image"].notna()]
    duplicated = truth["_image"].duplicated(keep=False)
    duplicates = 0
    if duplicated.any():
        labels = truth[duplicated].groupby("_image")["diagnosis"].agg(lambda d: set(d.dropna()))
        conflicting = labels[labels.map(len) > 1].index
        truth = truth.sort_values("diagnosis", na_position="last", kind="stable")  # a labelled copy first
        duplicates = int(truth["_image"].duplicated().sum())
        truth = truth.drop_duplicates("_image").sort_index()
        truth.loc[truth["_image"].isin(conflicting), "diagnosis"] = _CONFLICT
    return truth.set_index("_image"), duplicates, without_id


def _prediction_frame(predictions: pd.DataFrame, classes: list[str], account: _Accounting) -> tuple[pd.DataFrame, str]:
    """Image ids, numeric class probabilities and melanoma_risk, the Predictor's flags; rows
    without an id are counted, not dropped yet. Returns the frame and the risk's source column."""
    frame = pd.DataFrame({"image": _image_ids(predictions, "the predictions")})
    for code in classes:
        frame[code] = pd.to_numeric(predictions[code], errors="coerce") if code in predictions.columns else 0.0
    risk_column = "melanoma_risk" if "melanoma_risk" in predictions.columns else "MEL"
    frame["melanoma_risk"] = pd.to_numeric(predictions[risk_column], errors="coerce")
    for column in ("above_threshold", "looks_dermoscopic"):  # the Predictor's flags, checked below
        if column in predictions.columns:
            frame[column] = _as_bool(predictions[column])
    if "refusal" in predictions.columns:
        frame["refusal"] = predictions["refusal"].fillna("").astype(str).str.strip()
    return frame, risk_column


def _valid_predictions(frame: pd.DataFrame, classes: list[str], account: _Accounting) -> pd.DataFrame:
    """Rows with an id and probabilities in [0, 1] (rounded as the CSV stores them), one per image."""
    account.add("missing_image_id", [f"data row {i + 1}" for i in np.flatnonzero(frame["image"].isna())])
    frame = frame[frame["image"].notna()]
    if "refusal" in frame.columns:  # rows the gate refused: kept by `predict`, with no risk
        refused = frame["refusal"] != ""
        account.add("refused", frame.loc[refused, "image"])
        frame = frame[~refused].drop(columns="refusal")
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
    return frame


def _with_truth(frame: pd.DataFrame, truth: pd.DataFrame, account: _Accounting) -> pd.DataFrame:
    """The predictions of images the truth labels with a known diagnosis, with its context columns."""
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
    return frame


def _consistency_warnings(frame: pd.DataFrame, predictions: pd.DataFrame, risk_column: str, bundle: Bundle) -> list[str]:
    """Signs that the prediction table was made by another bundle, or that its risk column disagrees with MEL."""
    warnings = []
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
    return warnings


def _not_evaluated(truth: pd.DataFrame, frame: pd.DataFrame, predicted_ids: list, duplicates: int, without_id: int) -> dict:
    """Truth rows that were not evaluated, and why."""
    left = truth[~truth.index.isin(set(frame["image"]))]
    unpredicted = left[~left.index.isin(set(predicted_ids))]
    return {
        "rows": int(len(left)),
        "prediction_left_out": int(len(left) - len(unpredicted)),
        "no_prediction": int(len(unpredicted)),
        "unlabelled": int(unpredicted["diagnosis"].isna().sum()),
        "no_image": int(unpredicted["image_ref"].isna().sum()) if "image_ref" in unpredicted.columns else None,
        "duplicate_rows_merged": duplicates,
        "without_image_id": without_id,
    }


def _as_bool(values: pd.Series) -> pd.Series:
    if values.dtype == bool:
        return values
    return values.astype(str).str.strip().str.lower().isin(("true", "1", "1.0", "yes"))


def _bad_values(row: pd.Series, classes: list[str]) -> str:
    parts = [f"{c}={row[c]}" for c in [*classes, "melanoma_risk"] if not (0 <= row[c] <= 1)]
    return ", ".join(parts)
