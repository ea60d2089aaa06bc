"""Normalization fusions: decomposed LayerNorm / InstanceNorm / RMSNorm and exporter GroupNorm subgraphs become one standard op."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, helper

from onnxopt.graph import GraphScope, GraphView, is_standard, opset_version
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, option
from onnxopt.passes.fusion_support import (
    FLOAT_TYPES,
    Fusion,
    apply_fusions,
    check_private,
    const_name,
    debug,
    elem,
    other_input,
    producer,
    rank,
    scalar,
    select,
    sole_reader,
    unique,
)
from onnxopt.passes.noop_rules import NoMatch, dims_of, get_attr, require
from onnxopt.registry import register_pass

# ----------------------------------------------------------------------------- normalization matching


def reduce_axes(node: NodeProto, view: GraphView, ctx: PassContext, x_rank: int) -> list[int]:
    """The sorted non-negative axes a keepdims ReduceMean reduces (attribute before opset 18, input from 18)."""
    require(int(get_attr(node, "keepdims", 1)) == 1, "ReduceMean drops the reduced axes (keepdims=0)")  # type: ignore[arg-type]
    if (opset_version(ctx.model) or 1) >= 18:
        if len(node.input) > 1 and node.input[1]:
            array = const_name(view, node.input[1])
            require(array is not None, "the ReduceMean axes are not a constant")
            axes = [int(a) for a in array.reshape(-1)]  # type: ignore[union-attr]
        else:
            require(not int(get_attr(node, "noop_with_empty_axes", 0)), "ReduceMean without axes is a no-op here")  # type: ignore[arg-type]
            axes = []
    else:
        axes = [int(a) for a in get_attr(node, "axes", [])]  # type: ignore[union-attr]
    if not axes:
        return list(range(x_rank))
    require(all(-x_rank <= a < x_rank for a in axes), "a ReduceMean axis is out of range")
    return sorted({a % x_rank for a in axes})


def trailing(axes: list[int], x_rank: int) -> int:
    """k when ``axes`` are exactly the last k axes; NoMatch otherwise."""
    k = len(axes)
    require(
        k >= 1 and axes == list(range(x_rank - k, x_rank)), f"the reduced axes {axes} are not the trailing axes of a rank-{x_rank} tensor"
    )
    return k


def norm_shape(ctx: PassContext, x: str, k: int) -> tuple[int, ...]:
    """The static shape of the last ``k`` dims of ``x``; NoMatch when any is unknown."""
    dims = dims_of(ctx.types.get(x))
    require(dims is not None, f"the rank of '{x}' is unknown")
    tail = dims[-k:]  # type: ignore[index]
    require(all(d is not None and d > 0 for d in tail), f"the normalized dims of '{x}' are not static")
    return tuple(int(d) for d in tail)  # type: ignore[arg-type]


def affine_operand(view: GraphView, name: str, shape: tuple[int, ...], x_rank: int, role: str) -> str | np.ndarray:
    """A gamma/beta constant as a value of exactly ``shape`` (its own name when already so)."""
    array = const_name(view, name)
    require(array is not None, f"the {role} '{name}' is not a constant of this graph")
    require(array.ndim <= x_rank, f"the {role} raises the rank")  # type: ignore[union-attr]
    k = len(shape)
    lead = array.shape[: max(0, array.ndim - k)]  # type: ignore[union-attr]
    require(all(d == 1 for d in lead), f"the {role} varies along non-normalized axes")
    tail = array.reshape(array.shape[len(lead) :])  # type: ignore[union-attr]
    try:
        require(np.broadcast_shapes(tail.shape, shape) == shape, f"the {role} broadcasts beyond the normalized shape")
    except ValueError:
        raise NoMatch(f"the {role} shape {array.shape} does not broadcast to {shape}") from None  # type: ignore[union-attr]
    if tuple(array.shape) == shape:  # type: ignore[union-attr]
        return name
    return np.ascontiguousarray(np.broadcast_to(tail, shape))


def match_eps_sqrt(view: GraphView, var: str) -> tuple[float, int, list[NodeProto], str]:
    """``Sqrt(Add(var, eps))`` after the variance: (eps, eps rank, nodes, sqrt output)."""
    add = sole_reader(view, var, "Add")
    eps = scalar(view, other_input(add, var))
    require(eps is not None, "epsilon is not a one-element float constant")
    sqrt = sole_reader(view, add.output[0], "Sqrt")
    return eps[0], eps[1], [add, sqrt], sqrt.output[0]  # type: ignore[index]


def match_scaling(view: GraphView, value: str, std: str) -> tuple[list[NodeProto], str]:
    """``value / std`` as Div(value, std), Mul(value, Reciprocal(std)) or Mul(value, Div(1, std))."""
    reader = sole_reader(view, std, ("Div", "Reciprocal"))
    if reader.op_type == "Div" and list(reader.input) == [value, std]:
        return [reader], reader.output[0]
    if reader.op_type == "Div":
        one = scalar(view, reader.input[0])
        require(reader.input[1] == std and one is not None and one[0] == 1.0 and one[1] == 0, "Div is not value/std nor 1/std")
    mul = sole_reader(view, reader.output[0], "Mul")
    require(other_input(mul, reader.output[0]) == value, "the inverse deviation does not scale the normalized value")
    return [reader, mul], mul.output[0]


def match_affine(view: GraphView, value: str, operand: Callable[[str, str], Any]) -> tuple[list[NodeProto], str, Any, Any]:
    """Optional Mul(gamma) then Add(beta) (either operand order): (nodes, output, gamma, beta).

    ``operand(name, role)`` turns the other input into the fused op's gamma/beta or raises
    NoMatch (the node then stays outside the pattern).
    """
    nodes: list[NodeProto] = []
    gamma: Any = None
    beta: Any = None
    for op, role in (("Mul", "scale"), ("Add", "bias")):
        readers = unique(view.consumers.get(value, []))
        if len(readers) != 1 or readers[0].op_type != op or not is_standard(readers[0]) or value in view.graph_outputs:
            continue
        node = readers[0]
        if len(node.input) != 2 or node.input[0] == node.input[1]:
            continue
        try:
            converted = operand(other_input(node, value), role)
        except NoMatch:
            continue
        if role == "scale":
            gamma = converted
        else:
            beta = converted
        nodes.append(node)
        value = node.output[0]
    return nodes, value, gamma, beta


@dataclass
class Moments:
    """A matched ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)`` over ``axes`` of ``x``."""

    x: str
    x_rank: int
    dtype: int
    axes: list[int]
    eps: float
    nodes: list[NodeProto]
    normed: str


def match_moments(sub: NodeProto, view: GraphView, ctx: PassContext) -> Moments:
    """``Sub(x, ReduceMean(x))`` anchoring a mean/variance normalization over any axes of ``x``."""
    require(sub.op_type == "Sub" and is_standard(sub) and len(sub.input) == 2, "not a Sub")
    x, mean_out = sub.input
    mean = producer(view, mean_out, "ReduceMean")
    require(mean.input[0] == x, "the Sub does not subtract the mean of its own first input")
    x_rank = rank(ctx, x)
    require(x_rank is not None and x_rank >= 1, f"the rank of '{x}' is unknown")
    dtype = elem(ctx, x)
    require(dtype in FLOAT_TYPES, "the input is not a float tensor")
    axes = reduce_axes(mean, view, ctx, x_rank)  # type: ignore[arg-type]
    centered = sub.output[0]
    readers = unique(view.consumers.get(centered, []))
    require(len(readers) == 2, f"the centered value has {len(readers)} readers, the pattern needs two")
    square = next((r for r in readers if is_square(r, centered, view)), None)
    require(square is not None, "the centered value is not squared (Pow 2 or Mul by itself)")
    var = sole_reader(view, square.output[0], "ReduceMean")  # type: ignore[union-attr]
    require(reduce_axes(var, view, ctx, x_rank) == axes, "the two ReduceMean nodes reduce different axes")  # type: ignore[arg-type]
    eps, eps_rank, eps_nodes, std = match_eps_sqrt(view, var.output[0])
    require(eps_rank <= x_rank, "epsilon raises the rank")  # type: ignore[operator]
    scale_nodes, normed = match_scaling(view, centered, std)
    inside = {id(square), *(id(n) for n in scale_nodes)}
    require(all(id(r) in inside for r in readers), "the centered value has a reader outside the pattern")
    nodes = [mean, sub, square, var, *eps_nodes, *scale_nodes]  # type: ignore[list-item]
    return Moments(x, x_rank, dtype, axes, eps, nodes, normed)  # type: ignore[arg-type]


def match_layernorm(sub: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """The normalization anchored at ``sub``: LayerNorm (trailing axes), InstanceNorm or channel LayerNorm.

    See :class:`FuseLayerNorm`; the Fusion's kind is ``layernorm``, ``instancenorm`` or
    ``channel_layernorm`` (a :class:`TransposedFusion`).
    """
    core = match_moments(sub, view, ctx)
    x_rank, axes = core.x_rank, core.axes
    if x_rank >= 3 and axes == list(range(2, x_rank)):  # also trailing: take the form that absorbs more of the affine
        candidates: list[Fusion] = []
        reasons: list[str] = []
        for form in (trailing_layernorm, instancenorm):
            try:
                candidates.append(form(core, view, ctx))
            except NoMatch as exc:
                reasons.append(str(exc))
        require(bool(candidates), "; ".join(reasons))
        return max(candidates, key=lambda f: len(f.nodes))  # ties: the LayerNormalization (first)
    if axes == list(range(x_rank - len(axes), x_rank)):
        return trailing_layernorm(core, view, ctx)
    if x_rank >= 3 and axes == [1]:
        return channel_layernorm(core, view, ctx)
    raise NoMatch(f"the reduced axes {axes} of a rank-{x_rank} tensor are neither trailing, spatial nor the channel axis")


def trailing_layernorm(core: Moments, view: GraphView, ctx: PassContext) -> Fusion:
    """LayerNormalization(axis=-k) for a normalization over the trailing k axes."""
    k = trailing(core.axes, core.x_rank)
    shape = norm_shape(ctx, core.x, k)
    affine, output, gamma, beta = match_affine(view, core.normed, lambda name, role: affine_operand(view, name, shape, core.x_rank, role))
    nodes = [*core.nodes, *affine]
    check_private(view, nodes, output)
    np_dtype = helper.tensor_dtype_to_np_dtype(core.dtype)
    inputs: list[str | np.ndarray] = [core.x, gamma if gamma is not None else np.ones(shape, np_dtype)]
    if beta is not None:
        inputs.append(beta)
    return Fusion("layernorm", "LayerNormalization", inputs, output, nodes, 17, layernorm_attrs(-k, core.eps, core.dtype))


def layernorm_attrs(axis: int, eps: float, dtype: int) -> dict[str, Any]:
    """LayerNormalization attributes (double inputs keep double statistics)."""
    attrs: dict[str, Any] = {"axis": axis, "epsilon": eps}
    if dtype == TensorProto.DOUBLE:
        attrs["stash_type"] = TensorProto.DOUBLE
    return attrs


def channels_of(ctx: PassContext, x: str) -> int:
    """The static size of axis 1 of ``x``; NoMatch when unknown."""
    dims = dims_of(ctx.types.get(x))
    require(dims is not None and len(dims) >= 2 and dims[1] is not None and dims[1] > 0, f"the channel count of '{x}' is not static")
    return int(dims[1])  # type: ignore[index,arg-type]


def channel_operand(view: GraphView, name: str, channels: int, x_rank: int, dtype: int, role: str) -> np.ndarray:
    """A per-channel (axis 1) constant of an (N, C, ...) value as a vector of ``channels``; NoMatch otherwise."""
    array = const_name(view, name)
    require(array is not None, f"the {role} '{name}' is not a constant of this graph")
    require(array.dtype == helper.tensor_dtype_to_np_dtype(dtype), f"the {role} dtype differs from the input's")  # type: ignore[union-attr]
    require(array.ndim <= x_rank, f"the {role} raises the rank")  # type: ignore[union-attr]
    padded = (1,) * (x_rank - array.ndim) + tuple(array.shape)  # type: ignore[union-attr]
    require(
        all(d == 1 for i, d in enumerate(padded) if i != 1) and padded[1] in (1, channels),
        f"the {role} of shape {padded} is not per channel",
    )
    return np.ascontiguousarray(np.broadcast_to(array.reshape(-1), (channels,)))  # type: ignore[union-attr]


def channel_affine(core: Moments, view: GraphView, ctx: PassContext) -> tuple[int, list[NodeProto], str, Any, Any]:
    """(channels, pattern nodes, output, gamma, beta) of ``core`` and its optional per-channel Mul/Add; checked private."""
    channels = channels_of(ctx, core.x)
    affine, output, gamma, beta = match_affine(
        view, core.normed, lambda name, role: channel_operand(view, name, channels, core.x_rank, core.dtype, role)
    )
    nodes = [*core.nodes, *affine]
    check_private(view, nodes, output)
    return channels, nodes, output, gamma, beta


def instancenorm(core: Moments, view: GraphView, ctx: PassContext) -> Fusion:
    """InstanceNormalization for a normalization over every spatial axis of an (N, C, ...) value."""
    require(core.dtype != TensorProto.BFLOAT16, "InstanceNormalization takes no bfloat16 before opset 22")
    channels, nodes, output, gamma, beta = channel_affine(core, view, ctx)
    np_dtype = helper.tensor_dtype_to_np_dtype(core.dtype)
    scale = gamma if gamma is not None else np.ones(channels, np_dtype)
    bias = beta if beta is not None else np.zeros(channels, np_dtype)
    return Fusion("instancenorm", "InstanceNormalization", [core.x, scale, bias], output, nodes, 6, {"epsilon": core.eps})


@dataclass
class TransposedFusion(Fusion):
    """A Fusion whose op runs between ``Transpose(perm)`` of its first input and the inverse Transpose."""

    perm: list[int] = field(default_factory=list)

    def build(self, graph: GraphProto, ctx: PassContext) -> list[NodeProto]:
        """``Transpose(perm) -> op -> Transpose(inverse perm)`` writing :attr:`output`."""
        base = self.output
        moved, normed = ctx.names.fresh(f"{base}_channels_last"), ctx.names.fresh(f"{base}_normed")
        inverse = [self.perm.index(i) for i in range(len(self.perm))]
        core = Fusion(self.kind, self.op_type, [moved, *self.inputs[1:]], normed, self.nodes, self.opset, self.attrs)
        return [
            helper.make_node("Transpose", [self.inputs[0]], [moved], name=ctx.names.fresh(f"{base}_Transpose"), perm=self.perm),  # type: ignore[list-item]
            *core.build(graph, ctx),
            helper.make_node("Transpose", [normed], [base], name=ctx.names.fresh(f"{base}_Transpose"), perm=inverse),
        ]


def channel_layernorm(core: Moments, view: GraphView, ctx: PassContext) -> TransposedFusion:
    """``Transpose -> LayerNormalization(axis=-1) -> Transpose`` for a normalization over axis 1 of a rank >= 3 value."""
    channels, nodes, output, gamma, beta = channel_affine(core, view, ctx)
    np_dtype = helper.tensor_dtype_to_np_dtype(core.dtype)
    inputs: list[str | np.ndarray] = [core.x, gamma if gamma is not None else np.ones(channels, np_dtype)]
    if beta is not None:
        inputs.append(beta)
    perm = [0, *range(2, core.x_rank), 1]
    attrs = layernorm_attrs(-1, core.eps, core.dtype)
    return TransposedFusion("channel_layernorm", "LayerNormalization", inputs, output, nodes, 17, attrs, perm=perm)


def is_square(node: NodeProto, value: str, view: GraphView) -> bool:
    """Whether ``node`` computes ``value`` squared: Pow(value, 2) or Mul(value, value)."""
    if not is_standard(node) or len(node.input) != 2:
        return False
    if node.op_type == "Mul":
        return list(node.input) == [value, value]
    if node.op_type == "Pow" and node.input[0] == value:
        array = const_name(view, node.input[1])
        return array is not None and array.size == 1 and array.ndim == 0 and float(array.reshape(-1)[0]) == 2.0
    return False


def match_rmsnorm(var: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``ReduceMean(x^2)`` anchoring ``x / sqrt(mean(x^2) + eps) * gamma`` (see :class:`FuseLayerNorm`)."""
    require(var.op_type == "ReduceMean" and is_standard(var), "not a ReduceMean")
    square = view.producer.get(var.input[0])
    require(square is not None and square.op_type in ("Pow", "Mul"), "the ReduceMean does not read a square")
    x = square.input[0]  # type: ignore[union-attr]
    require(is_square(square, x, view), "the ReduceMean does not read a square")  # type: ignore[arg-type]
    x_rank = rank(ctx, x)
    require(x_rank is not None and x_rank >= 1, f"the rank of '{x}' is unknown")
    dtype = elem(ctx, x)
    require(dtype in FLOAT_TYPES, "the input is not a float tensor")
    k = trailing(reduce_axes(var, view, ctx, x_rank), x_rank)  # type: ignore[arg-type]
    shape = norm_shape(ctx, x, k)
    eps, eps_rank, eps_nodes, std = match_eps_sqrt(view, var.output[0])
    require(eps_rank <= x_rank, "epsilon raises the rank")  # type: ignore[operator]
    scale_nodes, normed = match_scaling(view, x, std)
    affine, output, gamma, beta = match_affine(view, normed, lambda name, role: affine_operand(view, name, shape, x_rank, role))  # type: ignore[arg-type]
    if beta is not None:  # RMSNormalization has no bias: the Add stays outside
        affine = affine[:-1]
        output = affine[-1].output[0] if affine else normed
    nodes = [square, var, *eps_nodes, *scale_nodes, *affine]  # type: ignore[list-item]
    check_private(view, nodes, output)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inputs: list[str | np.ndarray] = [x, gamma if gamma is not None else np.ones(shape, np_dtype)]
    attrs: dict[str, Any] = {"axis": -k, "epsilon": eps}
    if dtype == TensorProto.DOUBLE:
        attrs["stash_type"] = TensorProto.DOUBLE
    return Fusion("rmsnorm", "RMSNormalization", inputs, output, nodes, 23, attrs)


