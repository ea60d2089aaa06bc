"""Similarity merging for structured pruning: a filter parallel to another is folded into it, then removed.

When the producer's effective filter of channel j (its weight row and bias, with the per-channel
affine ops that follow folded in: BatchNormalization, Add/Sub/Mul/Div by constants) equals
``alpha`` times that of channel i with ``alpha > 0``, the pre-activation of j is ``alpha`` times
that of i; through positively homogeneous ops (Relu, LeakyRelu, max/average pooling, Pad, Resize,
Concat/Split/Flatten, a scalar Mul) it stays so, and every consumer computes ``W[:, i] a_i +
W[:, j] alpha a_i``. Adding ``alpha * W[:, j]`` into ``W[:, i]`` and removing j therefore leaves the
outputs unchanged (exactly for exactly parallel filters; nearly for cosine above the threshold).
A zero filter (its channel is a constant 0 after the path) is removed with ``alpha = 0``.

Groups under a grouped-conv constraint (``segments`` > 1) are skipped: merges remove channels one
by one, not in equal numbers per segment. Only groups with one producer qualify, and only when every path from the producer to a consumer
is of that form (:func:`merge_path`). The consumer update is done in place; the removal itself is
:func:`onnxopt.passes.channel_surgery.apply_pruning`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, NodeProto

from onnxopt.graph import GraphView, node_label
from onnxopt.passes.channel_groups import ChannelAnalysis, ChannelGroup
from onnxopt.passes.channel_scoring import producer_rows
from onnxopt.passes.noop_rules import get_attr

AFFINE_OPS = frozenset({"BatchNormalization", "Add", "Sub", "Mul", "Div"})
HOMOGENEOUS_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "Identity", "Dropout", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool", "Pad", "Resize", "Upsample", "Concat", "Split", "Flatten", "Reshape", "Squeeze", "Unsqueeze",
    }
)  # fmt: skip
CONSUMER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
log = logging.getLogger("onnxopt")
ZERO_NORM = 1e-12  # relative to the largest filter: a filter this small is a zero filter


class NotMergeable(Exception):
    """The group's path is not linear/positively homogeneous (the message says where; ``kind`` groups the reasons)."""

    def __init__(self, message: str, kind: str = "a path op is not linear or positively homogeneous") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Affine:
    """Per-channel ``y = scale * x + shift`` accumulated along the producer's affine chain."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass
class MergePlan:
    """For one group: ``(removed, survivor, alpha)`` triples and the resulting keep mask."""

    group: int
    pairs: list[tuple[int, int, float]] = field(default_factory=list)

    def mask(self, channels: int) -> np.ndarray:
        """Channels that stay."""
        keep = np.ones(channels, bool)
        keep[[j for j, _, _ in self.pairs]] = False
        return keep


def _channel_vector(array: np.ndarray, channels: int, rel: int) -> np.ndarray | None:
    """A constant broadcast over the channel axis ``rel`` (from the end) as a [C] vector; None when it varies elsewhere."""
    if array.size == 1:
        return np.full(channels, float(array.reshape(-1)[0]))
    axis = array.ndim + rel
    if axis < 0 or array.shape[axis] != channels or array.size != channels:
        return None
    return array.reshape(-1).astype(np.float64)


def _affine_step(node: NodeProto, value: str, arrays: Mapping[str, np.ndarray], affine: Affine, rel: int) -> bool:
    """Fold one affine node reading ``value`` into ``affine``; False when the node is not such an op."""
    c = affine.scale.size
    if node.op_type == "BatchNormalization":
        if len(node.input) != 5 or any(n not in arrays for n in node.input[1:]):
            return False
        gamma, beta, mean, var = (arrays[n].astype(np.float64).reshape(-1) for n in node.input[1:5])
        k = gamma / np.sqrt(var + float(get_attr(node, "epsilon", 1e-5)))  # type: ignore[arg-type]
        affine.scale, affine.shift = affine.scale * k, k * (affine.shift - mean) + beta
        return True
    if len(node.input) != 2:
        return False
    first = node.input[0] == value
    other = node.input[1] if first else node.input[0]
    vec = _channel_vector(arrays[other], c, rel) if other in arrays else None
    if vec is None:
        return False
    if node.op_type == "Add":
        affine.shift = affine.shift + vec
    elif node.op_type == "Sub":
        affine.scale, affine.shift = (affine.scale, affine.shift - vec) if first else (-affine.scale, vec - affine.shift)
    elif node.op_type == "Mul":
        affine.scale, affine.shift = affine.scale * vec, affine.shift * vec
    elif node.op_type == "Div" and first and np.all(vec != 0):
        affine.scale, affine.shift = affine.scale / vec, affine.shift / vec
    else:
        return False
    return True


def merge_path(analysis: ChannelAnalysis, view: GraphView, arrays: Mapping[str, np.ndarray], group: ChannelGroup) -> Affine:
    """The affine map from the producer's pre-bias output to the path's linear part; NotMergeable otherwise."""
    if len(group.spaces) != 1:
        raise NotMergeable("the group has several producers", "several producers")
    space = analysis.spaces[group.spaces[0]]
    producer = analysis.nodes[space.node]
    bias = producer.input[2] if len(producer.input) > 2 and producer.input[2] else ""
    scaled = float(get_attr(producer, "alpha", 1.0)) != 1.0 or (bias and float(get_attr(producer, "beta", 1.0)) != 1.0)  # type: ignore[arg-type]
    if producer.op_type == "Gemm" and scaled:
        raise NotMergeable(f"{node_label(producer)} has alpha or beta != 1", "a Gemm producer with alpha or beta != 1")
    shift = np.zeros(space.size)
    if bias:
        vec = _channel_vector(arrays[bias], space.size, -1) if bias in arrays else None
        if vec is None:
            raise NotMergeable(f"{node_label(producer)} has a bias that is not per-channel", "a producer bias that is not per-channel")
        shift = vec
    affine = Affine(np.ones(space.size), shift)
    value = space.value
    rel = analysis.maps[value].rel
    while True:
        readers = view.consumers.get(value, [])
        if len(readers) != 1 or readers[0].op_type not in AFFINE_OPS or not _affine_step(readers[0], value, arrays, affine, rel):
            break
        value = readers[0].output[0]
    _check_homogeneous(analysis, view, arrays, group, value)
    return affine


def _check_homogeneous(
    analysis: ChannelAnalysis, view: GraphView, arrays: Mapping[str, np.ndarray], group: ChannelGroup, start: str
) -> None:
    """Every path from ``start`` reaches consumers through positively homogeneous ops only."""
    consumer_slices = {(s.node, s.value) for s in group.slices if s.role == "consumer"}
    index = {id(n): i for i, n in enumerate(analysis.nodes)}
    stack, seen = [start], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        for node in view.consumers.get(value, []):
            if node.op_type in CONSUMER_OPS and (index[id(node)], value) in consumer_slices:
                continue
            if not _homogeneous(node, value, arrays):
                raise NotMergeable(f"{node_label(node)} on the path is not positively homogeneous")
            stack.extend(o for o in node.output if o in analysis.maps)


def _homogeneous(node: NodeProto, value: str, arrays: Mapping[str, np.ndarray]) -> bool:
    if node.op_type == "Mul" and len(node.input) == 2:
        other = node.input[1] if node.input[0] == value else node.input[0]
        return other in arrays and arrays[other].size == 1
    if node.op_type == "Pad":
        mode = get_attr(node, "mode", "constant")
        value_input = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        pad_value = float(arrays[value_input].reshape(-1)[0]) if value_input in arrays else float(get_attr(node, "value", 0.0))  # type: ignore[arg-type]
        return mode != "constant" or (pad_value == 0.0 and (not value_input or value_input in arrays))
    return node.op_type in HOMOGENEOUS_OPS and node.input[0] == value and not any(i == value for i in node.input[1:])


def plan_merges(rows: np.ndarray, threshold: float, max_merges: int) -> list[tuple[int, int, float]]:
    """Greedy merging of ``rows`` (effective filters, one per channel): ``(removed, survivor, alpha)``.

    Filters are visited from the largest norm down; one whose cosine with an earlier survivor is
    at least ``threshold`` merges into the most similar one, with ``alpha = <v_j, v_i> / |v_i|^2``.
    Zero filters are removed with ``alpha = 0``. At most ``max_merges`` channels are removed.
    """
    norms = np.linalg.norm(rows, axis=1)
    top = float(norms.max()) if norms.size else 0.0
    order = np.argsort(-norms, kind="stable")
    unit = rows / np.where(norms > 0, norms, 1.0)[:, None]
    survivors: list[int] = []
    pairs: list[tuple[int, int, float]] = []
    for j in order:
        if len(pairs) >= max_merges:
            break
        if norms[j] <= ZERO_NORM * top:
            if survivors:
                pairs.append((int(j), survivors[0], 0.0))
            continue
        if survivors:
            cos = unit[survivors] @ unit[j]
            best = int(np.argmax(cos))
            if cos[best] >= threshold:
                i = survivors[best]
                pairs.append((int(j), i, float(rows[j] @ rows[i] / (norms[i] ** 2))))
                continue
        survivors.append(int(j))
    return pairs


def effective_rows(analysis: ChannelAnalysis, arrays: Mapping[str, np.ndarray], group: ChannelGroup, affine: Affine) -> np.ndarray:
    """``[scale_c * W_c, shift_c]`` per channel: the filter and bias the path's linear part sees."""
    rows = producer_rows(analysis, arrays, analysis.spaces[group.spaces[0]])
    return np.concatenate([rows * affine.scale[:, None], affine.shift[:, None]], axis=1)


