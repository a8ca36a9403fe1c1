"""DICOM: pixels and the few patient tags DermSight uses (ISIC 2020 shipped .dcm files).

Only the tags needed for a lesion record are read; nothing else of a DICOM header
(names, birth dates, institutions) ever leaves this module.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dermsight.imaging.decode import MAX_PIXELS, MIN_SIDE, ImageError, stretch_to_uint8

# ISIC 2020 wrote the anatomical site into BodyPartExamined in upper case.
_TAGS = {
    "patient_id": "PatientID",
    "sex": "PatientSex",
    "age": "PatientAge",
    "site": "BodyPartExamined",
}


def read_dataset(data: bytes, name: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, OSError) as err:
        raise ImageError(f"{name}: unreadable DICOM ({err})") from None


def dicom_tags(dataset: pydicom.Dataset) -> dict[str, str]:
    """The record-relevant tags as plain strings ('' where absent)."""
    return {key: str(dataset.get(tag, "") or "") for key, tag in _TAGS.items()}


def decode_dicom(data: bytes, *, name: str = "image") -> np.ndarray:
    """Pixels of a single-frame DICOM as RGB uint8 (H, W, 3)."""
    dataset = read_dataset(data, name)
    if "PixelData" not in dataset:
        raise ImageError(f"{name}: DICOM has no pixel data")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    if rows * columns > MAX_PIXELS:
        raise ImageError(f"{name}: image is {columns}x{rows} pixels, over the {MAX_PIXELS / 1e6:.0f} megapixel limit")
    if min(rows, columns) < MIN_SIDE:
        raise ImageError(f"{name}: image is only {columns}x{rows} pixels; at least {MIN_SIDE} per side needed")
    try:
        pixels = dataset.pixel_array
    except Exception as err:  # pydicom raises many types for broken or unsupported pixel data
        raise ImageError(f"{name}: cannot decode DICOM pixel data ({err})") from None
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    # pydicom 3 already returns YBR_FULL / YBR_FULL_422 (the JPEG Baseline photometric)
    # as RGB (`as_rgb=True` by default): converting again would scramble the colours.
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    if pixels.ndim == 2 or pixels.dtype != np.uint8:
        if photometric == "MONOCHROME1":
            pixels = pixels.max() - pixels
        return stretch_to_uint8(pixels)
    return np.ascontiguousarray(pixels[..., :3])
