"""The one preprocessing used by training, evaluation, the CLI and the API.

A :class:`Preprocessing` is stored in every model bundle, so a bundle always sees
images exactly as it was trained on them: resized to `size` x `size` (``fit="crop"``: shorter
side to `size`, centre crop; ``fit="squash"``: the whole frame, aspect not kept, as isic9 and the
ISIC 2017-era archive images already are), optionally colour-normalised (Shades of Gray),
scaled to the backbone's mean/std, channels first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# Test-time views: dermoscopy has no "up", so flips and rotations are label-preserving.
VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "rot180")
FITS: tuple[str, ...] = ("crop", "squash")
SHADES_OF_GRAY_POWER = 6  # Finlayson & Trezzi's Minkowski norm; p = 6 is what the ISIC 2019 winners used


def shades_of_gray(rgb: np.ndarray, power: int = SHADES_OF_GRAY_POWER) -> np.ndarray:
    """Colour constancy: scale each channel so the image's Minkowski p-norm illuminant
    estimate becomes neutral grey (uint8 in, uint8 out). Removes a dermatoscope's or a
    camera's colour cast, one of the cues that tell sources apart."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    illuminant = np.power(np.mean(np.power(pixels, power), axis=0), 1.0 / power)
    gains = illuminant.mean() / np.maximum(illuminant, 1e-6)
    return np.clip(rgb.astype(np.float32) * gains, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Preprocessing:
    """The one preprocessing a bundle carries: square size, fit (crop or squash), colour constancy, mean/std."""

    size: int = 224
    mean: tuple[float, float, float] = (127 / 255,) * 3
    std: tuple[float, float, float] = (128 / 255,) * 3
    fit: str = "crop"
    colour_constancy: bool = False

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"unknown fit {self.fit!r}; expected one of {', '.join(FITS)}")

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (S, S, 3) the network reads: resized (bicubic) by `fit`, then colour-normalised
        when `colour_constancy` is set."""
        return self.colour_normalise(self.fit_square(rgb))

    def fit_square(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (S, S, 3): the frame resized (bicubic) by `fit`, colours untouched."""
        return self._squash(rgb) if self.fit == "squash" else self._crop(rgb)

    def colour_normalise(self, square: np.ndarray) -> np.ndarray:
        """Shades of Gray when `colour_constancy` is set, else the square itself."""
        return shades_of_gray(square) if self.colour_constancy else square

    def _squash(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        if (height, width) == (self.size, self.size):
            return np.asarray(rgb)
        return np.asarray(Image.fromarray(rgb).resize((self.size, self.size), Image.BICUBIC, reducing_gap=3.0))

    def _crop(self, rgb: np.ndarray) -> np.ndarray:
        """Shorter side to `size` (bicubic), then a centred square crop."""
        height, width = rgb.shape[:2]
        scale = self.size / min(height, width)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        image = Image.fromarray(rgb)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return np.asarray(image.crop((left, top, left + self.size, top + self.size)))

    def normalise(self, square: np.ndarray) -> np.ndarray:
        """uint8 (S, S, 3) -> float32 (3, S, S) in the backbone's units."""
        mean = np.asarray(self.mean, dtype=np.float32) * 255.0
        std = np.asarray(self.std, dtype=np.float32) * 255.0
        return ((square.astype(np.float32) - mean) / std).transpose(2, 0, 1)

    def normalise_into(self, square: np.ndarray, out: np.ndarray) -> None:
        """`normalise` written straight into `out` (a float32 (3, S, S) slot of a batch,
        channels first): the same numbers, without the temporaries and the later copy."""
        mean = (np.asarray(self.mean, dtype=np.float32) * 255.0).reshape(3, 1, 1)
        std = (np.asarray(self.std, dtype=np.float32) * 255.0).reshape(3, 1, 1)
        np.subtract(square.transpose(2, 0, 1), mean, out=out, dtype=np.float32)
        np.divide(out, std, out=out)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.normalise(self.resize(rgb))

    def to_dict(self) -> dict:
        resize = ["resize shorter side (bicubic)", "centre crop"] if self.fit == "crop" else ["resize to a square (bicubic, aspect not kept)"]
        constancy = ["Shades of Gray colour constancy (p=6)"] if self.colour_constancy else []
        return {**asdict(self), "steps": ["decode RGB (EXIF upright)", *resize, *constancy, "normalise"]}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """Bundles written before `fit` and `colour_constancy` existed crop and do not normalise colour."""
        return cls(
            size=int(data["size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
            fit=data.get("fit", "crop"), colour_constancy=bool(data.get("colour_constancy", False)),
        )


def view(chw: np.ndarray, name: str) -> np.ndarray:
    """One test-time view of a (..., 3, S, S) array."""
    if name == "identity":
        return chw
    if name == "hflip":
        return chw[..., ::-1]
    if name == "vflip":
        return chw[..., ::-1, :]
    if name == "rot180":
        return chw[..., ::-1, ::-1]
    raise ValueError(f"unknown view {name!r}; expected one of {', '.join(VIEWS)}")


def views(chw: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Stack the named views of a batch (N, 3, S, S) -> (V, N, 3, S, S), contiguous."""
    return np.ascontiguousarray(np.stack([view(chw, name) for name in names]))
