"""Evaluation metrics: the official ISIC challenge scores, the ISIC 2024 partial AUC, calibration
error, operating-point statistics, bootstrap confidence intervals and subgroup tables.

Binary functions take `y_true` (1 = positive, e.g. melanoma; 0 = negative) and a `score` where
higher means more likely positive; a case is called positive when `score >= threshold`.
Undefined ratios (e.g. sensitivity without positives) are NaN in arrays and tables, None in the
JSON-ready dicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from isic_challenge_scoring import metrics as isic_metrics
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from scipy.stats import binomtest
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

CI_PERCENTILES = (2.5, 97.5)


def check_binary(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    """`y_true` as an int array of 0/1 and `score` as a finite float array of the same length."""
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and score must be 1-D and of equal length, got shapes {y.shape} and {s.shape}")
    if y.size == 0:
        raise ValueError("y_true and score are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0/1 (or booleans), without missing values")
    if not np.isfinite(s).all():
        raise ValueError("score holds NaN or infinite values")
    return y.astype(int), s


def _require_both_classes(y: np.ndarray, what: str) -> None:
    if y.min() == y.max():
        raise ValueError(f"{what} needs both positives and negatives in y_true")


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def _json_float(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def official_scores(truth: pd.DataFrame, probabilities: pd.DataFrame) -> dict:
    """Multi-class scores from the official ISIC challenge package (isic-challenge-scoring).

    Both frames are indexed by image id with one column per class code: `truth` one-hot (a row
    may be all zero for an image of none of the classes, e.g. UNK), `probabilities` in [0, 1].
    Per class: accuracy, sensitivity, specificity, dice, ppv, npv (at 0.5, with the package's
    "freebie" 1.0 when undefined), auc, auc_sens_80 (area under the ROC curve where sensitivity
    >= 80%, as the package defines it) and ap. Classes without a positive (or a negative) in
    `truth` break the package's auc_sens_80, so they are left out of the per-class metrics and
    listed under "skipped_classes"; the balanced accuracy still uses every column, so predicting
    a skipped class counts as an error (tied top probabilities also count as errors, as in the
    package).
    """
    if truth.index.has_duplicates or probabilities.index.has_duplicates:
        raise ValueError("image ids must be unique in truth and probabilities")
    missing = truth.index.difference(probabilities.index)
    extra = probabilities.index.difference(truth.index)
    if len(missing) or len(extra):
        raise ValueError(f"probabilities miss {len(missing)} images of truth and have {len(extra)} extra")
    if set(truth.columns) != set(probabilities.columns):
        raise ValueError(f"class columns differ: {list(truth.columns)} vs {list(probabilities.columns)}")
    truth = truth.astype(float).sort_index()
    probabilities = probabilities.reindex(index=truth.index, columns=truth.columns).astype(float)
    for name, frame in (("truth", truth), ("probabilities", probabilities)):
        values = frame.to_numpy()
        if not (np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()):
            raise ValueError(f"{name} must hold values in [0, 1], without NaN")
    if not (np.isin(truth.to_numpy(), (0.0, 1.0)).all() and (truth.sum(axis=1) <= 1).all()):
        raise ValueError("truth must be one-hot: 0/1 with at most one 1 per image")

    positives = truth.sum()
    kept = [c for c in truth.columns if 0 < positives[c] < len(truth)]
    skipped = [c for c in truth.columns if c not in kept]
    if not kept:
        raise ValueError("no class has both positive and negative images in truth")
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=truth.index)
    score = ClassificationScore(truth[kept], probabilities[kept], weights, ClassificationMetric.BALANCED_ACCURACY)
    balanced = isic_metrics.balanced_multiclass_accuracy(truth, probabilities, weights["score_weight"])
    return {
        "images": len(truth),
        "classes": kept,
        "skipped_classes": skipped,
        "balanced_accuracy": _json_float(balanced),
        "per_class": {
            code: {metric: _json_float(value) for metric, value in row.items()}
            for code, row in score.per_category.to_dict(orient="index").items()
        },
        "macro_average": {metric: _json_float(value) for metric, value in score.macro_average.items()},
    }


def partial_auc(y_true, score, min_tpr: float = 0.80) -> float:
    """ISIC 2024 challenge partial AUC above `min_tpr` sensitivity, in [0, 1 - min_tpr].

    As the challenge's scoring code: labels and scores are flipped so that TPR >= min_tpr becomes
    FPR <= 1 - min_tpr, sklearn's McClish-standardised partial AUC is taken and un-standardised.
    """
    y, s = check_binary(y_true, score)
    _require_both_classes(y, "partial_auc")
    if not 0.0 <= min_tpr < 1.0:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr}")
    max_fpr = 1.0 - min_tpr
    scaled = roc_auc_score(np.abs(y - 1), -s, max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5))


def _confidence_and_outcome(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    prob = np.asarray(prob, dtype=float)
    if prob.ndim == 2:
        y = np.asarray(y_true)
        if y.shape != (prob.shape[0],) or not np.isin(y, np.arange(prob.shape[1])).all():
            raise ValueError("with 2-D prob, y_true must be one class index in [0, n_classes) per row")
        confidence, outcome = prob.max(axis=1), (prob.argmax(axis=1) == y).astype(float)
    else:
        y, confidence = check_binary(y_true, prob)
        outcome = y.astype(float)
    if not ((confidence >= 0) & (confidence <= 1)).all():
        raise ValueError("prob must hold probabilities in [0, 1]")
    return confidence, outcome


def reliability_curve(y_true, prob, n_bins: int = 10) -> pd.DataFrame:
    """One row per equal-width bin of [0, 1]: bin_centre, mean_predicted, observed, count.

    1-D `prob` is the probability of the positive class and `observed` the fraction of
    positives; 2-D `prob` (n, classes) with class indices in `y_true` uses the top-label
    confidence and `observed` is the accuracy of the arg-max. Bin i holds i/n_bins <= p <
    (i+1)/n_bins (p = 1 in the last bin); empty bins have NaN means and count 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence, outcome = _confidence_and_outcome(y_true, prob)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)

    def mean(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(bins, weights=values, minlength=n_bins)
        return np.divide(sums, counts, out=np.full(n_bins, np.nan), where=counts > 0)

    return pd.DataFrame(
        {
            "bin_centre": (np.arange(n_bins) + 0.5) / n_bins,
            "mean_predicted": mean(confidence),
            "observed": mean(outcome),
            "count": counts,
        }
    )


def expected_calibration_error(y_true, prob, n_bins: int = 10) -> float:
    """Count-weighted mean of |observed - mean_predicted| over the bins of `reliability_curve`."""
    curve = reliability_curve(y_true, prob, n_bins)
    gaps = (curve["observed"] - curve["mean_predicted"]).abs().fillna(0.0)
    return float((curve["count"] * gaps).sum() / curve["count"].sum())


def sensitivity_specificity(y_true, score, threshold: float) -> dict:
    """Sensitivity, specificity, ppv, npv (NaN when undefined) and tp/fp/tn/fn at `score >= threshold`."""
    y, s = check_binary(y_true, score)
    called = s >= threshold
    positive = y == 1
    tp = int(np.sum(called & positive))
    fp = int(np.sum(called & ~positive))
    tn = int(np.sum(~called & ~positive))
    fn = int(np.sum(~called & positive))
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def exact_interval(successes: int, trials: int, level: float = 0.95) -> dict:
    """A proportion with its exact (Clopper-Pearson) two-sided interval (scipy's binomtest)."""
    ci = binomtest(int(successes), int(trials)).proportion_ci(level, method="exact")
    return {"value": successes / trials, "ci_low": float(ci.low), "ci_high": float(ci.high), "successes": int(successes),
            "trials": int(trials), "level": level, "method": "exact (Clopper-Pearson)"}


def bootstrap_values(
    metric_fn: Callable, y: np.ndarray, values: np.ndarray, n_boot: int, seed: int, groups=None, both_classes: bool = True
) -> np.ndarray:
    """`metric_fn(y, values)` on `n_boot` resamples of rows, or of whole groups when `groups` is
    given (the one bootstrap every interval here uses); with `both_classes`, resamples holding a
    single class of `y` are skipped."""
    if groups is None:
        codes = np.arange(len(y))
    else:
        codes = pd.factorize(np.asarray(groups, dtype=object))[0]
        if len(codes) != len(y) or (codes < 0).any():
            raise ValueError("groups must give one non-missing id per sample")
    n_groups = codes.max() + 1
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        rows = np.repeat(np.arange(len(y)), drawn[codes])
        if not both_classes or y[rows].min() != y[rows].max():
            out.append(metric_fn(y[rows], values[rows]))
    return np.asarray(out, dtype=float)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap `values`; (nan, nan) when there are none."""
    if np.size(values) == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, CI_PERCENTILES)
    return float(low), float(high)


def bootstrap_ci(
    metric_fn: Callable, y_true, score, n_boot: int = 1000, seed: int = 0, groups=None
) -> tuple[float, float]:
    """95% percentile bootstrap interval of `metric_fn(y_true, score)`.

    With `groups` (patient or lesion ids) whole groups are resampled (cluster bootstrap), as
    images of one patient are not independent. Resamples with a single class are skipped;
    (nan, nan) when none is left.
    """
    y, s = check_binary(y_true, score)
    return percentile_interval(bootstrap_values(metric_fn, y, s, n_boot, seed, groups))


def auc(y_true, score) -> float:
    """Area under the ROC curve of a binary score (both classes needed)."""
    y, s = check_binary(y_true, score)
    _require_both_classes(y, "auc")
    return float(roc_auc_score(y, s))


def balanced_accuracy(y_true, predicted, n_classes: int | None = None) -> float:
    """Mean recall over the classes present in `y_true` (class indices; `predicted` arg-max
    indices); `n_classes` only sizes the count, classes absent from `y_true` never count."""
    y, predicted = np.asarray(y_true, dtype=int), np.asarray(predicted, dtype=int)
    k = max(int(max(y.max(), predicted.max())) + 1, n_classes or 0)
    support = np.bincount(y, minlength=k)
    hits = np.bincount(y, weights=(y == predicted).astype(float), minlength=k)
    present = support > 0
    return float((hits[present] / support[present]).mean())


def balanced_accuracy_ci(y_true, predicted, groups=None, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of `balanced_accuracy` (cluster bootstrap over `groups` when given)."""
    y, predicted = np.asarray(y_true, dtype=int), np.asarray(predicted, dtype=int)
    if n_boot <= 0 or len(y) == 0:
        return math.nan, math.nan
    return percentile_interval(bootstrap_values(balanced_accuracy, y, predicted, n_boot, seed, groups, both_classes=False))


def binary_summary(y_true, score, threshold: float, groups=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """JSON-ready summary of a binary probability (e.g. of melanoma).

    AUC, ISIC 2024 pAUC above 80% TPR, average precision, and sensitivity/specificity at
    `threshold`, each as {"value", "ci_low", "ci_high"} with a 95% bootstrap interval (cluster
    bootstrap over `groups` when given); ECE (point value only: its bootstrap distribution is
    biased upwards), ppv/npv and the counts at the threshold.
    """
    y, s = check_binary(y_true, score)
    _require_both_classes(y, "binary_summary")
    names = ("auc", "pauc_80", "average_precision", "sensitivity", "specificity")

    def metrics(yb: np.ndarray, sb: np.ndarray) -> np.ndarray:
        operating = sensitivity_specificity(yb, sb, threshold)
        return np.array(
            [
                roc_auc_score(yb, sb),
                partial_auc(yb, sb),
                average_precision_score(yb, sb),
                operating["sensitivity"],
                operating["specificity"],
            ]
        )

    values = metrics(y, s)
    boot = bootstrap_values(metrics, y, s, n_boot, seed, groups)
    if len(boot):
        low, high = np.percentile(boot, CI_PERCENTILES, axis=0)
    else:
        low = high = np.full(len(names), np.nan)
    operating = sensitivity_specificity(y, s, threshold)
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "bootstrap_resamples": len(boot),
        "cluster_bootstrap": groups is not None,
        **{
            name: {"value": _json_float(v), "ci_low": _json_float(lo), "ci_high": _json_float(hi)}
            for name, v, lo, hi in zip(names, values, low, high)
        },
        "ece": expected_calibration_error(y, s),
        "ppv": _json_float(operating["ppv"]),
        "npv": _json_float(operating["npv"]),
        **{k: operating[k] for k in ("tp", "fp", "tn", "fn")},
    }


def multiclass_summary(y_true_labels, probabilities, classes: Sequence[str]) -> dict:
    """JSON-ready multi-class summary for arg-max predictions (ties go to the first class).

    `y_true_labels` are class codes, `probabilities` an (n, len(classes)) array in `classes`
    order or a frame with those columns. Balanced accuracy is the mean recall over the classes
    present in `y_true_labels`; per-class recall, precision and one-vs-rest AUC are None when
    undefined; confusion_matrix[i][j] counts true classes[i] predicted as classes[j].
    """
    classes = list(classes)
    if isinstance(probabilities, pd.DataFrame):
        probabilities = probabilities[classes]
    probs = np.asarray(probabilities, dtype=float)
    labels = np.asarray(y_true_labels, dtype=object)
    if probs.shape != (len(labels), len(classes)):
        raise ValueError(f"probabilities must have shape ({len(labels)}, {len(classes)}), got {probs.shape}")
    y = pd.Index(classes).get_indexer(labels)
    if (y < 0).any():
        raise ValueError(f"labels outside classes: {sorted(set(map(str, labels[y < 0])))}")
    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(y, predicted, labels=np.arange(len(classes)))
    correct = np.diag(matrix)
    support = matrix.sum(axis=1)
    recall = np.divide(correct, support, out=np.full(len(classes), np.nan), where=support > 0)
    called = matrix.sum(axis=0)
    precision = np.divide(correct, called, out=np.full(len(classes), np.nan), where=called > 0)
    auc = [roc_auc_score(y == j, probs[:, j]) if 0 < support[j] < len(y) else math.nan for j in range(len(classes))]
    return {
        "n": len(y),
        "classes": classes,
        "accuracy": float(correct.sum() / len(y)),
        "balanced_accuracy": balanced_accuracy(y, predicted, len(classes)),
        "macro_auc": _json_float(np.nanmean(auc)) if not np.isnan(auc).all() else None,
        "ece_top_label": expected_calibration_error(y, probs),
        "per_class": {
            code: {
                "support": int(support[j]),
                "recall": _json_float(recall[j]),
                "precision": _json_float(precision[j]),
                "auc": _json_float(auc[j]),
            }
            for j, code in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
    }


def subgroup_table(
    frame: pd.DataFrame,
    score_col: str,
    label_col: str,
    by: list[str],
    threshold: float,
    min_count: int = 30,
    min_positives: int = 5,
) -> pd.DataFrame:
    """Binary performance per subgroup: one row for all of `frame`, then one per value of each
    column in `by` (each column on its own: combine columns beforehand for intersections, bin
    continuous ones such as age). Columns: variable, value (NaN for the missing-value group), n,
    positives, auc (NaN with a single class), sensitivity and specificity at `score >= threshold`
    (NaN when undefined), and too_small (n < min_count or positives < min_positives).
    """
    y, s = check_binary(frame[label_col].to_numpy(), frame[score_col].to_numpy())

    def row(variable: str, value, rows: np.ndarray) -> dict:
        yg, sg = y[rows], s[rows]
        operating = sensitivity_specificity(yg, sg, threshold)
        positives = int(yg.sum())
        return {
            "variable": variable,
            "value": value,
            "n": len(yg),
            "positives": positives,
            "auc": roc_auc_score(yg, sg) if 0 < positives < len(yg) else math.nan,
            "sensitivity": operating["sensitivity"],
            "specificity": operating["specificity"],
            "too_small": len(yg) < min_count or positives < min_positives,
        }

    rows = [row("all", "all", np.arange(len(y)))]
    positional = frame.reset_index(drop=True)
    for column in by:
        groups = positional.groupby(column, dropna=False, sort=True, observed=True).indices
        rows.extend(row(column, value, positions) for value, positions in groups.items())
    return pd.DataFrame(rows)
