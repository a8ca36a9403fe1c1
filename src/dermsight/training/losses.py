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


class WithMelanomaTerm(nn.Module):
    """A multi-task loss on one head: `base` on the class logits plus `weight` x the binary
    cross-entropy of melanoma against every other class, read from the same softmax
    (p_MEL against 1 - p_MEL). The melanoma decision gets the weight a melanoma-only network
    gives it, while the head still learns the ISIC classes (the differential). `balance`
    (2,) weights the binary term's non-melanoma and melanoma rows (None: unweighted, as
    under a source prior, which balances the logits already)."""

    def __init__(self, base: nn.Module, melanoma_index: int, weight: float, balance: torch.Tensor | None = None):
        super().__init__()
        self.base, self.melanoma_index, self.weight = base, melanoma_index, weight
        self.register_buffer("balance", balance)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1)
        k = self.melanoma_index
        log_melanoma = log_p[:, k]
        log_other = torch.logsumexp(torch.cat([log_p[:, :k], log_p[:, k + 1 :]], dim=1), dim=1)
        is_melanoma = target == k
        binary = -torch.where(is_melanoma, log_melanoma, log_other)
        if self.balance is not None:
            w = self.balance[is_melanoma.long()]
            binary = (binary * w).sum() / w.sum()
        else:
            binary = binary.mean()
        return self.base(logits, target) + self.weight * binary


def make_loss(
    name: str, class_weights: np.ndarray | None, *, melanoma_index: int | None = None, melanoma_weight: float = 0.0,
    labels: np.ndarray | None = None,
) -> nn.Module:
    """The training loss by name: ce (cross-entropy) or focal, with optional class weights;
    with `melanoma_weight` > 0, plus that weight of the melanoma-vs-rest term
    (:class:`WithMelanomaTerm`), balanced on `labels` when the classes are weighted."""
    weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    if name == "ce":
        loss = nn.CrossEntropyLoss(weight=weight)
    elif name == "focal":
        loss = FocalLoss(weight)
    else:
        raise ValueError(f"unknown loss {name!r}; expected 'ce' or 'focal'")
    if melanoma_weight <= 0:
        return loss
    if melanoma_index is None:
        raise ValueError("a melanoma term needs the melanoma class's index")
    balance = None
    if class_weights is not None:
        if labels is None:
            raise ValueError("a balanced melanoma term needs the training labels")
        balance = torch.as_tensor(balanced_class_weights((labels == melanoma_index).astype(int), 2), dtype=torch.float32)
    return WithMelanomaTerm(loss, melanoma_index, melanoma_weight, balance)
