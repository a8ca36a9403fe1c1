"""Counts a user wants first from a new dataset: images, patients, lesions, classes,
missing metadata, and everything that was skipped or unreadable."""

from __future__ import annotations

from collections import Counter

import pandas as pd

from dermsight.data.schema import DIAGNOSES, Problem


def summarise(records: pd.DataFrame, problems: list[Problem]) -> dict:
    """A JSON-ready summary of one record table and the problems met reading it."""
    unreadable = {p.where for p in problems if p.kind == "unreadable_image"}
    with_image = records["image_ref"].notna()
    readable = with_image & ~records["image_ref"].isin(unreadable)
    # Image files a reader already dropped (e.g. a DICOM without pixel data) have no record.
    dropped = len(unreadable - set(records["image_ref"].dropna()))
    labels = records["diagnosis"].value_counts()
    return {
        "records": int(len(records)),
        "images": int(with_image.sum()) + dropped,
        "readable_images": int(readable.sum()),
        "unreadable_images": int((with_image & ~readable).sum()) + dropped,
        "patients": int(records["patient_id"].nunique()),
        "lesions": int(records["lesion_id"].nunique()),
        "classes": {code: int(labels.get(code, 0)) for code in DIAGNOSES},
        "unlabelled": int(records["diagnosis"].isna().sum()),
        "melanoma": int((records["melanoma"] == 1).sum()),
        "missing": {column: int(records[column].isna().sum()) for column in ("age", "sex", "site")},
        "skipped_rows": sum(
            1 for p in problems if p.skipped and p.kind not in ("no_images", "unreadable_image", "unreadable_source")
        ),
        "problems": dict(Counter(p.kind for p in problems)),
    }


def problem_examples(problems: list[Problem], per_kind: int = 3) -> dict[str, list[str]]:
    """The first few problems of each kind, as sentences naming the file and row."""
    examples: dict[str, list[str]] = {}
    for problem in problems:
        shown = examples.setdefault(problem.kind, [])
        if len(shown) < per_kind:
            shown.append(str(problem))
    return examples
