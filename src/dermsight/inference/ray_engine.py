"""Batch scoring on Ray Data: the same Predictor, spread over the cores of one machine or
the nodes of a Ray cluster (`dermsight predict --engine ray`).

    records (driver) -> Ray dataset of rows
      -> decode + preprocess + encode metadata   map_batches tasks (stateless, many in flight)
      -> score                                   actor pool: one Predictor (one ONNX session) per actor
      -> patient context                         group-by patient_id, `prediction_table` per patient
      -> the prediction table (driver)           rows back in input order, Parquet or CSV

The table equals the single-process `Predictor.predict_records` table row for row: the
patients' image counts are filled in from the whole input before the rows are split
(`encode_metadata` would otherwise count within each piece), the patient context of a
patient only depends on that patient's rows, and the rows are put back in input order.

Needs the `scale` extra (`pip install -e ".[scale]"`). On a cluster every node needs
DermSight's dependencies (the base install) and must read the image paths as the driver
names them (a shared filesystem); the bundle travels with the job, and so does the
dermsight package itself (Ray's `py_modules`). Through a Ray Client (ray://), which Ray Data
cannot drive from, the pipeline is driven by a task on the cluster instead.

The steps (`engine_rows`, `decode_rows`, `RowScorer`, `table_rows`, `finish_table`) are
shared with the Spark engine (`dermsight.inference.spark_engine`), which runs them as
pandas UDFs.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from dermsight.imaging.batches import load_square
from dermsight.imaging.decode import ImageError, read_image_bytes
from dermsight.imaging.preprocess import Preprocessing
from dermsight.inference.context import CONTEXT_COLUMNS
from dermsight.inference.ood import OOD_FILE
from dermsight.inference.predictor import PREDICTION_COLUMNS, Predictor, Scores, no_quality, prediction_table
from dermsight.models.bundle import Bundle, load_bundle
from dermsight.models.metadata import encode_metadata, patient_image_counts

# What an actor needs of a bundle (weights.pt and the out-of-fold table stay home).
BUNDLE_FILES: tuple[str, ...] = ("bundle.json", "model.onnx", OOD_FILE)
ROWS_PER_BLOCK = 256  # records per input block at most: one decode task each (~40 MB of 224 px squares)
DECODE_CPUS = 0.5  # decoding is light; also keeps the decode and scoring stages unfused
# What a scored row carries on from `decode_rows`, besides its scores.
SCORED_KEYS: tuple[str, ...] = ("position", "image_id", "patient_key", "has_patient", "error")


class RayEngineError(RuntimeError):
    """Ray is missing, or the cluster cannot be reached."""


def predict_ray(
    records: pd.DataFrame,
    model: Bundle | Path | str | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
    num_cpus: int | None = None,
    threads: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Score every record (schema columns; image_ref required) on Ray. Returns the same
    (table, {image_id: error}) as `Predictor.predict_records`.

    address: a Ray cluster ("ray://head:10001", "head:6379" or "auto"); None starts a
        private local Ray with `num_cpus` CPUs (default: all cores). When Ray is already
        initialised in this process, that Ray is used and left running.
    workers: scoring actors (one ONNX session each); default one per CPU of a local Ray,
        half the cluster's CPUs on a cluster.
    threads: single-threaded ONNX runs in flight per actor; default 1 when several actors
        run, else the CPUs of the local Ray (or the actor's machine on a cluster).
    """
    ray = _import_ray()
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    records = records.reset_index(drop=True)
    if records.empty:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS)), {}
    started_here = not ray.is_initialized()
    if started_here:
        init_ray(ray, address, num_cpus)
    try:
        total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        if workers is None:
            workers = max(1, int(total_cpus) if address is None else int(total_cpus) // 2)
        if threads is None and workers == 1 and address is None:
            threads = max(1, int(total_cpus))
        elif threads is None and workers > 1:
            threads = 1
        bundle_files = [ray.put(worker_bundle_files(bundle))]  # read here; in a list, so tasks get the reference
        arguments = (records, bundle, bundle_files, workers, threads, total_cpus, batch_size, progress)
        if _ray_client(ray):  # Ray Data cannot drive from a Ray Client: drive from a task on the cluster
            return ray.get(ray.remote(num_cpus=0)(_run).remote(*arguments))
        return _run(*arguments)
    finally:
        if started_here:
            ray.shutdown()


def _run(records: pd.DataFrame, bundle: Bundle, bundle_files: list, workers: int, threads: int | None,
         total_cpus: float, batch_size: int, progress: bool) -> tuple[pd.DataFrame, dict[str, str]]:
    """The pipeline, driven from this process (or, for a Ray Client, from a task on the cluster)."""
    import ray

    _quiet_ray_data(ray, progress)
    rows = engine_rows(records)
    with_patients = bool(rows["has_patient"].any())
    # Enough blocks for every actor to have work (blocks are the unit handed to an actor).
    blocks = max(math.ceil(len(rows) / ROWS_PER_BLOCK), min(math.ceil(len(rows) / batch_size), 4 * workers))
    dataset = ray.data.from_pandas([rows.iloc[part] for part in np.array_split(np.arange(len(rows)), blocks)])
    decoded = dataset.map_batches(
        decode_rows, batch_format="pandas", batch_size=None, num_cpus=DECODE_CPUS,
        fn_kwargs={"prep": bundle.preprocessing, "features": tuple(bundle.metadata_features)},
    )
    # Scoring actors reserve at most an equal share of the CPUs with the decode stage, so
    # both stages always have room to run (Ray's CPUs are only bookkeeping).
    actor_cpus = min(float(threads or 1), total_cpus / (workers + 1))
    scored = decoded.map_batches(
        _Scorer, batch_format="numpy", batch_size=batch_size, num_cpus=actor_cpus,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"bundle_files": bundle_files[0], "threads": threads},
    )
    options = {"bundle": bundle, "with_patients": with_patients}
    if with_patients:
        patients = int(rows.loc[rows["has_patient"], "patient_key"].nunique()) + 1
        tables = scored.groupby("patient_key", num_partitions=max(1, min(patients, 2 * workers))).map_groups(
            table_rows, batch_format="numpy", fn_kwargs=options
        )
    else:
        tables = scored.map_batches(table_rows, batch_format="numpy", fn_kwargs=options)
    return finish_table(_collect(ray, tables), with_patients)


