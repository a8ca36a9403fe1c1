"""A small, fast version of bench/load.py: real uploads of real ISIC images to a real
uvicorn on 127.0.0.1 from an asyncio client. Eight clients within capacity get no error
at all; a burst over capacity is shed with 503 + Retry-After at once, never queued
without bound, and never a 500; an upload that was shed and retried counts its latency
from its first attempt to its 2xx; the bench measures the server with an API key."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest
from conftest import REPO
from live_server import in_thread

from dermsight.serving.app import create_app
from dermsight.serving.limits import Settings
from dermsight.serving.security import create_api_key

spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "load.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def images(shared):
    return bench.load_images(shared, 24)


def test_eight_clients_get_no_errors(serving_bundle, images, tmp_path):
    app = create_app(serving_bundle, storage_dir=tmp_path, dev=True)  # default capacity: 2 running + 16 waiting
    with in_thread(app) as url:
        report = asyncio.run(bench.run_clients(url, images, clients=8, requests=3, retries=0, max_seconds=120))
    print(json.dumps(report))
    assert report["statuses"] == report["attempt_statuses"] == {"201": 24}, report
    assert report["uploads"] == report["attempts"] == 24 and report["retried_uploads"] == 0
    assert report["server_errors"] == report["client_errors"] == report["shed_503"] == 0
    # Within capacity no upload comes near being shed (the queue timeout) nor starves behind the others.
    latency = report["latency_ms"]
    assert latency["max"] < 1000 * Settings().queue_timeout / 2, report
    assert latency["p99"] <= 10 * latency["p50"], report
    # Every upload sent a different image, so every one was stored (none deduplicated away).
    assert app.state.scorer.storage.counts()["images"] == 24


def test_a_burst_over_capacity_is_shed_fast(serving_bundle, images, tmp_path):
    app = create_app(serving_bundle, storage_dir=tmp_path, dev=True,
                     settings=Settings(max_active=1, max_queue=1))  # room for 2 uploads at a time
    with in_thread(app) as url:
        report = asyncio.run(bench.burst(url, images, 16))
    print(json.dumps(report))
    statuses = report["statuses"]
    assert set(statuses) <= {"201", "503"} and report["server_errors"] == report["client_errors"] == 0, report
    assert statuses.get("201", 0) >= 2 and statuses.get("503", 0) >= 8, report
    assert report["retry_after_s"] and min(report["retry_after_s"]) >= 1
    # Shed at once, not after waiting in a queue: a 503 comes back faster than an admitted upload.
    # Measured over 20 runs at load average ~19 on 2 cores: 503 p50 330-1,090 ms (a fixed 1 s bound
    # failed once), at most 0.56 of the 201s' p50: this bound keeps a 1.8x margin.
    assert report["latency_503_ms"]["p50"] <= report["latency_2xx_ms"]["p50"], report


def test_a_retried_upload_counts_from_its_first_attempt(serving_bundle, images, tmp_path):
    """Shed uploads come back after Retry-After: the upload's latency runs from its first
    attempt to its final 201 (the wait included), not from the attempt that got through."""
    app = create_app(serving_bundle, storage_dir=tmp_path, dev=True, settings=Settings(max_active=1, max_queue=0))
    with in_thread(app) as url:
        report = asyncio.run(bench.run_clients(url, images, clients=6, requests=2, retries=20, retry_cap=0.3,
                                               max_seconds=120))
    print(json.dumps(report))
    assert report["statuses"] == {"201": 12} and report["uploads"] == 12, report
    assert report["retried_uploads"] >= 1 and report["attempts"] == 12 + report["shed_503"], report
    assert report["attempt_statuses"] == {"201": 12, "503": report["shed_503"]}
    # The slowest upload waited at least one retry pause (0.3 s) on top of its scoring.
    assert report["latency_ms"]["max"] >= 300, report
    assert report["latency_ms"]["max"] > report["attempt_latency_ms"]["max"], report


def test_the_bench_authenticates_with_an_api_key(serving_bundle, images, tmp_path):
    """Without --dev every upload needs a key: the bench's headers carry it."""
    app = create_app(serving_bundle, storage_dir=tmp_path, settings=Settings(rate=1000, burst=1000))
    key = create_api_key(app.state.scorer.storage, "load test", role="clinician")
    with in_thread(app) as url:
        refused = asyncio.run(bench.run_clients(url, images, clients=1, requests=1, retries=0))
        report = asyncio.run(bench.run_clients(url, images, clients=2, requests=2, retries=0,
                                               headers={"Authorization": f"Bearer {key}"}))
    assert refused["statuses"] == {"401": 1}, refused
    assert report["statuses"] == {"201": 4}, report


def test_uploads_that_time_out_or_are_cut_off_are_counted_not_dropped(serving_bundle, images, tmp_path):
    """An upload without a 2xx still counts: a timeout is a failed upload in the latency
    percentiles (at the time it gave up), and one the level's time limit stopped is counted."""
    app = create_app(serving_bundle, storage_dir=tmp_path, dev=True)
    with in_thread(app) as url:
        timed_out = asyncio.run(bench.run_clients(url, images, clients=2, requests=2, retries=0, timeout=0.001))
        cut_off = asyncio.run(bench.run_clients(url, images, clients=2, requests=3, retries=0, max_seconds=0))
    assert timed_out["uploads"] == timed_out["attempts"] == timed_out["failed_uploads"] == timed_out["timeouts"] == 4
    assert timed_out["latency_ms"]["p50"] is not None and timed_out["latency_2xx_ms"]["p50"] is None, timed_out
    assert (cut_off["uploads"], cut_off["attempts"], cut_off["cut_off"], cut_off["failed_uploads"]) == (6, 0, 6, 6)
    assert cut_off["statuses"] == {"cut off": 6}
