"""Image-quality checks that matter for dermoscopy, measured before scoring.

Each image gets a few numbers (`QUALITY_MEASURES`), taken on the square the network reads
(before colour normalisation) and on the decoded size:

    short_side        the decoded image's shorter side, in pixels
    sharpness         variance of the 4-neighbour Laplacian of the grey square (0-255 units)
    brightness        mean grey level of the square, vignette included (0-255)
    highlights        share of pixels at grey >= 250 (blown-out glare or over-exposure)
    lesion_off_centre how far the lesion (pixels darker than the image's Otsu threshold, the
                      dermatoscope's black vignette left out) lies from the centre: 0 centred,
                      1 at an edge; a lesion cut off by the frame has its centre near the edge

`quality_warnings` turns them into plain warnings with thresholds fitted on the shared
training sources by `bench/quality.py` (stored beside this module in quality_thresholds.json,
with how often each fires on real and on degraded images); a warning never refuses the image.
Only a blank image (`UNIFORM_STD`) is unusable.
Pure numpy: no scipy import on the serving path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from dermsight.imaging.errors import ImageError

QUALITY_MEASURES: tuple[str, ...] = ("short_side", "sharpness", "brightness", "highlights", "lesion_off_centre")
THRESHOLDS_FILE = Path(__file__).with_name("quality_thresholds.json")
VIGNETTE_GREY = 25  # darker is the dermatoscope's black field-of-view edge, not skin
HIGHLIGHT_GREY = 250
UNIFORM_STD = 1.0  # grey standard deviation below which an image shows nothing to score
GREY_WEIGHTS = np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as Pillow's "L"


@dataclass(frozen=True)
class QualityThresholds:
    """Limits beyond which a measure earns a warning (fitted by bench/quality.py)."""

    min_sharpness: float
    min_brightness: float
    max_brightness: float
    max_highlights: float
    max_lesion_off_centre: float
    fitted_on: str = ""

    @classmethod
    def load(cls, path: Path = THRESHOLDS_FILE) -> QualityThresholds:
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@lru_cache(maxsize=1)
def default_thresholds() -> QualityThresholds:
    return QualityThresholds.load()


def grey(square: np.ndarray) -> np.ndarray:
    """uint8 (S, S, 3) -> float32 (S, S) luma."""
    return square.astype(np.float32) @ GREY_WEIGHTS


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of grey values in 0-255 (the level that best splits them in two)."""
    histogram = np.bincount(np.clip(values, 0, 255).astype(np.intp).ravel(), minlength=256).astype(np.float64)
    weight = np.cumsum(histogram)
    total = weight[-1]
    if total == 0:
        return 128.0
    mean = np.cumsum(histogram * np.arange(256))
    between = (mean[-1] * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-12)
    return float(np.argmax(between[:-1]))


def measure_quality(decoded_shape: tuple[int, ...], square: np.ndarray) -> np.ndarray:
    """(QUALITY_MEASURES,) float32 for one image: its decoded (H, W, ...) shape and the
    uint8 (S, S, 3) square the network reads, before colour normalisation. Raises ImageError
    for a blank image (nothing but one grey level)."""
    g = grey(square)
    if float(g.std()) < UNIFORM_STD:
        raise ImageError("the image is blank (a single colour): there is no lesion to score")
    laplacian = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    skin = g >= VIGNETTE_GREY
    threshold = otsu_threshold(g[skin]) if skin.any() else 0.0
    lesion = skin & (g < threshold)
    off_centre = 0.0
    if lesion.any():
        rows, cols = np.nonzero(lesion)
        half = (np.asarray(g.shape, np.float32) - 1) / 2
        off_centre = float(np.hypot(rows.mean() / half[0] - 1, cols.mean() / half[1] - 1))
    return np.asarray(
        [min(decoded_shape[:2]), laplacian.var(), g.mean(), np.mean(g >= HIGHLIGHT_GREY), off_centre], np.float32
    )


# Each warning code and the sentence shown with the result.
WARNINGS: dict[str, str] = {
    "too_small": "The image is only {width} x {height} px, smaller than what the network reads: fine detail is missing.",
    "out_of_focus": "The image looks out of focus (blurrier than 99 in 100 training images): retake it if you can.",
    "too_dark": "The image is darker than almost every training image: the lesion's colours may be misread.",
    "too_bright": "The image is over-exposed or shows strong glare: colours and structures may be lost.",
    "lesion_cut_off": "The lesion seems to run off the edge of the frame: the model sees only part of it.",
}


def quality_warnings(measures: np.ndarray, size: int, thresholds: QualityThresholds | None = None) -> list[list[str]]:
    """(N, QUALITY_MEASURES) -> for each image the codes of its warnings (keys of WARNINGS),
    `size` being the network's input side."""
    t = thresholds or default_thresholds()
    measures = np.atleast_2d(np.asarray(measures, np.float32))
    short_side, sharpness, brightness, highlights, off_centre = measures.T
    checks = {
        "too_small": short_side < size,
        "out_of_focus": sharpness < t.min_sharpness,
        "too_dark": brightness < t.min_brightness,
        "too_bright": (brightness > t.max_brightness) | (highlights > t.max_highlights),
        "lesion_cut_off": off_centre > t.max_lesion_off_centre,
    }
    return [[code for code, flagged in checks.items() if flagged[i]] for i in range(len(measures))]


def warning_message(code: str, width: int, height: int) -> str:
    """The sentence shown for one warning code of a `width` x `height` image."""
    return WARNINGS[code].format(width=width, height=height)
