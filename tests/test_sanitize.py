"""Every JPEG application segment (APP0-APP15) and the comment segment is metadata to the
sanitiser: script in any of them refuses the upload, and whatever else they carry is not stored
(only JFIF APP0, ICC APP2 and Adobe APP14, which decoders need, stay)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from dermsight.imaging.decode import ImageError
from dermsight.imaging.sanitize import sanitize_image

METADATA_MARKERS = [*range(0xE0, 0xF0), 0xFE]  # APP0 ... APP15, COM


@pytest.fixture(scope="module")
def lesion_jpeg(shared) -> bytes:
    return (shared / "ham10000" / "images" / "ISIC_0024306.jpg").read_bytes()


def with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """`jpeg` with one more segment right after its start-of-image marker."""
    return jpeg[:2] + bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def segment_markers(jpeg: bytes) -> list[int]:
    """The markers of the segments before the first scan."""
    markers, pos = [], 2
    while jpeg[pos + 1] != 0xDA:
        markers.append(jpeg[pos + 1])
        pos += 2 + struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
    return markers


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@pytest.mark.parametrize("marker", METADATA_MARKERS, ids=lambda m: f"0x{m:02X}")
def test_script_in_any_metadata_segment_is_refused(lesion_jpeg, marker):
    hostile = with_segment(lesion_jpeg, marker, b"Vendor\x00<script>alert(1)</script>")
    with pytest.raises(ImageError, match="lesion.jpg: the file carries embedded HTML, script or archive data"):
        sanitize_image(hostile, name="lesion.jpg")


@pytest.mark.parametrize("marker", METADATA_MARKERS, ids=lambda m: f"0x{m:02X}")
def test_other_metadata_segments_are_not_stored(lesion_jpeg, marker):
    """A vendor payload (not JFIF, ICC or Adobe) in any APPn or COM is dropped; the pixels stay."""
    payload = b"Vendor\x00" + bytes(range(200))
    stored = sanitize_image(with_segment(lesion_jpeg, marker, payload), name="lesion.jpg").data
    assert payload not in stored
    assert segment_markers(stored) == segment_markers(sanitize_image(lesion_jpeg).data)
    np.testing.assert_array_equal(pixels(stored), pixels(lesion_jpeg))
