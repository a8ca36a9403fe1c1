"""Dynamic micro-batching of one-off uploads (as Triton and TorchServe batch concurrent requests).

Each request decodes its own images in its own thread (the cores share that work), then hands
them to one scoring thread, which runs the model, the gate and the prediction table once for
every request waiting, instead of once per request: the per-call costs (Python, numpy and
pandas overheads of the gate and the table, ONNX Runtime's per-run overhead) are paid once per
batch. The wait is bounded and only spent on requests known to be coming: the scoring thread
waits for requests still decoding, at most `max_wait` seconds after the first request of the
batch arrived; with nothing else in flight it scores at once, so an idle service adds no
latency. A one-off image's row depends on nothing but the image itself and its metadata, so a
batch's answers are those of each request scored alone. Patients are scored by their own
request (their context spans their lesions), not batched."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from dermsight.inference.predictor import PreparedImages, Predictor, Scores

MAX_WAIT = 0.004  # seconds the first request of a batch may wait for others still decoding
MAX_IMAGES = 16  # images per batch


@dataclass
class _Job:
    prepared: PreparedImages
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[pd.DataFrame, Scores] | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Scores the one-off uploads of concurrent requests together (see the module docstring)."""

    def __init__(self, predictor: Predictor, max_wait: float = MAX_WAIT, max_images: int = MAX_IMAGES):
        self.predictor = predictor
        self.max_wait = max_wait
        self.max_images = max(1, max_images)
        self.batch_sizes: list[int] = []  # requests of each batch scored (the last 1,000), for measurements
        self._cond = threading.Condition()
        self._waiting: list[_Job] = []
        self._preparing = 0
        threading.Thread(target=self._serve, name="micro-batcher", daemon=True).start()

    def predict(self, prepare: Callable[[], PreparedImages]) -> tuple[pd.DataFrame, Scores]:
        """`prepare()` (decoding, in this thread; its errors are raised here) and then the
        model, gate and table of `Predictor.predict_prepared`, with the requests that arrive
        meanwhile: this request's (table, scores)."""
        with self._cond:
            self._preparing += 1
        try:
            prepared = prepare()
        except BaseException:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()
            raise
        job = _Job(prepared)
        with self._cond:
            self._preparing -= 1
            self._waiting.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                deadline = time.monotonic() + self.max_wait
                while self._preparing and self._images() < self.max_images:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                jobs, taken = [], 0
                while self._waiting and (not jobs or taken + len(self._waiting[0].prepared.inputs) <= self.max_images):
                    jobs.append(self._waiting.pop(0))
                    taken += len(jobs[-1].prepared.inputs)
            self._score(jobs)

    def _images(self) -> int:
        return sum(len(job.prepared.inputs) for job in self._waiting)

    def _score(self, jobs: list[_Job]) -> None:
        try:
            parts = [job.prepared for job in jobs]
            joined = PreparedImages(
                *(np.concatenate([getattr(p, name) for p in parts]) for name in ("inputs", "metadata", "quality", "squares")),
                frame=pd.DataFrame({"image_id": [i for p in parts for i in p.frame["image_id"]], "patient_id": None}),
            )
            table, scores = self.predictor.predict_prepared(joined)
            start = 0
            for job in jobs:
                rows = slice(start, start + len(job.prepared.inputs))
                job.result = (table.iloc[rows].reset_index(drop=True),
                              Scores(*(getattr(scores, f.name)[rows] for f in fields(Scores))))
                start = rows.stop
        except Exception as err:  # every request of the batch gets the error
            for job in jobs:
                job.error = err
        finally:
            self.batch_sizes = [*self.batch_sizes[-999:], len(jobs)]
            for job in jobs:
                job.done.set()
