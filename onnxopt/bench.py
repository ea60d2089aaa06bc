"""Latency of ONNX models in onnxruntime (and, with a CUDA device, of TensorRT engines) on the same inputs.

``benchmark([a, b], engines=[...])`` creates one session per model (graph optimizations on,
``threads`` intra-op threads), warms each up, then times the runs interleaved, one run of every
model per round, so drifts in clock speed or load hit all models alike. Inputs come from
:mod:`onnxopt.verify` exactly as ``onnxopt verify`` makes them. An engine is timed with
:class:`onnxopt.engine.runtime.EngineRunner` (execute + synchronize, inputs already on the device);
without a CUDA device its entry is ``skipped`` with the reason, and nothing raises.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto

from onnxopt.errors import OnnxoptError, OptionError, RequirementError, one_line
from onnxopt.ort import import_onnxruntime
from onnxopt.verify import create_session, generate_inputs, load_inputs, model_inputs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ModelSource = ModelProto | str | os.PathLike[str]
Progress = Callable[[int, int], None]


def ort_session(model: ModelSource, *, threads: int = 1, provider: str = "cpu") -> Any:
    """An onnxruntime session of a path or a ModelProto with every graph optimization on (what deployment runs)."""
    ort = import_onnxruntime()
    if provider not in PROVIDERS:
        raise OptionError(f"unknown provider '{provider}' (choose from {', '.join(PROVIDERS)})")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise RequirementError(f"this onnxruntime has no {PROVIDERS[provider]}: install onnxopt[gpu] (onnxruntime-gpu) for provider cuda")
    if threads < 1:
        raise OptionError(f"threads must be at least 1, not {threads}")
    try:
        return create_session(model, optimize=True, threads=threads, provider=PROVIDERS[provider])
    except OnnxoptError:
        raise
    except Exception as exc:  # noqa: BLE001  (onnxruntime raises several types for bad models)
        raise OnnxoptError(f"onnxruntime cannot load the model: {one_line(exc, 300)}") from exc


def interleaved_times(
    calls: Mapping[str, Callable[[], object]], runs: int, warmup: int = 0, progress: Progress | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each callable: ``warmup`` untimed rounds, then ``runs`` rounds of one call of each, in order."""
    if runs < 1:
        raise OptionError(f"runs must be at least 1, not {runs}")
    if warmup < 0:
        raise OptionError(f"warmup must not be negative, not {warmup}")
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for done in range(1, runs + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress(done, runs)
    return times


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one model's per-run times, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> LatencyStats:
        """Median, 90th percentile (linear interpolation), mean and minimum of ``seconds``."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 90)), float(ms.mean()), float(ms.min()), int(ms.size))


@dataclass
class BenchEntry:
    """One model or engine: its statistics and median ratio to the first model, or why it was skipped."""

    name: str
    kind: str  # "onnxruntime" or "engine"
    stats: LatencyStats | None = None
    ratio: float | None = None
    skipped: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: name, kind, median_ms, p90_ms, mean_ms, min_ms, runs, ratio, skipped."""
        stats = self.stats
        keys = ("median_ms", "p90_ms", "mean_ms", "min_ms", "runs")
        values = {k: (getattr(stats, k) if stats else None) for k in keys}
        return {"name": self.name, "kind": self.kind, **values, "ratio": self.ratio, "skipped": self.skipped or None}


@dataclass
class BenchResult:
    """Every entry (models first, then engines) and the settings they were measured with."""

    entries: list[BenchEntry]
    runs: int
    warmup: int
    threads: int
    provider: str
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def entry(self, name: str) -> BenchEntry:
        """The entry of ``name`` (KeyError when absent)."""
        for item in self.entries:
            if item.name == name:
                return item
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "runs": self.runs,
            "warmup": self.warmup,
            "threads": self.threads,
            "provider": self.provider,
            "inputs": self.inputs,
            "notes": list(self.notes),
            "results": [e.to_dict() for e in self.entries],
        }


