"""Embed mode's expensive half: frozen-backbone embeddings of every image and view,
cached on disk by image content hash, so training a new head never re-embeds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from dermsight.cache import content_hash, default_cache_dir
from dermsight.imaging.batches import iter_batches
from dermsight.imaging.decode import ImageError, read_image_bytes
from dermsight.imaging.preprocess import Preprocessing
from dermsight.inference.onnx_session import ParallelSession


class EmbeddingCache:
    """One float16 .npy per (image content, view) under ``<root>/<backbone>-<size>/``."""

    def __init__(self, root: Path, backbone: str, size: int):
        self.folder = root / "embeddings" / f"{backbone}-{size}"
        self.embedder_path = root / "embedders" / f"{backbone}-{size}.onnx"

    def path(self, digest: str, view: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.{view}.npy"

    def get(self, digest: str, view: str) -> np.ndarray | None:
        path = self.path(digest, view)
        return np.load(path).astype(np.float32) if path.exists() else None

    def put(self, digest: str, view: str, embedding: np.ndarray) -> None:
        path = self.path(digest, view)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as file:
            np.save(file, embedding.astype(np.float16))
        tmp.replace(path)


def embed_records(
    records: pd.DataFrame,
    backbone: str,
    prep: Preprocessing,
    view_names: tuple[str, ...],
    cache_root: Path | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[np.ndarray, list[str | None], dict[int, str]]:
    """Embeddings (V, N, F) of every record's image in each view, the content hashes,
    and {row: error} for images that could not be read (their rows are zeros)."""
    cache = EmbeddingCache(cache_root or default_cache_dir(), backbone, prep.size)
    refs = records["image_ref"].tolist()
    digests: list[str | None] = []
    errors: dict[int, str] = {}
    for row, ref in enumerate(refs):
        try:
            digests.append(content_hash(read_image_bytes(ref)))
        except (ImageError, TypeError) as err:
            digests.append(None)
            errors[row] = str(err) if ref else "record has no image"
    todo = [row for row, d in enumerate(digests) if d and any(cache.get(d, v) is None for v in view_names)]
    if todo:
        _embed_uncached(cache, [refs[r] for r in todo], [digests[r] for r in todo], backbone, prep, view_names, batch_size, progress, errors, todo)
    width = None
    out: list[list[np.ndarray | None]] = [[None] * len(refs) for _ in view_names]
    for row, digest in enumerate(digests):
        if digest is None or row in errors:
            continue
        for v, name in enumerate(view_names):
            out[v][row] = cache.get(digest, name)
            width = out[v][row].shape[0]
    width = width or 0
    stacked = np.zeros((len(view_names), len(refs), width), np.float32)
    for v in range(len(view_names)):
        for row, embedding in enumerate(out[v]):
            if embedding is not None:
                stacked[v, row] = embedding
    return stacked, digests, errors


def _embed_uncached(cache, refs, digests, backbone, prep, view_names, batch_size, progress, errors, rows) -> None:
    if not cache.embedder_path.exists():
        from dermsight.models.network import export_embedder_onnx

        export_embedder_onnx(backbone, cache.embedder_path, prep.size)
    session = ParallelSession(cache.embedder_path)
    columns = [BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*Progress.get_default_columns()[:1], *columns, disable=not progress) as bar:
        task = bar.add_task(f"embedding {len(refs)} images x {len(view_names)} views", total=len(refs))
        for batch in iter_batches(refs, prep, batch_size, on_item=lambda: bar.advance(task), views=view_names):
            for position, message in batch.errors.items():
                errors[rows[position]] = message
            if not batch.indices:
                continue
            flat = batch.images.reshape(-1, *batch.images.shape[2:])  # (V, n, 3, S, S): every view, view-major
            embeddings = session.run(["embedding"], {"image": flat})[0]
            embeddings = embeddings.reshape(len(view_names), len(batch.indices), -1)
            for v, name in enumerate(view_names):
                for j, position in enumerate(batch.indices):
                    cache.put(digests[position], name, embeddings[v, j])
