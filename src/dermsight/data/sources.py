"""Find the right reader for a path: ``[FORMAT:]PATH``, the format guessed when omitted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dermsight.data import readers
from dermsight.data.dicom import read_dicom_folder
from dermsight.data.records import IMAGE_SUFFIXES, Loaded, SourceError, read_csv
from dermsight.data.tfrecord import read_tfrecords


def _tfrecord(path: Path) -> Loaded:
    shards = [path] if path.is_file() else sorted(path.glob("*.tfrec"))
    folder = path.parent if path.is_file() else path
    csv = next((c for c in (folder / "train.csv", folder.parent / "train.csv") if c.exists()), None)
    return read_tfrecords(shards, csv)


def _isic2020(path: Path) -> Loaded:
    return readers.read_isic2020_csv(path) if path.is_file() else readers.read_isic2020_folder(path)


def _folder_of(reader: Callable[[Path], Loaded]) -> Callable[[Path], Loaded]:
    return lambda path: reader(path.parent if path.is_file() else path)


READERS: dict[str, Callable[[Path], Loaded]] = {
    "ham10000": _folder_of(readers.read_ham10000),
    "isic2020": _isic2020,
    "isic2019": _folder_of(readers.read_isic2019),
    "isic2018": _folder_of(readers.read_isic2018),
    "isic-cli": _folder_of(readers.read_isic_cli),
    "derm7pt": _folder_of(readers.read_derm7pt),
    "folders": readers.read_class_folders,
    "dicom": read_dicom_folder,
    "tfrecord": _tfrecord,
}


def detect_format(path: Path) -> str:
    """Name of the reader for `path`, from the files it holds."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".tfrec":
            return "tfrecord"
        if path.suffix.lower() == ".csv":
            columns = set(read_csv(path, ()).columns)
            if set(readers.ISIC2020_COLUMNS) <= columns:
                return "isic2020"
            if "isic_id" in columns:
                return "isic-cli"
            if {"lesion_id", "image_id", "dx"} <= columns:
                return "ham10000"
        raise SourceError(f"{path}: not a dataset file DermSight knows (a metadata CSV or a .tfrec shard)")
    names = {p.name for p in path.iterdir()}
    if "HAM10000_metadata.csv" in names:
        return "ham10000"
    if "ISIC_2019_Training_GroundTruth.csv" in names:
        return "isic2019"
    if any(n.startswith("ISIC2018_Task3_") and n.endswith("GroundTruth.csv") for n in names):
        return "isic2018"
    if (path / "meta" / "meta.csv").is_file() and {"case_num", "derm", "clinic"} <= set(read_csv(path / "meta" / "meta.csv", ()).columns):
        return "derm7pt"
    if "metadata.csv" in names and "isic_id" in read_csv(path / "metadata.csv", ()).columns:
        return "isic-cli"
    if any(n.endswith(".tfrec") for n in names):
        return "tfrecord"
    for csv in sorted(path.glob("*.csv")):
        if set(readers.ISIC2020_COLUMNS) <= set(read_csv(csv, ()).columns):
            return "isic2020"
    if any(n.lower().endswith(".dcm") for n in names):
        return "dicom"
    subfolders = [p for p in path.iterdir() if p.is_dir()]
    if subfolders and any(f.suffix.lower() in IMAGE_SUFFIXES for d in subfolders for f in d.iterdir()):
        return "folders"
    raise SourceError(
        f"{path}: cannot tell what dataset this is; name the format as FORMAT:PATH, one of {', '.join(READERS)}"
    )


def parse_source(spec: str) -> tuple[str, Path]:
    """Split ``FORMAT:PATH`` (format optional) into a reader name and a path."""
    head, sep, tail = spec.partition(":")
    if sep and head in READERS:
        return head, Path(tail)
    path = Path(spec)
    return detect_format(path), path


def read_source(spec: str) -> Loaded:
    """Read one source given as ``[FORMAT:]PATH``; raises SourceError if it is unusable."""
    name, path = parse_source(spec)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    return READERS[name](path)
