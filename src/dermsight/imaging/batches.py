"""Decode and preprocess images in a small thread pool, feeding fixed-size batches.

Decoding (Pillow releases the GIL) overlaps with inference on the previous batch, so
on two cores the model rarely waits for JPEGs; the batch arrays (every test-time view
included) are filled by the decode threads, never copied by the consumer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dermsight.imaging.decode import ImageError, decode_image, read_image_bytes
from dermsight.imaging.preprocess import Preprocessing, view
from dermsight.imaging.quality import QUALITY_MEASURES, measure_quality

# Images one decode task loads: a task per image cost ~0.2 ms of CPU per image in futures
# and thread hand-offs (1.0 vs 0.73 ms of decoding and preprocessing a test_128 image).
IMAGES_PER_TASK = 4


@dataclass
class Batch:
    indices: list[int]  # positions in the input sequence
    images: np.ndarray  # float32 (n, 3, S, S), preprocessed; (V, n, 3, S, S) when views were asked for
    errors: dict[int, str]  # input position -> why it could not be read
    quality: np.ndarray  # float32 (n, QUALITY_MEASURES) image-quality measures (NaN unless asked for)


def load_square(data: bytes, prep: Preprocessing, name: str, quality: np.ndarray | None = None) -> np.ndarray:
    """Encoded bytes -> preprocessed uint8 square (S, S, 3). With `quality` (a float32
    (QUALITY_MEASURES,) array), the image-quality measures are written into it; a blank image
    then raises ImageError."""
    rgb = decode_image(data, name=name, min_side=prep.size)
    square = prep.fit_square(rgb)
    if quality is not None:
        try:
            quality[:] = measure_quality(rgb.shape, square)
        except ImageError as err:
            raise ImageError(f"{name}: {err}") from None
    return prep.colour_normalise(square)


def iter_batches(
    items: Sequence[str | bytes],
    prep: Preprocessing,
    batch_size: int = 32,
    workers: int = 2,
    on_item: Callable[[], None] | None = None,
    views: Sequence[str] | None = None,
    lookahead: int = 2,
    measure: bool = False,
    item_names: Sequence[str] | None = None,
) -> Iterator[Batch]:
    """Batches of preprocessed images for `items` (image_refs or encoded bytes), in order.
    Unreadable items are reported in `Batch.errors`, never raised, under their `item_names`
    (default: the image_ref, or "image N" for bytes).

    The decode threads write each image, normalised, straight into its slot of the batch
    array, and with `views` (test-time view names) every view of it too: `Batch.images` is
    then (V, n, 3, S, S). So the consumer's thread does nothing but run the model while
    the next `lookahead` batches are decoded (Pillow and numpy release the GIL). The first
    batches ramp up (4, 8, 16, ... images) so that the model starts after a few decodes,
    not a whole batch of them: it matters for a handful of big photos. With `measure`, each
    image's quality measures fill `Batch.quality` (and a blank image is reported as unreadable)."""
    names = tuple(views) if views else None
    size = prep.size
    leading = (len(names),) if names else ()

    def load(position: int, slot: int, out: np.ndarray, quality: np.ndarray) -> str | None:
        item = items[position]
        if item_names is not None:
            name = item_names[position]
        else:
            name = f"image {position}" if isinstance(item, bytes) else str(item)
        try:
            data = item if isinstance(item, bytes) else read_image_bytes(item)
            square = load_square(data, prep, name, quality[slot] if measure else None)
        except ImageError as err:
            return str(err)
        if names is None:
            prep.normalise_into(square, out[slot])
            return None
        base = out[names.index("identity"), slot] if "identity" in names else np.empty((3, size, size), np.float32)
        prep.normalise_into(square, base)
        for v, view_name in enumerate(names):
            if view_name != "identity":
                out[v, slot] = view(base, view_name)
        return None

    def load_run(chunk: range, slots: range, out: np.ndarray, quality: np.ndarray) -> list[str | None]:
        return [load(chunk[slot], slot, out, quality) for slot in slots]

    chunks = _chunks(len(items), batch_size)
    with ThreadPoolExecutor(workers) as pool:

        def submit(chunk: range):
            out = np.empty((*leading, len(chunk), 3, size, size), np.float32)  # image slots: axis -4
            quality = np.full((len(chunk), len(QUALITY_MEASURES)), np.nan, np.float32)
            runs = [range(i, min(i + IMAGES_PER_TASK, len(chunk))) for i in range(0, len(chunk), IMAGES_PER_TASK)]
            return chunk, out, quality, [pool.submit(load_run, chunk, slots, out, quality) for slots in runs]

        pending = [submit(chunk) for chunk in chunks[:lookahead]]
        for k in range(len(chunks)):
            if k + lookahead < len(chunks):
                pending.append(submit(chunks[k + lookahead]))
            chunk, out, quality, futures = pending.pop(0)
            messages = [message for future in futures for message in future.result()]
            errors = {position: message for position, message in zip(chunk, messages) if message is not None}
            if on_item:
                for _ in chunk:
                    on_item()
            ok = [slot for slot, position in enumerate(chunk) if position not in errors]
            if len(ok) < len(chunk):
                out = out[..., ok, :, :, :] if ok else out[..., :0, :, :, :]
            yield Batch([chunk[slot] for slot in ok], out, errors, quality[ok])


def _chunks(n: int, batch_size: int, first: int = 4) -> list[range]:
    """Consecutive ranges covering 0..n: sizes first, 2 x first, ... up to batch_size."""
    chunks, start, size = [], 0, min(first, batch_size)
    while start < n:
        chunks.append(range(start, min(start + size, n)))
        start += size
        size = min(2 * size, batch_size)
    return chunks
