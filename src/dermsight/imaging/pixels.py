"""Pixel limits and pixel-value scaling shared by every decoder (Pillow formats in
`dermsight.imaging.decode`, DICOM in `dermsight.imaging.dicom`), so neither imports the other's
module for them."""

from __future__ import annotations

import numpy as np

from dermsight.imaging.errors import ImageError

MAX_PIXELS = 50_000_000  # ~ a 8700 x 5800 photo; the ISIC 2020 originals reach 24 MP
MIN_SIDE = 16  # smaller is no photograph of a lesion
MAX_FILE_BYTES = 64 * 1024 * 1024


def check_size(size: tuple[int, int], name: str) -> None:
    """ImageError (naming `name`) when a (width, height) is over MAX_PIXELS or under MIN_SIDE."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: image is {width}x{height} pixels, over the {MAX_PIXELS / 1e6:.0f} megapixel limit"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{name}: image is only {width}x{height} pixels; at least {MIN_SIDE} per side needed")


def stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth grey or colour array to 0-255 RGB."""
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = np.zeros_like(array) if high <= low else (array - low) * (255.0 / (high - low))
    scaled = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if scaled.ndim == 2:
        scaled = np.stack([scaled] * 3, axis=-1)
    return np.ascontiguousarray(scaled[..., :3])
