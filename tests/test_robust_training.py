"""The source-robust recipe's parts on real images: the acquisition sweep's transforms,
colour constancy and squash preprocessing (the same in training and inference), acquisition
augmentation, source priors, metadata dropout, and the ensemble graph."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermsight.evaluation.robustness import ACQUISITIONS
from dermsight.imaging.batches import iter_batches, load_square
from dermsight.imaging.decode import decode_image
from dermsight.imaging.preprocess import Preprocessing, shades_of_gray
from dermsight.models.metadata import SOURCE_NEUTRAL_FEATURES, encode_metadata, missing_metadata
from dermsight.training.finetune import LesionImages, augmentation, source_log_priors


@pytest.fixture(scope="module")
def derm7pt_image(shared) -> np.ndarray:
    return decode_image((shared / "derm7pt" / "images" / "NEL" / "Nel026.jpg").read_bytes())  # 480 x 320


def _laplacian_variance(rgb: np.ndarray) -> float:
    grey = rgb.astype(np.float32).mean(axis=2)
    lap = grey[1:-1, 1:-1] * 4 - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(lap.var())


def test_sweep_acquisitions_do_what_they_say(derm7pt_image):
    rgb = derm7pt_image
    assert np.array_equal(ACQUISITIONS["untouched"](rgb), rgb)
    for quality in (95, 75, 50):
        out = ACQUISITIONS[f"jpeg_{quality}"](rgb)
        assert out.shape == rgb.shape and not np.array_equal(out, rgb)
    error = {q: np.abs(ACQUISITIONS[f"jpeg_{q}"](rgb).astype(int) - rgb).mean() for q in (95, 75, 50)}
    assert error[95] < error[75] < error[50]
    half = ACQUISITIONS["half_size"](rgb)
    assert half.shape == rgb.shape and _laplacian_variance(half) < 0.7 * _laplacian_variance(rgb)
    squashed = ACQUISITIONS["aspect_changed"](rgb)
    assert rgb.shape[:2] == (320, 480) and squashed.shape[:2] == (320, 320)  # a 3:2 frame squashed to a square
    stretched = ACQUISITIONS["aspect_changed"](squashed)
    assert stretched.shape[:2] == (320, 427)
    warm = ACQUISITIONS["warmer_light"](rgb).astype(float)
    assert warm[..., 0].mean() > rgb[..., 0].mean() and warm[..., 2].mean() < rgb[..., 2].mean()
    assert _laplacian_variance(ACQUISITIONS["slight_blur"](rgb)) < 0.6 * _laplacian_variance(rgb)


def test_shades_of_gray_removes_a_colour_cast(derm7pt_image):
    cast = np.clip(derm7pt_image.astype(float) * [1.15, 1.0, 0.8], 0, 255).astype(np.uint8)
    fixed, original = shades_of_gray(cast).astype(float), shades_of_gray(derm7pt_image).astype(float)
    norms = np.power(np.mean(np.power(fixed.reshape(-1, 3), 6), axis=0), 1 / 6)
    assert norms.max() - norms.min() < 0.03 * norms.mean()  # the illuminant estimate is grey
    assert np.abs(fixed - original).mean() < 0.25 * np.abs(cast.astype(float) - derm7pt_image).mean()


def test_squash_and_colour_constancy_are_one_preprocessing_for_training_and_inference(shared, derm7pt_image):
    prep = Preprocessing(size=96, fit="squash", colour_constancy=True)
    path = shared / "derm7pt" / "images" / "NEL" / "Nel026.jpg"
    square = load_square(path.read_bytes(), prep, str(path))  # training's decode_all and the API use this
    assert square.shape == (96, 96, 3)
    expected = shades_of_gray(np.asarray(Image.fromarray(decode_image(path.read_bytes(), min_side=96)).resize((96, 96), Image.BICUBIC)))
    assert np.array_equal(square, expected)
    batch = next(iter_batches([str(path)], prep, batch_size=1))  # predict's path
    np.testing.assert_array_equal(batch.images[0], prep.normalise(square))
    cropped = Preprocessing(size=96).resize(derm7pt_image)
    assert not np.array_equal(cropped, Preprocessing(size=96, fit="squash").resize(derm7pt_image))
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    assert Preprocessing.from_dict({"size": 96, "mean": prep.mean, "std": prep.std}) == Preprocessing(size=96)  # old bundles
    with pytest.raises(ValueError, match="unknown fit"):
        Preprocessing(fit="stretch")


def test_acquisition_augmentation_changes_encoding_and_keeps_shape(derm7pt_image):
    square = Preprocessing(size=128, fit="squash").resize(derm7pt_image)
    plain, acquisition = augmentation(128), augmentation(128, acquisition=True)
    names = {type(t).__name__ for t in acquisition.transforms}
    assert {"ImageCompression", "Downscale", "GaussianBlur", "GaussNoise", "PlanckianJitter"} <= names
    assert names - {type(t).__name__ for t in plain.transforms} == {"ImageCompression", "Downscale", "GaussianBlur", "GaussNoise", "PlanckianJitter"}
    acquisition.set_random_seed(3)
    first = [acquisition(image=square)["image"] for _ in range(4)]
    acquisition.set_random_seed(3)
    again = [acquisition(image=square)["image"] for _ in range(4)]
    assert all(a.shape == (128, 128, 3) and a.dtype == np.uint8 for a in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # seeded: resumable runs draw the same


def test_strong_augmentation_adds_the_winners_set_and_resumes_mid_epoch(derm7pt_image):
    """--strong-augmentation: distortions (one of three), CLAHE, HSV, affine and cut-out on top of
    the acquisition set; a dataset restored from a mid-epoch augmentation state draws exactly what
    the uninterrupted one draws, nested transforms (OneOf's) included."""
    square = Preprocessing(size=128, fit="squash").resize(derm7pt_image)
    acquisition, strong = augmentation(128, acquisition=True), augmentation(128, acquisition=True, strong=True)
    added = [type(t).__name__ for t in strong.transforms[len(acquisition.transforms):]]
    assert added == ["OneOf", "CLAHE", "HueSaturationValue", "Affine", "CoarseDropout"]
    squares = np.repeat(square[None], 40, axis=0)
    metadata, labels = np.zeros((40, 3), np.float32), np.zeros(40, int)

    def dataset() -> LesionImages:
        return LesionImages(squares, metadata, labels, Preprocessing(size=128), train=True, acquisition=True, strong=True)

    uninterrupted = dataset()
    uninterrupted.reseed(5)
    first = [uninterrupted[i][0] for i in range(20)]
    state = uninterrupted.augmentation_state()
    rest = [uninterrupted[i][0] for i in range(20, 40)]
    resumed = dataset()
    resumed.reseed(5)
    resumed.restore_augmentation(state)
    assert all(torch.equal(a, b) for a, b in zip(rest, [resumed[i][0] for i in range(20, 40)]))
    assert all(a.shape == (3, 128, 128) for a in first) and not torch.equal(first[0], first[1])


def test_source_priors_hold_each_sources_class_mix():
    sources = np.array(["a"] * 6 + ["b"] * 4, dtype=object)
    labels = np.array([0, 0, 0, 0, 1, 2, 1, 1, 1, 0])
    priors = source_log_priors(sources, labels, 3)
    np.testing.assert_allclose(np.exp(priors).sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.exp(priors[0]), np.array([4 + 1, 1 + 1, 1 + 1]) / 9, rtol=1e-6)
    np.testing.assert_allclose(np.exp(priors[6]), np.array([1 + 1, 3 + 1, 0 + 1]) / 7, rtol=1e-6)
    # With the offsets in the loss, logits that carry no information about the image (all equal) already
    # predict each source's class mix: nothing is left to gain from recognising the source.
    loss = torch.nn.functional.cross_entropy(torch.zeros(10, 3) + torch.from_numpy(priors), torch.from_numpy(labels), reduction="none")
    per_source = {s: loss[torch.from_numpy(sources == s)].mean().item() for s in ("a", "b")}
    plain = torch.nn.functional.cross_entropy(torch.zeros(10, 3), torch.from_numpy(labels), reduction="none")
    assert per_source["a"] < plain[:6].mean().item() and per_source["b"] < plain[6:].mean().item()


def test_metadata_dropout_and_source_neutral_features():
    records = pd.DataFrame({"image_id": ["a", "b"], "age": [55.0, np.nan], "sex": ["female", None], "site": ["torso", None],
                            "patient_id": ["P1", None], "patient_images": [12.0, np.nan]})
    full = encode_metadata(records)
    neutral = encode_metadata(records, SOURCE_NEUTRAL_FEATURES)
    assert neutral.shape == (2, full.shape[1] - 2) and not any("patient_images" in f for f in SOURCE_NEUTRAL_FEATURES)
    np.testing.assert_array_equal(missing_metadata(SOURCE_NEUTRAL_FEATURES), neutral[1])
    squares = np.zeros((200, 32, 32, 3), np.uint8)
    dataset = LesionImages(squares, np.repeat(neutral[:1], 200, axis=0), np.zeros(200, int), Preprocessing(size=32), train=True,
                           metadata_dropout=0.3, blank_metadata=missing_metadata(SOURCE_NEUTRAL_FEATURES))
    dataset.reseed(1)
    blanked = np.mean([np.array_equal(dataset[i][1].numpy(), neutral[1]) for i in range(200)])
    assert 0.2 < blanked < 0.4
