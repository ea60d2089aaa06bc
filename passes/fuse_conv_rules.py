"""Matching and weight arithmetic for the Conv fusions of :mod:`onnxopt.passes.fuse_conv`.

Every ``match_*`` function only reads the graph: it returns a plan object or raises
:class:`NoMatch` with a readable reason. Weight arithmetic is done in float64 and cast
back to the weight's own dtype; a result that is not finite in that dtype is rejected.

Layouts: Conv weights are (M, C/group, k...), so output channel ``m`` is row ``m``.
ConvTranspose weights are (C, M/group, k...): output channel ``g * (M/group) + j`` is
column ``j`` of the rows of group ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto, numpy_helper

from onnxopt.graph import GraphView, is_standard
from onnxopt.passbase import PassContext
from onnxopt.passes.noop_rules import NoMatch, constant_tensor, default_opset, dims_of, get_attr, require

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
CONV_OPS = ("Conv", "ConvTranspose")


# ----------------------------------------------------------------------------- helpers


def int_attr(node: NodeProto, name: str, default: int) -> int:
    """An integer attribute's value, or ``default`` when absent."""
    return int(get_attr(node, name, default))  # type: ignore[arg-type]


def float_constant(view: GraphView, name: str, what: str) -> np.ndarray:
    """The value of a float constant of this graph; NoMatch when it is not one."""
    tensor = constant_tensor(view, name) if name else None
    require(tensor is not None, f"{what} '{name}' is not a constant of this graph")
    require(tensor.data_type in FLOAT_TYPES, f"{what} '{name}' is not float, float16 or double")  # type: ignore[union-attr]
    return numpy_helper.to_array(tensor)  # type: ignore[arg-type]


def sole_reader(view: GraphView, name: str) -> NodeProto:
    """The only node reading ``name``; NoMatch when it is a graph output or read elsewhere."""
    require(name not in view.graph_outputs, f"'{name}' is a graph output")
    readers = view.consumers.get(name, [])
    require(len(readers) == 1, f"'{name}' has {len(readers)} readers")
    return readers[0]


def cast_back(values: np.ndarray, like: np.ndarray, what: str) -> np.ndarray:
    """``values`` (float64) in the dtype of ``like``; NoMatch when not finite there."""
    with np.errstate(over="ignore", invalid="ignore"):
        result = values.astype(like.dtype)
    require(bool(np.all(np.isfinite(result))), f"the folded {what} is not finite in {like.dtype}")
    return result


def conv_channels(node: NodeProto, weight_shape: tuple[int, ...]) -> int:
    """The number of output channels of a Conv/ConvTranspose with weights of ``weight_shape``."""
    group = int_attr(node, "group", 1)
    require(len(weight_shape) >= 3, "the weight has rank < 3")
    if node.op_type == "Conv":
        require(group >= 1 and weight_shape[0] % group == 0, "the weight does not split into the groups")
        return weight_shape[0]
    require(group >= 1 and weight_shape[0] % group == 0, "the weight does not split into the groups")
    return weight_shape[1] * group


