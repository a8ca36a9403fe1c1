"""Out-of-distribution gate: is this a dermoscopic image at all?

The bundle's own embedding is compared with the training images' embeddings: a
Mahalanobis distance in their principal subspace (Ledoit-Wolf shrunk covariance).
The rejection threshold is a high quantile of distances of *held-out* training
images, so in-distribution images are rarely refused. A cat, a document, a blank
frame or a landscape lands far outside. Applying the gate needs numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

OOD_FILE = "ood_gate.npz"


@dataclass
class OODGate:
    mean: np.ndarray  # (F,)
    components: np.ndarray  # (P, F) principal axes of the training embeddings
    precision: np.ndarray  # (P, P) inverse of the shrunk covariance in that subspace
    threshold: float  # distances above this are rejected

    def distance(self, embeddings: np.ndarray) -> np.ndarray:
        projected = (embeddings - self.mean) @ self.components.T
        return np.sqrt(np.einsum("np,pq,nq->n", projected, self.precision, projected))

    def accepts(self, embeddings: np.ndarray) -> np.ndarray:
        return self.distance(embeddings) <= self.threshold

    def save(self, folder: Path) -> None:
        np.savez_compressed(
            folder / OOD_FILE,
            mean=self.mean.astype(np.float32),
            components=self.components.astype(np.float32),
            precision=self.precision.astype(np.float32),
            threshold=np.float32(self.threshold),
        )

    @classmethod
    def load(cls, folder: Path) -> OODGate | None:
        path = folder / OOD_FILE
        if not path.exists():
            return None
        data = np.load(path)
        return cls(data["mean"], data["components"], data["precision"], float(data["threshold"]))


def _fit_subspace(embeddings: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, the top principal axes, and the shrunk precision of the projections.

    The axes are the leading eigenvectors of the (F, F) scatter matrix: the same subspace
    as an SVD of the (N, F) data (the distances do not depend on the axes' signs), but
    far cheaper for N in the thousands (the six N x F SVDs took minutes of `dermsight train`)."""
    from sklearn.covariance import LedoitWolf
    from threadpoolctl import threadpool_limits

    mean = embeddings.mean(axis=0)
    centred = embeddings - mean
    # One BLAS thread: the eigensolver is mostly small steps that a second thread slows down
    # (35x on a busy 2-core machine), and the result no longer depends on the core count.
    with threadpool_limits(1, user_api="blas"):
        scatter = (centred.T @ centred).astype(np.float64)
        _, vectors = np.linalg.eigh(scatter)  # ascending eigenvalues
        k = min(n_components, *embeddings.shape)  # as many axes as an SVD would give
        components = np.ascontiguousarray(vectors[:, ::-1][:, :k].T).astype(embeddings.dtype, copy=False)
        covariance = LedoitWolf().fit(centred @ components.T)
    return mean, components, covariance.precision_


def fit_ood_gate(embeddings: np.ndarray, folds: np.ndarray, n_components: int = 64, quantile: float = 0.995) -> OODGate:
    """Fit on all `embeddings`; set the threshold from distances of each fold's images
    to a gate fitted without that fold (honest held-out distances)."""
    held_out = np.zeros(len(embeddings))
    for fold in np.unique(folds):
        rows = folds == fold
        gate = OODGate(*_fit_subspace(embeddings[~rows], n_components), threshold=np.inf)
        held_out[rows] = gate.distance(embeddings[rows])
    return OODGate(*_fit_subspace(embeddings, n_components), threshold=float(np.quantile(held_out, quantile)))
