"""The channel analysis rules of the ops it follows: producers, normalisation, pooling and shape ops.

Producers (Conv, ConvTranspose, Gemm, MatMul with constant weights) open channel spaces and
consume their inputs' channels (grouped convs with equal kept counts per group); the other rules pass channels through. Each rule is
``rule(walk, index, node, tracked)``: it reads the node's tracked input maps (``tracked[i]`` for
``node.input[i]``, None when untracked), records slices and edits on the walk and maps the outputs,
or raises :class:`~onnxopt.passes.channel_maps.Blocked` with the reason the node's tracked inputs
cannot be followed. Elementwise ops (which tie groups) are the walk's own method in
:mod:`onnxopt.passes.channel_groups`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import NodeProto

from onnxopt.graph import node_label
from onnxopt.passes.channel_maps import (
    POOL_OPS,
    REDUCE_OPS,
    SOFTMAX_OPS,
    UNARY_OPS,
    Blocked,
    ChannelMap,
    Edit,
    Segment,
    axes_value,
    normalized,
)
from onnxopt.passes.noop_rules import get_attr

if TYPE_CHECKING:
    from onnxopt.passes.channel_groups import Walk


def rule_unary(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Elementwise ops of one tensor: the output keeps the channels."""
    if tracked[0] is None or any(tracked[1:]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as a parameter")
    outputs = node.output[:2] if node.op_type == "Dropout" else node.output[:1]
    walk.forward(node, tracked[0], outputs)


def rule_pool(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Pooling over the spatial axes of an NCHW tensor."""
    cmap = tracked[0]
    if cmap is None or cmap.axis != 1 or cmap.inner != 1:
        raise Blocked(f"{node_label(node)} pools a tensor whose channels are not on axis 1")
    if len(node.output) > 1 and node.output[1] and walk.view.uses(node.output[1]):
        raise Blocked(f"{node_label(node)}: its Indices output encodes channel positions")
    walk.forward(node, cmap)


def rule_batchnormalization(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """BatchNormalization/InstanceNormalization: per-channel parameters on axis 1."""
    cmap = tracked[0]
    if cmap is None or any(tracked[1:]) or cmap.axis != 1 or cmap.inner != 1:
        raise Blocked(f"{node_label(node)} does not normalise the tracked channels on axis 1")
    if any(o and walk.view.uses(o) for o in node.output[1:]):
        raise Blocked(f"{node_label(node)} is in training mode (running statistics are read)")
    for name in node.input[1:]:
        dims = walk.consts.dims(name)
        if dims is None or len(dims) != 1 or dims[0] != cmap.channels:
            raise Blocked(f"{node_label(node)} has a parameter '{name}' that is not a constant [C] vector")
        walk.add_slice(name, 0, node.input[0], index, "channel")
    walk.forward(node, cmap)


def rule_concat(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Concat along the channel axis puts segments side by side; along another axis it ties like Add."""
    first = next(m for m in tracked if m is not None)
    axis = int(get_attr(node, "axis", 0))  # type: ignore[arg-type]
    axis = axis + first.rank if axis < 0 else axis
    if axis != first.axis:
        if any(m is None for m in tracked):
            raise Blocked(f"{node_label(node)} concatenates tracked channels with untracked tensors along axis {axis}")
        walk.tie(node, [m for m in tracked if m is not None])
        walk.forward(node, first)
        return
    segments: list[Segment] = []
    for name, cmap in zip(node.input, tracked):
        if cmap is not None:
            if cmap.inner != 1 or cmap.rank != first.rank or cmap.axis != axis:
                raise Blocked(f"{node_label(node)} concatenates tensors with channels on different axes")
            segments.extend(cmap.segments)
            continue
        dims = walk.dims(name)
        if dims is None or len(dims) != first.rank or dims[axis] is None:
            raise Blocked(f"{node_label(node)} concatenates '{name}' of unknown channel count")
        segments.append(Segment(None, 0, int(dims[axis])))  # type: ignore[arg-type]
    walk.forward(node, ChannelMap(first.rank, axis, normalized(segments)))


def rule_split(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Split along the channel axis hands out ranges (sizes are rewritten); along another axis every output keeps the map."""
    cmap = tracked[0]
    if cmap is None or any(tracked[1:]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as its sizes")
    axis = int(get_attr(node, "axis", 0))  # type: ignore[arg-type]
    axis = axis + cmap.rank if axis < 0 else axis
    outputs = list(node.output)
    if axis != cmap.axis:
        walk.forward(node, cmap, outputs)
        return
    if cmap.inner != 1:
        raise Blocked(f"{node_label(node)} splits flattened channels")
    sizes = axes_value(node, walk.consts, attr="split", index=1)
    if sizes is None:
        count = len(outputs)
        step = -(-cmap.channels // count)
        sizes = [min(step, cmap.channels - i * step) for i in range(count)]
    if sum(sizes) != cmap.channels or len(sizes) != len(outputs):
        raise Blocked(f"{node_label(node)} has split sizes that do not match its channels")
    start = 0
    for name, size in zip(outputs, sizes):
        if name:
            walk.maps[name] = cmap.sub(start, start + size)
        start += size
    walk.edits.append(Edit("split", index, node.input[0]))


def rule_flatten(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Flatten [N, C, H, W] -> [N, C*H*W]: each channel becomes H*W consecutive entries (for Gemm/MatMul readers)."""
    cmap = tracked[0]
    axis = int(get_attr(node, "axis", 1))  # type: ignore[arg-type]
    axis = axis + cmap.rank if axis < 0 else axis  # type: ignore[union-attr]
    flatten_to(walk, node, cmap, axis)  # type: ignore[arg-type]


def flatten_to(walk: Walk, node: NodeProto, cmap: ChannelMap, start: int) -> None:
    """Map the 2-D output of flattening axes ``start:`` of the input into axis 1."""
    dims = walk.dims(node.input[0])
    if dims is None or any(d is None for d in dims[cmap.axis + 1 :]) or cmap.axis < start:
        raise Blocked(f"{node_label(node)} flattens the channels with dims of unknown size or into the batch axis")
    if any(d != 1 for d in dims[start : cmap.axis]):
        raise Blocked(f"{node_label(node)} flattens axes in front of the channels")
    inner = int(np.prod([int(d) for d in dims[cmap.axis + 1 :]], dtype=np.int64)) * cmap.inner  # type: ignore[arg-type]
    walk.forward(node, ChannelMap(2, 1, cmap.segments, inner))


def rule_reshape(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """A Reshape is followed only when it flattens [N, C, ...] to [N, C*...] (a positive target entry 1 is then rewritten)."""
    cmap = tracked[0]
    if cmap is None or any(tracked[1:]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as its shape")
    in_dims = walk.dims(node.input[0])
    target = walk.consts.array(node.input[1]) if len(node.input) > 1 else None
    if in_dims is None or target is None or not _flattens(in_dims, [int(t) for t in target.reshape(-1)], cmap):
        raise Blocked(f"{node_label(node)} reshapes the channels (only a flatten into 2-D is followed)")
    flatten_to(walk, node, cmap, cmap.axis)
    if int(target.reshape(-1)[1]) > 0:
        walk.edits.append(Edit("reshape", index, node.output[0], 1))


def _flattens(in_dims: list[int | None], target: list[int], cmap: ChannelMap) -> bool:
    """Whether Reshape(input, target) is [lead..., C, rest...] -> [prod(lead), C * prod(rest)]."""
    axis = cmap.axis
    tail = in_dims[axis:]
    if len(target) != 2 or axis < 1 or any(d is None for d in tail):
        return False
    flat = int(np.prod([int(d) for d in tail], dtype=np.int64))  # type: ignore[arg-type]
    lead = None if any(d is None for d in in_dims[:axis]) else int(np.prod([int(d) for d in in_dims[:axis]], dtype=np.int64))  # type: ignore[arg-type]
    first, second = target
    if second == flat:
        return first == -1 or first == lead or (first == 0 and axis == 1)
    return second == -1 and ((first > 0 and first == lead) or (first == 0 and axis == 1))


def rule_pad(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Pad without padding the channel axis."""
    cmap = tracked[0]
    if cmap is None or any(tracked[1:]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as a parameter")
    pads = axes_value(node, walk.consts, attr="pads", index=1)
    axes = axes_value(node, walk.consts, attr="axes", index=3)  # opset 18's optional axes input
    axes = [a + cmap.rank if a < 0 else a for a in axes] if axes is not None else list(range(cmap.rank))
    if pads is None or len(pads) != 2 * len(axes):
        raise Blocked(f"{node_label(node)} has pads of unknown value")
    if cmap.axis in axes:
        at = axes.index(cmap.axis)
        if pads[at] or pads[at + len(axes)]:
            raise Blocked(f"{node_label(node)} pads the channel axis")
    walk.forward(node, cmap)


def rule_resize(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Resize/Upsample with scale 1 on the channel axis (constant sizes are rewritten)."""
    cmap = tracked[0]
    if cmap is None or any(tracked[1:]) or cmap.inner != 1:
        raise Blocked(f"{node_label(node)} reads a tracked tensor as a parameter")
    if get_attr(node, "coordinate_transformation_mode") == "tf_crop_and_resize" or get_attr(node, "axes") is not None:
        raise Blocked(f"{node_label(node)} crops or resizes selected axes")
    scales_at = 1 if node.op_type == "Upsample" or walk.opset < 11 else 2
    scales = get_attr(node, "scales") if node.op_type == "Upsample" and walk.opset < 9 else None
    if scales is None and len(node.input) > scales_at and node.input[scales_at]:
        array = walk.consts.array(node.input[scales_at])
        if array is None:
            raise Blocked(f"{node_label(node)} has non-constant scales")
        scales = [float(v) for v in array.reshape(-1)]
    if scales:
        if len(scales) != cmap.rank or float(scales[cmap.axis]) != 1.0:  # type: ignore[index]
            raise Blocked(f"{node_label(node)} scales the channel axis")
    elif len(node.input) > 3 and node.input[3]:
        sizes = walk.consts.array(node.input[3])
        if sizes is None or sizes.size != cmap.rank:
            raise Blocked(f"{node_label(node)} has non-constant sizes")
        if int(sizes.reshape(-1)[cmap.axis]) != cmap.channels:
            raise Blocked(f"{node_label(node)} resizes the channel axis")
        walk.edits.append(Edit("resize", index, node.output[0], cmap.axis))
    else:
        raise Blocked(f"{node_label(node)} has neither scales nor sizes")
    walk.forward(node, cmap)


def rule_squeeze(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Squeeze/Unsqueeze of axes other than the channel axis: the channel axis moves."""
    cmap = tracked[0]
    if cmap is None or any(tracked[1:]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as its axes")
    axes = axes_value(node, walk.consts, attr="axes", index=1)
    out_rank = walk.rank(node.output[0])
    if node.op_type == "Squeeze":
        if axes is None:
            dims = walk.dims(node.input[0])
            if dims is None or any(d is None for d in dims):
                raise Blocked(f"{node_label(node)} squeezes axes of unknown size")
            axes = [i for i, d in enumerate(dims) if d == 1]
        axes = sorted(a + cmap.rank if a < 0 else a for a in axes)
        if cmap.axis in axes:
            raise Blocked(f"{node_label(node)} squeezes the channel axis")
        rank = cmap.rank - len(axes)
        axis = cmap.axis - sum(1 for a in axes if a < cmap.axis)
    else:
        if axes is None:
            raise Blocked(f"{node_label(node)} has no axes")
        rank = cmap.rank + len(axes)
        inserted = {a + rank if a < 0 else a for a in axes}
        positions = [i for i in range(rank) if i not in inserted]
        axis = positions[cmap.axis]
    if out_rank is not None and out_rank != rank:
        raise Blocked(f"{node_label(node)} has an output of unexpected rank")
    walk.forward(node, cmap.moved(rank, axis))


def rule_reduce(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Reductions over axes other than the channel axis."""
    cmap = tracked[0]
    if cmap is None or any(tracked[1:]) or cmap.inner != 1:
        raise Blocked(f"{node_label(node)} reads a tracked tensor as its axes")
    axes = axes_value(node, walk.consts, attr="axes", index=1)
    keep = int(get_attr(node, "keepdims", 1))  # type: ignore[arg-type]
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [int(get_attr(node, "axis", 0))]  # type: ignore[arg-type]
    if not axes:
        raise Blocked(f"{node_label(node)} reduces every axis, the channels too")
    axes = sorted(a + cmap.rank if a < 0 else a for a in axes)
    if cmap.axis in axes:
        raise Blocked(f"{node_label(node)} reduces over the channels")
    if keep:
        walk.forward(node, cmap)
        return
    walk.forward(node, cmap.moved(cmap.rank - len(axes), cmap.axis - sum(1 for a in axes if a < cmap.axis)))


def rule_softmax(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Softmax-like ops over an axis other than the channels (opset < 13: over all axes from ``axis`` on)."""
    cmap = tracked[0]
    default = -1 if walk.opset >= 13 else 1
    axis = int(get_attr(node, "axis", default))  # type: ignore[arg-type]
    axis = axis + cmap.rank if axis < 0 else axis  # type: ignore[union-attr]
    if axis == cmap.axis or (walk.opset < 13 and axis <= cmap.axis):  # type: ignore[union-attr]
        raise Blocked(f"{node_label(node)} normalises over the channels")
    walk.forward(node, cmap)  # type: ignore[arg-type]


def rule_slice(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Slice of axes other than the channel axis."""
    cmap = tracked[0]
    if cmap is None or any(tracked[1:]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as a parameter")
    axes = axes_value(node, walk.consts, attr="axes", index=3)
    if axes is None:
        starts = axes_value(node, walk.consts, attr="starts", index=1) or []
        axes = list(range(len(starts)))
    if cmap.axis in {a + cmap.rank if a < 0 else a for a in axes}:
        raise Blocked(f"{node_label(node)} slices the channel axis")
    walk.forward(node, cmap)


# ----------------------------------------------------------------------------- producers and consumers


def consume(walk: Walk, index: int, node: NodeProto, cmap: ChannelMap | None, weight: str, axis: int, *, last_axis: bool) -> None:
    """Record that ``weight``'s ``axis`` is indexed by the channels of the node's first input."""
    if cmap is None:
        return
    if last_axis and cmap.axis != cmap.rank - 1:
        raise Blocked(f"{node_label(node)} reads the channels on axis {cmap.axis}, not the last one")
    if not last_axis and (cmap.axis != 1 or cmap.inner != 1):
        raise Blocked(f"{node_label(node)} reads the channels on axis {cmap.axis}, not axis 1")
    walk.add_slice(weight, axis, node.input[0], index, "consumer")


def rule_conv(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Conv: group 1 consumes and produces; depthwise passes channels through; other grouped convs: see :func:`grouped_conv`."""
    weight = node.input[1] if len(node.input) > 1 else ""
    wdims = walk.consts.float_weight(weight)
    if any(tracked[1:]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as its weight or bias")
    if wdims is None or len(wdims) < 3:
        if tracked[0] is not None:
            raise Blocked(f"{node_label(node)} has no constant float weight")
        return
    group = int(get_attr(node, "group", 1))  # type: ignore[arg-type]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if bias and walk.consts.dims(bias) is None:
        raise Blocked(f"{node_label(node)} has a non-constant bias")
    if group == 1:
        consume(walk, index, node, tracked[0], weight, 1, last_axis=False)
        produce(walk, index, node, weight, 0, wdims[0], len(wdims), 1, bias)
        return
    cmap = tracked[0]
    if wdims[1] == 1 and wdims[0] == group:  # depthwise, multiplier 1
        if cmap is None:
            return
        if cmap.axis != 1 or cmap.inner != 1 or cmap.channels != group:
            raise Blocked(f"depthwise {node_label(node)} does not read its channels on axis 1")
        walk.add_slice(weight, 0, node.input[0], index, "channel")
        if bias:
            walk.add_slice(bias, 0, node.input[0], index, "channel")
        walk.edits.append(Edit("group", index, node.input[0]))
        walk.forward(node, cmap)
        return
    grouped_conv(walk, index, node, cmap, weight, wdims, group, bias)


def grouped_conv(
    walk: Walk, index: int, node: NodeProto, cmap: ChannelMap | None, weight: str, wdims: tuple[int, ...], group: int, bias: str
) -> None:
    """A grouped conv (weight [Cout, Cin/group, ...]): consumes and produces with equal kept counts in each of its groups.

    As a consumer it must read one whole channel space on axis 1 (the space gets ``segments``
    ``group``) and its weight is sliced block-diagonally along axis 1; as a producer its output
    space gets ``segments`` ``group``. One input channel per group (a depthwise conv with a
    channel multiplier) blocks what it reads.
    """
    label = f"grouped {node_label(node)} (group={group})"
    if wdims[0] % group:
        raise Blocked(f"{label} has {wdims[0]} output channels, not a multiple of its group")
    if cmap is not None:
        if wdims[1] == 1:
            raise Blocked(f"{label} reads one input channel per group")
        whole = len(cmap.segments) == 1 and walk.full(cmap.segments[0])
        if not whole or cmap.axis != 1 or cmap.inner != 1 or cmap.channels != group * wdims[1]:
            raise Blocked(f"{label} reads channels that are not one whole channel space on axis 1")
        walk.add_slice(weight, 1, node.input[0], index, "consumer", blocks=group)
        walk.require_segments(cmap.segments[0].space, group)  # type: ignore[arg-type]
    produce(walk, index, node, weight, 0, wdims[0], len(wdims), 1, bias)
    if node.output[0] in walk.maps:
        walk.require_segments(walk.maps[node.output[0]].segments[0].space, group)  # type: ignore[arg-type]


def produce(
    walk: Walk, index: int, node: NodeProto, weight: str, weight_axis: int, channels: int, rank: int, axis: int, bias: str = ""
) -> None:
    """When ``node``'s op type is a producer: a new channel space on its output, sliced in the weight (and 1-D bias)."""
    if node.op_type not in walk.producer_ops:
        return
    walk.new_space(index, node.output[0], channels, weight, weight_axis, rank, axis)
    if node.output[0] in walk.maps:
        walk.add_slice(weight, weight_axis, node.output[0], index, "producer")
        if bias:
            walk.add_slice(bias, 0, node.output[0], index, "producer")


def rule_convtranspose(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """ConvTranspose (group 1): consumes along weight axis 0, produces along axis 1."""
    weight = node.input[1] if len(node.input) > 1 else ""
    wdims = walk.consts.float_weight(weight)
    if any(tracked[1:]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as its weight or bias")
    group = int(get_attr(node, "group", 1))  # type: ignore[arg-type]
    if wdims is None or len(wdims) < 3 or group != 1:
        if tracked[0] is not None:
            raise Blocked(f"{node_label(node)} has no constant float weight or group != 1")
        return
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    if bias and walk.consts.dims(bias) is None:
        raise Blocked(f"{node_label(node)} has a non-constant bias")
    consume(walk, index, node, tracked[0], weight, 0, last_axis=False)
    produce(walk, index, node, weight, 1, wdims[1], len(wdims), 1, bias)


def rule_gemm(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """Gemm with a constant B: consumes along K, produces along N (C sliced when it is per-column)."""
    weight = node.input[1] if len(node.input) > 1 else ""
    wdims = walk.consts.float_weight(weight)
    if any(tracked[1:2]):
        raise Blocked(f"{node_label(node)} reads a tracked tensor as B")
    trans_a, trans_b = int(get_attr(node, "transA", 0)), int(get_attr(node, "transB", 0))  # type: ignore[arg-type]
    if wdims is None or len(wdims) != 2 or trans_a:
        if tracked[0] is not None:
            raise Blocked(f"{node_label(node)} has no constant 2-D float B, or transA=1")
        return
    consume(walk, index, node, tracked[0], weight, 1 if trans_b else 0, last_axis=True)
    n = wdims[0] if trans_b else wdims[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    cdims = walk.dims(bias) if bias else None
    if tracked[2:3] and tracked[2] is not None:
        raise Blocked(f"{node_label(node)} reads a tracked tensor as C")
    if "Gemm" not in walk.producer_ops:
        return
    walk.new_space(index, node.output[0], n, weight, 0 if trans_b else 1, 2, 1)
    if node.output[0] not in walk.maps:
        return
    walk.add_slice(weight, 0 if trans_b else 1, node.output[0], index, "producer")
    if bias:
        if cdims is None:
            walk.block([walk.maps[node.output[0]]], f"{node_label(node)} has a C of unknown shape")
        elif cdims and cdims[-1] == n:
            if walk.consts.dims(bias) is None:
                walk.block([walk.maps[node.output[0]]], f"{node_label(node)} has a per-column C that is not a constant")
            else:
                walk.add_slice(bias, len(cdims) - 1, node.output[0], index, "producer")


def rule_matmul(walk: Walk, index: int, node: NodeProto, tracked: list[ChannelMap | None]) -> None:
    """MatMul with a constant 2-D B: consumes along B's axis 0, produces along axis 1 (the output's last axis)."""
    weight = node.input[1] if len(node.input) > 1 else ""
    wdims = walk.consts.float_weight(weight)
    if len(tracked) > 1 and tracked[1] is not None:
        raise Blocked(f"{node_label(node)} reads a tracked tensor as B")
    rank_a = tracked[0].rank if tracked[0] is not None else walk.rank(node.input[0])
    if wdims is None or len(wdims) != 2 or rank_a is None or rank_a < 2:
        if tracked[0] is not None:
            raise Blocked(f"{node_label(node)} has no constant 2-D float B")
        return
    consume(walk, index, node, tracked[0], weight, 0, last_axis=True)
    produce(walk, index, node, weight, 1, wdims[1], rank_a, rank_a - 1)


RULES = {
    **{op: rule_unary for op in UNARY_OPS},
    **{op: rule_pool for op in POOL_OPS},
    **{op: rule_reduce for op in REDUCE_OPS | {"ArgMax", "ArgMin"}},
    **{op: rule_softmax for op in SOFTMAX_OPS},
    "BatchNormalization": rule_batchnormalization,
    "InstanceNormalization": rule_batchnormalization,
    "Concat": rule_concat,
    "Split": rule_split,
    "Flatten": rule_flatten,
    "Reshape": rule_reshape,
    "Pad": rule_pad,
    "Resize": rule_resize,
    "Upsample": rule_resize,
    "Squeeze": rule_squeeze,
    "Unsqueeze": rule_squeeze,
    "Slice": rule_slice,
}
PRODUCER_RULES = {"Conv": rule_conv, "ConvTranspose": rule_convtranspose, "Gemm": rule_gemm, "MatMul": rule_matmul}