def scale_output_channels(node: NodeProto, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``weight`` (float64) with each output channel's slice multiplied by ``scale[channel]``."""
    if node.op_type == "Conv":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    group = int_attr(node, "group", 1)
    c_in, per_group, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    grouped = weight.reshape((group, c_in // group, per_group) + kernel)
    factors = scale.reshape((group, 1, per_group) + (1,) * len(kernel))
    return (grouped * factors).reshape(weight.shape)


@dataclass
class WeightFold:
    """New weight and bias values for ``node`` (inputs 1 and 2), computed before any mutation."""

    node: NodeProto
    weight: np.ndarray
    bias: np.ndarray
    output: str
    removed: list[NodeProto] = field(default_factory=list)
    kind: str = ""
    extra: dict = field(default_factory=dict)


def conv_bias(node: NodeProto, view: GraphView, weight: np.ndarray, channels: int) -> np.ndarray:
    """The constant bias (input 2) of a Conv/ConvTranspose, zeros when it has none; NoMatch unless [channels] of the weight's dtype."""
    if len(node.input) > 2 and node.input[2]:
        bias = float_constant(view, node.input[2], "bias")
        require(bias.shape == (channels,), f"the bias shape {list(bias.shape)} is not [{channels}]")
        require(bias.dtype == weight.dtype, "the bias and weight dtypes differ")
        return bias
    return np.zeros(channels, dtype=weight.dtype)


def conv_fold(node: NodeProto, view: GraphView, scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of Conv/ConvTranspose ``node`` followed by ``y * scale + shift`` per channel."""
    weight = float_constant(view, node.input[1], "weight")
    channels = conv_channels(node, weight.shape)
    require(scale.shape == (channels,) and shift.shape == (channels,), f"the affine has {scale.shape[0]} channels, not {channels}")
    bias = conv_bias(node, view, weight, channels)
    new_weight = scale_output_channels(node, weight.astype(np.float64), scale)
    new_bias = bias.astype(np.float64) * scale + shift
    return cast_back(new_weight, weight, "weight"), cast_back(new_bias, weight, "bias")


def conv_node_ok(node: NodeProto, view: GraphView) -> None:
    """Common checks on the Conv/ConvTranspose being folded into."""
    require(is_standard(node) and node.op_type in CONV_OPS, "the producer is not a standard Conv or ConvTranspose")
    require(len(node.input) >= 2 and len(node.output) == 1, "the convolution has an unexpected signature")


# ----------------------------------------------------------------------------- BatchNormalization


def batchnorm_affine(node: NodeProto, view: GraphView, ctx: PassContext) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) in float64 with ``BN(x) = x * scale + shift`` per channel; NoMatch unless inference form."""
    require(is_standard(node) and len(node.input) == 5, "not a standard BatchNormalization with 5 inputs")
    opset = default_opset(ctx)
    if opset < 7:
        require(bool(get_attr(node, "is_test", 0)), "is_test=0 means training mode before opset 7")
    if opset < 9:
        require(int_attr(node, "spatial", 1) == 1, "spatial=0 normalizes per activation")
    if opset >= 14:
        require(int_attr(node, "training_mode", 0) == 0, "training_mode=1")
    extra = [o for o in node.output[1:] if o]
    if opset < 14:
        require(not extra, "extra outputs declared: training mode before opset 14")
    require(not any(view.uses(o) for o in extra), "a statistics output is used")
    scale, bias, mean, var = (float_constant(view, node.input[i], label) for i, label in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
    require(scale.ndim == 1 and scale.shape == bias.shape == mean.shape == var.shape, "the parameters are not four vectors of one length")
    epsilon = float(get_attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]
    with np.errstate(all="ignore"):
        factor = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
        shift = bias.astype(np.float64) - mean.astype(np.float64) * factor
    require(bool(np.all(np.isfinite(factor)) and np.all(np.isfinite(shift))), "the normalization is not finite")
    return factor, shift


def gemm_fold(node: NodeProto, view: GraphView, ctx: PassContext, scale: np.ndarray, shift: np.ndarray) -> WeightFold:
    """New B and C of a Gemm followed by a per-column affine ``y * scale + shift``."""
    require(is_standard(node) and len(node.output) == 1 and len(node.input) >= 2, "not a standard Gemm")
    require(default_opset(ctx) >= 7, "Gemm before opset 7 has the 'broadcast' attribute")
    b = float_constant(view, node.input[1], "B")
    require(b.ndim == 2, "B is not a matrix")
    trans_b = int_attr(node, "transB", 0)
    columns = b.shape[0] if trans_b else b.shape[1]
    require(scale.shape == (columns,), f"the affine has {scale.shape[0]} channels, not {columns}")
    factors = scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1)
    new_b = cast_back(b.astype(np.float64) * factors, b, "B")
    beta = float(get_attr(node, "beta", 1.0))  # type: ignore[arg-type]
    if len(node.input) > 2 and node.input[2]:
        c = float_constant(view, node.input[2], "C")
        require(c.dtype == b.dtype, "C and B dtypes differ")
        require(c.ndim <= 2 and (c.ndim == 0 or c.shape[-1] in (1, columns)), f"C of shape {list(c.shape)} does not broadcast per column")
        new_c = beta * c.astype(np.float64) * scale + shift
    else:
        require(default_opset(ctx) >= 11, "C is required before opset 11")
        new_c = shift
    return WeightFold(node, new_b, cast_back(new_c, b, "C"), "", kind="gemm")


def match_batchnorm_fold(bn: NodeProto, view: GraphView, ctx: PassContext) -> WeightFold:
    """A Conv/ConvTranspose/Gemm whose only reader is ``bn``, with the folded weights."""
    scale, shift = batchnorm_affine(bn, view, ctx)
    producer = view.producer.get(bn.input[0])
    require(producer is not None and is_standard(producer), "the input is not made by a standard node of this graph")
    require(producer.op_type in ("Conv", "ConvTranspose", "Gemm"), f"the producer is {producer.op_type}")  # type: ignore[union-attr]
    require(sole_reader(view, bn.input[0]) is bn, "the producer's output is read elsewhere")
    if producer.op_type == "Gemm":  # type: ignore[union-attr]
        fold = gemm_fold(producer, view, ctx, scale, shift)  # type: ignore[arg-type]
    else:
        conv_node_ok(producer, view)  # type: ignore[arg-type]
        weight, bias = conv_fold(producer, view, scale, shift)  # type: ignore[arg-type]
        fold = WeightFold(producer, weight, bias, "", kind=producer.op_type)  # type: ignore[arg-type,union-attr]
    fold.output, fold.removed = bn.output[0], [bn]
    return fold


@dataclass
class LoneBatchNorm:
    """A BatchNormalization to rewrite as ``Mul(x, scale) -> Add(., shift)`` with per-channel constants."""

    node: NodeProto
    scale: np.ndarray
    shift: np.ndarray


def match_lone_batchnorm(bn: NodeProto, view: GraphView, ctx: PassContext) -> LoneBatchNorm:
    """A BatchNormalization with constant parameters on an input of known rank and float type."""
    require(default_opset(ctx) >= 7, "Mul/Add before opset 7 need the 'broadcast' attribute")
    scale, shift = batchnorm_affine(bn, view, ctx)
    x_type = ctx.types.get(bn.input[0])
    dims = dims_of(x_type)
    require(dims is not None and len(dims) >= 2, "the input rank is unknown or below 2")
    dtype = x_type.tensor_type.elem_type  # type: ignore[union-attr]
    require(dtype in FLOAT_TYPES, "the input is not float, float16 or double")
    channels = dims[1]  # type: ignore[index]
    require(channels is None or channels == scale.shape[0], "the channel count does not match the parameters")
    np_dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}[dtype]
    shape = (scale.shape[0],) + (1,) * (len(dims) - 2)  # type: ignore[arg-type]
    like = np.zeros(0, dtype=np_dtype)
    return LoneBatchNorm(bn, cast_back(scale, like, "scale").reshape(shape), cast_back(shift, like, "shift").reshape(shape))


# ----------------------------------------------------------------------------- Conv -> Mul/Add chains


def per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as a float64 vector of ``channels`` when broadcasting it with a rank-``rank``
    (N, C, ...) tensor applies it per channel without changing the tensor's shape; else None.
    """
    if value.ndim > rank:
        return None
    padded = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1) or padded[1] not in (1, channels):
        return None
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()


AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def affine_step(node: NodeProto, source: str, view: GraphView, rank: int, channels: int, dtype: np.dtype) -> tuple[str, np.ndarray]:
    """(op, per-channel constant) of ``node`` applied to ``source``; NoMatch when it is not such a step."""
    require(is_standard(node) and node.op_type in AFFINE_OPS, f"the reader is {node.op_type}, not Mul/Add/Sub/Div")
    require(len(node.input) == 2 and len(node.output) == 1, "not a binary node")
    commutative = node.op_type in ("Mul", "Add")
    require(node.input[0] == source or (commutative and node.input[1] == source), "the convolution output is not the first operand")
    other = node.input[1] if node.input[0] == source else node.input[0]
    require(other != source, "both operands are the convolution output")
    value = float_constant(view, other, "operand")
    require(value.dtype == dtype, "the operand dtype differs from the weight dtype")
    vector = per_channel(value, rank, channels)
    require(vector is not None, f"the operand of shape {list(value.shape)} is not per output channel")
    require(bool(np.all(np.isfinite(vector))), "the operand is not finite")  # type: ignore[arg-type]
    if node.op_type == "Div":
        require(bool(np.all(vector != 0)), "division by zero")  # type: ignore[operator]
    return node.op_type, vector  # type: ignore[return-value]


def compose_affine(scale: np.ndarray, shift: np.ndarray, op: str, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` of ``op(x * scale + shift, vector)`` for an :func:`affine_step` op (Mul, Div, Add or Sub)."""
    if op == "Mul":
        return scale * vector, shift * vector
    if op == "Div":
        return scale / vector, shift / vector
    return scale, shift + vector if op == "Add" else shift - vector


def match_affine_chain(conv: NodeProto, view: GraphView, ctx: PassContext) -> WeightFold:
    """The run of per-channel Mul/Add/Sub/Div after ``conv`` and the folded weight and bias."""
    require(default_opset(ctx) >= 7, "Mul/Add before opset 7 have the 'broadcast' attribute")
    conv_node_ok(conv, view)
    weight = float_constant(view, conv.input[1], "weight")
    channels = conv_channels(conv, weight.shape)
    rank = weight.ndim
    scale, shift = np.ones(channels), np.zeros(channels)
    chain: list[NodeProto] = []
    current = conv.output[0]
    kinds: list[str] = []
    while True:
        try:
            reader = sole_reader(view, current)
            op, vector = affine_step(reader, current, view, rank, channels, weight.dtype)
        except NoMatch as exc:
            require(bool(chain), str(exc))
            break
        scale, shift = compose_affine(scale, shift, op, vector)
        chain.append(reader)
        kinds.append(op)
        current = reader.output[0]
    new_weight, new_bias = conv_fold(conv, view, scale, shift)
    return WeightFold(conv, new_weight, new_bias, current, chain, kind=conv.op_type, extra={"ops": kinds})


# ----------------------------------------------------------------------------- Pad -> Conv/pool


@dataclass
class PadFusion:
    """A Pad folded into the ``pads`` attribute of its only reader."""

    pad: NodeProto
    consumer: NodeProto
    pads: list[int]


def pad_spec(pad: NodeProto, view: GraphView, ctx: PassContext, rank: int) -> tuple[list[int], float]:
    """(pads over all ``rank`` axes as begins then ends, pad value) of a constant-mode Pad."""
    require(is_standard(pad) and len(pad.output) == 1 and len(pad.input) >= 1, "not a standard Pad")
    mode = get_attr(pad, "mode", "constant")
    require(mode == "constant", f"mode is {mode}")
    opset = default_opset(ctx)
    axes = list(range(rank))
    if opset < 11:
        raw = get_attr(pad, "paddings" if opset < 2 else "pads")
        require(raw is not None, "the pads attribute is missing")
        pads = [int(v) for v in raw]  # type: ignore[union-attr]
        value = float(get_attr(pad, "value", 0.0))  # type: ignore[arg-type]
    else:
        require(len(pad.input) >= 2 and bool(pad.input[1]), "the pads input is missing")
        tensor = constant_tensor(view, pad.input[1])
        require(tensor is not None, "the pads are not a constant of this graph")
        pads = [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]  # type: ignore[arg-type]
        value = 0.0
        if len(pad.input) > 2 and pad.input[2]:
            tensor = constant_tensor(view, pad.input[2])
            require(tensor is not None and tensor.data_type in FLOAT_TYPES, "the pad value is not a float constant")
            array = numpy_helper.to_array(tensor).reshape(-1)  # type: ignore[arg-type]
            require(array.size == 1, "the pad value is not a scalar")
            value = float(array[0])
        if opset >= 18 and len(pad.input) > 3 and pad.input[3]:
            tensor = constant_tensor(view, pad.input[3])
            require(tensor is not None, "the axes are not a constant of this graph")
            axes = [int(a) + rank if int(a) < 0 else int(a) for a in numpy_helper.to_array(tensor).reshape(-1)]  # type: ignore[arg-type]
            require(all(0 <= a < rank for a in axes) and len(set(axes)) == len(axes), "the axes are out of range or repeated")
    require(len(pads) == 2 * len(axes), f"{len(pads)} pads for {len(axes)} axes")
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
    require(all(p >= 0 for p in full), "negative pads crop")
    require(full[0] == full[1] == full[rank] == full[rank + 1] == 0, "the batch or channel axis is padded")
    return full, value


def spatial_rank(consumer: NodeProto, view: GraphView, ctx: PassContext) -> int:
    """How many spatial axes the consumer's input has (from kernel_shape, the weight or types)."""
    kernel = get_attr(consumer, "kernel_shape")
    if kernel:
        return len(kernel)  # type: ignore[arg-type]
    if consumer.op_type == "Conv" and len(consumer.input) > 1:
        tensor = constant_tensor(view, consumer.input[1])
        if tensor is not None:
            return len(tensor.dims) - 2
        dims = dims_of(ctx.types.get(consumer.input[1]))
        if dims is not None:
            return len(dims) - 2
    raise NoMatch("the spatial rank is unknown")


def match_pad_fusion(pad: NodeProto, view: GraphView, ctx: PassContext) -> PadFusion:
    """A zero (or, before MaxPool, -inf) constant Pad of spatial axes whose only reader takes explicit pads."""
    require(len(pad.output) == 1 and bool(pad.input) and bool(pad.input[0]), "not a Pad with one output")
    consumer = sole_reader(view, pad.output[0])
    require(is_standard(consumer), f"domain '{consumer.domain}' is opaque")
    require(consumer.op_type in ("Conv", "AveragePool", "MaxPool"), f"the reader is {consumer.op_type}")
    require(
        consumer.input[0] == pad.output[0] and list(consumer.input).count(pad.output[0]) == 1, "the Pad does not feed only the data input"
    )
    auto_pad = get_attr(consumer, "auto_pad", "NOTSET")
    require(auto_pad in ("NOTSET", "VALID"), f"auto_pad is {auto_pad}")
    spatial = spatial_rank(consumer, view, ctx)
    full, value = pad_spec(pad, view, ctx, spatial + 2)
    if consumer.op_type == "MaxPool":
        require(value == -np.inf, "a MaxPool only ignores pads of -inf")
        require(not any(o and view.uses(o) for o in consumer.output[1:]), "the MaxPool indices are used")
    else:
        require(value == 0.0, f"the pad value is {value}, not 0")
    if consumer.op_type == "AveragePool":
        require(default_opset(ctx) >= 7 and int_attr(consumer, "count_include_pad", 0) == 1, "AveragePool excludes pads from the count")
    old = get_attr(consumer, "pads") if auto_pad == "NOTSET" else None
    old_pads = [int(v) for v in old] if old else [0] * (2 * spatial)  # type: ignore[union-attr]
    require(len(old_pads) == 2 * spatial, "the consumer's pads do not match its rank")
    rank = spatial + 2
    new = [old_pads[i] + full[2 + i] for i in range(spatial)] + [old_pads[spatial + i] + full[rank + 2 + i] for i in range(spatial)]
    if consumer.op_type != "Conv":
        require(int_attr(consumer, "ceil_mode", 0) == 0, "ceil_mode=1")
        kernel = [int(k) for k in get_attr(consumer, "kernel_shape", [])]  # type: ignore[union-attr]
        require(
            len(kernel) == spatial and all(new[i] < kernel[i] and new[spatial + i] < kernel[i] for i in range(spatial)),
            "a pool's pads must stay below its kernel",
        )
    return PadFusion(pad, consumer, new)
