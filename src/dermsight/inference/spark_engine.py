"""Batch scoring on Apache Spark: the same Predictor on the cores of one machine
(``local[N]``) or the executors of a Spark cluster (`dermsight predict --engine spark`).

    records (driver) -> Spark DataFrame of rows (paths and metadata, never pixels)
      -> decode + preprocess + score      mapInPandas on the executors: one Predictor (one ONNX
                                          Runtime session) per Python worker, made once, reused
      -> patient context                  groupBy(patient).applyInPandas: `prediction_table` per patient
      -> the prediction table (driver)    rows back in input order, Parquet or CSV

The steps are the engine-neutral ones both engines share (`dermsight.inference.engine_steps`:
the rows, their decoding, the scorer, the per-patient table and its assembly), so both give
the single-process `Predictor.predict_records` table row for row: the patients' image
counts are filled in from the whole input on the driver, the patient context of a patient
only depends on that patient's rows, and the rows are put back in input order. An image
that cannot be read becomes a row with its reason, never a failed task.

The bundle travels with the job (`SparkContext.addFile`: bundle.json, model.onnx and the
gate, read on the driver only); images do not: every executor must read the image paths as
the driver names them (a shared filesystem). Every node needs the same DermSight installed (the base install),
in the Python that PYSPARK_PYTHON names; on a local master that is this Python.

Needs the `spark` extra (`pip install -e ".[spark]"`) and Java 17 or newer (Debian:
openjdk-17-jre-headless). PySpark is imported only when a run starts.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from dermsight.imaging.preprocess import Preprocessing
from dermsight.inference.predictor import PREDICTION_COLUMNS, Predictor
from dermsight.inference.engine_steps import (
    BUNDLE_FILES,
    EngineError,
    RowScorer,
    decode_rows,
    engine_rows,
    finish_table,
    table_rows,
    worker_bundle_files,
)
from dermsight.models.bundle import Bundle, load_bundle

DEFAULT_MASTER = "local[*]"
ROWS_PER_TASK = 1024  # input rows per partition at most (one task each): ~4-20 s of scoring per core
UNKNOWN_PATIENT_ROWS = 256  # rows without a patient id are grouped in chunks of this many (no context)
MASTER_FORMS = ("local, local[N], local[*], local[N,F], spark://HOST:PORT[,HOST:PORT...], yarn "
                "or k8s://https://HOST:PORT")
_MASTER = re.compile(
    r"local(\[(\*|[1-9]\d*)(,\s*[1-9]\d*)?\])?"
    r"|local-cluster\[[1-9]\d*,\s*[1-9]\d*,\s*[1-9]\d*\]"
    r"|spark://[^\s/:,]+:\d+(,[^\s/:,]+:\d+)*"
    r"|yarn"
    r"|k8s://\S+"
)


class SparkEngineError(EngineError):
    """PySpark or Java is missing, the master is malformed, or Spark cannot start."""


def predict_spark(
    records: pd.DataFrame,
    model: Bundle | Path | str | None = None,
    *,
    spark=None,
    master: str | None = None,
    executor_memory: str | None = None,
    conf: Mapping[str, str] | None = None,
    partitions: int | None = None,
    batch_size: int = 32,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Score every record (schema columns; image_ref required) on Spark. Returns the same
    (table, {image_id: error}) as `Predictor.predict_records`.

    spark: a SparkSession to run on (left running). Else the session already active in this
        process is used (and left running), or one is started on `master` (default
        local[*]) with `executor_memory` and `conf` and stopped at the end.
    partitions: input partitions, one scoring task each (default: at least two per core
        Spark offers, at most ROWS_PER_TASK rows each).
    """
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    records = records.reset_index(drop=True)
    if master is not None:
        check_master(master)
    if records.empty:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS)), {}
    started_here = False
    if spark is None:
        spark = _active_session(master)
        if spark is None:
            spark = start_spark(master or DEFAULT_MASTER, executor_memory=executor_memory, conf=conf)
            started_here = True
    try:
        return _run(spark, records, bundle, partitions, batch_size)
    finally:
        if started_here:
            spark.stop()


