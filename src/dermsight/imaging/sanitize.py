"""What the web app stores of an upload: the picture, and nothing else of the file.

An uploaded file is identified by its magic bytes (never its name or content type),
checked to be one complete image, and reduced to its pixels' container:

- **JPEG**: kept losslessly, segment by segment. Only the segments a decoder needs
  stay (frame, tables, scans, JFIF APP0, ICC profile APP2, Adobe APP14); EXIF and
  XMP (APP1: GPS position, camera serial, dates), IPTC (APP13), comments and every
  other APPn go. An EXIF orientation is kept as a minimal EXIF block holding only the
  orientation tag, so the stored image is upright exactly as the uploaded one.
- **PNG**: kept losslessly, chunk by chunk (CRCs checked): image, palette,
  transparency and colour chunks stay; text, time and EXIF chunks go (orientation
  kept as for JPEG).
- **DICOM**: only its pixels are kept, as a PNG; the header (names, ids, dates,
  private tags) is dropped whole, never stored nor de-identified. A DICOM that says its
  pixels carry burned-in annotation is refused.
- **BMP, TIFF, WebP**: decoded and stored as PNG (lossless from the decoded pixels;
  TIFF and WebP can carry EXIF and XMP).

Polyglots are refused: data after the image's end (JPEG EOI, PNG IEND) beyond a
32-byte allowance or zero/0xFF padding, and HTML, script or archive signatures
(``_POLYGLOT``) in any JPEG segment or PNG chunk, kept or dropped (the ICC profile in
APP2 and the name and decompressed profile of a PNG iCCP chunk included), or in trailing
data. Only the compressed picture itself (JPEG scan data, PNG IDAT) is not scanned: any
byte pattern can occur there by chance. A PNG ICC profile that cannot be decompressed
within bounds is dropped. (A JPEG's extra MPF pictures, which phones append after the
first image, are dropped, not refused.) Every failure is an :class:`ImageError`.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags
from PIL import Image as PILImage

from dermsight.imaging.decode import decode_image, image_kind
from dermsight.imaging.errors import ImageError
from dermsight.imaging.pixels import MAX_PIXELS

TRAILING_ALLOWANCE = 32  # bytes after the image's end tolerated (and dropped) whatever they are

# HTML, script and archive signatures that make a file a polyglot when found in its
# metadata or after its end (case-insensitive for the text ones). A tag name must be
# followed by what ends it in HTML (space, "/" or ">"): "<svg/onload=...>" is a tag.
_POLYGLOT = re.compile(
    rb"<(script|iframe|object|embed|\?php|!doctype)"
    rb"|<(html|body|img|svg|math|style|link|meta|base|form|frame|frameset|applet|video|audio)[\s/>]|javascript:"
    rb"|PK\x03\x04[\x0a\x14\x2d]\x00|PK\x05\x06\x00\x00|Rar!\x1a\x07|7z\xbc\xaf\x27\x1c|\x7fELF[\x01\x02]",
    re.IGNORECASE,
)
MAX_ICC_BYTES = 4 * 2**20  # a PNG's decompressed ICC profile beyond this is dropped, not inflated

# JPEG markers that have no length field.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
# Chunks a PNG decoder needs for the picture; everything else is dropped.
_PNG_KEEP = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"bKGD", b"pHYs"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Sanitized:
    """An upload reduced to what may be stored: `data` in `format` (jpeg or png), and
    the format it arrived in."""

    data: bytes
    format: str
    original_format: str


def sanitize_image(data: bytes, *, name: str = "image") -> Sanitized:
    """The bytes of `data` that DermSight stores and scores; ImageError when `data` is
    not one complete, clean image."""
    kind = image_kind(data, name)
    if kind == "jpeg":
        return Sanitized(_clean_jpeg(data, name), "jpeg", kind)
    if kind == "png":
        return Sanitized(_clean_png(data, name), "png", kind)
    if kind == "dicom":
        return Sanitized(_png(_dicom_pixels(data, name)), "png", kind)
    return Sanitized(_png(decode_image(data, name=name)), "png", kind)


# -- JPEG -------------------------------------------------------------------------------


def _clean_jpeg(data: bytes, name: str) -> bytes:
    orientation = _orientation(data, name)
    n = len(data)
    kept: list[bytes] = [b"\xff\xd8"]
    pos, has_mpf, inserted_exif = 2, False, orientation == 1
    while True:
        if pos >= n or data[pos] != 0xFF:
            raise ImageError(f"{name}: corrupt or truncated JPEG (no marker at byte {pos})")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise ImageError(f"{name}: corrupt or truncated JPEG (ends inside a marker)")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE:
            kept.append(bytes((0xFF, marker)))
            continue
        if pos + 2 > n:
            raise ImageError(f"{name}: corrupt or truncated JPEG (ends inside a segment header)")
        length = struct.unpack(">H", data[pos : pos + 2])[0]
        if length < 2 or pos + length > n:
            raise ImageError(f"{name}: corrupt or truncated JPEG (a segment runs past the end of the file)")
        payload = data[pos + 2 : pos + length]
        segment = bytes((0xFF, marker)) + data[pos : pos + length]
        pos += length
        _refuse_polyglot(payload, name)  # every segment, kept or not (tables and frame headers too)
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn, COM: metadata
            has_mpf |= marker == 0xE2 and payload.startswith(b"MPF\x00")
            if _keep_app(marker, payload):
                kept.append(segment)
            continue
        if not inserted_exif:  # the orientation goes after APP0, before the frame
            kept.append(_app1(orientation))
            inserted_exif = True
        kept.append(segment)
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            end = _scan_end(data, pos, name)
            kept.append(data[pos:end])
            pos = end
    kept.append(b"\xff\xd9")
    _check_trailing(data[pos:], name, "JPEG", allow_pictures=has_mpf)
    return b"".join(kept)


def _keep_app(marker: int, payload: bytes) -> bool:
    if marker == 0xE0:
        return payload.startswith((b"JFIF\x00", b"JFXX\x00"))
    if marker == 0xE2:
        return payload.startswith(b"ICC_PROFILE\x00")
    if marker == 0xEE:
        return payload.startswith(b"Adobe")
    return False


def _scan_end(data: bytes, pos: int, name: str) -> int:
    """Position of the marker that ends the entropy-coded data starting at `pos`."""
    while True:
        at = data.find(b"\xff", pos)
        if at < 0 or at + 1 >= len(data):
            raise ImageError(f"{name}: corrupt or truncated JPEG (image data ends without an end marker)")
        following = data[at + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:  # stuffing, restart, fill
            pos = at + 1 if following == 0xFF else at + 2
            continue
        return at


def _app1(orientation: int) -> bytes:
    exif = PILImage.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    payload = exif.tobytes()
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


# -- PNG --------------------------------------------------------------------------------


def _clean_png(data: bytes, name: str) -> bytes:
    orientation = _orientation(data, name)
    n = len(data)
    kept: list[bytes] = [_PNG_SIGNATURE]
    pos, first = len(_PNG_SIGNATURE), True
    while True:
        if pos + 8 > n:
            raise ImageError(f"{name}: corrupt or truncated PNG (ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if length > 2**31 - 1 or end > n:
            raise ImageError(f"{name}: corrupt or truncated PNG (a chunk runs past the end of the file)")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : end])
        if zlib.crc32(kind + body) != crc:
            raise ImageError(f"{name}: corrupt PNG (checksum error in a {kind!r} chunk)")
        if first and kind != b"IHDR":
            raise ImageError(f"{name}: corrupt PNG (does not start with an IHDR chunk)")
        if kind != b"IDAT":  # the compressed picture: any byte pattern can occur there by chance
            _refuse_polyglot(body, name)
        if kind == b"iCCP":
            if _icc_profile_vouched(body, name):
                kept.append(data[pos:end])
        elif kind in _PNG_KEEP:
            kept.append(data[pos:end])
        elif kind[:1].isupper():  # an unknown critical chunk: no decoder could read the picture
            raise ImageError(f"{name}: PNG has an unknown critical chunk {kind!r}")
        if first and orientation != 1:
            exif = _app1(orientation)[10:]  # the TIFF structure without APP1 header and "Exif\0\0"
            kept.append(struct.pack(">I4s", len(exif), b"eXIf") + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif)))
        first = False
        pos = end
        if kind == b"IEND":
            break
    _check_trailing(data[pos:], name, "PNG", allow_pictures=False)
    return b"".join(kept)


def _icc_profile_vouched(body: bytes, name: str) -> bool:
    """Whether an iCCP chunk may be kept: its name is a PNG keyword and its profile
    inflates within MAX_ICC_BYTES (else False: the chunk is dropped); ImageError when the
    inflated profile carries a polyglot signature."""
    keyword, separator, rest = body.partition(b"\x00")
    printable = all(32 <= c <= 126 or 161 <= c <= 255 for c in keyword)
    if not separator or not 1 <= len(keyword) <= 79 or not printable or rest[:1] != b"\x00":
        return False
    inflater = zlib.decompressobj()
    try:
        profile = inflater.decompress(rest[1:], MAX_ICC_BYTES)
    except zlib.error:
        return False
    if inflater.unconsumed_tail or not inflater.eof:
        return False
    _refuse_polyglot(profile, name)
    return True


# -- shared -------------------------------------------------------------------------------


def _orientation(data: bytes, name: str) -> int:
    """The EXIF (or XMP) orientation Pillow applies when decoding, 1 when none or broken."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PILImage.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(
                        f"{name}: image is {width}x{height} pixels, over the {MAX_PIXELS / 1e6:.0f} megapixel limit"
                    )
                value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except ImageError:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise ImageError(
            f"{name}: image is too large to decode safely (over the {MAX_PIXELS / 1e6:.0f} megapixel limit)"
        ) from None
    except Exception as err:  # noqa: BLE001 - any parser failure on untrusted bytes is a corrupt file
        raise ImageError(f"{name}: corrupt image header ({type(err).__name__})") from None
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _refuse_polyglot(chunk: bytes, name: str) -> None:
    if _POLYGLOT.search(chunk):
        raise ImageError(f"{name}: the file carries embedded HTML, script or archive data; not accepted")


