"""Heat maps: a melanoma class activation map drawn over the model-input square."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

COLORMAP = "inferno"  # perceptually uniform, readable in grey and by most colour-blind viewers
MAX_ALPHA = 0.65  # the strongest activation covers the skin this much


def heatmap_png(cam: np.ndarray, square: np.ndarray, colormap: str = COLORMAP, max_alpha: float = MAX_ALPHA) -> bytes:
    """A (h, w) activation map blended over an (S, S, 3) uint8 square -> PNG bytes.

    The map is upsampled bilinearly to S x S, its positive part scaled to 0-1 by its
    maximum (negative evidence is not drawn), coloured, and alpha-blended with an
    opacity that grows with the activation, so cold regions leave the lesion visible.
    """
    size = square.shape[0]
    upsampled = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    positive = np.clip(upsampled, 0.0, None)
    peak = float(positive.max())
    level = positive / peak if peak > 0 else np.zeros_like(positive)
    colour = colormaps[colormap](level)[..., :3]
    alpha = (max_alpha * level)[..., None]
    blended = (1.0 - alpha) * (square.astype(np.float32) / 255.0) + alpha * colour
    buffer = io.BytesIO()
    Image.fromarray(np.round(blended * 255.0).astype(np.uint8), mode="RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
