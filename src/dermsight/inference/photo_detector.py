"""Is this dermoscopy, or an ordinary photo? A detector that looks at the image itself.

An ordinary close-up photo of a mole (a phone or camera instead of a dermatoscope) is the
commonest wrong input, and the network's own features hardly tell it from dermoscopy (a
logistic regression on them refused 46% of such photos). What does tell them apart is how the
picture was taken: a dermatoscope lights the skin evenly through a lens pressed on it, often
inside a dark circular field, with saturated, low-contrast colour; a photo has shadows,
specular light, surrounding skin, hair and clothing at another scale. The detector reads
cheap statistics of the model's own input square (about 1 ms of CPU per image, no network):
brightness, saturation and colour in concentric rings (the dermatoscope's field), their
histograms, sharpness and a coarse joint colour histogram; a small gradient-boosted tree
ensemble (evaluated in numpy) turns them into the probability of an ordinary photo.

It is fitted by ``scripts/fit_photo_detector.py`` on dermoscopy of every shared source and on
real photos (Derm7pt's clinical photos of its published train split, the everyday photos of
:mod:`dermsight.evaluation.ood_images`, and honest variants of them: crops, rescales, JPEG
re-encodings, phone-like colour), and stored in the bundle's ``ood_gate.npz``; its threshold is
a quantile of held-out dermoscopy probabilities. ``bench/ood.py`` measures it by source.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dermsight.imaging.preprocess import Preprocessing

GRID = 64  # statistics are taken on the input square box-averaged to about this size
RINGS = (0.0, 0.35, 0.7, 1.0, np.inf)  # radii (fraction of half the side) of the rings compared
BINS = 8  # histogram bins of saturation and brightness
DARK = 0.08  # brightness below this counts as the dark rim of a dermatoscope's field


def photo_features(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Normalised model inputs (N, 3, S, S), as the bundle's preprocessing makes them ->
    (N, F) float32 statistics of the picture."""
    images = np.asarray(images, np.float32)
    n, _, size, _ = images.shape
    factor = max(1, size // GRID)
    side = size // factor
    x = images[:, :, : side * factor, : side * factor].reshape(n, 3, side, factor, side, factor).mean(axis=(3, 5))
    rgb = np.clip(x * np.asarray(prep.std, np.float32)[:, None, None] + np.asarray(prep.mean, np.float32)[:, None, None], 0, 1)
    high, low = rgb.max(axis=1), rgb.min(axis=1)
    saturation = (high - low) / np.maximum(high, 1e-3)
    luma = np.tensordot(np.asarray([0.299, 0.587, 0.114], np.float32), rgb, axes=(0, 1))
    centre = (side - 1) / 2
    yy, xx = np.mgrid[:side, :side]
    radius = np.hypot(yy - centre, xx - centre) / (side / 2)
    ring = np.digitize(radius, RINGS[1:-1]).ravel()  # 0 .. len(RINGS) - 2
    per_ring = np.stack([ring == k for k in range(len(RINGS) - 1)]).astype(np.float32)  # (R, P)
    per_ring /= per_ring.sum(axis=1, keepdims=True)
    flat = lambda a: a.reshape(n, -1)  # noqa: E731
    gy, gx = np.gradient(luma, axis=(1, 2))
    gradient = np.hypot(gx, gy)
    laplace = 4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2] - luma[:, 1:-1, 2:]
    ring_means = [
        flat(a) @ per_ring.T
        for a in (luma, luma**2, saturation, (luma < DARK).astype(np.float32), *rgb.transpose(1, 0, 2, 3), gradient,
                  (gradient > 0.05).astype(np.float32))
    ]
    ring_means[1] = np.sqrt(np.maximum(ring_means[1] - ring_means[0] ** 2, 0))  # brightness sd per ring
    histograms = [_histogram(flat(a), BINS) for a in (saturation, luma)]
    colours = _histogram_codes(flat(_colour_codes(rgb)), 64)
    sharpness = np.stack([flat(laplace).std(axis=1), np.abs(flat(laplace)).mean(axis=1)], axis=1)
    return np.concatenate([*ring_means, *histograms, np.sqrt(colours), sharpness], axis=1).astype(np.float32)


