"""The error every imaging step raises for an input that is not a usable image, and the
:class:`Problem` record that names one skipped or repaired input (imaging's validation and
every data reader report them; ``dermsight.data.schema`` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


@dataclass(frozen=True)
class Problem:
    """Something a reader skipped or repaired; `where` names the file (and row)."""

    kind: str  # short machine key, e.g. "bad_age", "missing_image"
    where: str  # "path/to/file.csv row 17" or "path/to/image.jpg"
    message: str
    skipped: bool = False  # True when the whole record was dropped

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" + (" [record skipped]" if self.skipped else "")
