"""Fitting a site profile (see dermsight.models.site_profile) from one clinic's predictions.

With labels (`fit_profile(..., labels=...)`):
- the threshold: the highest one that reaches the target sensitivity on the site's melanomas,
  or, with a `confidence`, the highest whose exact one-sided (Clopper-Pearson) lower bound of
  sensitivity reaches it;
- sensitivity and specificity there, each with an exact two-sided 95% interval;
- melanoma_risk recalibrated to the site: Platt scaling on logit(risk) (two parameters);
- prevalence: the labelled share (exact interval), with the estimate from the images beside it.

Without labels: the prevalence estimated from the images (`PrevalenceEstimator`) and the risk
shifted to that prior (slope 1); the threshold stays the bundle's (under a pure prior shift a
threshold keeps its sensitivity), with the sensitivity it had on sources the networks never saw.

How many melanomas make a usable interval (`melanomas_needed`): the smallest n whose exact 95%
interval, at the target sensitivity observed, reaches no further than `margin` below it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression

from dermsight.evaluation.held_out import load_out_of_fold
from dermsight.evaluation.metrics import exact_interval, expected_calibration_error
from dermsight.data.inputs import records_from_inputs
from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import Bundle
from dermsight.models.site_profile import FORMAT_VERSION, KIND, SiteProfile, from_dict, recalibrate

LEVEL = 0.95  # two-sided level of every reported interval
LABEL_LAYOUTS = (("image_name", "melanoma"), ("image", "MEL"), ("image_name", "target"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".webp")
USABLE_MARGIN = 0.05  # an interval is usable when its lower end is within this of the estimate
N_BOOT = 1000


class CalibrationError(ValueError):
    """Input a site profile cannot be fitted from; the message names the file, column or count."""


def lower_bound(successes: int, trials: int, confidence: float) -> float:
    """The exact one-sided lower confidence bound of a proportion."""
    test = binomtest(int(successes), int(trials), alternative="greater")
    return float(test.proportion_ci(confidence, method="exact").low)


def melanomas_needed(target: float = 0.90, margin: float = USABLE_MARGIN, level: float = LEVEL) -> int:
    """The fewest melanomas for which, with sensitivity `target` observed (ceil(target * n)
    detected), the exact `level` interval's lower end lies within `margin` of the estimate."""
    n = 1
    while True:
        k = math.ceil(target * n)
        if k / n - binomtest(k, n).proportion_ci(level, method="exact").low <= margin:
            return n
        n += 1


def melanomas_for_confidence(target: float, confidence: float) -> int:
    """The fewest melanomas whose one-sided lower bound can reach `target` at all (every one detected)."""
    return math.ceil(math.log(1 - confidence) / math.log(target))


