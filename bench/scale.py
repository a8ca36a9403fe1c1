"""Scale-out benchmark: Ray Data batch scoring with 1 and 2 scoring actors against the
single-process Predictor, on the real SIIM-ISIC 2020 test_128 images (5,545 images of 344
patients, scored with their patient context). Prints one JSON object.

    .venv/bin/python bench/scale.py [--model BUNDLE] [--images N] [--cpus 2]

Run it on an otherwise idle machine: every number is wall-clock time. Each Ray run
includes starting its actors (loading the model), decoding, scoring, the patient group-by
and collecting the table. Each actor runs ONNX Runtime with one thread; the single-process
run uses its default (DERMSIGHT_THREADS, else every core).

Two measurements of 1 vs 2 workers:
* shared: one local Ray of `--cpus` CPUs (started once, start-up reported apart), 1 then 2
  scoring actors. The 1-actor run still decodes on the other core, so this ratio
  understates what a second worker adds.
* pinned: a worker = a core. Ray is started for each run with `num_cpus` = workers, and
  every Ray process (they inherit the driver's CPU affinity) is confined to that many
  cores: what adding a machine's worth of cores to a cluster buys.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Bundle (default: bundles/default, else /tmp/smoke_bundle).")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DERMSIGHT_DATA", REPO.parent / "shared" / "datasets")))
    parser.add_argument("--images", type=int, default=None, help="Only the first N images of test_128 (default: all 5,545).")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray.")
    args = parser.parse_args()

    import ray

    from dermsight.inference.inputs import records_from_inputs
    from dermsight.inference.predictor import Predictor
    from dermsight.inference.ray_engine import init_ray, predict_ray
    from dermsight.models.bundle import DEFAULT_BUNDLE, load_bundle

    model = args.model or (DEFAULT_BUNDLE if (DEFAULT_BUNDLE / "bundle.json").exists() else Path("/tmp/smoke_bundle"))
    bundle = load_bundle(model)
    records, _ = records_from_inputs([str(args.data / "isic2020")])
    records = records[records["image_ref"].str.contains("/test_128/", regex=False)].reset_index(drop=True)
    if args.images:
        records = records.iloc[: args.images].reset_index(drop=True)
    n = len(records)

    started = time.perf_counter()
    local_table, _ = Predictor(bundle).predict_records(records, progress=False)
    single_seconds = time.perf_counter() - started

    started = time.perf_counter()
    init_ray(ray, None, args.cpus)
    ray_start_seconds = time.perf_counter() - started
    runs = {}
    try:
        for workers in (1, 2):
            started = time.perf_counter()
            table, _ = predict_ray(records, bundle, workers=workers, threads=1, progress=False)
            seconds = time.perf_counter() - started
            gap = float(np.abs(table["melanoma_risk"].to_numpy() - local_table["melanoma_risk"].to_numpy()).max())
            runs[workers] = {"seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
                             "max_abs_difference_from_single_process": gap}
    finally:
        ray.shutdown()

    pinned = {}
    all_cores = os.sched_getaffinity(0)
    for workers in (1, 2):
        os.sched_setaffinity(0, set(sorted(all_cores)[:workers]))
        try:
            init_ray(ray, None, workers)
            started = time.perf_counter()
            table, _ = predict_ray(records, bundle, workers=workers, threads=1, progress=False)
            seconds = time.perf_counter() - started
        finally:
            ray.shutdown()
            os.sched_setaffinity(0, all_cores)
        gap = float(np.abs(table["melanoma_risk"].to_numpy() - local_table["melanoma_risk"].to_numpy()).max())
        pinned[workers] = {"cores": workers, "seconds": round(seconds, 2), "images_per_second": round(n / seconds, 1),
                           "max_abs_difference_from_single_process": gap}

    single_rate = n / single_seconds
    print(json.dumps({
        "images": n,
        "patients": int(records["patient_id"].nunique()),
        "bundle": bundle.name,
        "image_size": bundle.preprocessing.size,
        "views": bundle.views,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_at_end": os.getloadavg()[0]},
        "single_process": {"seconds": round(single_seconds, 2), "images_per_second": round(single_rate, 1)},
        "ray_local_cpus": args.cpus,
        "ray_start_seconds": round(ray_start_seconds, 2),
        "ray": {f"{w}_workers": r for w, r in runs.items()},
        "scaling_2_vs_1_workers": round(runs[2]["images_per_second"] / runs[1]["images_per_second"], 2),
        "ray_pinned": {f"{w}_workers": r for w, r in pinned.items()},
        "scaling_2_vs_1_workers_pinned": round(pinned[2]["images_per_second"] / pinned[1]["images_per_second"], 2),
        "ray_2_workers_time_vs_single_process": round(runs[2]["seconds"] / single_seconds, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
