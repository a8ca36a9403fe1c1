"""The CPU of each step of an upload, in this process: the service's own code path
(`Scorer.upload`, then `GET .../heatmap`'s rendering) on real uploads, one at a time, each
step's functions wrapped with a process-CPU clock (`time.process_time`: every thread of the
process, ONNX Runtime's runs included, not wall time). The steps:

  sanitize   the upload reduced to what may be stored (sanitize_image)
  decode     JPEG decode, resize to the model's square, colour constancy
  quality    the image-quality measures (blur, exposure, ...)
  forward    the ONNX graph (every member, every test-time view)
  gate       the photo detector and distance gate (photo features + OODGate.accepts)
  table      the prediction table (probabilities, differential, warnings)
  heat map   guided upsampling + colouring + JPEG of the melanoma map (at upload when eager,
             on its first GET when lazy: reported under its own name then)
  storage    files and rows of the scoring, one transaction
  other      the rest of the upload's process CPU (metadata, stacking, Python)

Run serially, so that no other request's work lands in a step's clock."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

from .common import rounded


def _clocked(totals: dict, step: str, function):
    def wrapper(*args, **kwargs):
        started = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            totals[step] += time.process_time() - started

    return wrapper


def upload_step_cpu(model: Path | None, uploads: list[tuple[bytes, dict]], warmup: int = 5) -> dict:
    """Mean process-CPU ms per upload of each step over `uploads` (after `warmup` of them),
    through a real Scorer with its own temporary storage."""
    from dermsight.imaging import batches
    from dermsight.inference import predictor as predictor_module
    from dermsight.inference.onnx_session import ParallelSession
    from dermsight.serving import scoring
    from dermsight.serving.storage.repository import Storage

    workdir = Path(tempfile.mkdtemp(prefix="dermsight-bench-steps-"))
    try:
        predictor = predictor_module.Predictor(model)
        storage = Storage(f"sqlite:///{workdir / 'db.sqlite'}", workdir / "files")
        scorer = scoring.Scorer(predictor, storage)
        totals: dict[str, float] = defaultdict(float)
        patches = {
            "sanitize": (scoring, "sanitize_image"),
            "decode": (batches, "decode_image"),
            "quality": (batches, "measure_quality"),
            "table": (predictor_module, "prediction_table"),
            "gate": (predictor_module.Predictor, "accepts"),
            "forward": (ParallelSession, "run"),
            "storage": (Storage, "save_scoring"),
            "heat map": (scoring, "heatmap_jpeg"),
        }
        resize = ("fit_square", "colour_normalise")  # decode's other parts, methods of the bundle's Preprocessing
        with ExitStack() as stack:
            for step, (owner, name) in patches.items():
                stack.enter_context(mock.patch.object(owner, name, _clocked(totals, step, getattr(owner, name))))
            prep = predictor.bundle.preprocessing
            for name in resize:
                stack.enter_context(mock.patch.object(
                    type(prep), name, _clocked(totals, "decode", getattr(type(prep), name))))
            metadata = scoring.parse_metadata(None, None, None)
            for jpeg, form in uploads[:warmup]:
                scorer.upload([scoring.Upload("lesion.jpg", jpeg)], metadata, None)
            totals.clear()
            measured = uploads[warmup:]
            started = time.process_time()
            predictions = []
            for jpeg, form in measured:
                meta = scoring.parse_metadata(form.get("age"), form.get("sex"), form.get("site"))
                predictions += scorer.upload([scoring.Upload("lesion.jpg", jpeg)], meta, None).predictions
            upload_total = time.process_time() - started
            at_upload = dict(totals)  # the GETs below add their own decode and heat map
            shown = getattr(scorer, "heatmap", None)  # lazy heat maps: drawn on their first GET
            lazy = 0.0
            if shown is not None:  # the heat maps, each rendered on its first GET
                started = time.process_time()
                for prediction in predictions:
                    if prediction.looks_dermoscopic:
                        shown(prediction.id)
                lazy = time.process_time() - started
        n = len(measured)
        steps = {step: rounded(1000 * at_upload.get(step, 0.0) / n, 2) for step in patches}
        steps["other"] = rounded(1000 * (upload_total - sum(at_upload.values())) / n, 2)
        return {
            "what": "process CPU (time.process_time, all threads) per upload of each step of Scorer.upload, "
                    "serially in the bench's process, through the service's own code",
            "uploads": n,
            "cpu_ms_per_upload": rounded(1000 * upload_total / n, 2),
            "steps_ms": steps,
            "heat_map_on_first_get_ms": rounded(1000 * lazy / n, 2) if shown is not None else None,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def batched_scoring_cpu(model: Path | None, uploads: list[tuple[bytes, dict]], sizes=(1, 2, 4, 8)) -> dict:
    """Process-CPU ms per image of `Predictor.predict_images` called with `size` uploads at
    once (decode, forward, gate, table), for each size over the same images: the most a
    micro-batch of concurrent requests can save on each of them."""
    import pandas as pd

    from dermsight.inference.predictor import Predictor

    predictor = Predictor(model)
    images = [jpeg for jpeg, _ in uploads]
    frames = pd.DataFrame([{k: form.get(k) for k in ("age", "sex", "site")} for _, form in uploads])
    frames["age"] = pd.to_numeric(frames["age"])
    predictor.predict_images(images[:2], frames.iloc[:2])  # warm-up
    out = {}
    for size in sizes:
        count = len(images) // size * size
        started = time.process_time()
        for start in range(0, count, size):
            predictor.predict_images(images[start : start + size], frames.iloc[start : start + size])
        out[str(size)] = rounded(1000 * (time.process_time() - started) / count, 2)
    return {"what": "process CPU ms per image of Predictor.predict_images with this many uploads per call",
            "images": len(images), "cpu_ms_per_image_by_call_size": out}