def finish_table(table: pd.DataFrame, with_patients: bool) -> tuple[pd.DataFrame, dict[str, str]]:
    """The rows `table_rows` made, gathered from every piece in any order -> the local
    engine's (table, {image_id: error}): input order, unreadable rows split off, its columns."""
    table = table.sort_values("position", kind="stable").reset_index(drop=True)
    failed = table["error"] != ""
    errors = dict(zip(table.loc[failed, "image"], table.loc[failed, "error"]))
    table = table[~failed].drop(columns=["position", "error"]).reset_index(drop=True)
    if table.empty:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS)), errors
    columns = list(PREDICTION_COLUMNS)
    for extra in ("unsure", "risk_spread"):  # an ensemble bundle: where the local table has them
        if extra in table.columns:
            columns.insert(columns.index("melanoma_risk") + 1, extra)
    if with_patients and table["patient_id"].notna().any():
        columns = [columns[0], "patient_id", *columns[1:], *CONTEXT_COLUMNS]
    return table[columns], errors


def _collect(ray, dataset) -> pd.DataFrame:
    """The dataset as one pandas frame with numpy dtypes (Ray's to_pandas keeps Arrow ones)."""
    import pyarrow as pa

    return pa.concat_tables(ray.get(dataset.to_arrow_refs()), promote_options="default").to_pandas()


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


class _Scorer:
    """One actor: one Predictor, whose session keeps `threads` single-threaded runs in flight."""

    def __init__(self, bundle_files, threads: int | None):
        import ray

        bundle_files: dict[str, bytes] = ray.get(bundle_files)  # one copy per node, from the object store
        folder = Path(tempfile.mkdtemp(prefix="dermsight-bundle-"))
        try:
            for name, data in bundle_files.items():
                (folder / name).write_bytes(data)
            self.score = RowScorer(Predictor(folder, threads))  # the session and gate are in memory after this
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.score(batch)


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


def _ray_client(ray) -> bool:
    """Connected through ray:// (Ray Client)?"""
    from ray.util.client import ray as client

    return client.is_connected()


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayEngineError('the Ray engine needs Ray: pip install -e ".[scale]"') from None
    return ray


def init_ray(ray, address: str | None, num_cpus: int | None) -> None:
    """Start a private local Ray (address None) or connect to a cluster; see `predict_ray`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine
    if address is None:
        ray.init(
            address="local",  # a new Ray of our own, even where RAY_ADDRESS names a cluster
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",  # a private Ray: nothing listens beyond loopback
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        return
    import dermsight

    try:  # the cluster runs the driver's dermsight code; its dependencies must be installed there
        ray.init(address=address, logging_level=logging.WARNING,
                 runtime_env={"py_modules": [str(Path(dermsight.__file__).parent)]})
    except Exception as err:  # Ray raises ConnectionError, RuntimeError, gRPC errors, ...
        raise RayEngineError(f"cannot connect to the Ray cluster at {address}: {err}") from None


def _quiet_ray_data(ray, progress: bool) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