def fold_consumers(model_arrays: Mapping[str, np.ndarray], analysis: ChannelAnalysis, group: ChannelGroup, pairs) -> set[str]:
    """Add ``alpha *`` each removed channel's consumer weight slices into its survivor's (arrays updated in place)."""
    touched: set[str] = set()
    consumers = {(s.constant, s.axis) for s in group.slices if s.role == "consumer"}
    for removed, survivor, alpha in pairs:
        if alpha == 0.0:
            continue
        gone = [r for r in analysis.removal(group, removed) if (r[0], r[1]) in consumers]
        kept = [r for r in analysis.removal(group, survivor) if (r[0], r[1]) in consumers]
        for (name, axis, a0, a1), (_, _, b0, b1) in zip(gone, kept):
            array = model_arrays[name]
            target = [slice(None)] * array.ndim
            source = list(target)
            target[axis], source[axis] = slice(b0, b1), slice(a0, a1)
            array[tuple(target)] += (alpha * array[tuple(source)].astype(np.float64)).astype(array.dtype)
            touched.add(name)
    return touched


def merge_groups(
    model: ModelProto,
    analysis: ChannelAnalysis,
    arrays: Mapping[str, np.ndarray],
    groups: list[ChannelGroup],
    threshold: float,
    floors: dict[int, int],
) -> tuple[list[MergePlan], dict[str, int]]:
    """A plan for every group that qualifies (at most ``channels - floors[g]`` merges each) and why others do not (counts)."""
    view = GraphView.build(model.graph)
    plans: list[MergePlan] = []
    skipped: dict[str, int] = {}
    for group in groups:
        if group.segments > 1:  # merging removes channels one by one, not equally per grouped-conv segment
            skipped["grouped conv (equal counts per group)"] = skipped.get("grouped conv (equal counts per group)", 0) + 1
            continue
        try:
            affine = merge_path(analysis, view, arrays, group)
        except NotMergeable as exc:
            skipped[exc.kind] = skipped.get(exc.kind, 0) + 1
            log.debug("merge_similar: group '%s' not mergeable: %s", group.name, exc)
            continue
        pairs = plan_merges(effective_rows(analysis, arrays, group, affine), threshold, group.channels - floors[group.index])
        if pairs:
            plans.append(MergePlan(group.index, pairs))
    return plans, skipped
