"""The file store: image and heat-map files under one directory, named by the SHA-256 of
their content (identical uploads share one file), written atomically (temporary file +
``os.replace``, fsynced, directory fsynced) and never read outside that directory.
Writers in several processes on one directory serialise on :meth:`FileStore.locked`."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dermsight.serving.storage.models import NotFound

FOLDERS = ("images", "heatmaps")
TEMPORARY_PREFIX = ".incoming-"


class FileStore:
    """Content-addressed image and heat-map files under one directory (see the module docstring)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        for folder in FOLDERS:
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._resolved = self.root.resolve()
        self._lock = threading.Lock()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """A thread lock, then an exclusive lock on the directory itself for other
        processes using it (flock on the directory: no lock file to leave behind)."""
        with self._lock:
            descriptor = os.open(self.root, os.O_RDONLY)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                yield
            finally:
                os.close(descriptor)  # closing releases the lock

    def put(self, data: bytes, folder: str, suffix: str, created: list[Path]) -> tuple[str, str]:
        """Write `data` to folder/<sha256><suffix> atomically unless it is already there;
        returns (relative path, sha256) and appends newly created files to `created`."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{folder}/{digest}{suffix}"
        target = self.root / relative
        if not target.exists():
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=TEMPORARY_PREFIX)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, target)
                _fsync_directory(target.parent)  # the rename itself survives a power cut
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            created.append(target)
        return relative, digest

    def path(self, relative: str) -> Path:
        """The file at `relative` (a path from a row), never outside the directory."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self._resolved) or path == self._resolved:
            raise NotFound(f"stored file {relative!r} is outside the storage directory")
        return path

    def scan(self) -> tuple[list[str], list[str]]:
        """(relative paths of the stored files, of leftover temporary files), folder by folder, sorted."""
        stored, temporary = [], []
        for folder in FOLDERS:
            for path in sorted((self.root / folder).iterdir()):
                relative = f"{folder}/{path.name}"
                if path.name.startswith(TEMPORARY_PREFIX):
                    temporary.append(relative)
                elif path.is_file():
                    stored.append(relative)
        return stored, temporary

    def remove(self, relatives: Iterable[str]) -> None:
        """Remove the files rows referred to (each checked to lie inside the directory)."""
        for relative in relatives:
            self.path(relative).unlink(missing_ok=True)

    def remove_listed(self, relatives: Iterable[str]) -> None:
        """Remove entries that :meth:`scan` listed (a link is removed, never followed)."""
        for relative in relatives:
            (self.root / relative).unlink(missing_ok=True)

    def counts(self) -> dict[str, int]:
        """Entries per folder, as ``"<folder> files"``."""
        return {f"{folder} files": len(list((self.root / folder).iterdir())) for folder in FOLDERS}


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
