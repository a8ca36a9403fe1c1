"""Reader for a folder of DICOM files (the SIIM-ISIC 2020 ``train/*.dcm`` layout).

Patient id, sex, age and site come from the DICOM tags; the image id is the file
stem (ISIC 2020 named each file after its image). With the competition's CSV beside
the folder, :func:`~dermsight.data.readers.read_isic2020_csv` reads labels and uses
the .dcm files as images instead.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dermsight.data.records import Loaded, RecordBuilder, SourceError
from dermsight.imaging.dicom import dicom_tags


def read_dicom_folder(folder: Path) -> Loaded:
    """Records of the .dcm files in `folder` (ISIC 2020 layout), from their tags; unreadable files are problems."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")
    if not paths:
        raise SourceError(f"{folder}: no .dcm files")
    builder = RecordBuilder("dicom")
    for path in paths:
        try:
            dataset = pydicom.dcmread(path, defer_size="1 KB")
        except (InvalidDicomError, EOFError, ValueError, OSError) as err:
            builder.problem("unreadable_image", str(path), f"not a readable DICOM file ({err})", skipped=True)
            continue
        if "PixelData" not in dataset:
            builder.problem("unreadable_image", str(path), "DICOM has no pixel data", skipped=True)
            continue
        tags = dicom_tags(dataset)
        builder.add(
            str(path),
            image_id=path.stem,
            image_ref=str(path),
            patient_id=tags["patient_id"],
            age=tags["age"],
            sex=tags["sex"],
            site=tags["site"],
        )
    return builder.loaded()
