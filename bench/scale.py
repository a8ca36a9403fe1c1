"""Scale-out benchmark: batch scoring on Ray Data (1 and 2 scoring actors) and on Apache
Spark (local[1] and local[2]) against the single-process Predictor, on the real SIIM-ISIC
2020 test_128 images (5,545 images of 344 patients, scored with their patient context).
Prints one JSON object.

    .venv/bin/python bench/scale.py [--model BUNDLE] [--images N] [--cpus 2] [--engines single,ray,spark]
        [--previous bench/scale_results.json]

Run it on an otherwise idle machine: every number is wall-clock time, and the load
averages at start and end are in the JSON. Every image is read once before the first timed
run, so every engine, the single-process baseline first, starts from the same warm page
cache (the baseline would otherwise pay the first reads from disk alone). Each Ray run includes starting its actors
(loading the model), decoding, scoring, the patient group-by and collecting the table.
Each actor runs ONNX Runtime with one thread; the single-process run uses its default
(DERMSIGHT_THREADS, else every core).

Two measurements of 1 vs 2 Ray workers:
* shared: one local Ray of `--cpus` CPUs (started once, start-up reported apart), 1 then 2
  scoring actors. The 1-actor run still decodes on the other core, so this ratio
  understates what a second worker adds.
* pinned: a worker = a core. Ray is started for each run with `num_cpus` = workers, and
  every Ray process (they inherit the driver's CPU affinity) is confined to that many
  cores: what adding a machine's worth of cores to a cluster buys.

Spark, local[1] and local[2], pinned the same way: each in a child process confined to its
cores (the JVM and its Python workers inherit that), so each gets a fresh JVM, whose start-up
(the SparkSession) is timed apart;
the run itself is cold (Python workers start, each loads the model once), as Ray's runs
are; then a second, warm run of 64 images in the same session shows the cost every job
pays on top of its images (scheduling, the patient shuffle, collecting the table).

Without ray in --engines, the Ray figures of --previous (an earlier output of this script)
are carried over under `ray_previous`, with the bundle and date they were measured with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RAY_KEYS = ("ray_local_cpus", "ray_start_seconds", "ray", "scaling_2_vs_1_workers", "ray_pinned",
            "scaling_2_vs_1_workers_pinned", "ray_2_workers_time_vs_single_process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Bundle (default: bundles/default, else /tmp/smoke_bundle).")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets")))
    parser.add_argument("--images", type=int, default=None, help="Only the first N images of test_128 (default: all 5,545).")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray; cores of the largest Spark local[N].")
    parser.add_argument("--engines", default="single,ray,spark", help="Comma-separated: single, ray, spark.")
    parser.add_argument("--previous", type=Path, default=REPO / "bench" / "scale_results.json",
                        help="Earlier results whose Ray figures are carried over when ray is not run.")
    parser.add_argument("--spark-run", type=int, default=None, help=argparse.SUPPRESS)  # one Spark run, in a child
    parser.add_argument("--spark-table", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    engines = {e.strip() for e in args.engines.split(",") if e.strip()}

    from dermsight.data.inputs import records_from_inputs
    from dermsight.inference.predictor import Predictor
    from dermsight.models.bundle import DEFAULT_BUNDLE, load_bundle

    model = args.model or (DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "bundle.json").exists() else Path("/tmp/smoke_bundle"))
    bundle = load_bundle(model)
    records, _ = records_from_inputs([str(args.data / "isic2020")])
    records = records[records["image_ref"].str.contains("/test_128/", regex=False)].reset_index(drop=True)
    if args.images:
        records = records.iloc[: args.images].reset_index(drop=True)
    n = len(records)
    if args.spark_run:
        print(json.dumps(spark_run(records, bundle, args.spark_run, args.spark_table)))
        return
    load_at_start = os.getloadavg()
    for ref in records["image_ref"]:  # the same warm page cache for every engine (see the docstring)
        Path(ref).read_bytes()

    started = time.perf_counter()
    local_table, _ = Predictor(bundle).predict_records(records, progress=False)
    single_seconds = time.perf_counter() - started

    def gap(table) -> float:
        """Largest |risk difference| from the single-process table over the images both scored; a refused
        image has no risk (NaN), so refused in one table only counts as an infinite difference."""
        mine, single = table["melanoma_risk"].to_numpy(float), local_table["melanoma_risk"].to_numpy(float)
        if not np.array_equal(np.isnan(mine), np.isnan(single)):
            return float("inf")
        scored = ~np.isnan(single)
        return float(np.abs(mine[scored] - single[scored]).max()) if scored.any() else 0.0

    result = {
        "images": n,
        "patients": int(records["patient_id"].nunique()),
        "bundle": bundle.name,
        "image_size": bundle.preprocessing.size,
        "views": bundle.views,
        "measured": datetime.date.today().isoformat(),
        "page_cache": "warm for every engine: each image read once before the first timed run",
        "single_process": {"seconds": round(single_seconds, 2), "images_per_second": round(n / single_seconds, 1)},
    }
    if "ray" in engines:
        result |= ray_runs(records, bundle, args.cpus, single_seconds, gap)
    elif args.previous.exists():
        result["ray_previous"] = previous_ray(json.loads(args.previous.read_text()))
    if "spark" in engines:
        result |= spark_runs(records, bundle, args.cpus, single_seconds, gap, args)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "load_average_at_start": [round(x, 2) for x in load_at_start],
                         "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(result, indent=1))


def previous_ray(previous: dict) -> dict:
    """The Ray figures of an earlier output of this script, with what they were measured with
    (carried as they are when that output had carried them itself)."""
    if "ray_previous" in previous:
        return previous["ray_previous"]
    return {
        "note": "not rerun here: the Ray figures of an earlier run of this script, with the bundle and date below",
        "bundle": previous.get("bundle"),
        "measured": previous.get("measured", "2026-11-28"),
        "single_process": previous.get("single_process"),
        "load_average_at_end": previous.get("machine", {}).get("load_average_at_end"),
        **{key: previous[key] for key in RAY_KEYS if key in previous},
    }


def ray_runs(records, bundle, cpus: int, single_seconds: float, gap) -> dict:
    import ray

    from dermsight.inference.ray_engine import init_ray, predict_ray

    n = len(records)
    started = time.perf_counter()
    init_ray(ray, None, cpus)
    ray_start_seconds = time.perf_counter() - started
    runs = {}
    try:
        for workers in (1, 2):
            started = time.perf_counter()
            table, _ = predict_ray(records, bundle, workers=workers, threads=1, progress=False)
            seconds = time.perf_counter() - started
            runs[workers] = {"seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
                             "max_abs_difference_from_single_process": gap(table)}
    finally:
        ray.shutdown()

    pinned = {}
    for workers in (1, 2):
        with pinned_to(workers):
            try:
                init_ray(ray, None, workers)
                started = time.perf_counter()
                table, _ = predict_ray(records, bundle, workers=workers, threads=1, progress=False)
                seconds = time.perf_counter() - started
            finally:
                ray.shutdown()
        pinned[workers] = {"cores": workers, "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
                           "max_abs_difference_from_single_process": gap(table)}
    return {
        "ray_local_cpus": cpus,
        "ray_start_seconds": round(ray_start_seconds, 2),
        "ray": {f"{w}_workers": r for w, r in runs.items()},
        "scaling_2_vs_1_workers": round(runs[2]["images_per_second"] / runs[1]["images_per_second"], 2),
        "ray_pinned": {f"{w}_workers": r for w, r in pinned.items()},
        "scaling_2_vs_1_workers_pinned": round(pinned[2]["images_per_second"] / pinned[1]["images_per_second"], 2),
        "ray_2_workers_time_vs_single_process": round(runs[2]["seconds"] / single_seconds, 2),
    }


def spark_runs(records, bundle, cpus: int, single_seconds: float, gap, args) -> dict:
    """Spark local[1] and local[N], each in a fresh process pinned to its cores (a new JVM
    each time: a JVM outlives SparkSession.stop, and its threads keep the affinity they
    started with)."""
    n = len(records)
    runs = {}
    for cores in sorted({1, cpus}):
        with tempfile.TemporaryDirectory() as folder:
            table_path = Path(folder) / "table.parquet"
            command = [sys.executable, __file__, "--spark-run", str(cores), "--spark-table", str(table_path),
                       "--data", str(args.data), "--model", str(bundle.path)]
            if args.images:
                command += ["--images", str(args.images)]
            chosen = set(sorted(os.sched_getaffinity(0))[:cores])
            done = subprocess.run(command, capture_output=True, text=True, check=True,
                                  preexec_fn=lambda: os.sched_setaffinity(0, chosen))
            run = json.loads(done.stdout)
            table = pd.read_parquet(table_path)
        run |= {"max_abs_difference_from_single_process": gap(table),
                "same_images_in_order": table["image"].tolist() == records["image_id"].astype(str).tolist()}
        runs[cores] = run
    big = max(runs)
    out = {"spark": {f"local[{c}]": r for c, r in runs.items()}}
    if big > 1:
        out["spark_scaling_local_2_vs_1"] = round(runs[big]["images_per_second"] / runs[1]["images_per_second"], 2)
    out["spark_time_vs_single_process"] = round(runs[big]["seconds"] / single_seconds, 2)
    return out


def spark_run(records, bundle, cores: int, table_path: Path) -> dict:
    """One Spark configuration, in this (pinned) process: session start-up (the JVM), a cold
    run on every image, a warm run on 64."""
    from dermsight.inference.spark_engine import ROWS_PER_TASK, predict_spark, start_spark

    n = len(records)
    started = time.perf_counter()
    spark = start_spark(f"local[{cores}]", app_name="dermsight bench/scale.py")
    start_seconds = time.perf_counter() - started
    try:
        started = time.perf_counter()
        table, _ = predict_spark(records, bundle, spark=spark)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        predict_spark(records.iloc[:64], bundle, spark=spark)
        warm_seconds = time.perf_counter() - started
        partitions = max(2 * spark.sparkContext.defaultParallelism, -(-n // ROWS_PER_TASK))  # the default
        worker_rss = python_worker_peak_rss_mb(spark, cores)
    finally:
        spark.stop()
    table.to_parquet(table_path, index=False)
    return {"cores": cores, "partitions": min(partitions, n), "session_start_seconds": round(start_seconds, 2),
            "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
            "warm_64_images_seconds": round(warm_seconds, 2), "python_worker_peak_rss_mb": worker_rss}


def python_worker_peak_rss_mb(spark, cores: int) -> float:
    """The largest peak RSS of the session's Python workers (reused: the ones that scored,
    each holding its Predictor), read by a small job that runs on them."""
    def peak(frames):
        import resource

        for frame in frames:
            yield pd.DataFrame({"mb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024] * len(frame)})

    rows = spark.range(0, 8 * cores, numPartitions=4 * cores).mapInPandas(peak, "mb double").toPandas()
    return round(float(rows["mb"].max()), 1)


class pinned_to:
    """Confine this process (and what it starts from now on) to its first `cores` cores."""

    def __init__(self, cores: int):
        self.all = os.sched_getaffinity(0)
        self.cores = set(sorted(self.all)[:cores])

    def __enter__(self):
        os.sched_setaffinity(0, self.cores)

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self.all)


if __name__ == "__main__":
    main()
