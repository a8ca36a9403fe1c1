"""The evaluation result as a JSON-ready dict: its header (built once for every mode) and the
conversion of numpy and pandas values to plain JSON."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd

from dermsight.models.bundle import Bundle, operating_point

FORMAT_VERSION = 1


def evaluation_result(mode: str, bundle: Bundle, ignored: dict, warnings: list[str], metrics: dict, **extra) -> dict:
    """kind, format_version, mode, created, bundle, ignored, warnings, then `metrics` and `extra`: as JSON."""
    result = {
        "kind": "dermsight-evaluation",
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bundle": bundle_info(bundle),
        "ignored": ignored,
        "warnings": warnings,
        **metrics,
        **extra,
    }
    return to_json(result)


def bundle_info(bundle: Bundle) -> dict:
    """What a result records of the bundle it evaluated."""
    return {
        "name": bundle.name,
        "path": str(bundle.path),
        "version": bundle.version,
        "classes": bundle.classes,
        "threshold": bundle.melanoma_threshold,
        "target_sensitivity": bundle.threshold.get("target_sensitivity"),
        "temperature": bundle.temperature,
        "operating_point": operating_point(bundle),
        "site": bundle.site.summary() if bundle.site else None,
    }


def to_json(value):
    """`value` with numpy scalars as Python ones, non-finite floats and pandas' missing values as None."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else float(value)
    if value is pd.NA or value is pd.NaT:
        return None
    return value
