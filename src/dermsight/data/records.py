"""Shared machinery for readers: turn raw fields into schema rows, collecting problems."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dermsight.data import harmonise
from dermsight.data.schema import Problem, as_records, empty_records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".bmp", ".tif", ".tiff", ".webp")


class SourceError(ValueError):
    """A whole source cannot be read (missing file, missing required column)."""


@dataclass
class Loaded:
    """What a reader returns: schema records and everything it skipped or repaired."""

    records: pd.DataFrame = field(default_factory=empty_records)
    problems: list[Problem] = field(default_factory=list)

    def extend(self, other: Loaded) -> None:
        self.records = (
            other.records if self.records.empty else pd.concat([self.records, other.records], ignore_index=True)
        )
        self.problems.extend(other.problems)


class RecordBuilder:
    """Collects rows for one source; each `add` harmonises and validates one record."""

    def __init__(self, source: str):
        self.source = source
        self.rows: list[dict] = []
        self.problems: list[Problem] = []

    def problem(self, kind: str, where: str, message: str, *, skipped: bool = False) -> None:
        self.problems.append(Problem(kind, where, message, skipped))

    def add(
        self,
        where: str,
        *,
        image_id: object,
        image_ref: str | None,
        patient_id: object = None,
        lesion_id: object = None,
        age: object = None,
        sex: object = None,
        site: object = None,
        label: object = None,
        diagnosis: str | None = None,
        melanoma: object = None,
        patient_images: float | None = None,
    ) -> None:
        """Add one record. `label` is the source's diagnosis text; `diagnosis` an already
        mapped code. `melanoma` overrides the target derived from the diagnosis."""
        image_id = _text(image_id)
        if not image_id:
            self.problem("missing_id", where, "no image id", skipped=True)
            return
        row = {
            "image_id": image_id,
            "image_ref": image_ref,
            "patient_id": _text(patient_id),
            "lesion_id": _text(lesion_id),
            "original_label": _text(label),
            "source": self.source,
            "patient_images": patient_images,
        }
        for column, parse in (("age", harmonise.age), ("sex", harmonise.sex), ("site", harmonise.site)):
            value, complaint = parse({"age": age, "sex": sex, "site": site}[column])
            row[column] = value
            if complaint:
                self.problem(f"bad_{column}", where, f"{complaint}; {column} set to missing")
        if diagnosis is None and row["original_label"] is not None:
            diagnosis, complaint = harmonise.diagnosis(row["original_label"])
            if complaint:
                self.problem("bad_diagnosis", where, complaint, skipped=True)
                return
        row["diagnosis"] = diagnosis
        row["melanoma"] = harmonise.melanoma_from(diagnosis)
        if melanoma is not None and _text(melanoma) is not None:
            try:
                row["melanoma"] = float(melanoma)
            except ValueError:
                self.problem("bad_target", where, f"target {melanoma!r} is not 0 or 1", skipped=True)
                return
            if row["melanoma"] not in (0.0, 1.0):
                self.problem("bad_target", where, f"target {melanoma!r} is not 0 or 1", skipped=True)
                return
        self.rows.append(row)

    def loaded(self) -> Loaded:
        frame = pd.DataFrame(self.rows) if self.rows else empty_records()
        return Loaded(as_records(frame), self.problems)


def read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a metadata CSV as text, failing with one clear message on missing columns."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: not a readable CSV ({err})") from None
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SourceError(
            f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(frame.columns) or 'none'}"
        )
    return frame


def row_location(path: Path, index: int) -> str:
    """Human row number: the header is line 1, so data row 0 is line 2."""
    return f"{path} line {index + 2}"


def image_index(folders: list[Path]) -> dict[str, Path]:
    """Map file stem -> path for every image file directly inside `folders`."""
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.stem not in found:
                    found[path.stem] = path
    return found


def attach_images(
    builder: RecordBuilder, frame: pd.DataFrame, id_column: str, images: dict[str, Path], csv_path: Path
) -> list[str | None]:
    """Image path for each CSV row; one problem per missing file, or one for the
    whole CSV when no image of it is present at all (a labels-only source)."""
    refs = [str(images[i]) if i in images else None for i in frame[id_column]]
    missing = [i for i, ref in enumerate(refs) if ref is None]
    if missing and len(missing) == len(refs):
        builder.problem(
            "no_images",
            str(csv_path),
            f"no image files found for any of its {len(refs)} rows; records kept as labels/metadata only",
        )
    else:
        for i in missing:
            builder.problem(
                "missing_image",
                row_location(csv_path, i),
                f"image file for {frame[id_column].iloc[i]} not found; record kept without image",
            )
    return refs


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None
