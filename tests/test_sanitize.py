"""Every JPEG application segment (APP0-APP15) and the comment segment is metadata to the
sanitiser: script in any of them refuses the upload, and whatever else they carry is not stored
(only JFIF APP0, ICC APP2 and Adobe APP14, which decoders need, stay)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dermsight.imaging.decode import ImageError
from dermsight.imaging.sanitize import TRAILING_ALLOWANCE, sanitize_image

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


# -- PNG: chunk by chunk -------------------------------------------------------------------------


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, body) of every chunk."""
    chunks, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        chunks.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def with_chunks(png: bytes, *extra: bytes) -> bytes:
    """`png` with the `extra` chunks right after IHDR (which ends at byte 33)."""
    return png[:33] + b"".join(extra) + png[33:]


@pytest.fixture(scope="module")
def lesion_png(lesion_jpeg) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(lesion_jpeg)).save(out, format="PNG")
    return out.getvalue()


KEPT_PNG_CHUNKS = [png_chunk(b"gAMA", struct.pack(">I", 45455)), png_chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)),
                   png_chunk(b"sBIT", b"\x08\x08\x08"), png_chunk(b"cHRM", bytes(32)), png_chunk(b"bKGD", bytes(6))]


def test_png_keeps_the_picture_chunks_and_drops_text_time_and_exif(lesion_png):
    dropped = [png_chunk(b"tEXt", b"Author\x00Dr Jane Doe"), png_chunk(b"tIME", bytes(7)),
               png_chunk(b"zTXt", b"Note\x00\x00" + zlib.compress(b"patient 1234")), png_chunk(b"vpAg", bytes(9))]
    stored = sanitize_image(with_chunks(lesion_png, *KEPT_PNG_CHUNKS, *dropped), name="lesion.png")
    assert (stored.format, stored.original_format) == ("png", "png")
    assert stored.data == with_chunks(lesion_png, *KEPT_PNG_CHUNKS)  # byte for byte, in their order
    assert sanitize_image(lesion_png).data == lesion_png


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_an_exif_orientation_is_kept_alone_in_jpeg_and_png(lesion_jpeg, lesion_png, orientation):
    """The orientation survives (the stored image is as upright as the upload), nothing else of
    the EXIF does, and the image data is untouched."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x9003] = orientation, "SecretCam", "2024:01:02 10:10:10"
    payload = exif.tobytes()
    jpeg = sanitize_image(with_segment(lesion_jpeg, 0xE1, payload)).data
    png = sanitize_image(with_chunks(lesion_png, png_chunk(b"eXIf", payload[6:]))).data
    for stored in (jpeg, png):
        assert dict(Image.open(io.BytesIO(stored)).getexif()) == {0x0112: orientation}
        assert b"SecretCam" not in stored and b"2024:01:02" not in stored
    app1 = jpeg.index(b"\xff\xe1")
    assert segment_markers(jpeg)[:2] == [0xE0, 0xE1]  # after JFIF, before the tables and the frame
    app1_end = app1 + 2 + struct.unpack(">H", jpeg[app1 + 2 : app1 + 4])[0]
    assert jpeg[:app1] + jpeg[app1_end:] == sanitize_image(lesion_jpeg).data
    kinds = [kind for kind, _ in png_chunks(png)]
    assert kinds[:2] == [b"IHDR", b"eXIf"] and kinds.count(b"eXIf") == 1
    assert [chunk for chunk in png_chunks(png) if chunk[0] != b"eXIf"] == png_chunks(lesion_png)


def test_no_orientation_or_orientation_1_adds_no_exif(lesion_jpeg, lesion_png):
    exif = Image.Exif()
    exif[0x0112] = 1
    assert sanitize_image(with_segment(lesion_jpeg, 0xE1, exif.tobytes())).data == sanitize_image(lesion_jpeg).data
    assert sanitize_image(with_chunks(lesion_png, png_chunk(b"eXIf", exif.tobytes()[6:]))).data == lesion_png


def iccp(keyword: bytes, compressed: bytes) -> bytes:
    return png_chunk(b"iCCP", keyword + b"\x00\x00" + compressed)


def before_iend(png: bytes, chunk: bytes) -> bytes:
    """`png` with `chunk` before its IEND chunk, where Pillow's header parsing never looks: what
    the sanitiser does with it is all that decides."""
    return png[:-12] + chunk + png[-12:]


PNG_DEFECTS = {
    "checksum": (lambda png: png[:-1] + bytes([png[-1] ^ 0xFF]), r"corrupt PNG \(checksum error in a b'IEND' chunk\)"),
    "no IHDR first": (lambda png: png[:8] + png_chunk(b"gAMA", bytes(4)) + png[8:],
                      r"corrupt PNG \(does not start with an IHDR chunk\)"),
    "no IEND": (lambda png: png[:-12], r"corrupt or truncated PNG \(ends before its IEND chunk\)"),
    "chunk past the end": (lambda png: png[:-12] + struct.pack(">I", 100) + b"IEND" + bytes(4),
                           r"corrupt or truncated PNG \(a chunk runs past the end of the file\)"),
    "unknown critical chunk": (lambda png: with_chunks(png, png_chunk(b"Zzzz", b"x")),  # critical: upper case first
                               r"PNG has an unknown critical chunk b'Zzzz'"),
    "script in a dropped chunk": (lambda png: with_chunks(png, png_chunk(b"tEXt", b"c\x00<script>x</script>")),
                                  "the file carries embedded HTML, script or archive data; not accepted"),
    "script in a kept icc profile": (lambda png: before_iend(png, iccp(b"sRGB", zlib.compress(b"<svg/onload=x>"))),
                                     "the file carries embedded HTML"),
    "script in an icc profile's name": (lambda png: before_iend(png, iccp(b"<script>", zlib.compress(b"p"))),
                                        "the file carries embedded HTML"),
}


@pytest.mark.parametrize("case", PNG_DEFECTS, ids=list(PNG_DEFECTS))
def test_png_defects_are_named(lesion_png, case):
    damage, message = PNG_DEFECTS[case]
    with pytest.raises(ImageError, match="^lesion.png: " + message):
        sanitize_image(damage(lesion_png), name="lesion.png")


@pytest.mark.parametrize("keyword, compressed, kept", [
    (b"sRGB", zlib.compress(b"profile " * 100), True),
    (b"k" * 79, zlib.compress(b"profile"), True),
    (b"\xa1\xff printable Latin-1", zlib.compress(b"profile"), True),
    (b"", zlib.compress(b"profile"), False),                       # no keyword
    (b"k" * 80, zlib.compress(b"profile"), False),                 # keyword too long
    (b"tab\tin name", zlib.compress(b"profile"), False),           # not printable
    (b"sRGB", zlib.compress(b"profile")[:-6], False),              # stream cut short
    (b"sRGB", b"not zlib", False),
])
def test_a_png_icc_profile_is_kept_only_when_it_inflates_within_bounds(lesion_png, keyword, compressed, kept):
    chunk = iccp(keyword, compressed)
    uploaded = before_iend(lesion_png, chunk)
    assert sanitize_image(uploaded).data == (uploaded if kept else lesion_png)


# -- after the end of the image ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_trailing_bytes_are_dropped_up_to_the_allowance_or_padding_else_refused(lesion_jpeg, lesion_png, kind):
    image = {"jpeg": sanitize_image(lesion_jpeg).data, "png": lesion_png}[kind]
    for tail in (b"x" * TRAILING_ALLOWANCE, b"\x00" * 5000, b"\xff\x00" * 2000):
        assert sanitize_image(image + tail).data == image
    message = rf"^up.{kind}: 33 bytes of other data after the end of the {kind.upper()} image"
    with pytest.raises(ImageError, match=message):
        sanitize_image(image + b"x" * (TRAILING_ALLOWANCE + 1), name=f"up.{kind}")
    with pytest.raises(ImageError, match="embedded HTML, script or archive"):
        sanitize_image(image + b"<html>", name=f"up.{kind}")


def test_a_second_picture_is_dropped_only_after_an_mpf_index(lesion_jpeg):
    """Phones append further pictures (MPF): dropped when an APP2 MPF index says so, refused otherwise."""
    image = sanitize_image(lesion_jpeg).data
    mpf = with_segment(image, 0xE2, b"MPF\x00" + bytes(40))
    assert sanitize_image(mpf + b"\x00\x00" + image).data == image
    with pytest.raises(ImageError, match="bytes of other data after the end of the JPEG image"):
        sanitize_image(image + image)


# -- JPEG structure ------------------------------------------------------------------------------


def test_restart_markers_and_fill_bytes_pass_unchanged(lesion_jpeg):
    out = io.BytesIO()
    Image.open(io.BytesIO(lesion_jpeg)).save(out, format="JPEG", quality=90, restart_marker_blocks=4)
    restarts = out.getvalue()
    assert any(bytes((0xFF, m)) in restarts for m in range(0xD0, 0xD8))
    assert sanitize_image(restarts).data == restarts
    filled = restarts[:2] + b"\xff\xff\xff" + restarts[2:]  # fill bytes before a marker are dropped
    assert sanitize_image(filled).data == restarts


# Damage after the first scan, where Pillow's header parsing (which refuses damage before it) never looks.
TABLE = b"\xff\xdb\x00\x04\x00\x00"  # a complete (if empty) segment
JPEG_DEFECTS = {
    "not a marker": (lambda j: j[:-2] + TABLE + b"\x00", r"no marker at byte \d+"),
    "ends inside a marker": (lambda j: j[:-2] + TABLE + b"\xff\xff", "ends inside a marker"),
    "ends inside a segment header": (lambda j: j[:-2] + b"\xff\xdb\x00", "ends inside a segment header"),
    "segment past the end": (lambda j: j[:-2] + b"\xff\xdb\x10\x00" + j[-2:],
                             "a segment runs past the end of the file"),
    "segment length 1": (lambda j: j[:-2] + b"\xff\xdb\x00\x01" + j[-2:], "a segment runs past the end of the file"),
    "scan without an end": (lambda j: j[:-2], "image data ends without an end marker"),
}


@pytest.mark.parametrize("case", JPEG_DEFECTS, ids=list(JPEG_DEFECTS))
def test_jpeg_defects_are_named(lesion_jpeg, case):
    damage, message = JPEG_DEFECTS[case]
    with pytest.raises(ImageError, match=rf"^lesion.jpg: corrupt or truncated JPEG \({message}\)$"):
        sanitize_image(damage(sanitize_image(lesion_jpeg).data), name="lesion.jpg")


@pytest.mark.parametrize("kind", ["BMP", "TIFF", "WEBP"])
def test_other_formats_are_stored_as_png_of_their_pixels(lesion_jpeg, kind):
    out = io.BytesIO()
    Image.open(io.BytesIO(lesion_jpeg)).save(out, format=kind, **({"lossless": True} if kind == "WEBP" else {}))
    stored = sanitize_image(out.getvalue())
    assert (stored.format, stored.original_format) == ("png", kind.lower())
    assert stored.data.startswith(b"\x89PNG") and [k for k, _ in png_chunks(stored.data)] == [b"IHDR", b"IDAT", b"IEND"]
    np.testing.assert_array_equal(pixels(stored.data), pixels(lesion_jpeg))
