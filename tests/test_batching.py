"""Micro-batching of concurrent one-off uploads (dermsight.serving.batching): a batch's answers
are each request's own, and the wait for others is bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest

from dermsight.inference.predictor import Predictor, Scores
from dermsight.serving.batching import MicroBatcher


@pytest.fixture(scope="module")
def predictor(trained_bundle) -> Predictor:
    return Predictor(trained_bundle)


def requests(lesion_images) -> list[tuple[list[bytes], pd.DataFrame]]:
    """Six one-off uploads of real images: one or two images each, each with its own metadata."""
    images = [path.read_bytes() for path in lesion_images]
    metas = [(60.0, "female", "torso"), (None, "male", None), (35.0, None, "lower extremity")]
    out = []
    for k in range(6):
        chosen = images[k : k + 1 + k % 2]
        age, sex, site = metas[k % 3]
        out.append((chosen, pd.DataFrame({"age": [age] * len(chosen), "sex": [sex] * len(chosen), "site": [site] * len(chosen)})))
    return out


def test_batched_answers_equal_each_request_scored_alone(predictor, lesion_images):
    """Six requests decoding at the same time (held at a barrier) are scored in one batch, and
    each gets back exactly the table and scores of its own images scored alone."""
    batcher = MicroBatcher(predictor, max_wait=10.0)
    uploads = requests(lesion_images)
    barrier = threading.Barrier(len(uploads))

    def send(upload):
        images, frame = upload

        def prepare():
            prepared = predictor.prepare_images(images, frame)
            barrier.wait(timeout=30)
            return prepared

        return batcher.predict(prepare)

    with ThreadPoolExecutor(len(uploads)) as pool:
        batched = list(pool.map(send, uploads))
    assert batcher.batch_sizes == [len(uploads)]
    for (images, frame), (table, scores) in zip(uploads, batched):
        alone_table, alone = predictor.predict_prepared(predictor.prepare_images(images, frame))
        assert len(table) == len(images)
        pd.testing.assert_frame_equal(table, alone_table, check_exact=False, rtol=1e-6, atol=1e-6)
        for f in fields(Scores):
            np.testing.assert_allclose(getattr(scores, f.name), getattr(alone, f.name), rtol=1e-6, atol=1e-6, err_msg=f.name)


def test_wait_for_a_slow_request_is_bounded(predictor, lesion_images):
    """A request still decoding holds the batch back at most `max_wait`: the first request is
    answered while the second is still preparing (it is released only after that answer)."""
    batcher = MicroBatcher(predictor, max_wait=0.05)
    (first_images, first_frame), (second_images, second_frame) = requests(lesion_images)[:2]
    first_answered = threading.Event()

    def slow_prepare():
        assert first_answered.wait(timeout=30), "the first request waited for the slow one"
        return predictor.prepare_images(second_images, second_frame)

    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(batcher.predict, slow_prepare)
        while batcher._preparing == 0:  # the slow request has started decoding
            threading.Event().wait(0.001)
        table, _ = pool.submit(batcher.predict, lambda: predictor.prepare_images(first_images, first_frame)).result(timeout=30)
        first_answered.set()
        assert len(table) == len(first_images) and len(slow.result(timeout=30)[0]) == len(second_images)
    assert batcher.batch_sizes == [1, 1]


def test_a_request_whose_images_fail_to_decode_fails_alone(predictor, lesion_images):
    """An unreadable upload raises in its own request; the batcher goes on scoring others."""
    from dermsight.imaging.errors import ImageError

    batcher = MicroBatcher(predictor)
    with pytest.raises(ImageError):
        batcher.predict(lambda: predictor.prepare_images([b"not an image"], pd.DataFrame({"age": [None]})))
    images, frame = requests(lesion_images)[0]
    table, _ = batcher.predict(lambda: predictor.prepare_images(images, frame))
    assert len(table) == 1 and batcher._preparing == 0