def read_labels(path: Path | str) -> pd.Series:
    """A labels CSV -> 0/1 melanoma per image id. Layouts: image_name,melanoma (0/1), the ISIC
    ground truth image,MEL and SIIM-ISIC image_name,target; ids lose an image-file suffix."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such labels file") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CalibrationError(f"{path}: not a readable CSV ({err})") from None
    columns = {c.strip(): c for c in frame.columns}
    layout = next(((i, v) for i, v in LABEL_LAYOUTS if i in columns and v in columns), None)
    if layout is None:
        expected = " or ".join(f"{i},{v}" for i, v in LABEL_LAYOUTS)
        found = ", ".join(map(str, frame.columns)) or "none"
        raise CalibrationError(f"{path}: needs the columns {expected}; it has {found}")
    ids = frame[columns[layout[0]]].str.strip().map(_strip_suffix)
    text = frame[columns[layout[1]]].str.strip()
    value = pd.to_numeric(text, errors="coerce")
    bad = value.isna() | ~value.isin((0, 1)) | (ids == "")
    if bad.any():
        rows = (np.flatnonzero(bad.to_numpy()) + 2).tolist()  # the header is line 1
        raise CalibrationError(
            f"{path}: {int(bad.sum())} row(s) without an image id or with a {layout[1]} that is not 0 or 1 "
            f"(line(s) {', '.join(map(str, rows[:5]))}: {', '.join(repr(t) for t in text[bad].head(5))})"
        )
    labels = pd.Series(value.astype(int).to_numpy(), index=ids.to_numpy(), name="melanoma")
    conflicting = labels.groupby(level=0).nunique()
    conflicting = conflicting[conflicting > 1].index.tolist()
    if conflicting:
        examples = ", ".join(conflicting[:5])
        raise CalibrationError(f"{path}: {len(conflicting)} image(s) labelled both 0 and 1, e.g. {examples}")
    if labels.empty:
        raise CalibrationError(f"{path}: no label rows")
    return labels[~labels.index.duplicated()]


def _strip_suffix(name: str) -> str:
    return name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name


def match_labels(images: pd.Series, labels: pd.Series, labels_path: Path | str) -> np.ndarray:
    """The 0/1 label of every scored image (in order). Every image needs a label and every label
    an image; else CalibrationError with the counts and a few ids."""
    ids = images.astype(str).map(_strip_suffix)
    unlabelled = ids[~ids.isin(labels.index)]
    if len(unlabelled):
        raise CalibrationError(
            f"{len(unlabelled)} of {len(ids)} scored image(s) have no label in {labels_path}, e.g. "
            f"{', '.join(unlabelled.head(5))}: label every image, or leave those images out of INPUTS"
        )
    missing = labels.index[~labels.index.isin(set(ids))]
    if len(missing):
        raise CalibrationError(
            f"{len(missing)} of {len(labels)} label row(s) of {labels_path} name images not found among the scored "
            f"INPUTS (missing or unreadable), e.g. {', '.join(missing[:5])}"
        )
    y = labels.loc[ids.to_numpy()].to_numpy()
    if y.sum() == 0 or y.sum() == len(y):
        kind = "melanoma" if y.sum() == 0 else "benign case"
        raise CalibrationError(
            f"{labels_path}: the {len(y)} labelled case(s) include no {kind}: a threshold needs both"
        )
    return y


def choose_site_threshold(y, risk, target: float = 0.90, confidence: float | None = None) -> dict:
    """The highest threshold (one of the melanomas' risks) whose sensitivity on (y, risk) reaches
    `target`, or, with `confidence`, whose exact one-sided lower bound does. Returns the threshold,
    the rule, the sensitivity and specificity there with exact intervals (and the lower bound)."""
    y, risk = np.asarray(y).astype(int), np.asarray(risk, dtype=float)
    melanoma = np.sort(risk[y == 1])[::-1]
    n = len(melanoma)
    if confidence is not None and lower_bound(n, n, confidence) < target:
        raise CalibrationError(
            f"{n} melanomas cannot show sensitivity >= {target:.2f} at {confidence:.0%} confidence even if every "
            f"one is detected: at least {melanomas_for_confidence(target, confidence)} are needed "
            "(exact binomial bound)"
        )
    for k in range(1, n + 1):  # melanoma[k - 1] is the highest threshold detecting k of them (ties: more)
        detected = int(np.sum(melanoma >= melanoma[k - 1]))
        meets = lower_bound(detected, n, confidence) >= target if confidence else detected / n >= target
        if meets:
            break
    threshold = float(melanoma[k - 1])
    benign = risk[y == 0]
    result = {
        "model_threshold": threshold,
        "rule": (f"the highest threshold whose exact one-sided {confidence:.0%} lower bound of sensitivity reaches "
                 f"{target:.2f} on the site's cases" if confidence else
                 f"the highest threshold reaching sensitivity {target:.2f} on the site's cases"),
        "target_sensitivity": target,
        "confidence": confidence,
        "sensitivity": exact_interval(detected, n),
        "specificity": exact_interval(int(np.sum(benign < threshold)), len(benign)),
    }
    if confidence:
        result["sensitivity"]["lower_bound"] = {"value": lower_bound(detected, n, confidence), "confidence": confidence,
                                                "one_sided": True}
    return result


def platt(y, risk) -> tuple[float, float]:
    """Slope and intercept of sigmoid(a * logit(risk) + b) fitted to 0/1 `y` (unpenalised logistic
    regression). CalibrationError when the risk does not rank melanomas higher (slope <= 0)."""
    features = np.log(np.clip(risk, 1e-6, 1 - 1e-6) / np.clip(1 - np.asarray(risk), 1e-6, 1))[:, None]
    model = LogisticRegression(C=np.inf, max_iter=1000).fit(features, np.asarray(y).astype(int))
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope <= 0:
        raise CalibrationError(f"the model's melanoma risk does not rank this site's melanomas above its benign cases "
                               f"(recalibration slope {slope:.3f}): DermSight cannot be calibrated for these images")
    return slope, intercept


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class PrevalenceEstimator:
    """Melanoma prevalence from unlabelled images: the mean of the risks after a Platt map fitted on
    the bundle's out-of-fold predictions (probabilistic classify-and-count). Chosen over
    Saerens' EM, adjusted classify-and-count and HDy, which diverged on the left-out sources
    (bench/site_calibration.py compares them); its interval is a bootstrap over images, and
    `between_sites` is how far it missed on each source the networks never saw."""

    def __init__(self, slope: float, intercept: float, prior: float, between_sites: dict | None = None):
        self.slope, self.intercept, self.prior, self.between_sites = slope, intercept, prior, between_sites or {}

    @classmethod
    def fit(cls, oof: pd.DataFrame) -> PrevalenceEstimator:
        """Fit on an out-of-fold table (MEL, diagnosis, source), and measure it on every source left
        out: fitted without that source, estimated on its images."""
        y = (oof["diagnosis"] == "MEL").to_numpy().astype(int)
        risk = oof["MEL"].to_numpy(dtype=float)
        between = {}
        for source in sorted(oof["source"].dropna().unique()):
            rows = (oof["source"] == source).to_numpy()
            if rows.all() or y[rows].sum() == 0:
                continue
            slope, intercept = platt(y[~rows], risk[~rows])
            estimate = float(recalibrate(risk[rows], slope, intercept).mean())
            between[str(source)] = {"truth": float(y[rows].mean()), "estimate": estimate,
                                    "error": estimate - float(y[rows].mean()), "images": int(rows.sum())}
        return cls(*platt(y, risk), prior=float(y.mean()), between_sites=between)

    def estimate(self, risk) -> float:
        return float(recalibrate(risk, self.slope, self.intercept).mean())

    def estimate_with_interval(self, risk, n_boot: int = N_BOOT, seed: int = 0) -> dict:
        """The estimate, a percentile bootstrap interval over the images, and that interval widened
        by the largest miss on a left-out source (`with_site_error`: the honest one)."""
        site = recalibrate(np.asarray(risk, dtype=float), self.slope, self.intercept)
        rng = np.random.default_rng(seed)
        boots = site[rng.integers(0, len(site), (n_boot, len(site)))].mean(axis=1)
        low, high = np.percentile(boots, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
        miss = max((abs(s["error"]) for s in self.between_sites.values()), default=0.0)
        return {
            "value": float(site.mean()), "ci_low": float(low), "ci_high": float(high), "level": LEVEL,
            "method": "mean of Platt-recalibrated risks (fitted on the bundle's out-of-fold predictions); "
                      "percentile bootstrap over images",
            "with_site_error": {"ci_low": max(0.0, float(low) - miss), "ci_high": min(1.0, float(high) + miss),
                                "largest_miss_on_a_left_out_source": miss},
            "left_out_sources": self.between_sites,
        }


def _warnings(n_melanomas: int, target: float) -> list[str]:
    needed, rough = melanomas_needed(target), melanomas_needed(target, 2 * USABLE_MARGIN)
    if n_melanomas >= needed:
        return []
    return [f"only {n_melanomas} melanomas: the sensitivity interval is wide (about {needed} are needed for its "
            f"95% lower end to lie within {USABLE_MARGIN:.2f} of the estimate, {rough} for {2 * USABLE_MARGIN:.2f})"]


def fit_profile(
    bundle: Bundle,
    images: pd.Series,
    risk,
    *,
    labels: pd.Series | None = None,
    labels_path: Path | str | None = None,
    target: float = 0.90,
    confidence: float | None = None,
    site: str | None = None,
    oof: pd.DataFrame | None = None,
) -> SiteProfile:
    """A checked site profile for `bundle` from its melanoma `risk` on the site's `images` (the
    bundle's own risk, no profile applied) and, optionally, their `labels` (see `read_labels`).
    Raises CalibrationError for labels that do not match the images or hold one class only."""
    risk = np.asarray(risk, dtype=float)
    if len(risk) == 0:
        raise CalibrationError("no image was scored: nothing to calibrate on")
    if np.isnan(risk).any():
        raise CalibrationError(f"{int(np.isnan(risk).sum())} images have no risk (refused by the gate?): leave them out first")
    estimator = PrevalenceEstimator.fit(load_out_of_fold(bundle) if oof is None else oof)
    from_images = estimator.estimate_with_interval(risk)
    data: dict = {
        "kind": KIND, "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "site": site, "bundle": {"name": bundle.name, "version": bundle.version},
        "n_cases": int(len(risk)), "prevalence_from_images": from_images,
    }
    if labels is not None:
        y = match_labels(images, labels, labels_path or "labels")
        chosen = choose_site_threshold(y, risk, target, confidence)
        slope, intercept = platt(y, risk)
        prevalence = exact_interval(int(y.sum()), len(y))
        calibrated = recalibrate(risk, slope, intercept)
        data.update(chosen)
        data.update({
            "n_melanomas": int(y.sum()), "prevalence": prevalence["value"], "prevalence_interval": prevalence,
            "recalibration": {
                "method": "platt (logistic regression on logit(melanoma_risk), the site's labelled cases)",
                "slope": slope, "intercept": intercept, "ece_on": "the calibration cases",
                "ece_before": expected_calibration_error(y, risk),
                "ece_after": expected_calibration_error(y, calibrated),
            },
            "warnings": _warnings(int(y.sum()), target),
            "melanomas_needed": _needed(target, confidence),
        })
    else:
        threshold = bundle.threshold
        pooled = threshold.get("pooled_held_out") or {}
        prior = estimator.prior
        intercept = _logit(min(max(from_images["value"], 1e-4), 1 - 1e-4)) - _logit(prior)
        data.update({
            "model_threshold": bundle.model_threshold, "target_sensitivity": threshold.get("target_sensitivity"),
            "confidence": None,
            "rule": "no labels: the bundle's threshold (a prior shift keeps its sensitivity); risk shifted to the "
                    "prevalence estimated from the images",
            **{key: pooled.get(key) or {"value": threshold.get(key, 0.0), "ci_low": 0.0, "ci_high": 1.0}
               for key in ("sensitivity", "specificity")},
            "sensitivity_measured_on": "images of sources the networks never saw (not this site's)",
            "n_melanomas": 0, "prevalence": from_images["value"], "prevalence_interval": from_images,
            "recalibration": {"method": f"prior shift from the training prior {prior:.3f} to the estimated prevalence",
                              "slope": 1.0, "intercept": intercept},
            "warnings": ["no labels: the sensitivity is the one measured at other clinics, and the prevalence estimate "
                         "can be far off where the model ranks a site's melanomas poorly (see prevalence_interval)"],
        })
    data["threshold"] = float(recalibrate(data["model_threshold"], data["recalibration"]["slope"],
                                          data["recalibration"]["intercept"]))
    return from_dict(data)


def _needed(target: float, confidence: float | None) -> dict:
    needed = {
        "usable_interval": melanomas_needed(target),
        "how": f"smallest n whose exact {LEVEL:.0%} interval, with ceil({target:.2f} n) melanomas detected, has "
               f"its lower end within {USABLE_MARGIN:.2f} of the estimate "
               "(scipy.stats.binomtest(...).proportion_ci, exact)",
        "rough_interval": melanomas_needed(target, 2 * USABLE_MARGIN),
    }
    if confidence:
        needed["confidence_possible"] = melanomas_for_confidence(target, confidence)
    return needed


def without_refused(table: pd.DataFrame, labels: pd.Series | None = None) -> tuple[pd.DataFrame, pd.Series | None, list[str]]:
    """A prediction table's rows the gate accepted, their labels, and a message for each refused one:
    a refused image gets no risk in use (predict, the API), so it cannot set the operating point."""
    refused = ~table["looks_dermoscopic"].astype(bool)
    messages = [f"{image}: refused as not dermoscopic (no risk): left out of the calibration" for image in table.loc[refused, "image"]]
    if labels is not None:
        labels = labels.drop(table.loc[refused, "image"].astype(str).map(_strip_suffix), errors="ignore")
    return table[~refused], labels, messages


def calibrate_site(
    inputs: list[str],
    bundle: Bundle,
    *,
    labels_path: Path | str | None = None,
    target: float = 0.90,
    confidence: float | None = None,
    site: str | None = None,
    cache=None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[SiteProfile, list[str]]:
    """What `dermsight calibrate` does: read the labels (first, so a bad file fails before any
    scoring), score INPUTS (anything `predict` reads) with the bundle's own operating point, and
    fit the profile. Returns it and what was skipped (unreadable inputs, as messages)."""
    labels = read_labels(labels_path) if labels_path is not None else None
    records, problems = records_from_inputs(inputs)
    if records.empty:
        raise CalibrationError(f"no images found in {', '.join(inputs)}")
    plain = dataclasses.replace(bundle, site=None)
    table, unreadable = Predictor(plain).predict_records(records, batch_size=batch_size, progress=progress, cache=cache)
    skipped = [str(p) for p in problems] + [f"{image}: {message}" for image, message in unreadable.items()]
    table, labels, refused = without_refused(table, labels)
    skipped += refused
    profile = fit_profile(plain, table["image"], table["melanoma_risk"].to_numpy(), labels=labels,
                          labels_path=labels_path, target=target, confidence=confidence, site=site)
    return profile, skipped
