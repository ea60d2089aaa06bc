"""How much each channel of a channel group matters: L1/L2 filter norms, BatchNorm gamma, or calibration activations.

A group's score for channel c sums one term per producer, each normalised by that producer's
mean so that producers of different scales weigh the same:

* ``l1`` / ``l2``: the norm of the producer's weight slice for output channel c;
* ``bn_gamma``: ``|gamma_c| / sqrt(var_c + eps)`` of the BatchNormalization that reads the
  producer's output (groups with a producer and no such BatchNormalization use ``l1``);
* ``activation``: the mean ``|x_c|`` over calibration batches of the producer's activation: its
  output followed forward through single-reader per-channel ops (BatchNormalization, activations,
  elementwise ops with constants), i.e. the tensor just before its first branch or consumer.
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, NodeProto

from onnxopt.graph import GraphView
from onnxopt.passes.channel_groups import ELEMENTWISE_OPS, UNARY_OPS, ChannelAnalysis, ChannelGroup, Space
from onnxopt.passes.noop_rules import get_attr

ACTIVATION_BATCHES = 16  # calibration batches read for activation statistics
CALIB_BATCH = 8


def _normalised(values: np.ndarray) -> np.ndarray:
    mean = float(np.mean(values))
    return values / mean if mean > 0 else values


def producer_rows(analysis: ChannelAnalysis, arrays: dict[str, np.ndarray], space: Space) -> np.ndarray:
    """The producer's weight as [C, -1] float64 (one row per output channel)."""
    weight = arrays[space.weight]
    return np.moveaxis(weight.astype(np.float64), space.weight_axis, 0).reshape(space.size, -1)


def norm_scores(analysis: ChannelAnalysis, arrays: dict[str, np.ndarray], group: ChannelGroup, order: int) -> np.ndarray:
    """Sum over producers of the (mean-normalised) L1 or L2 norm of each output filter."""
    total = np.zeros(group.channels)
    for index in group.spaces:
        rows = producer_rows(analysis, arrays, analysis.spaces[index])
        total += _normalised(np.linalg.norm(rows, ord=order, axis=1) if order == 2 else np.abs(rows).sum(axis=1))
    return total


def _batchnorm_after(view: GraphView, value: str) -> NodeProto | None:
    readers = view.consumers.get(value, [])
    for node in readers:
        if node.op_type == "BatchNormalization" and node.input[0] == value and len(readers) == 1:
            return node
    return None


def bn_scores(analysis: ChannelAnalysis, arrays: dict[str, np.ndarray], view: GraphView, group: ChannelGroup) -> np.ndarray | None:
    """``|gamma| / sqrt(var + eps)`` summed over producers, or None when a producer has no BatchNormalization after it."""
    total = np.zeros(group.channels)
    for index in group.spaces:
        bn = _batchnorm_after(view, analysis.spaces[index].value)
        if bn is None or any(name not in arrays for name in bn.input[1:5]):
            return None
        gamma, var = arrays[bn.input[1]].astype(np.float64), arrays[bn.input[4]].astype(np.float64)
        eps = float(get_attr(bn, "epsilon", 1e-5))  # type: ignore[arg-type]
        total += _normalised(np.abs(gamma) / np.sqrt(var + eps))
    return total


def activation_value(analysis: ChannelAnalysis, view: GraphView, space: Space) -> str:
    """The producer's activation: its output followed through single-reader per-channel ops."""
    value = space.value
    segments = analysis.maps[value].segments
    while True:
        readers = view.consumers.get(value, [])
        if len(readers) != 1 or value in view.graph_outputs or not readers[0].output:
            return value
        node = readers[0]
        following = node.output[0]
        tracked = sum(1 for name in node.input if name in analysis.maps)
        per_channel = node.op_type in UNARY_OPS or node.op_type in ("BatchNormalization", "InstanceNormalization")
        per_channel = per_channel or (node.op_type in ELEMENTWISE_OPS and tracked == 1)
        cmap = analysis.maps.get(following)
        if not per_channel or cmap is None or cmap.segments != segments or cmap.inner != 1:
            return value
        value = following


def activation_scores(model: ModelProto, analysis: ChannelAnalysis, groups: list[ChannelGroup], data) -> dict[int, np.ndarray]:
    """Mean |activation| per channel, per group (summed over producers, each normalised), from calibration data."""
    from onnxopt.calibration.capture import stream_values

    view = GraphView.build(model.graph)
    wanted = {s: activation_value(analysis, view, analysis.spaces[s]) for g in groups for s in g.spaces}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    names = sorted(set(wanted.values()))
    for values in stream_values(model, names, data, batch_size=CALIB_BATCH, limit=ACTIVATION_BATCHES):
        for name in names:
            cmap = analysis.maps[name]
            x = np.abs(np.asarray(values[name], dtype=np.float64))
            moved = np.moveaxis(x, cmap.axis, 0).reshape(x.shape[cmap.axis], -1)
            sums[name] = sums.get(name, 0) + moved.sum(axis=1)
            counts[name] = counts.get(name, 0) + moved.shape[1]
    scores: dict[int, np.ndarray] = {}
    for group in groups:
        total = np.zeros(group.channels)
        for s in group.spaces:
            name = wanted[s]
            total += _normalised(sums[name] / max(counts[name], 1))
        scores[group.index] = total
    return scores
