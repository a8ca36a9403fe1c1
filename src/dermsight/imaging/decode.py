"""The one image decoder: bytes or a record's image_ref -> validated RGB uint8 array.

Content is identified by magic bytes, never by file name. Pixel counts are checked
from the header before any decoding, so a small file that would decode to gigapixels
is refused cheaply. Every failure raises :class:`ImageError` with a sentence a user
can act on.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dermsight.imaging.dicom import decode_dicom
from dermsight.imaging.errors import ImageError, reason
from dermsight.imaging.pixels import MAX_FILE_BYTES, MAX_PIXELS, check_size, stretch_to_uint8
from dermsight.imaging.tfrecord_image import read_tfrecord_image

# Pillow's own bomb guard raises at 2x its limit; ours is checked first, from the header.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (128, b"DICM", "dicom"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format named by `data`'s magic bytes, or None."""
    for offset, magic, name in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_kind(data: bytes, name: str = "image") -> str:
    """`sniff_format`, raising ImageError (naming `name`) for empty or non-image data."""
    if not data:
        raise ImageError(f"{name}: file is empty (0 bytes)")
    kind = sniff_format(data)
    if kind is None:
        raise ImageError(f"{name}: not an image (JPEG, PNG, DICOM, BMP, TIFF or WebP expected)")
    return kind


def read_image_bytes(ref: str | Path) -> bytes:
    """The encoded bytes behind an image_ref: a file path, or ``shard.tfrec#offset``."""
    ref = str(ref)
    if "#" in ref and ref.rsplit("#", 1)[1].isdigit():
        path, offset = ref.rsplit("#", 1)
        return read_tfrecord_image(path, int(offset))
    path = Path(ref)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageError(f"{ref}: cannot read file ({err.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{ref}: file is {size / 1e6:.0f} MB, over the {MAX_FILE_BYTES / 1e6:.0f} MB limit")
    return path.read_bytes()


def decode_image(data: bytes, *, name: str = "image", min_side: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to an RGB uint8 array of shape (H, W, 3).

    `min_side`, when given, lets JPEG decoding run at a reduced scale (Pillow's
    ``draft``) as long as both sides stay at least that large: about twice as fast
    for big photos, and the model never sees more pixels than it needs.
    """
    kind = image_kind(data, name)
    if kind == "dicom":
        return decode_dicom(data, name=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_size(image.size, name)
            if kind == "jpeg" and min_side:
                image.draft("RGB", _draft_size(image.size, min_side))
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{name}: image is too large to decode safely (over the {MAX_PIXELS / 1e6:.0f} megapixel limit)"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{name}: corrupt or truncated {kind.upper()} ({reason(err)})") from None
    return to_rgb_array(image)


def decode_file(ref: str | Path, *, min_side: int | None = None) -> np.ndarray:
    """Read and decode the image behind an image_ref (a path or ``shard.tfrec#offset``)."""
    return decode_image(read_image_bytes(ref), name=str(ref), min_side=min_side)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Upright (EXIF orientation applied), 8-bit RGB; alpha composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        return stretch_to_uint8(array)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _draft_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    width, height = size
    scale = min_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))
