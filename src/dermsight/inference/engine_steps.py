"""The engine-neutral steps of batch scoring, shared by the Ray and Spark engines (and any
engine registered in `dermsight.inference.engines`): the rows the tasks read (`engine_rows`), their
decoding (`decode_rows`), the scorer a worker holds (`RowScorer`), the prediction-table rows of one
patient (`table_rows`) and the assembly of the whole table (`finish_table`), so every engine
gives the single-process `Predictor.predict_records` table row for row, as it leaves DermSight
(`withhold_refused`: a refused image's row keeps its reason and no model output)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from dermsight.imaging.batches import load_square
from dermsight.imaging.decode import ImageError, read_image_bytes
from dermsight.imaging.preprocess import Preprocessing
from dermsight.inference.context import CONTEXT_COLUMNS
from dermsight.inference.ood import OOD_FILE
from dermsight.inference.predictor import (
    PREDICTION_COLUMNS,
    Predictor,
    Scores,
    no_quality,
    prediction_table,
    withhold_refused,
)
from dermsight.models.bundle import Bundle
from dermsight.models.metadata import encode_metadata, patient_image_counts

# What a scoring worker needs of a bundle (weights.pt and the out-of-fold table stay home).
BUNDLE_FILES: tuple[str, ...] = ("bundle.json", "model.onnx", OOD_FILE)
# What a scored row carries on from `decode_rows`, besides its scores.
SCORED_KEYS: tuple[str, ...] = ("position", "image_id", "patient_key", "has_patient", "error")


class EngineError(RuntimeError):
    """An engine cannot run: its runtime is missing, an option is malformed, or its cluster cannot be reached."""


def engine_rows(records: pd.DataFrame) -> pd.DataFrame:
    """The columns the tasks need, self-contained: patient image counts from the whole
    input (as `encode_metadata` computes them over the single-process frame)."""
    counted = patient_image_counts(records)
    given = records["patient_images"] if "patient_images" in records.columns else counted
    has_patient = records["patient_id"].notna()
    return pd.DataFrame(
        {
            "position": np.arange(len(records), dtype=np.int64),
            "image_id": records["image_id"].astype(str),
            "image_ref": records["image_ref"].astype(str),
            "patient_key": records["patient_id"].where(has_patient, "").astype(str),  # group key without nulls
            "has_patient": has_patient,
            "age": pd.to_numeric(records["age"], errors="coerce").astype(float),
            "sex": _text(records["sex"]),
            "site": _text(records["site"]),
            "patient_images": given.fillna(counted).astype(float),
        }
    )


def _text(column: pd.Series) -> pd.Series:
    """Strings, with "" for missing (Arrow needs one type per column; "" is in no vocabulary,
    so `encode_metadata` reads it as missing exactly like None)."""
    return column.where(column.notna(), "").astype(str)


def decode_rows(batch: pd.DataFrame, prep: Preprocessing, features: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A block of rows -> uint8 model-input squares (normalised by the actor: 4x less to
    move), image-quality measures, encoded metadata and, for unreadable images, the reason
    (as `iter_batches`)."""
    squares = np.zeros((len(batch), prep.size, prep.size, 3), np.uint8)
    quality = no_quality(len(batch))
    errors = np.full(len(batch), "", dtype=object)
    for i, ref in enumerate(batch["image_ref"]):
        try:
            squares[i] = load_square(read_image_bytes(ref), prep, ref, quality[i])
        except ImageError as err:
            errors[i] = str(err)
    return {
        "position": batch["position"].to_numpy(),
        "image_id": batch["image_id"].to_numpy(dtype=object),
        "patient_key": batch["patient_key"].to_numpy(dtype=object),
        "has_patient": batch["has_patient"].to_numpy(dtype=bool),
        "metadata": encode_metadata(batch.assign(patient_id=batch["patient_key"].where(batch["has_patient"], None)), features),
        "square": squares,
        "image_quality": quality,
        "error": errors,
    }


