"""Uploads and patients -> the Predictor -> stored predictions; heat maps on request.

A patient is always scored whole: the newest image of each of their lesions goes
through the Predictor together with any new upload, so the ugly-duckling context (and
the patient's image count the model sees) covers all their lesions. A patient is scored
by one request at a time; one-off uploads run side by side. Off the event loop, each
scoring is stored in one transaction.

A prediction keeps the melanoma activation map; its heat map (guided upsampling over the
model-input square, colour, JPEG: a few ms a scoring) is drawn on its first request and
kept (:meth:`Scorer.heatmap`), so nobody pays for maps that are never looked at.

Every upload is first reduced to what may be stored (:func:`sanitize_image`: a complete
image without metadata, a DICOM reduced to its pixels); the Predictor scores exactly
those bytes, so what is stored is what was scored.
"""

from __future__ import annotations

import io
import math
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ExifTags
from PIL import Image as PILImage

from dermsight.data import harmonise
from dermsight.imaging.batches import load_square
from dermsight.imaging.errors import ImageError
from dermsight.imaging.sanitize import Sanitized, sanitize_image
from dermsight.inference.context import CONTEXT_COLUMNS
from dermsight.inference.heatmap import heatmap_jpeg
from dermsight.inference.ood import REFUSAL
from dermsight.inference.predictor import Predictor
from dermsight.serving.batching import MicroBatcher
from dermsight.serving.storage.models import NotFound, Prediction
from dermsight.serving.storage.repository import NewImage, NewPrediction, Storage

MAX_FILES = 20  # images per upload (the upload route checks it before reading the files)


class InputError(ValueError):
    """A request the user can fix: the message says how."""


@dataclass
class Upload:
    """One uploaded file: the name shown back to the uploader, and its bytes."""

    filename: str
    data: bytes


@dataclass
class Rejected:
    """An uploaded file left out of its upload (nothing of it stored): its place (1-based), name and why."""

    number: int
    filename: str
    reason: str


@dataclass
class UploadResult:
    """The predictions of the stored files, in upload order, and the files left out."""

    predictions: list[Prediction]
    rejected: list[Rejected]


@dataclass
class LesionMetadata:
    """What the uploader said about the lesions of an upload, in schema vocabulary."""

    age: float | None
    sex: str | None
    site: str | None


def parse_metadata(age: str | None, sex: str | None, site: str | None) -> LesionMetadata:
    """Form text -> schema vocabulary (harmonise's synonyms accepted); InputError otherwise."""
    age_value, age_problem = harmonise.age(age)
    sex_value, sex_problem = harmonise.sex(sex)
    site_value, site_problem = harmonise.site(site)
    problems = [p for p in (age_problem, sex_problem, site_problem) if p]
    if problems:
        raise InputError("; ".join(problems))
    return LesionMetadata(None if math.isnan(age_value) else age_value, sex_value, site_value)


def image_size(data: bytes) -> tuple[int, int]:
    """Upright (width, height) of a sanitised image (JPEG or PNG), from its header."""
    with PILImage.open(io.BytesIO(data)) as image:
        width, height = image.size
        rotated = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (height, width) if rotated else (width, height)


