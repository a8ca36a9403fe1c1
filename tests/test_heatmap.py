"""The heat map follows the lesion: real melanomas, the default bundle's own activation maps."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermsight.data import readers
from dermsight.imaging.quality import grey
from dermsight.inference.heatmap import box_mean, guided_upsample, heatmap_jpeg
from dermsight.inference.predictor import Predictor


def jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scored(shared, trained_bundle):
    """Ten ISIC archive melanomas, each alone and in the top-left quarter of a canvas of its
    own skin colour twice its size: (cams, squares) of both, from one Predictor call."""
    records = readers.read_isic_cli(shared / "isic2017").records
    originals = [np.asarray(Image.open(ref).convert("RGB")) for ref in records.loc[records["diagnosis"] == "MEL", "image_ref"].head(10)]
    canvases = []
    for rgb in originals:
        height, width = rgb.shape[:2]
        skin = np.median(np.concatenate([rgb[:4].reshape(-1, 3), rgb[-4:].reshape(-1, 3)]), axis=0).astype(np.uint8)
        canvas = np.empty((2 * height, 2 * width, 3), np.uint8)
        canvas[:] = skin
        canvas[:height, :width] = rgb
        canvases.append(canvas)
    images = [jpeg(rgb) for rgb in originals + canvases]
    _, scores, squares = Predictor(trained_bundle).predict_images(images, pd.DataFrame(index=range(len(images))))
    return scores.melanoma_cam, squares


def edge_agreement(heat: np.ndarray, square: np.ndarray) -> float:
    """Correlation between the map's gradient magnitude and the image's."""
    gy, gx = np.gradient(heat)
    iy, ix = np.gradient(grey(square))
    return float(np.corrcoef(np.hypot(gx, gy).ravel(), np.hypot(ix, iy).ravel())[0, 1])


def test_the_peak_moves_with_the_lesion(scored):
    cams, squares = scored
    half = squares.shape[1] // 2
    peaks = [np.unravel_index(np.argmax(guided_upsample(cam, square)), square.shape[:2]) for cam, square in zip(cams, squares)]
    moved = peaks[10:]
    assert sum(row < half and col < half for row, col in moved) >= 7  # in the quarter that holds the lesion
    assert np.mean([row + col for row, col in moved]) < np.mean([row + col for row, col in peaks[:10]]) - 30


def test_the_map_follows_the_image_edges_where_bilinear_does_not(scored):
    cams, squares = scored
    size = squares.shape[1]
    better = 0
    for cam, square in zip(cams, squares):
        bilinear = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
        better += edge_agreement(guided_upsample(cam, square), square) > edge_agreement(bilinear, square) + 0.1
    assert better >= 16


def test_box_mean_and_a_flat_guide():
    x = np.arange(25, dtype=np.float32).reshape(5, 5)
    assert box_mean(x, 1)[2, 2] == pytest.approx(x[1:4, 1:4].mean())
    assert box_mean(x, 1)[0, 0] == pytest.approx(x[:2, :2].mean())  # clipped window at the corner
    flat = np.full((64, 64, 3), 120, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1.0
    heat = guided_upsample(cam, flat)  # nothing to follow: a smoothed upsampling, peak kept in its corner
    assert np.unravel_index(np.argmax(heat), heat.shape)[0] < 16
    image = np.asarray(Image.open(io.BytesIO(heatmap_jpeg(cam, flat)))).astype(int)
    assert np.abs(image[:8, :8] - 120).max() > 40 and np.abs(image[48:, 48:] - 120).max() <= 2
