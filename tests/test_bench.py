"""The benchmark suite runs and reports in the documented shape. Benchmarks are never
timed tests: nothing here asserts a speed, only that the figures are there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_quick_ceiling_prints_the_report_json():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--only", "ceiling", "--no-table"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["quick"] is True and report["sections"] == ["ceiling"] and report["errors"] == {}
    assert {"cpus", "onnxruntime", "load_average_at_start", "load_average_at_end"} <= set(report["machine"])
    ceiling = report["results"]["ceiling"]
    for key in ("images_per_second", "plain_onnxruntime_images_per_second", "ms_per_image", "session_create_seconds"):
        assert isinstance(ceiling[key], float) and ceiling[key] > 0, key
    assert ceiling["batch"] == 32 and ceiling["image_size"] > 0
    # Every target of the issue is listed, unmeasured ones as None.
    assert set(report["targets"]) == {
        "batch_forward_ratio_to_ceiling", "batch_forward_ratio_to_best_ceiling", "speedup_over_naive",
        "speedup_over_naive_train_originals",
        "api_p50_ms_8_clients", "api_p99_ms_8_clients", "api_p50_ms_8_clients_paced", "api_p99_ms_8_clients_paced",
        "serve_rss_mb", "train_minutes",
    }
    assert all(t["measured"] is None and t["met"] is None for t in report["targets"].values())


def test_bench_rejects_an_unknown_section():
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--only", "warp-drive"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown section" in result.stderr
