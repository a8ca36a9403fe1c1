"""Out-of-distribution gate: is this a dermoscopic image at all?

The gate reads the network's ``gate_features``: the pooled outputs of its middle stages
(colour, texture, shape statistics), one block per stage. For each block it measures a
Mahalanobis distance from the training images (top principal axes, Ledoit-Wolf shrunk
covariance) and divides it by that block's 99th percentile of *held-out* training
distances; an image's score is the largest of these ratios. The final embedding is no
use here: trained to separate lesion classes, it maps a cat or a page of text close to
some lesion, while the middle stages see at once that it is no dermoscopic image.

The rejection threshold is a high quantile of held-out scores (images scored by a gate
fitted without their fold), so in-distribution images are rarely refused; the measured
rates are in the README (`python bench/ood.py`). Applying the gate needs numpy only.

The commonest wrong input is no cat but an ordinary close-up photo of a mole, which a
distance from dermoscopy alone lets through too often (and so did a logistic regression on
these features: 46% of such photos refused). The gate therefore also carries a
:class:`~dermsight.inference.photo_detector.PhotoDetector`, a small ImageNet network's view of
the picture itself (fitted by ``scripts/fit_photo_detector.py``); an image is accepted only
when both agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermsight.inference.photo_detector import PhotoDetector

OOD_FILE = "ood_gate.npz"
# What an image the gate refuses carries instead of a risk: the API's reason code, and its sentence.
REFUSAL = "not_dermoscopic"
REFUSAL_MESSAGE = "This looks like an ordinary photo, not a dermoscopic image; DermSight reads dermoscopy only."
LAYER_QUANTILE = 0.99  # each block's distance is expressed as a multiple of this held-out quantile


@dataclass
class BlockGate:
    """The Mahalanobis distance on one block of the gate features."""

    mean: np.ndarray  # (F,)
    components: np.ndarray  # (P, F) principal axes of the training features
    precision: np.ndarray  # (P, P) inverse of the shrunk covariance in that subspace
    scale: float = 1.0  # the held-out LAYER_QUANTILE of the distances

    def distance(self, features: np.ndarray) -> np.ndarray:
        projected = (features - self.mean) @ self.components.T
        return np.sqrt(np.einsum("np,pq,nq->n", projected, self.precision, projected)) / self.scale


@dataclass
class OODGate:
    """Is it dermoscopy? The largest per-block distance ratio from the training images, and an optional photo detector."""

    block_sizes: tuple[int, ...]  # the gate features are these blocks side by side
    blocks: list[BlockGate]
    threshold: float  # scores above this are rejected
    photo: PhotoDetector | None = None

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, G) gate features -> (N,) scores; about 1 for a typical training image."""
        parts = np.split(np.asarray(features, np.float32), np.cumsum(self.block_sizes)[:-1], axis=1)
        return np.max([block.distance(part) for block, part in zip(self.blocks, parts)], axis=0)

    def accepts(self, features: np.ndarray, images: np.ndarray | None = None) -> np.ndarray:
        """(N,) True for images both parts accept: `features` the gate features, `images` the
        normalised model inputs (N, 3, S, S) the photo detector looks at (needed when the gate
        has one)."""
        accepted = self.score(features) <= self.threshold
        if self.photo is not None:
            if images is None:
                raise ValueError("this gate has a photo detector: pass the images")
            accepted &= self.photo.probability(images) <= self.photo.threshold
        return accepted

    def save(self, folder: Path) -> None:
        arrays = {"block_sizes": np.asarray(self.block_sizes), "threshold": np.float32(self.threshold)}
        if self.photo is not None:
            arrays |= self.photo.arrays()
        for i, block in enumerate(self.blocks):
            arrays |= {
                f"mean_{i}": block.mean.astype(np.float32),
                f"components_{i}": block.components.astype(np.float32),
                f"precision_{i}": block.precision.astype(np.float32),
                f"scale_{i}": np.float32(block.scale),
            }
        np.savez_compressed(folder / OOD_FILE, **arrays)

    @classmethod
    def load(cls, folder: Path, photo_detector: bool = True) -> OODGate | None:
        """The bundle's gate, or None; with `photo_detector` False, without its photo detector
        (the way to replace one of an older format)."""
        path = folder / OOD_FILE
        if not path.exists():
            return None
        data = np.load(path)
        if "block_sizes" not in data:
            raise ValueError(f"{path} is a gate of an older DermSight (on the final embedding): retrain the bundle")
        sizes = tuple(int(s) for s in data["block_sizes"])
        blocks = [
            BlockGate(data[f"mean_{i}"], data[f"components_{i}"], data[f"precision_{i}"], float(data[f"scale_{i}"]))
            for i in range(len(sizes))
        ]
        if not photo_detector:
            return cls(sizes, blocks, float(data["threshold"]))
        if any(key.startswith("photo_") for key in data.files) and "photo_network" not in data.files:
            raise ValueError(f"{path} holds an older photo detector (without its network): refit it with "
                             "scripts/fit_photo_detector.py")
        photo = PhotoDetector.from_arrays(data) if "photo_network" in data.files else None
        return cls(sizes, blocks, float(data["threshold"]), photo)


def _fit_block(features: np.ndarray, n_components: int) -> BlockGate:
    """Mean, the top principal axes, and the shrunk precision of the projections.

    The axes are the leading eigenvectors of the (F, F) scatter matrix: the same subspace
    as an SVD of the (N, F) data (the distances do not depend on the axes' signs), but
    far cheaper for N in the thousands."""
    from sklearn.covariance import LedoitWolf
    from threadpoolctl import threadpool_limits

    features = features.astype(np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    # One BLAS thread: the eigensolver is mostly small steps that a second thread slows down
    # (35x on a busy 2-core machine), and the result no longer depends on the core count.
    with threadpool_limits(1, user_api="blas"):
        _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        k = min(n_components, *features.shape)  # as many axes as an SVD would give
        components = np.ascontiguousarray(vectors[:, ::-1][:, :k].T)
        covariance = LedoitWolf().fit(centred @ components.T)
    return BlockGate(mean, components, covariance.precision_)


def fit_ood_gate(
    features: np.ndarray, block_sizes: tuple[int, ...], folds: np.ndarray, n_components: int = 64, quantile: float = 0.99
) -> OODGate:
    """Fit on all `features` (N, G) of training images. Every distance that sets a scale or
    the threshold is held out: each fold's images are measured by blocks fitted without
    that fold. `quantile` of the held-out scores becomes the threshold, so about
    1 - quantile of images like the training ones are refused."""
    parts = np.split(np.asarray(features, np.float64), np.cumsum(block_sizes)[:-1], axis=1)
    held_out = np.zeros((len(parts), len(features)))
    for fold in np.unique(folds):
        rows = folds == fold
        for b, part in enumerate(parts):
            held_out[b, rows] = _fit_block(part[~rows], n_components).distance(part[rows])
    scales = np.quantile(held_out, LAYER_QUANTILE, axis=1)
    blocks = [_fit_block(part, n_components) for part in parts]
    for block, scale in zip(blocks, scales):
        block.scale = float(scale)
    scores = (held_out / scales[:, None]).max(axis=0)
    return OODGate(tuple(int(s) for s in block_sizes), blocks, threshold=float(np.quantile(scores, quantile)))
