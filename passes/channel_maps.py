"""The vocabulary of the channel analysis: channel spaces, segments, channel maps, slices and edits.

A *channel space* is the output channels of one producer. A tensor's :class:`ChannelMap` says
how its channel axis is made of :class:`Segment` s of spaces; an :class:`AxisSlice` says which
constant axis a tensor's channels index; an :class:`Edit` names an attribute or shape constant
that follows a channel count. See :mod:`onnxopt.passes.channel_groups` for the analysis itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto, numpy_helper

from onnxopt.graph import GraphView, is_standard, node_label
from onnxopt.passes.noop_rules import get_attr

PRODUCER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
WEIGHT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
UNARY_OPS = frozenset(
    {
        "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Identity", "Dropout",
        "Cast", "CastLike", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Softplus", "Softsign", "Elu", "Selu", "Celu",
        "Mish", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf", "Shrink",
    }
)  # fmt: skip
ELEMENTWISE_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Mod", "Equal", "Less", "LessOrEqual",
        "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Where",
    }
)  # fmt: skip
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
REDUCE_OPS = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
    }
)
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})


class Blocked(Exception):
    """Raised inside a rule: the node's tracked inputs cannot be followed (the message says why)."""


# ----------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Segment:
    """Channels ``start:stop`` of channel space ``space`` (None: channels no prunable producer owns)."""

    space: int | None
    start: int
    stop: int

    @property
    def length(self) -> int:
        """Number of channels."""
        return self.stop - self.start


@dataclass(frozen=True)
class ChannelMap:
    """How the channel axis ``axis`` of a rank-``rank`` tensor is made of channel-space segments."""

    rank: int
    axis: int
    segments: tuple[Segment, ...]
    inner: int = 1

    @property
    def channels(self) -> int:
        """Channels along the axis (entries / inner)."""
        return sum(s.length for s in self.segments)

    @property
    def entries(self) -> int:
        """Size of the channel axis."""
        return self.channels * self.inner

    @property
    def rel(self) -> int:
        """The axis counted from the end (negative), as broadcasting aligns it."""
        return self.axis - self.rank

    def moved(self, rank: int, axis: int, inner: int | None = None) -> ChannelMap:
        """The same segments on another axis/rank."""
        return ChannelMap(rank, axis, self.segments, self.inner if inner is None else inner)

    def spaces(self) -> set[int]:
        """The channel spaces the map holds."""
        return {s.space for s in self.segments if s.space is not None}

    def sub(self, start: int, stop: int) -> ChannelMap:
        """Channels ``start:stop`` of the map (counted along the map, inner == 1)."""
        out: list[Segment] = []
        offset = 0
        for seg in self.segments:
            lo, hi = max(start, offset), min(stop, offset + seg.length)
            if lo < hi:
                out.append(Segment(seg.space, seg.start + lo - offset, seg.start + hi - offset))
            offset += seg.length
        return ChannelMap(self.rank, self.axis, normalized(out), self.inner)


def normalized(segments: Iterable[Segment]) -> tuple[Segment, ...]:
    """Merge adjacent contiguous segments of the same space (and adjacent fixed ones)."""
    out: list[Segment] = []
    for seg in segments:
        if seg.length <= 0:
            continue
        if out and out[-1].space == seg.space and (seg.space is None or out[-1].stop == seg.start):
            last = out.pop()
            stop = last.stop + seg.length if seg.space is None else seg.stop
            seg = Segment(seg.space, last.start, stop)
        out.append(seg)
    return tuple(out)


@dataclass
class Space:
    """The output channels of one producer node."""

    index: int
    node: int
    value: str
    size: int
    weight: str
    weight_axis: int
    reasons: list[str] = field(default_factory=list)
    segments: int = 1  # equal contiguous segments whose kept counts must be equal (grouped convs)