def _check_trailing(rest: bytes, name: str, kind: str, *, allow_pictures: bool) -> None:
    """Data after the image's end is dropped when it is a few bytes, padding or (JPEG with
    an MPF index) further pictures; anything else makes the file a polyglot."""
    if not rest:
        return
    if allow_pictures and rest.lstrip(b"\x00").startswith(b"\xff\xd8\xff"):
        return  # MPF: further pictures of the same shot (gain map, depth map); never stored
    _refuse_polyglot(rest, name)
    if len(rest) <= TRAILING_ALLOWANCE or not rest.strip(b"\x00\xff"):
        return
    raise ImageError(
        f"{name}: {len(rest):,} bytes of other data after the end of the {kind} image; "
        "not accepted (export or re-save the image and upload it again)"
    )


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG", compress_level=3)
    return out.getvalue()


def _dicom_pixels(data: bytes, name: str) -> np.ndarray:
    """The first frame's pixels; nothing of the header is kept."""
    from dermsight.imaging.dicom import burned_in_annotation, dataset_pixels, read_dataset

    with warnings.catch_warnings():  # pydicom's warnings can quote header values: never let them out
        warnings.simplefilter("ignore")
        dataset = read_dataset(data, name)
        try:
            burned_in = burned_in_annotation(dataset)
        except Exception as err:  # noqa: BLE001 - an element that cannot be read cannot be judged safe
            raise ImageError(f"{name}: unreadable DICOM ({type(err).__name__} in its header)") from None
        if burned_in:
            raise ImageError(
                f"{name}: the DICOM says its pixels carry burned-in annotation (patient details in the picture); "
                "DermSight does not store such images"
            )
        return dataset_pixels(dataset, name)
