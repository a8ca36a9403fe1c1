"""Image-quality checks on real dermoscopic images made worse in one way each."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from dermsight.data import readers
from dermsight.imaging.decode import decode_file
from dermsight.imaging.errors import ImageError
from dermsight.imaging.quality import (
    QUALITY_MEASURES,
    QualityThresholds,
    default_thresholds,
    measure_quality,
    quality_warnings,
    warning_message,
)
from dermsight.inference.predictor import Predictor
from dermsight.models.bundle import load_bundle

PREP = load_bundle(None).preprocessing


@pytest.fixture(scope="module")
def melanomas(shared) -> list[np.ndarray]:
    """The first ten ISIC 2017-era archive melanomas (256 x 256, sharp, well exposed)."""
    records = readers.read_isic_cli(shared / "isic2017").records
    refs = records.loc[records["diagnosis"] == "MEL", "image_ref"].head(10)
    return [decode_file(ref, min_side=PREP.size) for ref in refs]


def warnings_of(rgb: np.ndarray) -> list[str]:
    return quality_warnings(measure_quality(rgb.shape, PREP.fit_square(rgb)), PREP.size)[0]


def at_frame_edge(rgb: np.ndarray) -> np.ndarray:
    """The image's left half on the right of a canvas of its own skin colour, as large as the
    image: the lesion's centre now lies on the frame's right edge."""
    height, width = rgb.shape[:2]
    skin = np.median(np.concatenate([rgb[:4].reshape(-1, 3), rgb[-4:].reshape(-1, 3)]), axis=0)
    canvas = np.empty_like(rgb)
    canvas[:] = skin.astype(np.uint8)
    canvas[:, width - width // 2 :] = rgb[:, : width // 2]
    return canvas


def test_untouched_real_images_get_no_warning(melanomas):
    assert all(warnings_of(rgb) == [] for rgb in melanomas)


def test_blur_darkness_glare_and_size_each_earn_their_warning(melanomas):
    scale = melanomas[0].shape[0] / PREP.size
    blurred = [np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(2.0 * scale))) for rgb in melanomas]
    dark = [(rgb * 0.3).astype(np.uint8) for rgb in melanomas]
    washed = [(255 - (255 - rgb.astype(np.float32)) * 0.25).astype(np.uint8) for rgb in melanomas]
    tiny = [np.asarray(Image.fromarray(rgb).resize((96, 96), Image.BICUBIC)) for rgb in melanomas]
    assert all("out_of_focus" in warnings_of(rgb) for rgb in blurred)
    assert all("too_dark" in warnings_of(rgb) for rgb in dark)
    assert sum("too_bright" in warnings_of(rgb) for rgb in washed) >= 8
    assert all("too_small" in warnings_of(rgb) for rgb in tiny)
    assert not any("too_small" in warnings_of(rgb) for rgb in blurred + dark)  # each warning means one thing


def test_a_lesion_moved_to_the_frame_edge_is_called_cut_off(melanomas):
    moved = [at_frame_edge(rgb) for rgb in melanomas]
    assert sum("lesion_cut_off" in warnings_of(rgb) for rgb in moved) >= 6


def test_a_blank_image_is_refused_and_a_dim_real_one_is_not(melanomas):
    with pytest.raises(ImageError, match="blank"):
        measure_quality((300, 300, 3), np.full((PREP.size, PREP.size, 3), 180, np.uint8))
    dim = (melanomas[0] * 0.1).astype(np.uint8)  # very dark, still a lesion
    assert "too_dark" in warnings_of(dim)


def test_thresholds_come_from_the_bench_and_messages_name_the_numbers():
    thresholds = default_thresholds()
    assert "bench/quality.py" in thresholds.fitted_on
    assert 0 < thresholds.min_brightness < thresholds.max_brightness < 255
    measures = np.asarray([[100, 50, 150, 0, 0.1]], np.float32)
    assert quality_warnings(measures, 160) == [["too_small"]]
    assert warning_message("too_small", 128, 96).startswith("The image is only 128 x 96 px")
    strict = QualityThresholds(60, 0, 255, 1, 1)
    assert quality_warnings(measures, 96, strict) == [["out_of_focus"]]
    assert len(QUALITY_MEASURES) == measures.shape[1]


def test_predictor_reports_warnings_per_upload_and_refuses_a_blank_one(melanomas, trained_bundle):
    predictor = Predictor(trained_bundle)

    def jpeg(rgb: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    sharp = melanomas[1]
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(2.0 * sharp.shape[0] / PREP.size)))
    table, scores, _ = predictor.predict_images([jpeg(sharp), jpeg(blurred)], pd.DataFrame(index=range(2)))
    assert table["quality_warnings"].tolist() == ["", "out_of_focus"]
    assert scores.image_quality.shape == (2, len(QUALITY_MEASURES))
    blank = jpeg(np.full((300, 300, 3), 200, np.uint8))
    with pytest.raises(ImageError, match="image 2: the image is blank"):
        predictor.predict_images([jpeg(sharp), blank], pd.DataFrame(index=range(2)))
