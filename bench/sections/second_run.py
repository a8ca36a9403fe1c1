"""second_run: `dermsight predict` on the same images twice, from an empty cache (process
wall time, peak RSS); and the time of `dermsight --help`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .common import Settings, child_env, dermsight_command, rounded, run_measured, test_128_records


def run(args, settings: Settings, results: dict) -> dict:
    records = test_128_records(settings.second_run_images)
    workdir = Path(tempfile.mkdtemp(prefix="dermsight-bench-predict-"))
    try:
        manifest = workdir / "images.csv"
        records.to_csv(manifest, index=False)
        cmd = [*dermsight_command(), "predict", str(manifest), "-o", str(workdir / "predictions.csv")]
        if args.model:
            cmd += ["--model", str(args.model)]
        runs = []
        cache = child_env({"DERMSIGHT_CACHE": str(workdir / "cache")})  # empty: run 1 folds and caches the graph
        for _ in range(2):
            result = run_measured(cmd, env=cache)
            if result["returncode"] != 0:
                raise RuntimeError(f"dermsight predict failed: {result['stderr'][-1500:]}")
            runs.append(result)
        cli_seconds = run_measured([*dermsight_command(), "--help"], env=child_env())["seconds"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    first, second = runs
    return {
        "what": "`dermsight predict MANIFEST -o predictions.csv` twice on the same test_128 images "
        "(process wall time); "
        "run 1 starts with an empty DERMSIGHT_CACHE (it builds the static-padding graph and caches it and every "
        "image's scores), run 2 reuses both: it reads and hashes the images but neither decodes nor runs the network",
        "images": len(records),
        "first_seconds": rounded(first["seconds"], 2),
        "second_seconds": rounded(second["seconds"], 2),
        "second_over_first": rounded(second["seconds"] / first["seconds"]),
        "images_per_second_second_run": rounded(len(records) / second["seconds"], 1),
        "cli_help_seconds": rounded(cli_seconds, 2),
        "peak_rss_mb": rounded(max(first["peak_rss_mb"], second["peak_rss_mb"]), 1),
    }