def _run(spark, records: pd.DataFrame, bundle: Bundle, partitions: int | None,
         batch_size: int) -> tuple[pd.DataFrame, dict[str, str]]:
    from pyspark.sql import functions as F

    rows = engine_rows(records)
    with_patients = bool(rows["has_patient"].any())
    # The group of a row: its patient, or for rows without one a chunk of neighbours.
    chunk = "\0" + (rows["position"] // UNKNOWN_PATIENT_ROWS).astype(str)
    rows["group"] = np.where(rows["has_patient"], "p" + rows["patient_key"], chunk)
    if partitions is None:
        partitions = max(2 * spark.sparkContext.defaultParallelism, math.ceil(len(rows) / ROWS_PER_TASK))
    partitions = max(1, min(partitions, len(rows)))
    bundle_name = ship_bundle(spark, bundle)

    frame = spark.createDataFrame(rows, schema=_schema(_ROWS_FIELDS)).repartition(partitions)
    scored = frame.mapInPandas(
        partial(_score_partitions, bundle_name=bundle_name, prep=bundle.preprocessing,
                features=tuple(bundle.metadata_features), batch_size=batch_size),
        schema=_schema(_SCORED_FIELDS),
    )

    def make_table(frame):
        return _table(frame, bundle, with_patients)

    def make_tables(frames):
        return map(make_table, frames)

    schema = table_schema(bundle, with_patients)
    if with_patients:
        tables = scored.repartition(partitions, F.col("group")).groupBy("group").applyInPandas(make_table, schema)
    else:
        tables = scored.mapInPandas(make_tables, schema)
    return finish_table(tables.toPandas(), with_patients)


# -- the executors' side ------------------------------------------------------------

_SCORERS: dict[tuple[str, int], RowScorer] = {}  # one per Python worker and bundle: the session lives on


def _scorer(bundle_name: str, threads: int) -> RowScorer:
    """This Python worker's scorer for the shipped bundle, made on first use from the files
    `ship_bundle` added to the job (the session and gate are in memory after that)."""
    key = (bundle_name, threads)
    if key not in _SCORERS:
        from pyspark import SparkFiles

        folder = Path(tempfile.mkdtemp(prefix="dermsight-bundle-"))
        try:
            for name in BUNDLE_FILES:
                shipped = Path(SparkFiles.get(f"{bundle_name}-{name}"))
                if shipped.exists():
                    shutil.copyfile(shipped, folder / name)
            _SCORERS[key] = RowScorer(Predictor(folder, threads))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return _SCORERS[key]


def _score_partitions(frames: Iterator[pd.DataFrame], bundle_name: str, prep: Preprocessing,
                      features: tuple[str, ...], batch_size: int) -> Iterator[pd.DataFrame]:
    """mapInPandas: decode and score a task's rows, `batch_size` at a time, with as many
    single-threaded ONNX runs in flight as the task has cores (spark.task.cpus). Each scored
    row travels on as its position, its group and what the scorer made of it (pickled: the
    scorer's row layout is engine_steps', whatever it holds)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    scorer = _scorer(bundle_name, max(1, context.cpus() if context is not None else 1))
    for frame in frames:
        for start in range(0, len(frame), batch_size):
            part = frame.iloc[start : start + batch_size]
            scored = scorer(decode_rows(part, prep, features))
            payload = [pickle.dumps({key: value[i] for key, value in scored.items()}, protocol=pickle.HIGHEST_PROTOCOL)
                       for i in range(len(part))]
            yield pd.DataFrame({"position": part["position"].to_numpy(), "group": part["group"].to_numpy(dtype=object),
                                "row": payload})


def _table(frame: pd.DataFrame, bundle: Bundle, with_patients: bool) -> pd.DataFrame:
    """applyInPandas (one patient's rows) or mapInPandas (rows without patients): the
    prediction-table rows, with input position and error, as `table_rows` makes them for every engine.
    In input order: a patient's context then sums its rows as the local engine does."""
    rows = [pickle.loads(row) for row in frame.sort_values("position", kind="stable")["row"]]
    return table_rows(_stack(rows), bundle, with_patients)


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
    """Scored rows -> the batch of arrays the scorer made (strings as object arrays)."""
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        batch[key] = np.array(values, dtype=object) if isinstance(values[0], str) else np.stack(values)
    return batch


# -- schemas --------------------------------------------------------------------------

def _schema(fields: list[tuple[str, str]]):
    from pyspark.sql import types as T

    kinds = {
        "long": T.LongType(), "string": T.StringType(), "bool": T.BooleanType(), "double": T.DoubleType(),
        "float": T.FloatType(), "binary": T.BinaryType(),
    }
    return T.StructType([T.StructField(name, kinds[kind], nullable=True) for name, kind in fields])


_ROWS_FIELDS = [("position", "long"), ("image_id", "string"), ("image_ref", "string"), ("patient_key", "string"),
                ("has_patient", "bool"), ("age", "double"), ("sex", "string"), ("site", "string"),
                ("patient_images", "double"), ("group", "string")]
_SCORED_FIELDS = [("position", "long"), ("group", "string"), ("row", "binary")]


def table_schema(bundle: Bundle, with_patients: bool):
    """The Spark schema of `table_rows`'s output for this bundle: read off the function's own
    output on one row made the way the executors make them (an unreadable image: every
    score 0), so the two can never disagree."""
    probe = pd.DataFrame({
        "position": [0], "image_id": ["probe"], "image_ref": ["/nonexistent/dermsight-schema-probe.jpg"],
        "patient_key": ["probe" if with_patients else ""], "has_patient": [with_patients],
        "age": [np.nan], "sex": [""], "site": [""], "patient_images": [1.0],
    })
    batch = decode_rows(probe, bundle.preprocessing, tuple(bundle.metadata_features))
    classes, members = len(bundle.classes), int(bundle.training.get("members", 1))
    batch |= {"probabilities": np.zeros((1, classes), np.float32), "embeddings": np.zeros((1, 1), np.float32),
              "looks_dermoscopic": np.zeros(1, bool),
              "member_probabilities": np.zeros((1, members * classes), np.float32)}
    table = table_rows(batch, bundle, with_patients)
    kinds = {"int64": "long", "float32": "float", "float64": "double", "bool": "bool", "object": "string"}
    return _schema([(name, kinds[str(dtype)]) for name, dtype in table.dtypes.items()])


# -- the session ------------------------------------------------------------------------

_SHIPPED: dict[tuple[str, str], str] = {}  # (application id, bundle content hash) -> name under SparkFiles


def ship_bundle(spark, bundle: Bundle) -> str:
    """Add the bundle's worker files to the Spark job (once per application), each as
    NAME-FILE where NAME is made of their content hash; returns NAME. Executors fetch them
    with SparkFiles.get (one file at a time: Spark ships no local folder to a cluster)."""
    files = worker_bundle_files(bundle)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    name = f"dermsight-bundle-{digest.hexdigest()[:16]}"
    key = (spark.sparkContext.applicationId, name)
    if key not in _SHIPPED:
        # Spark serves the files to executors from here for the whole application: kept
        # until this process ends.
        folder = Path(tempfile.mkdtemp(prefix="dermsight-spark-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        for file, data in files.items():
            (folder / f"{name}-{file}").write_bytes(data)
            spark.sparkContext.addFile(str(folder / f"{name}-{file}"))
        _SHIPPED[key] = name
    return name


def check_master(master: str) -> None:
    """Raise SparkEngineError unless `master` is a Spark master URL DermSight can use."""
    if not _MASTER.fullmatch(master.strip()):
        raise SparkEngineError(f"not a Spark master: {master!r}; expected {MASTER_FORMS}")


def parse_conf(items) -> dict[str, str]:
    """KEY=VALUE settings (`--spark-conf`) -> {KEY: VALUE}."""
    settings = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise SparkEngineError(f"a Spark setting is KEY=VALUE (e.g. spark.executor.cores=4), not {item!r}")
        settings[key.strip()] = value.strip()
    return settings


def is_local(master: str) -> bool:
    return master.strip().startswith("local")


def find_java() -> str:
    """The java that PySpark will start: $JAVA_HOME/bin/java, else java on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        where = f"JAVA_HOME={home} has no bin/java" if home else "no java on PATH and JAVA_HOME unset"
        raise SparkEngineError(
            f"the Spark engine needs Java 17 or newer ({where}): "
            "apt-get install openjdk-17-jre-headless, or set JAVA_HOME"
        )
    return found


def import_pyspark():
    try:
        import pyspark
        from pyspark.sql import SparkSession  # noqa: F401
    except ImportError:
        raise SparkEngineError('the Spark engine needs PySpark: pip install -e ".[spark]"') from None
    return pyspark


def start_spark(master: str = DEFAULT_MASTER, *, executor_memory: str | None = None,
                conf: Mapping[str, str] | None = None, app_name: str = "dermsight predict"):
    """A SparkSession on `master`, set up for DermSight: Arrow for the pandas UDFs, Python
    workers reused (each keeps its ONNX session), no console progress. A local master stays
    on loopback, without a web UI, and runs its Python workers in this Python."""
    check_master(master)
    import_pyspark()
    java = find_java()
    from pyspark.sql import SparkSession

    master = master.strip()
    settings = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.python.worker.reuse": "true",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.adaptive.enabled": "false",  # keep the partitions asked for: one scoring task each
    }
    if is_local(master):
        os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers import dermsight from this environment
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        settings |= {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                     "spark.ui.enabled": "false"}
    elif master.startswith("spark://"):
        _check_reachable(master)
    if executor_memory:
        settings["spark.executor.memory"] = executor_memory
    settings |= dict(conf or {})
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except Exception as err:  # py4j / PySparkRuntimeError: the JVM did not start or the master refused
        raise SparkEngineError(
            f"cannot start Spark on {master}: {_first_line(err)} (java: {java}, {_java_version(java)})"
        ) from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _active_session(master: str | None):
    """This process's running SparkSession, if any (a process holds one SparkContext)."""
    import_pyspark()
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is None:
        return None
    running = active.sparkContext.master
    if master is not None and master.strip() != running:
        raise SparkEngineError(
            f"a SparkSession on {running} already runs in this process; cannot start one on {master}"
        )
    return active


def _check_reachable(master: str) -> None:
    """Fail at once when no standalone master answers (Spark itself retries for minutes)."""
    problems = []
    for address in master.removeprefix("spark://").split(","):
        host, port = address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            return
        except OSError as err:
            problems.append(f"{address}: {err.strerror or err}")
    raise SparkEngineError(f"cannot reach the Spark master at {master} ({'; '.join(problems)})")


def _java_version(java: str) -> str:
    """What `java -version` says first (Spark 4 needs 17 or newer)."""
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot run it: {err}"
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[0] if lines else f"java -version exited {result.returncode}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
