"""ONNX Runtime sessions configured for a small CPU machine."""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort


def default_threads() -> int:
    return int(os.environ.get("DERMSIGHT_THREADS", os.cpu_count() or 1))


def create_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with full graph optimisation and a fixed thread count (threads
    spinning beyond the core count only steal time from image decoding)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