@dataclass(frozen=True)
class AxisSlice:
    """Axis ``axis`` of constant ``constant`` (read by node ``node``) is indexed like the channel axis of ``value``.

    ``role``: "producer" (the producer's weight/bias), "consumer" (a reader's weight, along its
    input-channel axis), or "channel" (a per-channel parameter on the path: BatchNormalization,
    elementwise operands, depthwise weights).

    ``blocks`` > 1 (a grouped conv's weight read as a consumer): the constant's axis 0 is
    ``blocks`` contiguous blocks of rows, and block j's ``axis`` is indexed by channels
    ``j * n : (j + 1) * n`` of ``value`` (n = the axis' size), a block-diagonal slice.
    """

    constant: str
    axis: int
    value: str
    node: int
    role: str
    source: str | None = None  # set: write a private sliced copy of this constant and point the node at it
    blocks: int = 1

    @property
    def private(self) -> bool:
        """Whether the node gets its own sliced copy (the constant is shared, or reached through Identity)."""
        return self.source is not None


@dataclass(frozen=True)
class Edit:
    """A node attribute or shape constant that follows the channel count of ``value``.

    ``kind``: "group" (depthwise Conv), "split" (sizes = counts of the node's outputs),
    "reshape" (target entry ``position``), "resize" (sizes entry ``position``).
    """

    kind: str
    node: int
    value: str
    position: int = 0


def axes_value(node: NodeProto, consts: Constants, *, attr: str, index: int) -> list[int] | None:
    """An int list from attribute ``attr`` or constant input ``index``; None when absent; Blocked when not constant."""
    value = get_attr(node, attr)
    if value is not None:
        return [int(v) for v in value]  # type: ignore[union-attr]
    if len(node.input) > index and node.input[index]:
        array = consts.array(node.input[index])
        if array is None:
            raise Blocked(f"{node_label(node)} has a non-constant '{attr}' input")
        return [int(v) for v in array.reshape(-1)]
    return None


class Constants:
    """Constants of one graph (initializers not graph inputs, and Constant nodes), read lazily and cached."""

    def __init__(self, view: GraphView) -> None:
        self.view = view
        self._arrays: dict[str, np.ndarray | None] = {}

    def resolve(self, name: str) -> str | None:
        """The constant behind ``name``: itself, or the end of a chain of Identity nodes; None when there is none."""
        seen = 0
        while name and seen < 64:
            if self.direct(name):
                return name
            node = self.view.producer.get(name)
            if node is None or node.op_type != "Identity" or not is_standard(node) or not node.input:
                return None
            name, seen = node.input[0], seen + 1
        return None

    def direct(self, name: str) -> bool:
        """Whether ``name`` itself is an initializer (not a graph input) or a Constant node's output."""
        if self.view.is_constant(name):
            return True
        node = self.view.producer.get(name)
        return node is not None and node.op_type == "Constant" and is_standard(node)

    def tensor(self, name: str) -> TensorProto | None:
        """The TensorProto behind ``name`` without copying (an initializer or a Constant node's ``value``, through Identity), or None."""
        name = self.resolve(name) or ""
        if not name:
            return None
        if self.view.is_constant(name):
            tensor = self.view.initializers[name]
            return None if tensor.data_location == TensorProto.EXTERNAL else tensor
        node = self.view.producer.get(name)
        if node is not None and node.op_type == "Constant" and is_standard(node) and len(node.attribute) == 1:
            attr = node.attribute[0]
            if attr.name == "value" and attr.HasField("t") and attr.t.data_location != TensorProto.EXTERNAL:
                return attr.t
        return None

    def dims(self, name: str) -> tuple[int, ...] | None:
        """The constant's dims, or None when ``name`` is not a constant."""
        tensor = self.tensor(name)
        return None if tensor is None else tuple(int(d) for d in tensor.dims)

    def array(self, name: str) -> np.ndarray | None:
        """The constant's value (cached), or None."""
        if name not in self._arrays:
            tensor = self.tensor(name)
            self._arrays[name] = None if tensor is None else numpy_helper.to_array(tensor)
        return self._arrays[name]

    def float_weight(self, name: str) -> tuple[int, ...] | None:
        """Dims of a float32/float16 constant, or None."""
        tensor = self.tensor(name)
        return tuple(int(d) for d in tensor.dims) if tensor is not None and tensor.data_type in WEIGHT_TYPES else None
