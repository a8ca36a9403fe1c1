"""ceiling: the raw ONNX Runtime forward of the bundle's graph (batch 32, 1 view, pre-made
random input): the best of DermSight's session (single-threaded runs, one per core), one
session with intra-op threads and a default ONNX Runtime session; plus a sweep of rows per
run (1-64) in both layouts: the best of it is the stricter ceiling."""

from __future__ import annotations

import statistics

import numpy as np

from .common import Settings, load_bundle, now, rounded


def run(args, settings: Settings, results: dict) -> dict:
    import onnxruntime as ort

    from dermsight.inference.onnx_session import ParallelSession, optimised_model_path, session_options

    bundle = load_bundle(args.model)
    size, n = bundle.preprocessing.size, settings.ceiling_batch
    started = now()
    session = ParallelSession(bundle.onnx_path)
    create_seconds = now() - started
    # The same optimised graph in one session with ONNX Runtime's own intra-op threads (one
    # per core): how DermSight ran it until 2026-11-28.
    options = session_options()
    options.intra_op_num_threads = session.streams
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threaded = ort.InferenceSession(str(optimised_model_path(bundle.onnx_path)), options,
                                    providers=["CPUExecutionProvider"])
    plain_options = ort.SessionOptions()  # ONNX Runtime's defaults but the exact int8 kernel: every session, the same numbers
    plain_options.add_session_config_entry("session.x64quantprecision", "1")
    plain = ort.InferenceSession(str(bundle.onnx_path), plain_options, providers=["CPUExecutionProvider"])
    sessions = {"dermsight": session, "one_session_intra_op_threads": threaded, "plain_onnxruntime": plain}
    rng = np.random.default_rng(0)
    feeds = {
        "image": rng.standard_normal((n, 3, size, size)).astype(np.float32),
        "metadata": np.zeros((n, len(bundle.metadata_features)), np.float32),
    }
    # A fresh process runs slower for its first seconds (arenas, page mapping, clocks): warm
    # up by time, not by a run count, before any figure is taken.
    warm_until = now() + settings.warmup_seconds
    while now() < warm_until:
        for each in sessions.values():
            each.run(None, feeds)
    times = time_session(sessions, feeds, settings.ceiling_warmup, settings.ceiling_runs)
    rates = {name: n / statistics.median(t) for name, t in times.items()}
    best_config = max(rates, key=rates.get)
    sweep = rows_sweep(session, threaded, bundle, settings.sweep_rounds)
    best_rows = max(sweep, key=sweep.get)
    return {
        "what": "ONNX Runtime forward of the bundle's graph, batch 32, 1 view, random input (the upper bound): "
                "the best of DermSight's session (single-threaded runs, one per core), one session with "
                "intra-op threads, and a default ONNX Runtime session (all three with the exact int8 kernel)",
        "batch": n,
        "image_size": size,
        "runs": settings.ceiling_runs,
        "streams": session.streams,
        "images_per_second": rounded(rates[best_config], 1),
        "best_configuration": best_config,
        "images_per_second_by_configuration": {name: rounded(rate, 1) for name, rate in rates.items()},
        "ms_per_image": rounded(1000 / rates[best_config], 2),
        "session_create_seconds": rounded(create_seconds, 2),
        "dermsight_session_speedup_over_plain": rounded(rates["dermsight"] / rates["plain_onnxruntime"], 2),
        # Images/s when the same 64 images go through in runs of R rows, in either layout:
        # the best of all is the stricter ceiling.
        "rows_sweep_images_per_second": {key: rounded(v, 1) for key, v in sweep.items()},
        "best_rows_per_run": best_rows,
        "best_images_per_second": rounded(sweep[best_rows], 1),
        "predictor_rows_per_run": session.rows,
    }


def time_session(sessions: dict, feeds: dict, warmup: int, runs: int, block: int = 5) -> dict[str, list[float]]:
    """Seconds per run of each session: blocks of `block` runs per session in turn (so that
    machine noise hits all alike), each block after one untimed run. Not run-by-run: a
    default ONNX Runtime session's threads keep spinning after its run and would slow the
    next session's run down."""
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    while any(len(t) < runs for t in times.values()):
        for name, session in sessions.items():
            session.run(None, feeds)
            for _ in range(min(block, runs - len(times[name]))):
                started = now()
                session.run(None, feeds)
                times[name].append(now() - started)
    return times


def rows_sweep(session, threaded, bundle, rounds: int, sizes=(1, 2, 4, 8, 16, 32, 64)) -> dict[str, float]:
    """Images/s of 64 random images in runs of each size, sizes and layouts interleaved:
    `dermsight-R` hands DermSight's session all 64 in runs of R rows spread over its
    streams, `intra-op-R` feeds the intra-op-threaded session R rows at a time."""
    size = bundle.preprocessing.size
    rng = np.random.default_rng(1)
    images = rng.standard_normal((64, 3, size, size)).astype(np.float32)
    metadata = np.zeros((64, len(bundle.metadata_features)), np.float32)
    default_rows = session.rows

    def parallel(rows: int) -> None:
        session.rows = rows
        session.run(None, {"image": images, "metadata": metadata})

    def sequential(rows: int) -> None:
        for i in range(0, 64, rows):
            threaded.run(None, {"image": images[i : i + rows], "metadata": metadata[i : i + rows]})

    layouts = {"dermsight": parallel, "intra-op": sequential}
    try:
        for run in layouts.values():  # warm-up: a full untimed round (shapes, arenas, CPU clocks)
            for rows in sizes:
                run(rows)
        seconds: dict[str, list[float]] = {f"{name}-{rows}": [] for name in layouts for rows in sizes}
        for _ in range(rounds):
            for rows in sizes:
                for name, run in layouts.items():
                    started = now()
                    run(rows)
                    seconds[f"{name}-{rows}"].append(now() - started)
    finally:
        session.rows = default_rows
    return {key: 64 / statistics.median(t) for key, t in seconds.items()}
