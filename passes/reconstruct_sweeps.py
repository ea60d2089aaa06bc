"""Calibration sweeps of the ``reconstruct`` pass: which layers are fitted together, and what a sweep sums.

:func:`upstream` and :func:`waves` order the selected layers so that each is fitted on inputs taken
after the re-fits of the layers it depends on; :func:`chunks` bounds one sweep's memory;
:func:`collect` runs student and teacher over the calibration batches once and accumulates each
layer's normal equations (:class:`Sums`, with held-out rows apart) through :func:`accumulate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from onnxopt.calibration.capture import layer_rows, output_rows, stream_values
from onnxopt.calibration.data import CalibrationData
from onnxopt.graph import GraphView
from onnxopt.passes.reconstruct_layers import Layer
from onnxopt.passes.reconstruct_solve import LayerStats

GRAM_BUDGET = 1 << 30  # bytes of normal equations accumulated in one calibration sweep
HOLD_OUT_EVERY = 4  # with this many batches or more, every 4th one validates the fits (not fitted on)


# ----------------------------------------------------------------------------- scheduling


def upstream(view: GraphView, layers: list[Layer]) -> list[int]:
    """For each layer, a bit mask of the layers its input depends on (bit i: ``layers[i]``)."""
    bits = {id(layer.node): 1 << i for i, layer in enumerate(layers)}
    deps: dict[str, int] = {}
    for node in view.nodes:
        mask = bits.get(id(node), 0)
        for name in view.all_inputs(node):
            mask |= deps.get(name, 0)
        for out in node.output:
            if out:
                deps[out] = mask
    return [deps.get(layer.input, 0) for layer in layers]


def waves(pending: list[int], deps: list[int], sequential: bool) -> list[int]:
    """The next layers to re-fit together: all pending (parallel) or those depending on no pending layer."""
    if not sequential:
        return list(pending)
    waiting = 0
    for i in pending:
        waiting |= 1 << i
    return [i for i in pending if not deps[i] & waiting]


def chunks(indices: list[int], layers: list[Layer]) -> list[list[int]]:
    """``indices`` split so that one sweep's normal equations fit :data:`GRAM_BUDGET`."""
    out: list[list[int]] = [[]]
    used = 0
    for i in indices:
        size = LayerStats.nbytes(layers[i].groups, layers[i].k, layers[i].n)
        if out[-1] and used + size > GRAM_BUDGET:
            out.append([])
            used = 0
        out[-1].append(i)
        used += size
    return out


# ----------------------------------------------------------------------------- statistics


def accumulate(layer: Layer, x: np.ndarray, y: np.ndarray, stats: LayerStats) -> bool:
    """Add one batch of student inputs ``x`` and teacher outputs ``y``; False when the shapes do not correspond."""
    node, groups = layer.node, layer.groups
    if layer.node.op_type == "Conv":
        if x.ndim != len(layer.shape) or y.ndim != x.ndim or x.shape[0] != y.shape[0]:
            return False
        parts = [(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]  # im2col one sample at a time
    else:
        parts = [(x, y)]
    for xs, ys in parts:
        rows = layer_rows(node, xs, layer.shape)
        channels = ys.shape[1] if node.op_type == "Conv" else (ys.shape[-1] if ys.ndim else 0)
        if rows.shape[2] != layer.k or channels != layer.n * groups or ys.size != rows.shape[1] * channels:
            return False
        targets = output_rows(node, ys, groups)
        if targets.shape != (groups, rows.shape[1], layer.n):
            return False
        stats.add(rows, targets)
    return True


@dataclass
class Sums:
    """A layer's normal equations from one sweep: fitting rows and, with enough batches, held-out rows."""

    fit: LayerStats
    held_out: LayerStats | None = None

    def total(self) -> LayerStats:
        """The sums over all calibration rows."""
        return self.fit if self.held_out is None else self.fit.plus(self.held_out)


def _empty_sums(layer: Layer, validate: bool) -> Sums:
    zeros = LayerStats.zeros
    return Sums(zeros(layer.groups, layer.k, layer.n), zeros(layer.groups, layer.k, layer.n) if validate else None)


def collect(
    student: ModelProto, teacher: ModelProto, layers: list[Layer], data: CalibrationData, batch_size: int, samples: int
) -> dict[int, Sums]:
    """One calibration sweep: normal equations of ``layers`` (keyed by position); layers whose shapes do not match are left out.

    ``samples`` (0: all) limits the calibration samples, in batches of ``batch_size``. With at least
    :data:`HOLD_OUT_EVERY` batches, every ``HOLD_OUT_EVERY``-th batch is summed apart to validate the fits.
    """
    limit = math.ceil(samples / batch_size) if samples else None
    data.validate(student)
    batches = data.num_batches(batch_size) if limit is None else min(limit, data.num_batches(batch_size))
    validate = batches >= HOLD_OUT_EVERY
    inputs = list(dict.fromkeys(layer.input for layer in layers))
    outputs = list(dict.fromkeys(layer.output for layer in layers))
    sums = {i: _empty_sums(layer, validate) for i, layer in enumerate(layers)}
    live = set(sums)
    kwargs = {"batch_size": batch_size, "limit": limit}
    streams = zip(stream_values(student, inputs, data, **kwargs), stream_values(teacher, outputs, data, **kwargs))
    for index, (xs, ys) in enumerate(streams):
        held = validate and index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
        for i in sorted(live):
            target = sums[i].held_out if held else sums[i].fit
            if not accumulate(layers[i], np.asarray(xs[layers[i].input]), np.asarray(ys[layers[i].output]), target):  # type: ignore[arg-type]
                live.discard(i)
    return {i: sums[i] for i in sorted(live) if sums[i].fit.rows}