def finish_table(table: pd.DataFrame, with_patients: bool) -> tuple[pd.DataFrame, dict[str, str]]:
    """The rows `table_rows` made, gathered from every piece in any order -> the local
    engine's (table, {image_id: error}): input order, unreadable rows split off, its columns,
    refused images' model outputs withheld."""
    table = table.sort_values("position", kind="stable").reset_index(drop=True)
    failed = table["error"] != ""
    errors = dict(zip(table.loc[failed, "image"], table.loc[failed, "error"]))
    table = table[~failed].drop(columns=["position", "error"]).reset_index(drop=True)
    if table.empty:
        return withhold_refused(pd.DataFrame(columns=list(PREDICTION_COLUMNS))), errors
    columns = list(PREDICTION_COLUMNS)
    for extra in ("unsure", "risk_spread"):  # an ensemble bundle: where the local table has them
        if extra in table.columns:
            columns.insert(columns.index("melanoma_risk") + 1, extra)
    if with_patients and table["patient_id"].notna().any():
        columns = [columns[0], "patient_id", *columns[1:], *CONTEXT_COLUMNS]
    return withhold_refused(table[columns]), errors


class RowScorer:
    """Scores what `decode_rows` made with one Predictor (shared by the Ray and Spark
    engines): probabilities, embeddings, gate verdicts and member probabilities, zeros
    for unreadable rows."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.prep = predictor.bundle.preprocessing
        width = predictor.session.get_outputs()[1].shape[1]
        if not isinstance(width, int):
            blank = np.zeros((1, 3, self.prep.size, self.prep.size), np.float32)
            metadata = np.zeros((1, len(predictor.bundle.metadata_features)), np.float32)
            width = predictor.score(blank, metadata).embeddings.shape[1]
        self.width = width
        self.members = int(predictor.bundle.training.get("members", 1))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n = len(ok)
        probabilities = np.zeros((n, len(self.predictor.classes)), np.float32)
        embeddings = np.zeros((n, self.width), np.float32)
        looks = np.zeros(n, bool)
        members = np.zeros((n, self.members, len(self.predictor.classes)), np.float32)
        if ok.any():
            images = np.stack([self.prep.normalise(square) for square in batch["square"][ok]])
            scores = self.predictor.score(images, batch["metadata"][ok], batch["image_quality"][ok])
            probabilities[ok], embeddings[ok], looks[ok] = scores.probabilities, scores.embeddings, scores.looks_dermoscopic
            members[ok] = scores.member_probabilities
        return {
            **{key: batch[key] for key in SCORED_KEYS},
            "probabilities": probabilities,
            "embeddings": embeddings,
            "looks_dermoscopic": looks,
            "member_probabilities": members.reshape(n, -1),  # 2-D: Arrow blocks keep it whole
            "image_quality": batch["image_quality"],
        }


def table_rows(batch: dict[str, np.ndarray], bundle: Bundle, with_patients: bool) -> pd.DataFrame:
    """Prediction-table rows for one patient (or, without patients, any batch of rows), with
    their input position and error ("" when scored). The patient context comes from the
    scored rows alone; unreadable rows get placeholder values of the same types (one schema
    for every block) and are split off by the driver."""
    classes = list(bundle.classes)
    ok = batch["error"] == ""
    parts = []
    for rows in (ok, ~ok):
        if not rows.any():
            continue
        scores = Scores(
            batch["probabilities"][rows].astype(np.float32),
            batch["embeddings"][rows].astype(np.float32),
            np.zeros((int(rows.sum()), 0, 0), np.float32),  # heat maps are not part of the table
            batch["looks_dermoscopic"][rows].astype(bool),
            np.asarray(batch["member_probabilities"][rows], np.float32).reshape(int(rows.sum()), -1, len(classes)),
            np.asarray(batch["image_quality"][rows], np.float32),
        )
        patient_ids = None
        if with_patients:
            patient_ids = pd.Series(np.where(batch["has_patient"][rows], batch["patient_key"][rows], None), dtype=object)
        part = prediction_table(scores, list(batch["image_id"][rows]), patient_ids, bundle)
        part.insert(0, "position", batch["position"][rows])
        part["error"] = batch["error"][rows].astype(str)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def worker_bundle_files(bundle: Bundle) -> dict[str, bytes]:
    """The files of `bundle` a scoring worker needs (BUNDLE_FILES), by name."""
    return {name: (bundle.path / name).read_bytes() for name in BUNDLE_FILES if (bundle.path / name).exists()}
