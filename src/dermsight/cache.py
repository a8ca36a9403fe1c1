"""Where DermSight keeps what it can recompute (``$DERMSIGHT_CACHE``, default
``~/.cache/dermsight``): embed mode's embeddings, folded ONNX graphs, `predict`'s scores.
Everything in it is keyed by content hash; deleting it only costs time."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Where recomputable things are kept: $DERMSIGHT_CACHE, else ~/.cache/dermsight."""
    return Path(os.environ.get("DERMSIGHT_CACHE", Path.home() / ".cache" / "dermsight"))


def content_hash(data: bytes) -> str:
    """The SHA-256 of `data`, hex."""
    return hashlib.sha256(data).hexdigest()
