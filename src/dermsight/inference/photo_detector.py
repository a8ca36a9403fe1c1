"""Is this dermoscopy, or an ordinary photo? A detector that sees the image itself.

An ordinary close-up photo of a mole (a phone or camera instead of a dermatoscope) is the
commonest wrong input, and the melanoma network's own features hardly tell it from dermoscopy
(a logistic regression on them refused 46% of such photos), nor did hand-made picture
statistics (brightness, colour and sharpness in rings, 200 boosted trees: 66%, and they learnt
one atlas's camera instead of the kind of image). The detector runs a small network on the
central 70% of the model's input square: an ImageNet EfficientNet-Lite0 up to its fifth stage
at 128 px (:class:`~dermsight.models.network.PhotoFeatureNet`; edges, texture and object parts:
magnified, evenly lit skin against skin seen from afar, its surroundings, shadows and rulers),
pools each of four stages to its mean and standard deviation, and a logistic regression turns
those 512 values into the probability of an ordinary photo. The network travels inside the bundle's ``ood_gate.npz`` (an
ONNX graph, ~2.5 MB), so nothing is downloaded at run time.

It is fitted by ``scripts/fit_photo_detector.py`` (:mod:`dermsight.training.photo_gate`) on
dermoscopy of every shared source and on real photos (Derm7pt's clinical photos of its
published train split, the everyday photos of :mod:`dermsight.evaluation.ood_images`, and
honest variants of them); its threshold is a quantile of held-out dermoscopy probabilities.
``bench/ood.py`` measures it by source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from dermsight.inference.onnx_session import session_options


@dataclass
class PhotoNetwork:
    """The detector's network (an ONNX graph: the bundle's normalised input (N, 3, S, S) ->
    photo_features (N, F)), run in one single-threaded session made on first use."""

    onnx: bytes
    _session: ort.InferenceSession | None = field(default=None, init=False, repr=False, compare=False)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Normalised model inputs (N, 3, S, S) -> (N, F) pooled network features."""
        if self._session is None:
            self._session = ort.InferenceSession(self.onnx, session_options(), providers=["CPUExecutionProvider"])
        return self._session.run(None, {"image": np.ascontiguousarray(images, np.float32)})[0]


@dataclass
class PhotoDetector:
    """The photo network's pooled features -> standardised -> logistic regression: the
    probability that an image is an ordinary (non-dermoscopic) photo; above `threshold` it is
    refused."""

    network: PhotoNetwork
    mean: np.ndarray  # (F,) the features' training mean
    scale: np.ndarray  # (F,) and standard deviation
    weight: np.ndarray  # (F,) logistic regression on the standardised features
    bias: float
    threshold: float

    def probability_of(self, features: np.ndarray) -> np.ndarray:
        """(N, F) :meth:`PhotoNetwork.features` -> (N,) probability of an ordinary photo."""
        z = ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.weight + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def probability(self, images: np.ndarray) -> np.ndarray:
        """Normalised model inputs (N, 3, S, S) -> (N,) probability of an ordinary photo."""
        return self.probability_of(self.network.features(images))

    def arrays(self) -> dict[str, np.ndarray]:
        """What the bundle's ood_gate.npz stores (keys prefixed photo_)."""
        return {
            "photo_network": np.frombuffer(self.network.onnx, np.uint8), "photo_mean": self.mean, "photo_scale": self.scale,
            "photo_weight": self.weight, "photo_bias": np.float64(self.bias), "photo_threshold": np.float64(self.threshold),
        }

    @classmethod
    def from_arrays(cls, data) -> PhotoDetector:
        return cls(PhotoNetwork(np.asarray(data["photo_network"], np.uint8).tobytes()), *(np.asarray(data[f"photo_{k}"], np.float64)
                   for k in ("mean", "scale", "weight")), float(data["photo_bias"]), float(data["photo_threshold"]))
