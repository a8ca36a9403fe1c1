"""The benchmark suite runs and reports in the documented shape. Benchmarks are never
timed tests: nothing here asserts a speed, only that the figures are there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    for key in ("images_per_second", "best_images_per_second", "ms_per_image", "session_create_seconds"):
        assert isinstance(ceiling[key], float) and ceiling[key] > 0, key
    by_configuration = ceiling["images_per_second_by_configuration"]
    assert set(by_configuration) == {"dermsight", "one_session_intra_op_threads", "plain_onnxruntime"}
    assert ceiling["images_per_second"] == max(by_configuration.values()) == by_configuration[ceiling["best_configuration"]]
    assert {"dermsight-8", "intra-op-32"} <= set(ceiling["rows_sweep_images_per_second"])
    assert ceiling["batch"] == 32 and ceiling["image_size"] > 0
    # Every target of the issue is listed, unmeasured ones as None.
    assert set(report["targets"]) == {
        "batch_forward_ratio_to_ceiling", "batch_forward_ratio_to_ceiling_paired", "batch_forward_ratio_to_best_ceiling",
        "speedup_over_naive",
        "speedup_over_naive_train_originals",
        "api_p50_ms_8_clients", "api_p99_ms_8_clients", "api_p50_ms_8_clients_paced", "api_p99_ms_8_clients_paced",
        "serve_rss_mb", "train_minutes",
    }
    assert all(t["measured"] is None and t["met"] is None for t in report["targets"].values())


def test_bench_rejects_an_unknown_section():
    command = [sys.executable, str(REPO / "bench" / "run.py"), "--only", "warp-drive"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown section" in result.stderr


def test_ham_accuracy_counts_akiec_as_ak_or_scc():
    """HAM10000's akiec holds AK and intraepithelial SCC: its truth is either code, its
    probability P(AK) + P(SCC), so an SCC image called SCC is right on the 7 HAM classes."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("bench_accuracy", REPO / "bench" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    codes = accuracy.HAM_CLASSES + ["SCC"]
    rows = pd.DataFrame(
        [  # truth, then probabilities in `codes` order
            ("SCC", [0.0, 0.0, 0.0, 0.2, 0.3, 0.0, 0.0, 0.5]),  # akiec 0.7 beats BKL 0.3: right
            ("AK", [0.0, 0.0, 0.0, 0.3, 0.4, 0.0, 0.0, 0.3]),  # akiec 0.6 beats BKL 0.4: right
            ("BKL", [0.0, 0.0, 0.0, 0.1, 0.6, 0.0, 0.0, 0.3]),  # BKL 0.6 beats akiec 0.4: right
            ("MEL", [0.6, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.3]),  # MEL 0.6 beats akiec 0.4: right
        ],
        columns=["diagnosis", "p"],
    )
    rows = pd.concat([rows[["diagnosis"]], pd.DataFrame(rows["p"].tolist(), columns=codes)], axis=1)
    assert accuracy.restricted_accuracy(rows, accuracy.HAM_CLASSES, {"SCC": "AK"}) == pytest.approx(1.0)
    # Without P(SCC) in akiec, both akiec images would be called BKL: akiec recall 0, balanced accuracy 2/3.
