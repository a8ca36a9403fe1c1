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

The steps (`engine_rows`, `decode_rows`, `RowScorer`, `table_rows`, `finish_table`) are the
engine-neutral ones of `dermsight.inference.engine_steps`, which the Spark engine
(`dermsight.inference.spark_engine`) runs as pandas UDFs.
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

from dermsight.inference.engine_steps import (
    EngineError,
    RowScorer,
    decode_rows,
    engine_rows,
    finish_table,
    table_rows,
    worker_bundle_files,
)
from dermsight.inference.predictor import PREDICTION_COLUMNS, Predictor
from dermsight.models.bundle import Bundle, load_bundle

ROWS_PER_BLOCK = 256  # records per input block at most: one decode task each (~40 MB of 224 px squares)
DECODE_CPUS = 0.5  # decoding is light; also keeps the decode and scoring stages unfused


class RayEngineError(EngineError):
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


def _collect(ray, dataset) -> pd.DataFrame:
    """The dataset as one pandas frame with numpy dtypes (Ray's to_pandas keeps Arrow ones)."""
    import pyarrow as pa

    return pa.concat_tables(ray.get(dataset.to_arrow_refs()), promote_options="default").to_pandas()


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