# ----------------------------------------------------------------------------- GroupNorm


def reshape_target(node: NodeProto, view: GraphView) -> tuple[list[int], bool]:
    """(constant target, allowzero) of a standard two-input Reshape; NoMatch otherwise."""
    require(node.op_type == "Reshape" and is_standard(node) and len(node.input) == 2, "not a two-input Reshape")
    array = const_name(view, node.input[1])
    require(array is not None and array.dtype.kind == "i" and array.ndim == 1, "the Reshape target is not a constant int vector")
    return [int(v) for v in array], bool(get_attr(node, "allowzero", 0))  # type: ignore[union-attr,arg-type]


def ones_and_zeros(view: GraphView, scale: str, bias: str, size: int) -> None:
    """NoMatch unless ``scale`` is a constant of ones and ``bias`` absent or a constant of zeros, each of ``size`` values."""
    array = const_name(view, scale)
    require(array is not None and array.size == size and bool(np.all(array == 1)), "the inner scale is not a constant of ones")
    if bias:
        array = const_name(view, bias)
        require(array is not None and array.size == size and bool(np.all(array == 0)), "the inner bias is not a constant of zeros")


def match_group_inner(node: NodeProto, view: GraphView, ctx: PassContext) -> tuple[str, float]:
    """(input, epsilon) of an unscaled normalization over the last axis of a rank-3 value.

    ``InstanceNormalization(v, ones, zeros)`` or ``LayerNormalization(v, ones[, zeros], axis=-1)``.
    """
    v = node.input[0]
    require(rank(ctx, v) == 3, f"the normalized value '{v}' is not rank 3")
    dims = dims_of(ctx.types.get(v))
    if node.op_type == "InstanceNormalization":
        require(len(node.input) == 3 and len(node.output) == 1, "not a three-input InstanceNormalization")
        groups = dims[1]  # type: ignore[index]
        require(groups is not None, "the group count is not static")
        ones_and_zeros(view, node.input[1], node.input[2], groups)  # type: ignore[arg-type]
        return v, float(get_attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]
    require(node.op_type == "LayerNormalization" and len(node.input) >= 2, "not an InstanceNormalization or LayerNormalization")
    require(int(get_attr(node, "axis", -1)) in (-1, 2), "the LayerNormalization is not over the last axis")  # type: ignore[arg-type]
    require(int(get_attr(node, "stash_type", 1)) == TensorProto.FLOAT, "the LayerNormalization keeps double statistics")  # type: ignore[arg-type]
    require(not any(o for o in node.output[1:]), "the LayerNormalization's statistics outputs are declared")
    size = dims[2]  # type: ignore[index]
    require(size is not None, "the normalized size is not static")
    ones_and_zeros(view, node.input[1], node.input[2] if len(node.input) > 2 else "", size)  # type: ignore[arg-type]
    return v, float(get_attr(node, "epsilon", 1e-5))  # type: ignore[arg-type]


