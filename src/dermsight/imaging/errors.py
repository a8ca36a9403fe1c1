"""The error every imaging step raises for an input that is not a usable image, and the
:class:`Problem` record that names one skipped or repaired input (imaging's validation and
every data reader report them; ``dermsight.data.schema`` re-exports it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


def reason(err: BaseException) -> str:
    """A library error as words for a message: without object reprs such as
    ``<_io.BytesIO object at 0x7f...>`` (memory addresses say nothing to a user and
    something to an attacker); the error's type when nothing else is left."""
    text = _OBJECT_REPR.sub("", str(err)).strip()
    return text or type(err).__name__


@dataclass(frozen=True)
class Problem:
    """Something a reader skipped or repaired; `where` names the file (and row)."""

    kind: str  # short machine key, e.g. "bad_age", "missing_image"
    where: str  # "path/to/file.csv row 17" or "path/to/image.jpg"
    message: str
    skipped: bool = False  # True when the whole record was dropped

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" + (" [record skipped]" if self.skipped else "")
