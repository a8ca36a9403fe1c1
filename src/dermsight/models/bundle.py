"""A model bundle: one directory that carries everything needed to use a model.

    bundle.json   classes, preprocessing, metadata features, TTA views, calibration,
                  operating threshold, validation metrics, how it was trained, and the
                  uncertainty level (the members' risk spread called "unsure")
    model.onnx    image + metadata -> logits, embedding, class activation maps, gate
                  features (float, or int8 when trained with --int8)
    weights.pt    the float torch weights (stored fp16): the float reference, for fine-tuning further
    MODEL_CARD.md provenance, intended use, limits

Reading a bundle needs neither torch nor timm.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermsight.imaging.preprocess import Preprocessing
from dermsight.models.site_profile import SiteProfile, SiteProfileError, read_profile

FORMAT_VERSION = 1
DEFAULT_BUNDLE = Path(__file__).resolve().parents[3] / "bundles" / "default"


class BundleError(ValueError):
    """A directory that is not a usable DermSight bundle."""


@dataclass
class Bundle:
    """A bundle directory as read (`load_bundle`) or about to be written (`save`): what the
    Predictor needs to see images as the network was trained on them (classes, preprocessing,
    metadata features, test-time views), to calibrate and decide (temperature, threshold,
    uncertainty level), and what the model card reports (metrics, training provenance)."""

    path: Path
    name: str
    backbone: str
    classes: list[str]
    preprocessing: Preprocessing
    metadata_features: list[str]
    views: list[str]
    temperature: float = 1.0
    threshold: dict = field(default_factory=dict)  # {"melanoma": t, "target_sensitivity": .., ...}
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    uncertainty: dict = field(default_factory=dict)  # {"risk_spread_level": s, ...}: bench/uncertainty.py
    site: SiteProfile | None = None  # a clinic's operating point (with_site); never saved here

    @property
    def unsure_level(self) -> float | None:
        """The members' risk spread above which a result is called unsure (None: no level fitted)."""
        level = self.uncertainty.get("risk_spread_level")
        return None if level is None else float(level)

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def melanoma_threshold(self) -> float:
        """The referral threshold on the melanoma_risk shown: the site profile's when one is attached."""
        return self.site.threshold if self.site else self.model_threshold

    @property
    def model_threshold(self) -> float:
        """The same cut on the network's own (uncalibrated-to-the-site) risk: what decides above_threshold."""
        return self.site.model_threshold if self.site else float(self.threshold.get("melanoma", 0.5))

    def site_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """Class probabilities (..., K) as the attached site profile recalibrates them (unchanged without one)."""
        return self.site.apply(probabilities, self.classes.index("MEL")) if self.site else probabilities

    @property
    def version(self) -> str:
        return f"{self.name}@{self.training.get('created', 'unknown')}"

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "backbone": self.backbone,
            "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
            "metadata_features": self.metadata_features,
            "views": self.views,
            "calibration": {"method": "temperature", "temperature": self.temperature},
            "threshold": self.threshold,
            "metrics": self.metrics,
            "training": self.training,
            **({"uncertainty": self.uncertainty} if self.uncertainty else {}),
        }

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "bundle.json").write_text(json.dumps(self.to_dict(), indent=1))


def load_bundle(path: Path | str | None = None) -> Bundle:
    """Read a bundle directory (the committed default when `path` is None)."""
    path = Path(path) if path else DEFAULT_BUNDLE
    config_path = path / "bundle.json"
    if not config_path.exists():
        raise BundleError(f"{path}: not a DermSight model bundle (no bundle.json)")
    try:
        data = json.loads(config_path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: bundle format {data.get('format_version')} is not {FORMAT_VERSION}")
        bundle = Bundle(
            path=path,
            name=data["name"],
            backbone=data["backbone"],
            classes=list(data["classes"]),
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            metadata_features=list(data["metadata_features"]),
            views=list(data["views"]),
            temperature=float(data["calibration"]["temperature"]),
            threshold=data.get("threshold", {}),
            metrics=data.get("metrics", {}),
            training=data.get("training", {}),
            uncertainty=data.get("uncertainty", {}),
        )
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise BundleError(f"{config_path}: malformed bundle config ({err})") from None
    if not bundle.onnx_path.exists():
        raise BundleError(f"{path}: model.onnx is missing")
    return bundle


def check_bundle(profile: SiteProfile, bundle: Bundle) -> None:
    """A profile fits only the bundle it was calibrated with (same name and version)."""
    made_for = profile.data["bundle"]
    if made_for.get("version") != bundle.version:
        where = profile.path or "site profile"
        raise SiteProfileError(
            f"{where} was made for bundle {made_for.get('version')}, not {bundle.version} "
            f"({bundle.path}): calibrate again with this bundle"
        )


def with_site(bundle: Bundle, site: SiteProfile | Path | str | None) -> Bundle:
    """`bundle` carrying the site profile (a path is read and checked against it); None: the
    bundle as it is."""
    if site is None:
        return bundle
    profile = site if isinstance(site, SiteProfile) else read_profile(site)
    check_bundle(profile, bundle)
    return dataclasses.replace(bundle, site=profile)


def operating_point(bundle: Bundle) -> str:
    """The active operating point in one line: the attached profile's, or the bundle's own."""
    return bundle.site.statement() if bundle.site else default_statement(bundle)


def default_statement(bundle: Bundle) -> str:
    """Without a profile: where the bundle's threshold comes from and how it held on the sources
    the networks never saw (from bundle.json's threshold section)."""
    threshold = bundle.threshold
    held = threshold.get("held_out_sources") or {}
    text = f"no site profile: referral threshold {bundle.melanoma_threshold:.3f} from other clinics"
    if held:
        sens = [s["sensitivity"]["value"] for s in held.values()]
        spec = [s["specificity"]["value"] for s in held.values()]
        text += (
            f"; on {len(held)} sources the networks never saw it reached sensitivity {min(sens):.2f}-{max(sens):.2f} "
            f"and specificity {min(spec):.2f}-{max(spec):.2f}: calibrate on your own cases (`dermsight calibrate`)"
        )
    return text
