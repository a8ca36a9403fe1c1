"""Post-hoc calibration, fitted on a held-out calibration split: temperature scaling of
multi-class logits, isotonic regression of a binary score, and a sensitivity-first choice of the
operating threshold. Fitted calibrators round-trip through plain JSON dicts, and applying one
needs numpy only."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression

from dermsight.evaluation.metrics import check_binary, exact_interval, sensitivity_specificity

TEMPERATURE_BOUNDS = (0.01, 100.0)


def _check_logits(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=float)
    if z.ndim != 2 or z.shape[1] < 2 or not np.isfinite(z).all():
        raise ValueError(f"logits must be a finite (n, n_classes >= 2) array, got shape {z.shape}")
    return z


class TemperatureScaler:
    """softmax(logits / T) with one temperature T > 0 that minimises the negative log-likelihood
    (Guo et al. 2017); T > 1 softens over-confident predictions. T is searched in
    TEMPERATURE_BOUNDS, on log T."""

    def fit(self, logits, y) -> TemperatureScaler:
        """Fit T on `logits` (n, n_classes) and integer class indices `y`."""
        z = _check_logits(logits)
        y = np.asarray(y)
        if y.shape != (len(z),) or not np.isin(y, np.arange(z.shape[1])).all():
            raise ValueError("y must be one class index in [0, n_classes) per row of logits")
        rows = np.arange(len(z))

        def nll(log_t: float) -> float:
            return float(-log_softmax(z / math.exp(log_t), axis=1)[rows, y].mean())

        bounds = tuple(math.log(t) for t in TEMPERATURE_BOUNDS)
        result = minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-6})
        if not result.success:
            raise RuntimeError(f"temperature fit failed: {result.message}")
        self.temperature_ = math.exp(result.x)
        return self

    def transform(self, logits) -> np.ndarray:
        """Calibrated class probabilities, (n, n_classes)."""
        if not hasattr(self, "temperature_"):
            raise NotFittedError("TemperatureScaler is not fitted")
        return softmax(_check_logits(logits) / self.temperature_, axis=1)

    def to_dict(self) -> dict:
        return {"kind": "temperature", "temperature": self.temperature_}

    @classmethod
    def from_dict(cls, data: dict) -> TemperatureScaler:
        if data.get("kind") != "temperature" or not data.get("temperature", 0) > 0:
            raise ValueError(f"not a temperature scaler: {data}")
        scaler = cls()
        scaler.temperature_ = float(data["temperature"])
        return scaler


class IsotonicCalibrator:
    """Non-decreasing map from a binary score to a probability (sklearn IsotonicRegression,
    clipped outside the fitted range). Applied by numpy.interp between the fitted thresholds
    `X_thresholds_` -> `y_thresholds_`, so a calibrator loaded from its dict gives identical
    outputs without sklearn."""

    def fit(self, score, y) -> IsotonicCalibrator:
        """Fit on a binary `score` and 0/1 labels `y`."""
        y, s = check_binary(y, score)
        regression = IsotonicRegression(out_of_bounds="clip").fit(s, y.astype(float))
        self.X_thresholds_ = regression.X_thresholds_.astype(float)
        self.y_thresholds_ = regression.y_thresholds_.astype(float)
        return self

    def transform(self, score) -> np.ndarray:
        """Calibrated probabilities for `score`."""
        if not hasattr(self, "X_thresholds_"):
            raise NotFittedError("IsotonicCalibrator is not fitted")
        return np.interp(np.asarray(score, dtype=float), self.X_thresholds_, self.y_thresholds_)

    def to_dict(self) -> dict:
        return {"kind": "isotonic", "x": self.X_thresholds_.tolist(), "y": self.y_thresholds_.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> IsotonicCalibrator:
        x = np.asarray(data.get("x", []), dtype=float)
        y = np.asarray(data.get("y", []), dtype=float)
        if data.get("kind") != "isotonic" or x.ndim != 1 or x.size == 0 or x.shape != y.shape or (np.diff(x) < 0).any():
            raise ValueError("not an isotonic calibrator: need kind 'isotonic' and equal-length x (ascending), y")
        calibrator = cls()
        calibrator.X_thresholds_, calibrator.y_thresholds_ = x, y
        return calibrator


def choose_threshold(y_true, score, target_sensitivity: float = 0.90) -> dict:
    """The highest threshold whose sensitivity (`score >= threshold`) on this data is at least
    `target_sensitivity`: the k-th highest positive score for the smallest k reaching the
    target, so ties are well defined. Returns threshold, target_sensitivity and the
    `sensitivity_specificity` statistics there."""
    y, s = check_binary(y_true, score)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    positive_scores = np.sort(s[y == 1])
    if positive_scores.size == 0:
        raise ValueError("choose_threshold needs at least one positive in y_true")
    n_positive = positive_scores.size
    candidates = np.unique(positive_scores)[::-1]
    sensitivity = (n_positive - np.searchsorted(positive_scores, candidates, side="left")) / n_positive
    threshold = float(candidates[np.argmax(sensitivity >= target_sensitivity)])
    return {
        "threshold": threshold,
        "target_sensitivity": float(target_sensitivity),
        **sensitivity_specificity(y, s, threshold),
    }


MIN_SOURCE_MELANOMAS = 20  # a source with fewer melanomas sets no threshold of its own (too noisy)


def choose_threshold_every_source(y_true, score, sources, target_sensitivity: float = 0.90) -> dict:
    """The lowest of the pooled threshold (see `choose_threshold`) and each source's own one
    (sources with at least MIN_SOURCE_MELANOMAS melanomas): the target sensitivity then holds
    on every source's held-out images, not only on their pooled mix, at the cost of
    specificity where a source's risks run low. Returns what `choose_threshold` does, at the
    chosen threshold, plus `per_source` thresholds and the `rule`."""
    y, s = check_binary(y_true, score)
    sources = np.asarray(sources, dtype=object)
    pooled = choose_threshold(y, s, target_sensitivity)
    per_source = {
        str(source): choose_threshold(y[sources == source], s[sources == source], target_sensitivity)["threshold"]
        for source in np.unique(sources)
        if y[sources == source].sum() >= MIN_SOURCE_MELANOMAS
    }
    lowest = min([pooled["threshold"], *per_source.values()])
    return {
        "threshold": lowest,
        "target_sensitivity": float(target_sensitivity),
        **sensitivity_specificity(y, s, lowest),
        "rule": "the lowest of the pooled and each source's threshold for the target sensitivity",
        "per_source": per_source,
    }


def choose_threshold_held_out_sources(y_true, score, sources, held_out, target_sensitivity: float = 0.90) -> dict:
    """The threshold for the target sensitivity on the pooled images of the sources held out whole
    (`held_out`: predicted by networks that never saw their source), what a new clinic should
    expect, with each such source's sensitivity and specificity there (exact 95% intervals).
    Returns what `choose_threshold` does on those images, plus `rule`, `pooled_held_out` and
    `held_out_sources`."""
    y, s = check_binary(y_true, score)
    sources, held_out = np.asarray(sources, dtype=object), np.asarray(held_out, dtype=bool)
    if not (y[held_out] == 1).any():
        raise ValueError("no melanoma among the images of sources held out whole")
    chosen = choose_threshold(y[held_out], s[held_out], target_sensitivity)
    threshold = chosen["threshold"]

    def figures(rows: np.ndarray) -> dict:
        positive, negative = rows & (y == 1), rows & (y == 0)
        return {
            "images": int(rows.sum()), "melanomas": int(positive.sum()),
            "sensitivity": exact_interval(int((s[positive] >= threshold).sum()), int(positive.sum())),
            "specificity": exact_interval(int((s[negative] < threshold).sum()), int(negative.sum())),
        }

    return {
        **chosen,
        "rule": "pooled leave-one-source-out: the highest threshold reaching the target sensitivity on the pooled "
                "images of every source held out whole (networks that never saw their source)",
        "pooled_held_out": figures(held_out),
        "held_out_sources": {str(source): figures(held_out & (sources == source))
                             for source in sorted(set(sources[held_out]))
                             if ((sources == source) & held_out & (y == 1)).any()},
    }
