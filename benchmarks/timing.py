"""Shared by the benchmarks: 1-thread onnxruntime sessions and interleaved median latency."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def session(model: Any):
    """A 1-thread onnxruntime CPU session (full graph optimizations) of a path or a ModelProto."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def latency(models: dict[str, Any], feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median seconds per run of each model on the first sample of ``feeds``, runs interleaved (one of each per round)."""
    sessions = {k: session(m) for k, m in models.items()}
    one = {k: v[:1] for k, v in feeds.items()}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, one)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for key, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, one)
            times[key].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}