def _named(models: Sequence[ModelSource] | Mapping[str, ModelSource]) -> dict[str, ModelSource]:
    if isinstance(models, Mapping):
        named = dict(models)
    else:
        named = {}
        for i, model in enumerate(models):
            name = f"model{i}" if isinstance(model, ModelProto) else os.fspath(model)
            named[name if name not in named else f"{name}#{i}"] = model
    if not named:
        raise OptionError("give at least one model to benchmark")
    return named


def bench_inputs(
    model: ModelProto,
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The feeds ``onnxopt verify`` would use: an .npz file, a mapping, or seeded inputs from ``model``'s specs."""
    if inputs is None:
        return generate_inputs(model, input_shapes, seed=seed)
    if isinstance(inputs, Mapping):
        return {k: np.asarray(v) for k, v in inputs.items()}, []
    return load_inputs(inputs, model), []


def _check_same_inputs(name: str, model: ModelProto, feeds: Mapping[str, Any]) -> None:
    wanted = sorted(v.name for v in model_inputs(model))
    if wanted != sorted(feeds):
        raise OnnxoptError(f"model '{name}' has inputs {wanted}, the first model {sorted(feeds)} (all run on the same inputs)")


def _ort_call(name: str, session: Any, feeds: Mapping[str, Any]) -> Callable[[], object]:
    """One run of ``session`` as a callable; a first run here turns an onnxruntime failure into one line."""
    call = functools.partial(session.run, None, dict(feeds))
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        raise OnnxoptError(f"onnxruntime failed to run '{name}': {one_line(exc, 300)}") from exc
    return call


def _open_engine(path: ModelSource, backend: str, feeds: Mapping[str, Any], stack: contextlib.ExitStack) -> tuple[Any, str]:
    """An EngineRunner with ``feeds`` on the device, or None and the reason when no CUDA device answers."""
    from onnxopt.engine.runtime import DeviceUnavailableError, EngineRunner, read_plan

    plan, _ = read_plan(path)  # a missing or empty file is an error, device or not
    try:
        runner = stack.enter_context(EngineRunner(plan, backend))
    except DeviceUnavailableError as exc:
        return None, str(exc)
    runner.prepare(feeds)
    return runner, ""


def benchmark(
    models: Sequence[ModelSource] | Mapping[str, ModelSource],
    *,
    engines: Sequence[str | os.PathLike[str]] = (),
    runs: int = 50,
    warmup: int = 5,
    threads: int = 1,
    provider: str = "cpu",
    inputs: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    backend: str = "auto",
    progress: Progress | None = None,
) -> BenchResult:
    """Time ``models`` (paths or ModelProtos; a mapping names them) and ``engines`` interleaved on the same inputs.

    Inputs are generated from the first model (or read from ``inputs``); every model must take the
    same input names. Ratios are each median over the first model's median.
    """
    from onnxopt.io import load

    named = _named(models)
    protos = {name: load(model) for name, model in named.items()}
    first = next(iter(protos.values()))
    feeds, notes = bench_inputs(first, inputs, input_shapes, seed)
    for name, proto in protos.items():
        _check_same_inputs(name, proto, feeds)
    entries = [BenchEntry(name, "onnxruntime") for name in named]
    with contextlib.ExitStack() as stack:
        calls = {name: _ort_call(name, ort_session(named[name], threads=threads, provider=provider), feeds) for name in named}
        for i, path in enumerate(engines):
            name = os.fspath(path)
            entry = BenchEntry(name if all(e.name != name for e in entries) else f"{name}#{i}", "engine")
            runner, entry.skipped = _open_engine(path, backend, feeds, stack)
            if runner is not None:
                calls[entry.name] = runner.execute
            entries.append(entry)
        times = interleaved_times(calls, runs, warmup, progress)
    _summarize(entries, times)
    shapes = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
    return BenchResult(entries, runs, warmup, threads, provider, shapes, notes)


def _summarize(entries: list[BenchEntry], times: Mapping[str, Sequence[float]]) -> None:
    """Fill each timed entry's statistics and its median ratio to the first entry's."""
    base = None
    for entry in entries:
        if entry.name in times:
            entry.stats = LatencyStats.from_seconds(times[entry.name])
            base = entry.stats.median_ms if base is None else base
            entry.ratio = entry.stats.median_ms / base if base > 0 else None
