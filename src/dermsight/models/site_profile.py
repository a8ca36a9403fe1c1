"""A site profile: one clinic's operating point for one bundle (`dermsight calibrate` writes it).

    threshold        the referral threshold on the site's melanoma_risk (model_threshold: the same
                     cut on the bundle's own risk, which decides above_threshold)
    recalibration    melanoma_risk -> sigmoid(slope * logit(risk) + intercept): Platt scaling on the
                     site's labelled cases, or a prior shift to its estimated prevalence (slope 1)
    sensitivity, specificity, prevalence   estimates with their intervals, n_cases, n_melanomas
    bundle           the bundle it was made for (name and version): another bundle refuses it

Reading, writing (atomically) and checking live here, below inference, so that the Predictor,
the batch engines, `evaluate` and the app all apply a profile the same way: a bundle carries it
(`bundle.with_site`), and the prediction table is made from `Bundle.site_probabilities` and
`Bundle.model_threshold`. The recalibration is monotone and affine in logit space, so the
ranking, the referrals and the patient context (ranks and logit z-scores) are unchanged by it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KIND = "dermsight-site-profile"
FORMAT_VERSION = 1
ENVIRONMENT = "DERMSIGHT_SITE"  # the app reads its profile from here when --site is not given
_ESTIMATES = ("sensitivity", "specificity")
_EPS = 1e-6


class SiteProfileError(ValueError):
    """A site profile that cannot be used: missing, damaged, or made for another bundle."""


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def recalibrate(risk, slope: float, intercept: float) -> np.ndarray:
    """sigmoid(slope * logit(risk) + intercept), risk clipped to [1e-6, 1 - 1e-6]."""
    return _sigmoid(slope * _logit(risk) + intercept)


@dataclass(frozen=True)
class SiteProfile:
    """A checked site profile (`read_profile`, `from_dict`); `data` is the JSON as written."""

    data: dict
    path: Path | None = None

    @property
    def threshold(self) -> float:
        return float(self.data["threshold"])

    @property
    def model_threshold(self) -> float:
        return float(self.data["model_threshold"])

    @property
    def slope(self) -> float:
        return float(self.data["recalibration"]["slope"])

    @property
    def intercept(self) -> float:
        return float(self.data["recalibration"]["intercept"])

    @property
    def target_sensitivity(self) -> float | None:
        return self.data.get("target_sensitivity")

    def recalibrate(self, risk) -> np.ndarray:
        """The site's melanoma risk for the bundle's `risk`."""
        return recalibrate(risk, self.slope, self.intercept)

    def apply(self, probabilities: np.ndarray, melanoma_index: int) -> np.ndarray:
        """Class probabilities (..., K) with the melanoma one recalibrated to the site and the
        others rescaled to keep their ratios (their sum stays 1), in the input's dtype."""
        p = np.asarray(probabilities, dtype=np.float64)
        risk = p[..., melanoma_index]
        site = self.recalibrate(risk)
        out = p * ((1.0 - site) / np.maximum(1.0 - risk, _EPS))[..., None]
        out[..., melanoma_index] = site
        return out.astype(np.asarray(probabilities).dtype, copy=False)

    def statement(self) -> str:
        """One line for the page and the API: which operating point is active and how sure it is."""
        d = self.data
        sensitivity = d["sensitivity"]
        where = f" at {d['site']}" if d.get("site") else ""
        if d.get("n_melanomas"):
            text = (
                f"calibrated on {d['n_cases']:,} cases ({d['n_melanomas']:,} melanomas){where}: sensitivity "
                f"{sensitivity['value']:.2f} ({sensitivity['ci_low']:.2f}-{sensitivity['ci_high']:.2f})"
            )
        else:
            text = (
                f"adjusted to an estimated melanoma prevalence of {d['prevalence']:.1%}{where} from {d['n_cases']:,} "
                f"unlabelled images; threshold from other clinics: sensitivity {sensitivity['value']:.2f} "
                f"({sensitivity['ci_low']:.2f}-{sensitivity['ci_high']:.2f}) there"
            )
        return text + f", referral threshold {self.threshold:.3f}"

    def summary(self) -> dict:
        """What a report or the API shows of the profile."""
        keys = ("site", "rule", "threshold", "model_threshold", "target_sensitivity", "confidence", "sensitivity",
                "specificity", "n_cases", "n_melanomas", "prevalence", "prevalence_interval", "warnings")
        return {"statement": self.statement(), "path": str(self.path) if self.path else None,
                **{k: self.data.get(k) for k in keys}}


def from_dict(data: dict, where: str = "site profile") -> SiteProfile:
    """Check a profile's JSON: its kind and version, every needed key, numbers in range, an
    increasing recalibration. Raises SiteProfileError naming `where` and what is wrong."""
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise SiteProfileError(f"{where}: not a DermSight site profile (no \"kind\": \"{KIND}\")")
    if data.get("format_version") != FORMAT_VERSION:
        raise SiteProfileError(f"{where}: site profile format {data.get('format_version')} is not {FORMAT_VERSION}")
    needed = ("bundle", "threshold", "model_threshold", "recalibration", "sensitivity", "specificity", "n_cases",
              "n_melanomas", "prevalence", "rule")
    missing = [key for key in needed if key not in data]
    if missing:
        raise SiteProfileError(f"{where}: damaged site profile, missing key(s) {', '.join(missing)}")
    try:
        numbers = {key: float(data[key]) for key in ("threshold", "model_threshold", "prevalence")}
        slope, intercept = float(data["recalibration"]["slope"]), float(data["recalibration"]["intercept"])
        estimates = {f"{key} {part}": float(data[key][part])
                     for key in _ESTIMATES for part in ("value", "ci_low", "ci_high")}
        version = str(data["bundle"]["version"])
        int(data["n_cases"]), int(data["n_melanomas"])
    except (KeyError, TypeError, ValueError) as err:
        raise SiteProfileError(f"{where}: damaged site profile ({type(err).__name__}: {err})") from None
    bad = [k for k, v in {**numbers, **estimates}.items() if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise SiteProfileError(f"{where}: damaged site profile, {', '.join(bad)} not a number in [0, 1]")
    if not (math.isfinite(slope) and slope > 0 and math.isfinite(intercept)):
        raise SiteProfileError(f"{where}: damaged site profile, recalibration slope {slope} / intercept {intercept}")
    if not version:
        raise SiteProfileError(f"{where}: damaged site profile, no bundle version")
    return SiteProfile(data)


def read_profile(path: Path | str) -> SiteProfile:
    """Read and check a profile file (`bundle.with_site` also checks that it fits the bundle)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SiteProfileError(f"{path}: no such site profile (make one with `dermsight calibrate`)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SiteProfileError(f"{path}: not readable ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SiteProfileError(f"{path}: damaged site profile, not JSON ({err})") from None
    return dataclasses.replace(from_dict(data, str(path)), path=path)


def write_profile(profile: SiteProfile | dict, path: Path | str) -> Path:
    """Write a (checked) profile atomically: a temporary file in the same folder, then renamed."""
    data = profile.data if isinstance(profile, SiteProfile) else from_dict(profile).data
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a profile is read by the app's user too
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
