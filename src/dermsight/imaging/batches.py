"""Decode and preprocess images in a small thread pool, feeding fixed-size batches.

Decoding (Pillow releases the GIL) overlaps with inference on the previous batch, so
on two cores the model rarely waits for JPEGs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dermsight.imaging.decode import ImageError, decode_image, read_image_bytes
from dermsight.imaging.preprocess import Preprocessing


@dataclass
class Batch:
    indices: list[int]  # positions in the input sequence
    images: np.ndarray  # float32 (n, 3, S, S), preprocessed
    errors: dict[int, str]  # input position -> why it could not be read


def load_square(data: bytes, prep: Preprocessing, name: str) -> np.ndarray:
    """Encoded bytes -> preprocessed uint8 square (S, S, 3)."""
    return prep.resize(decode_image(data, name=name, min_side=prep.size))


def iter_batches(
    items: Sequence[str | bytes],
    prep: Preprocessing,
    batch_size: int = 32,
    workers: int = 2,
    on_item: Callable[[], None] | None = None,
) -> Iterator[Batch]:
    """Batches of preprocessed images for `items` (image_refs or encoded bytes), in order.
    Unreadable items are reported in `Batch.errors`, never raised."""

    def work(position: int) -> tuple[int, np.ndarray | None, str | None]:
        item = items[position]
        name = f"image {position}" if isinstance(item, bytes) else str(item)
        try:
            data = item if isinstance(item, bytes) else read_image_bytes(item)
            return position, prep.normalise(load_square(data, prep, name)), None
        except ImageError as err:
            return position, None, str(err)

    with ThreadPoolExecutor(workers) as pool:
        # Bounded look-ahead: at most two batches decoded ahead of the consumer.
        chunks = [range(start, min(start + batch_size, len(items))) for start in range(0, len(items), batch_size)]
        pending = [pool.map(work, chunk) for chunk in chunks[:2]]
        for next_chunk in [*chunks[2:], None, None]:
            if not pending:
                break
            results = list(pending.pop(0))
            if next_chunk is not None:
                pending.append(pool.map(work, next_chunk))
            if on_item:
                for _ in results:
                    on_item()
            ok = [(i, a) for i, a, _ in results if a is not None]
            images = np.stack([a for _, a in ok]) if ok else np.zeros((0, 3, prep.size, prep.size), np.float32)
            yield Batch([i for i, _ in ok], images, {i: e for i, _, e in results if e is not None})
