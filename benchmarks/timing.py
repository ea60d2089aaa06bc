"""Shared by the benchmarks: 1-thread onnxruntime sessions and interleaved median latency (onnxopt.bench's timer)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from onnxopt.bench import interleaved_times, ort_session


def session(model: Any):
    """A 1-thread onnxruntime CPU session (full graph optimizations) of a path or a ModelProto."""
    return ort_session(model, threads=1, provider="cpu")


def latency(models: dict[str, Any], feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median seconds per run of each model on the first sample of ``feeds``, runs interleaved (one of each per round)."""
    one = {k: v[:1] for k, v in feeds.items()}
    calls = {k: functools.partial(session(m).run, None, one) for k, m in models.items()}
    times = interleaved_times(calls, runs, warmup=3)
    return {k: float(np.median(v)) for k, v in times.items()}
