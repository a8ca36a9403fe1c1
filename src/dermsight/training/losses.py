"""Losses for an imbalanced label space (about 2% melanoma in ISIC 2020)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Weights n / (k * count_c): every class contributes equally to the loss
    (scikit-learn's "balanced"); classes absent from `labels` get weight 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


class FocalLoss(nn.Module):
    """Class-weighted focal loss (Lin et al. 2017): down-weights easy examples by (1-p)^gamma."""

    def __init__(self, weight: torch.Tensor | None = None, gamma: float = 2.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def make_loss(name: str, class_weights: np.ndarray | None) -> nn.Module:
    """The training loss by name: ce (cross-entropy) or focal, with optional class weights."""
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    if name == "ce":
        return nn.CrossEntropyLoss(weight=weight)
    if name == "focal":
        return FocalLoss(weight)
    raise ValueError(f"unknown loss {name!r}; expected 'ce' or 'focal'")


class MelanomaHeadLoss(nn.Module):
    """A multi-task network's loss (see models/network.py): `class_loss` on the class head's
    K logits plus `melanoma_loss` on the melanoma head's two ([melanoma, not melanoma]), each
    with its own target, the same image's diagnosis."""

    def __init__(self, class_loss: nn.Module, melanoma_loss: nn.Module, n_classes: int, melanoma_index: int):
        super().__init__()
        self.class_loss, self.melanoma_loss = class_loss, melanoma_loss
        self.n_classes, self.melanoma_index = n_classes, melanoma_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = self.n_classes
        not_melanoma = (target != self.melanoma_index).long()
        return self.class_loss(logits[:, :n], target) + self.melanoma_loss(logits[:, n:], not_melanoma)
