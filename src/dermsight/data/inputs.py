"""Turn what a user points `predict` at into schema records: image files, folders of
images, a DermSight manifest, or any dataset source a reader understands."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dermsight.data.dataset import deduplicate, is_manifest, load_manifest, load_sources
from dermsight.data.records import IMAGE_SUFFIXES, Loaded, RecordBuilder, SourceError
from dermsight.data.schema import Problem
from dermsight.data.sources import detect_format


def records_from_inputs(inputs: list[str]) -> tuple[pd.DataFrame, list[Problem]]:
    """Records with an image to score, and the problems met (nothing raised)."""
    loaded = Loaded()
    for spec in inputs:
        path = Path(spec)
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            loaded.extend(_images([path], "files"))
        elif path.is_file() and path.suffix.lower() == ".csv" and is_manifest(path):
            loaded.extend(Loaded(load_manifest(path), []))
        elif path.is_dir() and _is_plain_image_folder(path):
            loaded.extend(_images(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), "folder"))
        else:
            loaded.extend(load_sources([spec]))
    loaded = deduplicate(loaded)
    records = loaded.records[loaded.records["image_ref"].notna()].reset_index(drop=True)
    problems = [p for p in loaded.problems if p.skipped and p.kind != "duplicate"]
    return records, problems


def _images(paths: list[Path], source: str) -> Loaded:
    builder = RecordBuilder(source)
    for path in paths:
        builder.add(str(path), image_id=path.stem, image_ref=str(path))
    return builder.loaded()


def _is_plain_image_folder(path: Path) -> bool:
    """A folder of images that no dataset reader claims."""
    try:
        detect_format(path)
        return False
    except SourceError:
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