def _colour_codes(rgb: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W) joint colour bins of a 4x4x4 RGB grid."""
    q = np.minimum((rgb * 4).astype(np.int64), 3)
    return q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]


def _histogram_codes(codes: np.ndarray, bins: int) -> np.ndarray:
    n = len(codes)
    offsets = (np.arange(n) * bins)[:, None]
    return np.bincount((codes + offsets).ravel(), minlength=n * bins).reshape(n, bins) / codes.shape[1]


def _histogram(values: np.ndarray, bins: int) -> np.ndarray:
    return _histogram_codes(np.minimum((values * bins).astype(np.int64), bins - 1), bins)


@dataclass
class PhotoDetector:
    """Gradient-boosted trees on :func:`photo_features`: the probability that an image is an
    ordinary (non-dermoscopic) photo; above `threshold` it is refused. The trees are flat arrays
    (node -> feature, split value, children, leaf value; children index the same arrays), so
    applying them needs numpy only."""

    feature: np.ndarray  # (nodes,) int32: the feature a node splits on
    split: np.ndarray  # (nodes,) float64: go left when the feature is <= this
    left: np.ndarray  # (nodes,) int32
    right: np.ndarray  # (nodes,) int32
    leaf: np.ndarray  # (nodes,) bool
    value: np.ndarray  # (nodes,) float64: a leaf's contribution to the log-odds
    roots: np.ndarray  # (trees,) int32: each tree's first node
    depth: int  # the deepest leaf's depth
    baseline: float  # log-odds before the first tree
    threshold: float

    def probability(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, np.float64)
        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()  # (N, trees)
        rows = np.arange(len(x))[:, None]
        for _ in range(self.depth):
            go_left = x[rows, self.feature[node]] <= self.split[node]
            node = np.where(self.leaf[node], node, np.where(go_left, self.left[node], self.right[node]))
        z = self.baseline + self.value[node].sum(axis=1)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def arrays(self) -> dict[str, np.ndarray]:
        """What the bundle's ood_gate.npz stores (keys prefixed photo_)."""
        names = ("feature", "split", "left", "right", "leaf", "value", "roots")
        return {f"photo_{name}": getattr(self, name) for name in names} | {
            "photo_depth": np.int32(self.depth), "photo_baseline": np.float64(self.baseline),
            "photo_threshold": np.float64(self.threshold),
        }

    @classmethod
    def from_arrays(cls, data) -> PhotoDetector:
        names = ("feature", "split", "left", "right", "leaf", "value", "roots")
        return cls(*(np.asarray(data[f"photo_{name}"]) for name in names), int(data["photo_depth"]),
                   float(data["photo_baseline"]), float(data["photo_threshold"]))


def _from_sklearn(model, threshold: float = 0.5) -> PhotoDetector:
    """A fitted binary HistGradientBoostingClassifier as flat arrays."""
    parts, roots, offset = [], [], 0
    for (tree,) in model._predictors:  # one tree per iteration for a binary classifier
        nodes = tree.nodes
        parts.append((nodes["feature_idx"], nodes["num_threshold"], nodes["left"] + offset, nodes["right"] + offset,
                      nodes["is_leaf"].astype(bool), nodes["value"], nodes["depth"]))
        roots.append(offset)
        offset += len(nodes)
    feature, split, left, right, leaf, value, depth = (np.concatenate(column) for column in zip(*parts))
    left, right = np.where(leaf, 0, left), np.where(leaf, 0, right)
    return PhotoDetector(
        feature.astype(np.int32), split.astype(np.float64), left.astype(np.int32), right.astype(np.int32), leaf,
        value.astype(np.float64), np.asarray(roots, np.int32), int(depth.max()),
        float(np.ravel(model._baseline_prediction)[0]), threshold,
    )


def _boosted_trees(seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=10, l2_regularization=1.0,
        class_weight="balanced", random_state=seed,
    )


def held_out_probabilities(
    features: np.ndarray, is_photo: np.ndarray, folds: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Each image's photo probability from trees fitted without its fold."""
    out = np.zeros(len(features))
    for fold in np.unique(folds):
        rows = folds == fold
        model = _boosted_trees(seed).fit(features[~rows], is_photo[~rows])
        out[rows] = model.predict_proba(features[rows])[:, 1]
    return out


def fit_photo_detector(
    features: np.ndarray, is_photo: np.ndarray, folds: np.ndarray, max_false_rejection: float = 0.01, seed: int = 0
) -> tuple[PhotoDetector, np.ndarray]:
    """Trees on all (N, F) `features` (`is_photo` true for ordinary photos). The threshold is
    the (1 - max_false_rejection) quantile of the dermoscopy probabilities held out by `folds`
    (trees fit their own images too well: a threshold on those would refuse far more fresh
    dermoscopy). Returns the detector and the held-out probabilities."""
    is_photo = np.asarray(is_photo, bool)
    held_out = held_out_probabilities(features, is_photo, folds, seed)
    threshold = float(np.quantile(held_out[~is_photo], 1.0 - max_false_rejection))
    return _from_sklearn(_boosted_trees(seed).fit(features, is_photo), threshold), held_out
