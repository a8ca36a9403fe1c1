"""Whether a bundle's melanoma threshold holds on evaluated data, in a sentence a reader can act on."""

from __future__ import annotations

import numpy as np

from dermsight.evaluation.calibration import choose_threshold
from dermsight.evaluation.join import DECIMALS
from dermsight.models.bundle import Bundle


def threshold_check(bundle: Bundle, melanoma: dict, y: np.ndarray, risk: np.ndarray) -> dict:
    """The bundle's threshold, its validation figures and this data's, the threshold that would
    reach the target sensitivity here, and the verdict: holds / below target (within the
    interval) / does not hold."""
    site = bundle.site.data if bundle.site else None  # a site profile's operating point replaces the bundle's
    target = site["target_sensitivity"] if site else bundle.threshold.get("target_sensitivity")
    sensitivity = melanoma["sensitivity"]
    check = {
        "threshold": bundle.melanoma_threshold,
        "threshold_compared": round(bundle.melanoma_threshold, DECIMALS),
        "target_sensitivity": target,
        "validation_sensitivity": site["sensitivity"]["value"] if site else bundle.threshold.get("sensitivity"),
        "validation_specificity": site["specificity"]["value"] if site else bundle.threshold.get("specificity"),
        "sensitivity": sensitivity,
        "specificity": melanoma["specificity"],
        "here": choose_threshold(y, risk, target) if target else None,
    }
    check["holds"], check["verdict"] = _verdict(target, sensitivity, melanoma["positives"], check["here"])
    return check


def _verdict(target: float | None, sensitivity: dict, positives: int, here: dict | None) -> tuple[bool | None, str]:
    value, high = sensitivity["value"], sensitivity["ci_high"]
    if target is None:
        return None, "the bundle records no target sensitivity"
    if value >= target:
        return True, f"holds: sensitivity {value:.1%} reaches the target {target:.0%}"
    if high is not None and high >= target:
        return False, (
            f"below target: sensitivity {value:.1%} < {target:.0%}, though the target lies within the 95% interval "
            f"({positives} melanomas is too few to tell)"
        )
    interval = f" (95% CI up to {high:.1%})" if high is not None else ""
    return False, (
        f"does not hold: sensitivity {value:.1%}{interval} is below the target {target:.0%}; "
        f"a threshold of {here['threshold']:.4f} would reach it on this data"
    )
