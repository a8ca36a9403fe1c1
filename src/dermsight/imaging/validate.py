"""Check that every record's image decodes, in parallel, with a progress bar."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pandas as pd
from rich.progress import Progress

from dermsight.imaging.decode import decode_file
from dermsight.imaging.errors import ImageError, Problem

CHECK_SIDE = 32  # decode at reduced scale: enough to prove the file is whole


def _check(ref: str) -> str | None:
    try:
        decode_file(ref, min_side=CHECK_SIDE)
    except ImageError as err:
        return str(err)
    return None


def find_unreadable(records: pd.DataFrame, workers: int = 2, progress: bool = True) -> list[Problem]:
    """A Problem for each record whose image file cannot be decoded (truncated, empty,
    not an image, too large). Records without an image are not checked."""
    refs = records["image_ref"].dropna().tolist()
    problems: list[Problem] = []
    with Progress(disable=not progress, transient=True) as bar, ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("checking images", total=len(refs))
        for ref, error in zip(refs, pool.map(_check, refs, chunksize=64)):
            bar.advance(task)
            if error:
                problems.append(Problem("unreadable_image", ref, error.removeprefix(f"{ref}: "), skipped=True))
    return problems
