"""Where the melanoma heat map points: on the lesion or beside it, on real melanomas, for one or more bundles.

    python bench/heatmap_focus.py BUNDLE [BUNDLE ...] > bench/heatmap_focus_results.json

The first MELANOMAS melanomas of the ISIC archive export (isic2017, 256 px, in its order) are scored by each bundle's
Predictor (no metadata), and each melanoma heat map is upsampled as the card draws it (`guided_upsample`, the
positive part: negative evidence is not drawn). No lesion masks are shared here, so the lesion is approximated by
the largest dark region of the model-input square (grey levels below Otsu's threshold). Per bundle: the share of the
map's positive mass inside that region (median, mean; a map spread evenly would score the region's share of the
square, `lesion_area_share`) and how often the map's brightest pixel lies in it; images
whose map has no positive evidence at all are counted apart. A crude mask: read the figures side by side, not alone.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.filters import threshold_otsu
from skimage.measure import label

from dermsight.data.readers import read_isic_cli
from dermsight.inference.heatmap import guided_upsample
from dermsight.inference.predictor import Predictor

MELANOMAS = 120
BATCH = 24


def lesion_mask(square: np.ndarray) -> np.ndarray:
    """The largest connected region darker than Otsu's threshold of the square's grey levels."""
    grey = square.mean(axis=2)
    regions = label(grey < threshold_otsu(grey))
    if regions.max() == 0:
        return np.zeros(grey.shape, dtype=bool)
    return regions == np.bincount(regions.ravel())[1:].argmax() + 1


def focus(bundle: str, images: list[bytes]) -> dict:
    predictor = Predictor(bundle)
    inside, peak_inside, area, no_evidence = [], [], [], 0
    for start in range(0, len(images), BATCH):
        batch = images[start:start + BATCH]
        metadata = pd.DataFrame({"age": [np.nan] * len(batch), "sex": [None] * len(batch), "site": [None] * len(batch)})
        _, scores, squares = predictor.predict_images(batch, metadata)
        for cam, square in zip(scores.melanoma_cam, squares):
            positive = np.clip(guided_upsample(cam, square), 0.0, None)
            mask = lesion_mask(square)
            if positive.sum() == 0 or not mask.any():
                no_evidence += 1
                continue
            inside.append(float(positive[mask].sum() / positive.sum()))
            area.append(float(mask.mean()))
            peak_inside.append(bool(mask.ravel()[positive.argmax()]))
    return {"bundle": predictor.bundle.name, "melanomas": len(images), "no_positive_evidence_or_mask": no_evidence,
            "map_mass_inside_lesion": {"median": round(float(np.median(inside)), 3), "mean": round(float(np.mean(inside)), 3)},
            "peak_inside_lesion": round(float(np.mean(peak_inside)), 3),
            "lesion_area_share": {"median": round(float(np.median(area)), 3), "mean": round(float(np.mean(area)), 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    args = parser.parse_args()
    data = Path(os.environ.get("DERMSIGHT_DATA", "../shared/datasets"))
    records = read_isic_cli(data / "isic2017").records
    images = [Path(p).read_bytes() for p in records.loc[records["diagnosis"] == "MEL", "image_ref"].tolist()[:MELANOMAS]]
    print(json.dumps({"mask": "largest region below Otsu's grey threshold of the model-input square",
                      "source": "isic2017 (ISIC archive export), first melanomas in its order",
                      "bundles": [focus(bundle, images) for bundle in args.bundles]}, indent=1))


if __name__ == "__main__":
    main()
