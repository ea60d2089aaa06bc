"""Activation statistics: :func:`collect_stats` runs the model in onnxruntime in batches, in bounded memory.

Two sweeps (running min/max and per-channel means, then fixed-size histograms over the range
found), so memory is O(tensors x bins) plus one batch, never all activations. Histograms are of
x (signed) over ``[-absmax, absmax]`` with ``2 * bins`` bins, so that the histogram of |x|
(:meth:`TensorStats.abs_histogram`) has exactly ``bins`` bins over ``[0, absmax]``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from onnxopt.calibration.capture import probe_session
from onnxopt.calibration.data import FLOAT_TYPES, CalibrationData, CalibrationError


@dataclass
class TensorStats:
    """Statistics of one tensor over the calibration data.

    ``histogram`` counts the finite values of x in ``2 * bins`` equal bins over ``edges`` =
    ``linspace(-absmax, absmax, 2 * bins + 1)`` (``linspace(-1, 1, ...)`` for an all-zero tensor);
    ``count`` is the number of finite values, ``nonfinite`` the NaN/inf values left out (a tensor with no
    finite value has a zero range and ``count`` 0: users check ``nonfinite``).
    ``mean_axis1`` / ``mean_last`` are per-channel means along axis 1 and the last axis
    (None when that dim changes between batches or the tensor has rank < 2).
    """

    name: str
    min: float
    max: float
    absmax: float
    histogram: np.ndarray
    edges: np.ndarray
    count: int
    nonfinite: int = 0
    mean: float = 0.0
    mean_axis1: np.ndarray | None = None
    mean_last: np.ndarray | None = None

    @property
    def bins(self) -> int:
        """Bins of the |x| histogram (half of ``histogram``'s)."""
        return len(self.histogram) // 2

    def abs_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts of |x| in ``bins`` bins over [0, absmax] and their edges (folded from the signed histogram).

        A negative value exactly on a bin edge counts in the bin below its magnitude (the signed bins are half-open).
        """
        half = self.bins
        counts = self.histogram[half:] + self.histogram[:half][::-1]
        return counts, self.edges[half:]


class _Accumulator:
    def __init__(self, name: str) -> None:
        self.name = name
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.nonfinite = 0
        self.total = 0.0
        self.axis1: np.ndarray | None = None
        self.axis1_count = 0
        self.last: np.ndarray | None = None
        self.last_count = 0
        self.channel_ok = True
        self.hist: np.ndarray | None = None
        self.edges: np.ndarray | None = None

    def update_range(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = np.isfinite(x)
            self.nonfinite += int(x.size - np.count_nonzero(finite))
            self.channel_ok = False
            x = x[finite]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(x.size)
        self.total += float(x.sum(dtype=np.float64))
        if self.channel_ok and x.ndim >= 2:
            self.axis1, self.axis1_count = self._channel_sum(x, 1, self.axis1, self.axis1_count)
            self.last, self.last_count = self._channel_sum(x, x.ndim - 1, self.last, self.last_count)
        elif x.ndim < 2:
            self.channel_ok = False

    def _channel_sum(self, x: np.ndarray, axis: int, acc: np.ndarray | None, n: int):
        others = tuple(i for i in range(x.ndim) if i != axis)
        sums = x.sum(axis=others, dtype=np.float64)
        if acc is not None and acc.shape != sums.shape:
            self.channel_ok = False
            return None, 0
        return (sums if acc is None else acc + sums), n + x.size // max(1, x.shape[axis])

    def start_histogram(self, bins: int) -> None:
        absmax = max(abs(self.min), abs(self.max)) if self.count else 0.0
        self.edges = np.linspace(-absmax, absmax, 2 * bins + 1) if absmax > 0 else np.linspace(-1.0, 1.0, 2 * bins + 1)
        self.hist = np.zeros(2 * bins, np.int64)

    def update_histogram(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        if self.nonfinite:
            x = x[np.isfinite(x)]
        counts, _ = np.histogram(x, bins=len(self.hist), range=(float(self.edges[0]), float(self.edges[-1])))
        self.hist += counts

    def result(self) -> TensorStats:
        if not self.count:  # empty in every batch, or only inf/NaN (a mask): a zero range, nonfinite says which
            edges = self.edges if self.edges is not None else np.linspace(-1.0, 1.0, 3)
            hist = self.hist if self.hist is not None else np.zeros(len(edges) - 1, np.int64)
            return TensorStats(self.name, 0.0, 0.0, 0.0, hist, edges, 0, self.nonfinite)
        ok = self.channel_ok and self.axis1 is not None and self.last is not None
        return TensorStats(
            self.name,
            float(self.min),
            float(self.max),
            float(max(abs(self.min), abs(self.max))),
            self.hist,
            self.edges,
            self.count,
            self.nonfinite,
            self.total / self.count,
            self.axis1 / self.axis1_count if ok else None,
            self.last / self.last_count if ok else None,
        )


def collect_stats(
    model: ModelProto | str | os.PathLike[str],
    tensors: Sequence[str],
    data: CalibrationData,
    *,
    batch_size: int = 8,
    bins: int = 2048,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 1,
) -> dict[str, TensorStats]:
    """Min/max and histograms of the float tensors ``tensors`` over ``data``, run in onnxruntime in batches.

    Two sweeps over the data (min/max and per-channel means, then histograms with ``2 * bins`` bins
    over [-absmax, absmax]); memory is O(len(tensors) * bins) plus one batch of activations.
    Initializers are measured from their values. ``progress(done, total)`` is called after each
    batch of both sweeps (default: ``data.progress``, which the CLI sets to draw a bar). The
    session has graph optimizations off so every tensor keeps its name; a model over 2 GB runs
    from external data. ``model`` is not modified.
    """
    from onnxopt.io import load

    progress = progress or data.progress
    if bins <= 0:
        raise CalibrationError(f"histogram bins must be positive, got {bins}")
    model = load(model) if not isinstance(model, ModelProto) else model
    names = list(dict.fromkeys(tensors))
    if not names:
        return {}
    data.validate(model)
    graph = model.graph
    produced = {o for node in graph.node for o in node.output if o}
    inputs = {v.name for v in graph.input}
    inits = {t.name: t for t in graph.initializer}
    for name in names:
        if name not in produced and name not in inputs and name not in inits:
            raise CalibrationError(f"tensor '{name}' is not produced in the model's main graph (subgraph tensors cannot be calibrated)")
    accs = {name: _Accumulator(name) for name in names}

    const_names = [n for n in names if n in inits and n not in produced]
    for name in const_names:
        _stats_of_constant(accs[name], inits[name], bins)
    run_names = [n for n in names if n not in const_names]
    if not run_names:
        return {n: accs[n].result() for n in names}

    session = probe_session(model, run_names, threads=threads, what="for calibration")
    types = {o.name: o.type for o in session.get_outputs()}
    for name in run_names:
        if types.get(name) not in FLOAT_TYPES:
            raise CalibrationError(f"tensor '{name}' is {types.get(name, 'unknown')}; calibration collects float tensors only")
    total = 2 * data.num_batches(batch_size)
    done = 0
    for sweep in (0, 1):
        if sweep == 1:
            for name in run_names:
                accs[name].start_histogram(bins)
        for feeds in data.batches(batch_size):
            try:
                values = session.run(run_names, feeds)
            except Exception as exc:
                raise data.failed_batch(exc) from exc
            for name, value in zip(run_names, values):
                if sweep == 0:
                    accs[name].update_range(value)
                else:
                    accs[name].update_histogram(value)
            del values
            done += 1
            if progress is not None:
                progress(done, total)
    return {n: accs[n].result() for n in names}


def stats_from_array(name: str, array: np.ndarray, bins: int = 2048) -> TensorStats:
    """The same statistics as :func:`collect_stats` for one float array (a weight, or values in hand)."""
    array = np.asarray(array)
    if array.dtype.kind != "f":
        raise CalibrationError(f"tensor '{name}' is {array.dtype}; calibration collects float tensors only")
    acc = _Accumulator(name)
    acc.update_range(array)
    acc.start_histogram(bins)
    acc.update_histogram(array)
    return acc.result()


def _stats_of_constant(acc: _Accumulator, tensor, bins: int) -> None:
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor)
    if array.dtype.kind != "f":
        raise CalibrationError(f"tensor '{acc.name}' is {array.dtype}; calibration collects float tensors only")
    acc.update_range(array)
    acc.start_histogram(bins)
    acc.update_histogram(array)
