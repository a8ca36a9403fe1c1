"""Fit the image-quality thresholds on the shared training sources and measure what they catch.

    .venv/bin/python bench/quality.py [--per-source 300] [--write] > bench/quality_results.json

Every source contributes the same number of images (a random `--per-source` of each), so no
source's camera sets the limits alone. Each threshold is a quantile of that pooled sample:
sharpness at its 1st percentile, brightness at its 0.5th and 99.5th, highlights at the 99.5th,
the lesion's distance from the centre at the 95th (lesions off the middle are common in real
dermoscopy; a looser limit would catch fewer cut-off lesions, measured below). Then:

- `false_warnings`: the share of each source's real images that earn each warning, on a second
  random sample of the same size that the thresholds were not fitted on (`false_warnings_fitted`:
  on the fitted sample, which its own quantiles flatter, for comparison);
- `detected`: the share of degraded copies of that second sample's images that earn the
  warning meant for them: Gaussian blur of 2 network pixels (`blur`), exposure x0.3
  (`dark`), washed out to 25% contrast under white (`bright`), the left half of the frame kept
  (`half_cut`, the lesion's centre on the edge), the top-left quarter kept (`quarter_cut`), and
  downscaled to 96 px (`tiny`).

`--write` stores the thresholds in src/dermsight/imaging/quality_thresholds.json, which the
Predictor reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from dermsight.data.dataset import deduplicate, load_sources
from dermsight.imaging.decode import decode_image, read_image_bytes
from dermsight.imaging.quality import QUALITY_MEASURES, THRESHOLDS_FILE, QualityThresholds, measure_quality, quality_warnings
from dermsight.models.bundle import load_bundle

DATA = Path(os.environ.get("DERMSIGHT_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
SOURCES = ["ham10000", "isic9/train", "isic2020", "isic2017", "derm7pt"]
QUANTILES = {"min_sharpness": 0.01, "min_brightness": 0.005, "max_brightness": 0.995, "max_highlights": 0.995,
             "max_lesion_off_centre": 0.95}
MEASURE_OF = {"min_sharpness": "sharpness", "min_brightness": "brightness", "max_brightness": "brightness",
              "max_highlights": "highlights", "max_lesion_off_centre": "lesion_off_centre"}
DEGRADATIONS = {"blur": "out_of_focus", "dark": "too_dark", "bright": "too_bright", "half_cut": "lesion_cut_off",
                "quarter_cut": "lesion_cut_off", "tiny": "too_small"}


def degrade(rgb: np.ndarray, kind: str, size: int) -> np.ndarray:
    """A real image made worse in one way (see the module docstring)."""
    height, width = rgb.shape[:2]
    image = Image.fromarray(rgb)
    if kind == "blur":
        return np.asarray(image.filter(ImageFilter.GaussianBlur(2.0 * min(height, width) / size)))
    if kind == "dark":
        return (rgb * 0.3).astype(np.uint8)
    if kind == "bright":
        return (255 - (255 - rgb.astype(np.float32)) * 0.25).astype(np.uint8)
    if kind == "half_cut":
        return np.ascontiguousarray(rgb[:, : width // 2])
    if kind == "quarter_cut":
        return np.ascontiguousarray(rgb[: height // 2, : width // 2])
    if kind == "tiny":
        scale = 96 / min(height, width)
        return np.asarray(image.resize((round(width * scale), round(height * scale)), Image.BICUBIC))
    raise ValueError(kind)


def measured(refs: list[str], prep, kind: str | None = None) -> np.ndarray:
    rows = []
    for ref in refs:
        rgb = decode_image(read_image_bytes(ref), min_side=prep.size)
        if kind:
            rgb = degrade(rgb, kind, prep.size)
        rows.append(measure_quality(rgb.shape, prep.fit_square(rgb)))
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-source", type=int, default=300)
    parser.add_argument("--write", action="store_true", help=f"store the thresholds in {THRESHOLDS_FILE.name}")
    args = parser.parse_args()
    prep = load_bundle(None).preprocessing
    records = deduplicate(load_sources([str(DATA / s) for s in SOURCES])).records
    records = records[records["image_ref"].notna()].sample(frac=1.0, random_state=0)
    fit = records.groupby("source").head(args.per_source)
    check = records.drop(fit.index).groupby("source").head(args.per_source)  # never in the fit
    print(f"measuring {len(fit)} images to fit, {len(check)} to check", file=sys.stderr)
    fit_measures = measured(fit["image_ref"].tolist(), prep)
    pooled = pd.DataFrame(fit_measures, columns=QUALITY_MEASURES)
    values = {name: float(np.quantile(pooled[MEASURE_OF[name]], q)) for name, q in QUANTILES.items()}
    thresholds = QualityThresholds(**values, fitted_on=f"{len(fit)} images, {args.per_source} per source of "
                                   f"{', '.join(SOURCES)}, by bench/quality.py")
    refs = check["image_ref"].tolist()

    def warning_shares(sample: pd.DataFrame, measures: np.ndarray) -> dict:
        """Per source, the share of its clean images earning each warning."""
        shares = {}
        for source, rows in sample.reset_index(drop=True).groupby("source").groups.items():
            warned = quality_warnings(measures[rows], prep.size, thresholds)
            shares[source] = {code: round(float(np.mean([code in w for w in warned])), 3)
                              for code in sorted(set(DEGRADATIONS.values()))}
        return shares

    false_warnings = warning_shares(check, measured(refs, prep))
    false_warnings_fitted = warning_shares(fit, fit_measures)
    detected = {}
    for kind, code in DEGRADATIONS.items():
        warned = quality_warnings(measured(refs, prep, kind), prep.size, thresholds)
        detected[kind] = {"warning": code, "share": round(float(np.mean([code in w for w in warned])), 3),
                          "images": len(refs)}
    result = {
        "thresholds": {**values, "quantiles": QUANTILES},
        "network_input": prep.size,
        "measures_by_source": pooled.assign(source=fit["source"].to_numpy()).groupby("source")
        .median().round(3).to_dict(orient="index"),
        "false_warnings": false_warnings,
        "false_warnings_images_per_source": check.groupby("source").size().to_dict(),
        "false_warnings_fitted": false_warnings_fitted,
        "detected": detected,
        "per_source": args.per_source,
    }
    if args.write:
        THRESHOLDS_FILE.write_text(json.dumps({**values, "fitted_on": thresholds.fitted_on}, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
