"""DICOM: pixels and the few tags DermSight uses (ISIC 2020 shipped .dcm files).

Only the tags needed for a lesion record (and Burned In Annotation) are read; nothing
else of a DICOM header (names, birth dates, institutions) ever leaves this module. The
web app stores an uploaded DICOM's pixels only, as PNG: its header is dropped whole, so
it is never de-identified tag by tag.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dermsight.imaging.errors import ImageError, reason
from dermsight.imaging.pixels import check_size, stretch_to_uint8

# ISIC 2020 wrote the anatomical site into BodyPartExamined in upper case.
_TAGS = {
    "patient_id": "PatientID",
    "sex": "PatientSex",
    "age": "PatientAge",
    "site": "BodyPartExamined",
}


def read_dataset(data: bytes, name: str) -> pydicom.Dataset:
    """The parsed DICOM dataset of `data`; ImageError (naming `name`) when it is not one."""
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, OSError) as err:
        raise ImageError(f"{name}: unreadable DICOM ({reason(err)})") from None
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on malformed headers (fuzzing found them)
        raise ImageError(f"{name}: unreadable DICOM ({type(err).__name__} in its header)") from None


def burned_in_annotation(dataset: pydicom.Dataset) -> bool:
    """True when the DICOM says its pixels carry identifying text (Burned In Annotation YES)."""
    return str(dataset.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def dicom_tags(dataset: pydicom.Dataset) -> dict[str, str]:
    """The record-relevant tags as plain strings ('' where absent)."""
    return {key: str(dataset.get(tag, "") or "") for key, tag in _TAGS.items()}


def decode_dicom(data: bytes, *, name: str = "image") -> np.ndarray:
    """Pixels of a single-frame DICOM as RGB uint8 (H, W, 3)."""
    return dataset_pixels(read_dataset(data, name), name)


def dataset_pixels(dataset: pydicom.Dataset, name: str = "image") -> np.ndarray:
    """Pixels of a read DICOM dataset (the first frame) as RGB uint8 (H, W, 3)."""
    try:  # header elements are parsed lazily: a malformed one raises on first access
        has_pixels = "PixelData" in dataset
        rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        photometric = str(dataset.get("PhotometricInterpretation", ""))
    except Exception as err:  # noqa: BLE001
        raise ImageError(f"{name}: unreadable DICOM ({type(err).__name__} in its header)") from None
    if not has_pixels:
        raise ImageError(f"{name}: DICOM has no pixel data")
    check_size((columns, rows), name)
    try:
        if frames > 1:  # only the first frame is decoded: 1,000 compressed frames would not fit in memory
            dataset.pixel_array_options(index=0)
        pixels = dataset.pixel_array
    except Exception as err:  # pydicom raises many types for broken or unsupported pixel data
        raise ImageError(f"{name}: cannot decode DICOM pixel data ({reason(err)})") from None
    if frames > 1 and pixels.ndim == (4 if int(dataset.get("SamplesPerPixel", 1) or 1) > 1 else 3):
        pixels = pixels[0]
    # pydicom 3 already returns YBR_FULL / YBR_FULL_422 (the JPEG Baseline photometric)
    # as RGB (`as_rgb=True` by default): converting again would scramble the colours.
    if pixels.ndim == 2 or pixels.dtype != np.uint8:
        if photometric == "MONOCHROME1":
            pixels = pixels.max() - pixels
        return stretch_to_uint8(pixels)
    return np.ascontiguousarray(pixels[..., :3])