def restores_shape(node: NodeProto, view: GraphView, ctx: PassContext, x: str, x_dims: list[int | None]) -> list[NodeProto]:
    """NoMatch unless the Reshape ``node`` (of an [N, G, X] value made from ``x``) gives back ``x``'s shape.

    Its target is ``Shape(x)`` or a constant whose entries are ``x``'s static dims, ``0``
    in place of the batch (allowzero=0) or one ``-1``. Returns the Shape node when one is used.
    """
    require(node.op_type == "Reshape" and is_standard(node) and len(node.input) == 2, "the inner result is not reshaped back")
    shape = view.producer.get(node.input[1])
    if shape is not None and shape.op_type == "Shape" and is_standard(shape) and shape.input[0] == x and not shape.attribute:
        return [shape]
    target, allowzero = reshape_target(node, view)
    require(len(target) == len(x_dims) and target.count(-1) <= 1, "the second Reshape does not restore the input's rank")
    for i, (t, d) in enumerate(zip(target, x_dims)):
        require(t == -1 or (d is not None and t == d) or (i == 0 and t == 0 and not allowzero), f"the second Reshape changes dim {i}")
    return []


def match_groupnorm(inner: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``Reshape(x, [N, G, -1]) -> unscaled norm -> Reshape(back) [-> Mul(gamma)] [-> Add(beta)]`` as GroupNormalization."""
    require(is_standard(inner) and inner.op_type in ("InstanceNormalization", "LayerNormalization"), "not an unscaled normalization")
    require(ctx.target == "trt", "GroupNormalization is emitted for target trt only: onnxruntime runs the exporter's form 1.7-3.7x faster")
    v, eps = match_group_inner(inner, view, ctx)
    first = producer(view, v, "Reshape")
    x = first.input[0]
    x_dims = dims_of(ctx.types.get(x))
    require(x_dims is not None and len(x_dims) >= 3, f"the rank of '{x}' is unknown or below 3")
    dtype = elem(ctx, x)
    require(dtype in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE), "the input is not float, float16 or double")
    channels = channels_of(ctx, x)
    target, allowzero = reshape_target(first, view)
    require(len(target) == 3, "the first Reshape does not make a rank-3 value")
    groups = target[1]
    require(groups > 0 and channels % groups == 0, f"{groups} groups do not divide {channels} channels")
    batch_ok = (target[0] == 0 and not allowzero) or (x_dims[0] is not None and target[0] == x_dims[0])  # type: ignore[index]
    spatial = x_dims[2:]  # type: ignore[index]
    rest = None if any(d is None for d in spatial) else channels // groups * int(np.prod(spatial, dtype=np.int64))
    require(batch_ok and (target[2] == -1 or (rest is not None and target[2] == rest)), f"the first Reshape {target} is not [N, G, -1]")
    second = sole_reader(view, inner.output[0], "Reshape")
    shape_nodes = restores_shape(second, view, ctx, x, x_dims)  # type: ignore[arg-type]
    shape_nodes = [s for s in shape_nodes if unique(view.consumers.get(s.output[0], [])) == [second]]
    affine, output, gamma, beta = match_affine(
        view,
        second.output[0],
        lambda name, role: channel_operand(view, name, channels, len(x_dims), dtype, role),  # type: ignore[arg-type]
    )
    nodes = [first, inner, *shape_nodes, second, *affine]
    check_private(view, nodes, output)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    scale = gamma if gamma is not None else np.ones(channels, np_dtype)
    bias = beta if beta is not None else np.zeros(channels, np_dtype)
    attrs = {"num_groups": groups, "epsilon": eps}
    return Fusion("groupnorm", "GroupNormalization", [x, scale, bias], output, nodes, 21, attrs)


@register_pass
class FuseLayerNorm(Pass):
    """Fuse decomposed LayerNorm/InstanceNorm/RMSNorm and exporter GroupNorm subgraphs into one standard op.

    Pre: types inferred (``ctx.types``: rank, dtype and static normalized dims of the input).
    Mean/variance normalizations: ``m = ReduceMean(x); d = Sub(x, m); v = ReduceMean(Pow(d, 2)
    | Mul(d, d)); Div(d, Sqrt(Add(v, eps)))`` (or ``Mul(d, Reciprocal(Sqrt(..)))``), then
    optionally ``Mul(gamma)`` and ``Add(beta)`` in either operand order. ReduceMean axes as
    attribute (opset < 18) or constant input (opset >= 18), keepdims=1, both reductions over
    the same axes; eps a one-element float constant. By the axes:

    - the trailing k axes: LayerNormalization(axis=-k) (opset >= 17); gamma/beta constants
      that vary only along the normalized axes and broadcast to exactly their static shape
      (materialized to that shape when needed; gamma absent: ones; beta absent: no bias);
    - every spatial axis of a rank >= 4 (N, C, ...) value: InstanceNormalization (float,
      float16, double; static C); gamma/beta per channel ([C, 1, ...], [1, C, 1, ...] or one
      value; absent: ones/zeros);
    - axis 1 of a rank >= 3 value (channels-first LayerNorm, as ConvNeXt writes it):
      ``Transpose(channels last) -> LayerNormalization(axis=-1) -> Transpose(back)``
      (opset >= 17; static C); gamma/beta per channel as for InstanceNorm.

    A Mul/Add whose operand does not fit stays outside the fused op. GroupNorm as torch
    exports it: ``Reshape(x, [N | 0, G, -1]) -> InstanceNormalization(ones, zeros)`` (or
    ``LayerNormalization(ones[, zeros], axis=-1)`` on that rank-3 value) ``-> Reshape(back to
    x's shape: Shape(x) or a constant of x's dims, 0 for the batch, one -1) [-> Mul(gamma)]
    [-> Add(beta)]`` with per-channel gamma/beta becomes GroupNormalization(num_groups=G),
    opset >= 21 (GroupNormalization-18, with per-group scale, is deprecated: the onnx checker
    rejects it, so it is never emitted), for target trt only (onnxruntime's CPU
    GroupNormalization runs 1.7-3.7x slower than the exporter's InstanceNormalization form). RMSNorm: ``x / Sqrt(Add(ReduceMean(x^2),
    eps))`` (Div, Reciprocal+Mul or Div(1, .)+Mul) then optional ``Mul(gamma)`` becomes
    RMSNormalization (opset >= 23). Every intermediate must be read only inside the pattern
    and not be a graph output. A fp16 export's Casts around the float part stay; the inner
    part is fused. Below the needed opset nothing is rewritten and a note says why. Double
    inputs keep double statistics (stash_type). Custom-domain ops are never touched; nothing
    is done in IR < 4 models.

    Post: the fused node (channels-first LayerNorm: the second Transpose) writes the
    pattern's last value (graph outputs keep their names); new gamma/beta tensors are new
    initializers; original constants are left for ``eliminate_dead_code``.
    """

    name = "fuse_layernorm"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    @dataclass
    class Options(PassOptions):
        """Options of fuse_layernorm."""

        layernorm: bool = option(True, "fuse LayerNorm over trailing axes into LayerNormalization (opset >= 17)")
        instancenorm: bool = option(True, "fuse a normalization over the spatial axes into InstanceNormalization")
        channel_layernorm: bool = option(True, "fuse a normalization over axis 1 into Transpose + LayerNormalization + Transpose")
        groupnorm: bool = option(True, "fuse the exporter GroupNorm into GroupNormalization (opset >= 21; target trt only)")
        rmsnorm: bool = option(True, "fuse RMSNorm into RMSNormalization (opset >= 23)")

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every mean/variance normalization, then every RMSNorm and GroupNorm on the nodes left, then rewrite."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        view = ctx.view(scope.graph)
        claimed: set[int] = set()
        found: list[Fusion] = []
        options = self.options
        wanted = {kind: bool(getattr(options, kind)) for kind in ("layernorm", "instancenorm", "channel_layernorm", "groupnorm", "rmsnorm")}
        searches = (
            (("Sub",), match_layernorm, wanted["layernorm"] or wanted["instancenorm"] or wanted["channel_layernorm"]),
            (("ReduceMean",), match_rmsnorm, wanted["rmsnorm"]),
            (("InstanceNormalization", "LayerNormalization"), match_groupnorm, wanted["groupnorm"]),
        )
        for anchors, matcher, enabled in searches:
            if not enabled:
                continue
            matches: list[Fusion] = []
            for node in view.nodes:
                if node.op_type not in anchors or not is_standard(node) or id(node) in claimed:
                    continue
                try:
                    fusion = matcher(node, view, ctx)
                except NoMatch as exc:
                    debug(self.name, node, exc)
                    continue
                if wanted[fusion.kind]:
                    matches.append(fusion)
            found.extend(select(matches, claimed, ctx, self.name, result))
        apply_fusions(scope.graph, view, found, ctx, result)
        return result