class Scorer:
    """Scores uploads and patients with the Predictor and stores images and predictions; draws
    a prediction's heat map when it is first asked for."""

    def __init__(self, predictor: Predictor, storage: Storage, batcher: MicroBatcher | None = None):
        """`batcher`: how one-off uploads of concurrent requests are scored together (default: a
        MicroBatcher with its bounded wait)."""
        self.predictor = predictor
        self.storage = storage
        self.batcher = batcher or MicroBatcher(predictor)
        # A patient is scored by one request at a time (its next scoring must see the rows
        # this one stores); one-off uploads depend on nothing stored and run side by side
        # (the app's admission control bounds how many).
        self._patient_locks: weakref.WeakValueDictionary[int, threading.Lock] = weakref.WeakValueDictionary()
        self._locks_guard = threading.Lock()

    def upload(self, uploads: list[Upload], metadata: LesionMetadata, patient_id: int | None) -> UploadResult:
        """Score and store new images (of a patient, or anonymous one-offs). A file that is
        not a readable image is left out and reported, and nothing of it is stored; the
        others are scored and stored. Raises InputError when no file is usable, NotFound for
        an unknown patient; nothing is stored then."""
        if not uploads:
            raise InputError("no image uploaded")
        new, rejected = [], []
        for number, upload in enumerate(uploads, start=1):
            try:
                new.append((upload.filename, self._sanitized(upload), metadata))
            except InputError as err:
                rejected.append(Rejected(number, upload.filename, str(err)))
        if not new:
            raise InputError("; ".join(r.reason for r in rejected))
        if patient_id is None:
            return UploadResult(self._score_and_store(None, new), rejected)
        with self._patient_lock(patient_id):
            return UploadResult(self._score_and_store(patient_id, new)[-len(new):], rejected)

    @staticmethod
    def _sanitized(upload: Upload) -> Sanitized:
        try:
            return sanitize_image(upload.data, name=upload.filename)
        except ImageError as err:
            raise InputError(str(err)) from None

    def rescore(self, patient_id: int) -> list[Prediction]:
        """Score the newest image of each of the patient's lesions with the current model."""
        with self._patient_lock(patient_id):
            return self._score_and_store(patient_id, [])

    def heatmap(self, prediction_id: int) -> Path:
        """The file of a prediction's heat map: on its first request drawn from the activation
        map stored with the prediction over its image's model-input square (the same bytes as a
        heat map drawn at scoring time) and stored. NotFound for a refused image, which has none."""
        prediction = self.storage.get_prediction(prediction_id)
        path = prediction.heatmap_path
        if path is None:
            if prediction.melanoma_cam is None:
                raise NotFound(f"prediction {prediction_id} refused its image as not dermoscopic: it has no heat map")
            image = prediction.image
            square = load_square(self.storage.file(image.path).read_bytes(), self.predictor.bundle.preprocessing,
                                 f"stored image {image.id}")
            path = self.storage.save_heatmap(prediction_id, heatmap_jpeg(np.asarray(prediction.melanoma_cam, np.float32), square))
        return self.storage.file(path)

    def _patient_lock(self, patient_id: int) -> threading.Lock:
        with self._locks_guard:
            lock = self._patient_locks.get(patient_id)
            if lock is None:
                lock = self._patient_locks[patient_id] = threading.Lock()
            return lock

    def _score_and_store(self, patient_id: int | None, new: list[tuple[str, Sanitized, LesionMetadata]]) -> list[Prediction]:
        lesions = self.storage.get_patient(patient_id).lesions if patient_id is not None else []
        stored = [(lesion.images[-1], lesion.site) for lesion in lesions if lesion.images]
        if not stored and not new:
            return []
        names = [f"stored image {image.id}" for image, _ in stored] + [name for name, _, _ in new]
        try:
            data = [self.storage.file(image.path).read_bytes() for image, _ in stored] + [s.data for _, s, _ in new]
        except FileNotFoundError:
            missing = f"a stored image of patient {patient_id} is missing (deleted while being scored?)"
            raise NotFound(missing) from None
        rows = [(image.age, image.sex, site) for image, site in stored]
        rows += [(meta.age, meta.sex, meta.site) for _, _, meta in new]
        frame = pd.DataFrame(rows, columns=["age", "sex", "site"])
        if patient_id is not None:
            frame["patient_id"] = str(patient_id)
            frame["patient_images"] = float(len(frame))
        try:
            if patient_id is None:  # one-offs: scored with those of concurrent requests
                table, scores = self.batcher.predict(lambda: self.predictor.prepare_images(data, frame))
            else:
                table, scores, _ = self.predictor.predict_images(data, frame)
        except ImageError as err:
            raise InputError(_named(str(err), names)) from None
        items: list[int | NewImage] = [image.id for image, _ in stored]
        items += [NewImage(s.data, s.format, *image_size(s.data), meta.age, meta.sex, meta.site) for _, s, meta in new]
        return self._store(patient_id, items, table, scores.melanoma_cam)

    def _store(self, patient_id: int | None, items: list, table: pd.DataFrame, cams: np.ndarray) -> list[Prediction]:
        predictions = [
            self._prediction(row, cams[i].tolist()) if row["looks_dermoscopic"] else self._refused(row)
            for i, row in enumerate(table.to_dict("records"))
        ]
        return self.storage.save_scoring(patient_id, list(zip(items, predictions)))

    def _refused(self, row: dict) -> NewPrediction:
        """A refused image's prediction: its reason, and no risk, class, context or heat map."""
        return NewPrediction(
            model_version=self.predictor.bundle.version, probabilities=None, predicted_class=None, melanoma_risk=None,
            threshold=self.predictor.bundle.melanoma_threshold, above_threshold=None, looks_dermoscopic=False,
            context=None, quality_warnings=str(row["quality_warnings"]), refusal=REFUSAL,
        )

    def _prediction(self, row: dict, cam: list[list[float]]) -> NewPrediction:
        bundle = self.predictor.bundle
        context = {c: _number(row[c]) for c in CONTEXT_COLUMNS} if "patient_id" in row else None
        return NewPrediction(
            model_version=bundle.version,
            probabilities={code: float(row[code]) for code in bundle.classes},
            predicted_class=str(row["predicted_class"]),
            melanoma_risk=float(row["melanoma_risk"]),
            risk_spread=float(row["risk_spread"]) if "risk_spread" in row else None,
            unsure=bool(row["unsure"]) if "unsure" in row else None,
            quality_warnings=str(row["quality_warnings"]),
            threshold=bundle.melanoma_threshold,
            above_threshold=bool(row["above_threshold"]),
            looks_dermoscopic=True,
            context=context,
            melanoma_cam=cam,
        )


def _number(value) -> float | None:
    """JSON-safe: NaN (no context for a lone lesion) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def _named(message: str, names: list[str]) -> str:
    """The Predictor names inputs "image N"; say which file that was."""
    match = re.match(r"image (\d+): ", message)
    if match and 1 <= int(match.group(1)) <= len(names):
        return f"{names[int(match.group(1)) - 1]}: {message[match.end():]}"
    return message
