"""Scores a bundle already computed, so a second `dermsight predict` (or `evaluate`) on the
same images skips decoding and the network.

Keyed by the image's content hash and its encoded metadata row (the network sees both), in
one SQLite file per bundle content (bundle.json, graph and gate hashed together: a retrained
or edited bundle never reads another's scores). Patient context is recomputed from the
cached embeddings and risks on every run, since it depends on which images run together.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dermsight.cache import content_hash, default_cache_dir
from dermsight.imaging.decode import ImageError, read_image_bytes
from dermsight.models.bundle import Bundle

SCHEMA = """CREATE TABLE IF NOT EXISTS scores_v3 (
    key TEXT PRIMARY KEY, probabilities BLOB, embedding BLOB, cam BLOB, cam_height INTEGER, looks_dermoscopic INTEGER,
    member_probabilities BLOB, image_quality BLOB
)"""


SCORING_VERSION = 3  # bump when the same bundle files score differently (2: exact int8 kernel without VNNI; 3: centred melanoma map)


def bundle_digest(bundle: Bundle) -> str:
    """A digest of the bundle files that decide its scores (and of SCORING_VERSION): the cache's file name."""
    digest = hashlib.sha256(f"scoring v{SCORING_VERSION}".encode())
    for name in ("bundle.json", "model.onnx", "ood_gate.npz"):
        path = bundle.path / name
        digest.update(name.encode() + (path.read_bytes() if path.exists() else b"-"))
    return digest.hexdigest()[:32]


HELD_BYTES = 512 * 1024 * 1024  # encoded images kept between hashing and decoding; past it, a miss is read again


class ScoreCache:
    """Scores of images a bundle scored before, keyed by image content and metadata (SQLite)."""

    def __init__(self, bundle: Bundle, root: Path | None = None):
        self.path = (root or default_cache_dir()) / "scores" / f"{bundle_digest(bundle)}.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # one transaction
                yield db
        finally:
            db.close()

    @staticmethod
    def read(refs: Sequence, metadata: np.ndarray) -> tuple[list[str | None], list[bytes | None]]:
        """One key per image (None when its bytes cannot be read: the scorer reports why) and its
        encoded bytes, kept (up to HELD_BYTES in all, else None) so that scoring a cache miss
        decodes them without reading the file again."""
        keys: list[str | None] = []
        held: list[bytes | None] = []
        budget = HELD_BYTES
        for ref, row in zip(refs, metadata.astype(np.float32)):
            try:
                data = read_image_bytes(ref)
            except (ImageError, TypeError, OSError):
                keys.append(None)
                held.append(None)
                continue
            keys.append(content_hash(data) + content_hash(row.tobytes())[:16])
            held.append(data if len(data) <= budget else None)
            budget -= len(held[-1] or b"")
        return keys, held

    def get(self, keys: Sequence[str | None]) -> dict[int, tuple]:
        """{position in `keys`: (probabilities, embedding, melanoma cam, looks_dermoscopic, member
        probabilities (members, K), image-quality measures)} of the cached ones: Scores' fields."""
        wanted = {k: i for i, k in enumerate(keys) if k}
        found = {}
        names = list(wanted)
        try:
            with self._connect() as db:
                for start in range(0, len(names), 500):
                    chunk = names[start : start + 500]
                    query = f"SELECT * FROM scores_v3 WHERE key IN ({','.join('?' * len(chunk))})"
                    for key, probabilities, embedding, cam, height, accepted, members, quality in db.execute(query, chunk):
                        probabilities = np.frombuffer(probabilities, np.float32)
                        found[wanted[key]] = (
                            probabilities,
                            np.frombuffer(embedding, np.float32),
                            np.frombuffer(cam, np.float32).reshape(height, -1),
                            bool(accepted),
                            np.frombuffer(members, np.float32).reshape(-1, len(probabilities)),
                            np.frombuffer(quality, np.float32),
                        )
        except sqlite3.Error:  # a damaged cache file costs time, never a result
            return {}
        return found

    def put(self, keys: Sequence[str | None], probabilities, embeddings, cams, accepted, member_probabilities, quality) -> None:
        rows = [
            (
                k, p.astype(np.float32).tobytes(), e.astype(np.float32).tobytes(), c.astype(np.float32).tobytes(), c.shape[0],
                int(a), m.astype(np.float32).tobytes(), q.astype(np.float32).tobytes(),
            )
            for k, p, e, c, a, m, q in zip(keys, probabilities, embeddings, cams, accepted, member_probabilities, quality)
            if k
        ]
        try:
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO scores_v3 VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error:
            pass  # not cached this time; the scores themselves are returned all the same


def open_score_cache(bundle: Bundle, warn: Callable[[str], None]) -> ScoreCache | None:
    """The bundle's score cache, or None when its folder is not writable (scoring still works;
    `warn` is told why)."""
    try:
        return ScoreCache(bundle)
    except (OSError, sqlite3.Error) as err:
        warn(f"score cache unavailable ({err}); scoring every image")
        return None
