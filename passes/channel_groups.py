"""Channel dependency analysis for structured pruning: which output channels are tied, and what each one touches.

A *channel space* is the output channels of one producer (a Conv, ConvTranspose, Gemm or MatMul
with a constant float weight). Every main-graph tensor derived from producers gets a
:class:`ChannelMap`: its channel axis (1 for NCHW tensors, the last axis for Gemm/MatMul outputs)
as a list of :class:`Segment` s of spaces (Concat puts several side by side, Split takes ranges;
``inner`` > 1 after a Flatten, where each channel covers ``inner`` consecutive entries). Ops of
two activations on the same channels (residual Add, Mul by an SE branch) tie their spaces: tied
spaces form one :class:`ChannelGroup`, pruned together with one keep mask.

Each constant that pruning must slice is an :class:`AxisSlice`: "axis ``axis`` of ``constant``
is indexed like the channel axis of ``value``" (producer weight and bias, BatchNormalization
parameters, per-channel operands of elementwise ops, depthwise weights, consumer weights).
Attributes and shape constants that follow a channel count are :class:`Edit` s (a depthwise
conv's ``group``, Split sizes, a flattening Reshape's target, Resize sizes).

A grouped conv (1 < group < channels) produces a space and consumes its input's channels like a
plain conv, under one constraint recorded as ``segments`` on the space (and the group: the lcm):
each of its ``group`` contiguous segments of output (input) channels keeps the same count, so the
conv stays valid with the same ``group``. Its weight is sliced along axis 0 as a producer, and
block-diagonally along axis 1 as a consumer (``AxisSlice.blocks``: the rows of output group j
keep the input positions input group j keeps).

Whatever reads a group's tensor with a channel meaning the rewrite cannot follow (a graph output,
Shape, Transpose, a Reshape that is not a flatten into Gemm/MatMul, Softmax over channels, a
grouped conv reading anything but one whole channel space or with one input channel per group, an
unknown op or domain, a subgraph) blocks the whole group; the reasons are kept.
The analysis never mutates the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TypeProto

from onnxopt.graph import GraphView, is_standard, node_label, opset_version
from onnxopt.passbase import matches_pattern
from onnxopt.passes.channel_maps import (
    ELEMENTWISE_OPS,
    PRODUCER_OPS,
    UNARY_OPS,
    AxisSlice,
    Blocked,
    ChannelMap,
    Constants,
    Edit,
    Segment,
    Space,
)
from onnxopt.passes.channel_rules import PRODUCER_RULES
from onnxopt.passes.channel_rules import RULES as CHANNEL_RULES
from onnxopt.passes.noop_rules import dims_of
from onnxopt.toposort import topological_order

__all__ = [
    "ELEMENTWISE_OPS",
    "PRODUCER_OPS",
    "UNARY_OPS",
    "AxisSlice",
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelMap",
    "Edit",
    "Segment",
    "Space",
    "analyze_channels",
]


@dataclass
class ChannelGroup:
    """Tied channel spaces: one keep mask of ``channels`` entries prunes them all, with every slice and edit listed.

    ``segments``: the mask's ``channels`` split into that many equal contiguous segments must keep
    the same number of channels in each (the lcm of the groups of the grouped convs that produce
    or read the group; 1 without grouped convs).
    """

    index: int
    name: str
    channels: int
    spaces: list[int]
    producers: list[int]
    slices: list[AxisSlice] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    segments: int = 1

    @property
    def prunable(self) -> bool:
        """Whether nothing blocks the group."""
        return not self.reasons

    def consumers(self) -> list[int]:
        """Node indices whose weights are sliced along their input channels."""
        return sorted({s.node for s in self.slices if s.role == "consumer"})


@dataclass
class ChannelAnalysis:
    """The result of :func:`analyze_channels` on a model's main graph."""

    graph: GraphProto
    nodes: list[NodeProto]
    maps: dict[str, ChannelMap]
    spaces: list[Space]
    groups: list[ChannelGroup]
    space_group: list[int]

    def group(self, name: str) -> ChannelGroup:
        """The group of that name, or the group holding the space of the producer node/output named ``name``."""
        for group in self.groups:
            if group.name == name:
                return group
        for space in self.spaces:
            if name in (space.value, self.nodes[space.node].name):
                return self.groups[self.space_group[space.index]]
        raise KeyError(name)

    def prunable(self) -> list[ChannelGroup]:
        """Groups nothing blocks."""
        return [g for g in self.groups if g.prunable]

    def value_mask(self, value: str, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Which entries of ``value``'s channel axis survive when group ``g`` keeps ``keep[g]`` (all others stay)."""
        cmap = self.maps[value]
        parts = []
        for seg in cmap.segments:
            group = self.space_group[seg.space] if seg.space is not None else None
            mask = keep.get(group) if group is not None else None
            parts.append(np.ones(seg.length, bool) if mask is None else np.asarray(mask, bool)[seg.start : seg.stop])
        flat = np.concatenate(parts) if parts else np.ones(0, bool)
        return np.repeat(flat, cmap.inner) if cmap.inner > 1 else flat

    def removal(self, group: ChannelGroup, channel: int) -> list[tuple[str, int, int, int]]:
        """What removing ``channel`` of ``group`` removes: (constant, axis, start, stop) index ranges.

        Block-diagonal slices (a grouped conv's weight read as a consumer, ``blocks`` > 1) are left
        out: their entries are no single range of one axis.
        """
        ranges = []
        for piece in group.slices:
            if piece.blocks > 1:
                continue
            cmap = self.maps[piece.value]
            offset = 0
            for seg in cmap.segments:
                if seg.space is not None and self.space_group[seg.space] == group.index and seg.start <= channel < seg.stop:
                    begin = (offset + channel - seg.start) * cmap.inner
                    ranges.append((piece.constant, piece.axis, begin, begin + cmap.inner))
                offset += seg.length
        return ranges


# ----------------------------------------------------------------------------- the walk


class Walk:
    """Walks the main graph once in topological order, assigning channel maps and collecting slices."""

    def __init__(self, model: ModelProto, types: dict[str, TypeProto], producer_ops: Sequence[str]) -> None:
        self.model = model
        self.view = GraphView.build(model.graph)
        self.types = types
        self.producer_ops = set(producer_ops)
        self.opset = opset_version(model) or 1
        self.consts = Constants(self.view)
        self.maps: dict[str, ChannelMap] = {}
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.slices: list[AxisSlice] = []
        self.edits: list[Edit] = []

    # -- union-find and blocking --------------------------------------------------------------

    def find(self, space: int) -> int:
        """The representative of a space's class."""
        root = space
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[space] != root:
            self.parent[space], space = root, self.parent[space]
        return root

    def union(self, a: int, b: int) -> None:
        """Tie two spaces (the smaller index becomes the representative)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, maps: Iterable[ChannelMap | None], reason: str) -> None:
        """Record ``reason`` on every space of ``maps``."""
        for cmap in maps:
            if cmap is None:
                continue
            for space in sorted(cmap.spaces()):
                if reason not in self.spaces[space].reasons:
                    self.spaces[space].reasons.append(reason)

    # -- helpers ------------------------------------------------------------------------------

    def dims(self, name: str) -> list[int | None] | None:
        """Known dims of a value (constants first, then inferred types)."""
        const = self.consts.dims(name)
        if const is not None:
            return list(const)
        return dims_of(self.types.get(name))

    def rank(self, name: str) -> int | None:
        """A value's rank, when known."""
        dims = self.dims(name)
        return None if dims is None else len(dims)

    def add_slice(self, constant: str, axis: int, value: str, node: int, role: str, blocks: int = 1) -> None:
        """Record an AxisSlice."""
        self.slices.append(AxisSlice(constant, axis, value, node, role, blocks=blocks))

    def require_segments(self, space: int, count: int) -> None:
        """Require ``count`` equal contiguous segments of ``space`` to keep equal numbers of channels (lcm with earlier ones)."""
        self.spaces[space].segments = math.lcm(self.spaces[space].segments, count)

    def new_space(self, node: int, value: str, size: int, weight: str, weight_axis: int, rank: int, axis: int) -> None:
        """Create the output space of a producer and map its output."""
        if size <= 1:
            return
        index = len(self.spaces)
        self.spaces.append(Space(index, node, value, size, weight, weight_axis))
        self.parent.append(index)
        self.maps[value] = ChannelMap(rank, axis, (Segment(index, 0, size),))

    # -- the walk -----------------------------------------------------------------------------

    def run(self) -> None:
        """Visit every node in topological order, then block what graph outputs and subgraphs read."""
        nodes = self.view.nodes
        for index in topological_order(self.model.graph, self.view):
            node = nodes[index]
            tracked = [self.maps.get(name) for name in node.input]
            implicit = [self.maps[name] for name in self.view.implicit.get(id(node), ()) if name in self.maps]
            if implicit:
                self.block(implicit, f"read inside a subgraph of {node_label(node)}")
            try:
                self.visit(index, node, tracked)
            except Blocked as exc:
                self.block(tracked, str(exc))
        for name in sorted(self.view.graph_outputs):
            if name in self.maps:
                self.block([self.maps[name]], f"'{name}' is a graph output")

    def visit(self, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
        """Dispatch one node to its rule."""
        op = node.op_type
        if not is_standard(node):
            if any(tracked):
                raise Blocked(f"read by {node_label(node)} of domain '{node.domain}'")
            return
        if op in PRODUCER_RULES:
            PRODUCER_RULES[op](self, index, node, tracked)
            return
        if not any(tracked):
            return
        rule = RULES.get(op)
        if rule is None:
            raise Blocked(f"read by {node_label(node)}")
        rule(self, index, node, tracked)

    def forward(self, node: NodeProto, cmap: ChannelMap, outputs: Sequence[str] | None = None) -> None:
        """Give the node's outputs (default: the first) the map ``cmap``."""
        for name in outputs if outputs is not None else node.output[:1]:
            if name:
                self.maps[name] = cmap

    # -- channel-preserving ops ---------------------------------------------------------------

    def rule_elementwise(self, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
        """Broadcasting ops: per-channel constants are sliced, activations on the same channels are tied."""
        maps = [m for m in tracked if m is not None]
        first = maps[0]
        if any(m.rel != first.rel or m.inner != first.inner or m.entries != first.entries for m in maps):
            raise Blocked(f"{node_label(node)} combines tensors whose channel axes do not line up")
        out_rank = self.rank(node.output[0]) or max(m.rank for m in maps)
        per_channel: list[tuple[str, int]] = []
        for name, cmap in zip(node.input, tracked):
            if cmap is not None or not name:
                continue
            dims = self.dims(name)
            if dims is None:
                raise Blocked(f"{node_label(node)} combines the channels with '{name}' of unknown shape")
            aligned = len(dims) + first.rel
            size = dims[aligned] if aligned >= 0 else 1
            if size == 1:
                continue
            if size != first.entries or self.consts.dims(name) is None:
                raise Blocked(f"{node_label(node)} combines the channels with '{name}', which is not a per-channel constant")
            per_channel.append((name, aligned))
        self.tie(node, maps)
        output = node.output[0]
        for name, axis in per_channel:
            self.add_slice(name, axis, output, index, "channel")
        self.forward(node, first.moved(out_rank, out_rank + first.rel))

    def tie(self, node: NodeProto, maps: list[ChannelMap]) -> None:
        """Require ``maps`` to hold the same channels position by position, uniting full spaces of equal size."""
        first = maps[0]
        pairs: list[tuple[int, int]] = []
        for other in maps[1:]:
            if other.segments == first.segments:
                continue
            if len(other.segments) != len(first.segments):
                raise Blocked(f"{node_label(node)} combines channel segments that do not line up")
            for a, b in zip(first.segments, other.segments):
                if a == b or (a.space is None and b.space is None and a.length == b.length):
                    continue
                if a.space is None or b.space is None or a.length != b.length or not (self.full(a) and self.full(b)):
                    raise Blocked(f"{node_label(node)} combines channel segments that do not line up")
                pairs.append((a.space, b.space))
        for a, b in pairs:
            self.union(a, b)

    def full(self, seg: Segment) -> bool:
        """Whether a segment covers its whole space."""
        return seg.space is not None and seg.start == 0 and seg.stop == self.spaces[seg.space].size


RULES = {**CHANNEL_RULES, **{op: Walk.rule_elementwise for op in ELEMENTWISE_OPS}}


# ----------------------------------------------------------------------------- groups


def _placed_slices(walk: Walk) -> tuple[list[AxisSlice], dict[AxisSlice, str]]:
    """The walk's slices, made private where a per-channel constant is shared or read through Identity; blocking reasons.

    A shared or indirect producer/consumer weight blocks its groups (copying a weight would grow
    the model); per-channel parameters (biases, BatchNormalization and elementwise constants,
    depthwise weights) get a sliced copy for the reading node instead.
    """
    view = walk.view
    weights = {(s.node, s.weight) for s in walk.spaces}
    placed: list[AxisSlice] = []
    reasons: dict[AxisSlice, str] = {}
    for piece in walk.slices:
        name = piece.constant
        readers = {id(n) for n in view.consumers.get(name, [])}
        shared = len(readers) > 1 or name in view.graph_outputs
        if walk.consts.direct(name) and not shared:
            placed.append(piece)
            continue
        source = walk.consts.resolve(name)
        weight = piece.role == "consumer" or (piece.node, name) in weights
        if source is None:
            reasons[piece] = f"'{name}' is not a constant of the main graph"
        elif weight:
            reasons[piece] = f"weight '{name}' is shared by {len(readers)} nodes" if shared else f"weight '{name}' is read through Identity"
        else:
            piece = replace(piece, source=source)
        placed.append(piece)
    return placed, reasons


def _group_name(walk: Walk, spaces: list[int]) -> str:
    node = walk.view.nodes[walk.spaces[spaces[0]].node]
    return node.name or walk.spaces[spaces[0]].value


def analyze_channels(
    model: ModelProto,
    types: dict[str, TypeProto],
    *,
    producer_ops: Sequence[str] = PRODUCER_OPS,
    exclude: Sequence[str] = (),
) -> ChannelAnalysis:
    """The channel groups of ``model``'s main graph (see the module docstring); ``types`` from shape inference.

    ``producer_ops`` limits which ops' output channels may be pruned; groups with a producer whose
    node name (or output name) matches ``exclude`` (exact or full-regex) are blocked.
    """
    walk = Walk(model, types, producer_ops)
    walk.run()
    roots = [walk.find(s.index) for s in walk.spaces]
    order = sorted(set(roots))
    group_of_root = {root: i for i, root in enumerate(order)}
    space_group = [group_of_root[r] for r in roots]
    groups = []
    for i, root in enumerate(order):
        spaces = [s for s, r in enumerate(roots) if r == root]
        producers = [walk.spaces[s].node for s in spaces]
        group = ChannelGroup(i, _group_name(walk, spaces), walk.spaces[root].size, spaces, producers)
        group.segments = math.lcm(*(walk.spaces[s].segments for s in spaces))
        groups.append(group)
    for cmap_name, cmap in walk.maps.items():
        for g in sorted({space_group[s] for s in cmap.spaces()}):
            groups[g].values.append(cmap_name)
    placed, blocking = _placed_slices(walk)
    for piece in placed:
        for g in sorted({space_group[s] for s in walk.maps[piece.value].spaces()}):
            groups[g].slices.append(piece)
    for edit in walk.edits:
        node = walk.view.nodes[edit.node]
        names = [edit.value, *node.output] if edit.kind == "split" else [edit.value]
        touched = {space_group[s] for name in names if name in walk.maps for s in walk.maps[name].spaces()}
        for g in sorted(touched):
            groups[g].edits.append(edit)
    for group in groups:
        for s in group.spaces:
            for reason in walk.spaces[s].reasons:
                if reason not in group.reasons:
                    group.reasons.append(reason)
        for piece in group.slices:
            reason = blocking.get(piece)
            if reason and reason not in group.reasons:
                group.reasons.append(reason)
        if exclude and any(_matches(walk, walk.spaces[s], exclude) for s in group.spaces):
            group.reasons.append("excluded by option 'exclude'")
        reason = _segments_reason(group)
        if reason:
            group.reasons.append(reason)
    return ChannelAnalysis(model.graph, walk.view.nodes, walk.maps, walk.spaces, groups, space_group)


def _segments_reason(group: ChannelGroup) -> str:
    """Why the group's grouped-conv constraint leaves nothing to prune ("" when it does not)."""
    if group.channels % group.segments:
        return f"grouped convs need {group.segments} equal segments of its {group.channels} channels"
    if 1 < group.segments == group.channels:
        return f"grouped convs leave one channel in each of its {group.segments} segments"
    return ""


def _matches(walk: Walk, space: Space, patterns: Sequence[str]) -> bool:
    node = walk.view.nodes[space.node]
    return any(matches_pattern(name, patterns) for name in (node.name, space.value) if name)
