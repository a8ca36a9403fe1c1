"""Embed mode's cheap half: a linear classifier over [embedding, metadata].

Fitted in full batch with L-BFGS (a convex problem: seconds on a CPU). The inputs'
standardisation is folded into the returned weights, so the head drops straight
into DermSightNet's nn.Linear and the class activation map stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dermsight.training.losses import make_loss


@dataclass
class LinearHead:
    """A multinomial logistic head over embeddings and metadata: logits = features @ weight.T + bias."""

    weight: np.ndarray  # (K, F + M), applies to raw (unstandardised) inputs
    bias: np.ndarray  # (K,)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias


def fit_linear_head(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    class_weights: np.ndarray | None,
    l2: float = 1e-3,
    loss: str = "ce",
    max_iter: int = 300,
    seed: int = 0,
) -> LinearHead:
    """Fit softmax regression on `features` (N, D) -> `labels` (N,) with an L2 penalty
    `l2` on the weights of the standardised inputs."""
    torch.manual_seed(seed)
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-6] = 1.0
    x = torch.as_tensor((features - mean) / scale, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    layer = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    criterion = make_loss(loss, class_weights)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = criterion(layer(x), y) + l2 * layer.weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(closure)
    w = layer.weight.detach().numpy().astype(np.float64) / scale
    b = layer.bias.detach().numpy().astype(np.float64) - w @ mean
    return LinearHead(w.astype(np.float32), b.astype(np.float32))
