"""Heat maps: a melanoma class activation map drawn over the model-input square."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from matplotlib import colormaps
from PIL import Image

COLORMAP = "inferno"  # perceptually uniform, readable in grey and by most colour-blind viewers
MAX_ALPHA = 0.65  # the strongest activation covers the skin this much
# JPEG, full-resolution colour (4:4:4, so the colour map's hues keep their edges): a cost paid
# inside every API request, 0.1 ms for a 160 px map against 1.9 ms for PNG (zlib level 1),
# and 5 KB instead of 38 KB.
JPEG_QUALITY = 90


@lru_cache(maxsize=8)
def _colour_table(colormap: str) -> np.ndarray:
    """The colormap's own lookup table: (N, 3) float32 RGB in 0-1 (N = 256 for matplotlib's)."""
    cmap = colormaps[colormap]
    return np.asarray(cmap(np.arange(cmap.N))[:, :3], dtype=np.float32)


def heatmap_jpeg(cam: np.ndarray, square: np.ndarray, colormap: str = COLORMAP, max_alpha: float = MAX_ALPHA) -> bytes:
    """A (h, w) activation map blended over an (S, S, 3) uint8 square -> JPEG bytes.

    The map is upsampled bilinearly to S x S, its positive part scaled to 0-1 by its
    maximum (negative evidence is not drawn), coloured, and alpha-blended with an
    opacity that grows with the activation, so cold regions leave the lesion visible.
    """
    size = square.shape[0]
    upsampled = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    positive = np.clip(upsampled, 0.0, None)
    peak = float(positive.max())
    level = positive / np.float32(peak) if peak > 0 else np.zeros_like(positive)
    table = _colour_table(colormap)
    # What matplotlib's Colormap.__call__ does with floats in [0, 1], without its float64 RGBA copy.
    colour = table[np.minimum((level * len(table)).astype(np.intp), len(table) - 1)]
    alpha = (np.float32(max_alpha) * level)[..., None]
    blended = (1.0 - alpha) * (square.astype(np.float32) / np.float32(255.0)) + alpha * colour
    pixels = np.round(blended * np.float32(255.0)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()
