"""Softmax fusion: ``Exp(x - max(x)) / sum(Exp(x - max(x)))`` over one axis, as TF/jax2tf exports write it, becomes Softmax."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, helper

from onnxopt.graph import GraphScope, GraphView, is_standard
from onnxopt.passbase import Pass, PassContext, PassResult, Requirement
from onnxopt.passes.fusion_support import (
    FLOAT_TYPES,
    Fusion,
    apply_fusions,
    check_private,
    collect,
    const_name,
    debug,
    elem,
    producer,
    rank,
    select,
)
from onnxopt.passes.noop_rules import NoMatch, default_opset, get_attr, require
from onnxopt.registry import register_pass

# Opset from which each reduction takes its axes as an input instead of an attribute.
AXES_INPUT_FROM = {"ReduceSum": 13, "ReduceMax": 18}


def reduced_axis(node: NodeProto, view: GraphView, ctx: PassContext, x_rank: int) -> tuple[int, bool]:
    """(axis, keepdims) of a ReduceSum/ReduceMax over exactly one axis; NoMatch otherwise."""
    if default_opset(ctx) >= AXES_INPUT_FROM[node.op_type]:
        require(len(node.input) > 1 and bool(node.input[1]), f"the {node.op_type} has no axes input (it reduces every axis)")
        array = const_name(view, node.input[1])
        require(array is not None, f"the {node.op_type} axes are not a constant")
        axes = [int(a) for a in array.reshape(-1)]  # type: ignore[union-attr]
    else:
        axes = [int(a) for a in get_attr(node, "axes", [])]  # type: ignore[union-attr]
    require(len(axes) == 1 and -x_rank <= axes[0] < x_rank, f"the {node.op_type} does not reduce exactly one axis")
    return axes[0] % x_rank, bool(get_attr(node, "keepdims", 1))


def restored(view: GraphView, ctx: PassContext, name: str, x: str, axis: int, x_rank: int) -> tuple[str, list[NodeProto]]:
    """Walk back from ``name`` over an Unsqueeze/Reshape that puts the reduced ``axis`` back as 1: (reduced value, nodes)."""
    node = view.producer.get(name)
    if node is None or not is_standard(node) or node.op_type not in ("Unsqueeze", "Reshape"):
        return name, []
    if node.op_type == "Unsqueeze":
        if default_opset(ctx) >= 13:
            array = const_name(view, node.input[1]) if len(node.input) > 1 else None
            axes = None if array is None else [int(a) for a in array.reshape(-1)]
        else:
            axes = [int(a) for a in get_attr(node, "axes", [])]  # type: ignore[union-attr]
        require(axes is not None and len(axes) == 1 and axes[0] % x_rank == axis, "the Unsqueeze does not restore the reduced axis")
        return node.input[0], [node]
    require(len(node.input) == 2 and not int(get_attr(node, "allowzero", 0)), "the Reshape takes allowzero")  # type: ignore[arg-type]
    target = const_name(view, node.input[1])
    require(target is not None and target.ndim == 1 and target.size == x_rank, "the Reshape target is not a constant of the input's rank")
    dims = [d if isinstance(d, int) else None for d in _dims(ctx, x)]
    entries = [int(t) for t in target]  # type: ignore[union-attr]
    require(entries[axis] == 1, "the Reshape does not put the reduced axis back as 1")
    unknown = 0
    for index, entry in enumerate(entries):
        if index == axis:
            continue
        if entry == -1:
            unknown += 1
        else:  # a 0 copies dim ``index`` of the reduced value, which is dim ``index`` of x only before the axis
            require(entry == dims[index] or (entry == 0 and index < axis), f"the Reshape changes dim {index}")
    require(unknown <= 1, "the Reshape target has more than one -1")
    return node.input[0], [node]


def _dims(ctx: PassContext, name: str) -> list:
    type_proto = ctx.types.get(name)
    if type_proto is None or not type_proto.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim]


def lowest_constant(view: GraphView, name: str, dtype: np.dtype) -> bool:
    """Whether ``name`` is a one-element constant no larger than the dtype's lowest finite value (or -inf)."""
    array = const_name(view, name)
    if array is None or array.size != 1 or dtype.kind != "f":
        return False
    try:
        lowest = float(np.finfo(dtype).min)
    except ValueError:  # bfloat16 and other dtypes numpy has no finfo for
        return False
    return float(array.reshape(-1)[0]) <= lowest


def match_softmax(div: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``Div(e, Sum(e, axis))`` with ``e = Exp(x - Max(x, axis))`` (or ``Exp(x)``) -> ``Softmax(x, axis)``."""
    require(len(div.input) == 2 and not div.attribute, "not a two-input Div")
    e, total = div.input
    exp = producer(view, e, "Exp")
    sub = view.producer.get(exp.input[0])
    if sub is not None and is_standard(sub) and sub.op_type == "Sub" and len(sub.input) == 2:
        try:
            return _softmax(div, exp, sub.input[0], sub, view, ctx)
        except NoMatch as exc:
            debug("fuse_softmax", div, exc)  # maybe a softmax of the difference itself
    return _softmax(div, exp, exp.input[0], None, view, ctx)


def _softmax(div: NodeProto, exp: NodeProto, x: str, sub: NodeProto | None, view: GraphView, ctx: PassContext) -> Fusion:
    """The Softmax of ``x``: the sum of ``exp`` divides it, ``sub`` (if given) shifts ``x`` by its maximum."""
    e, total = div.input
    dtype = elem(ctx, x)
    require(dtype in FLOAT_TYPES, "the input is not a float tensor of known type")
    x_rank = rank(ctx, x)
    require(x_rank is not None and x_rank >= 1, "the input's rank is unknown")
    sums = producer(view, total, ("ReduceSum", "Reshape", "Unsqueeze"))
    if sums.op_type == "ReduceSum":
        reduce_sum, total_nodes = sums, []
        axis, keepdims = reduced_axis(reduce_sum, view, ctx, x_rank)  # type: ignore[arg-type]
        require(keepdims, "the sum drops the reduced axis")
    else:
        reduce_sum = producer(view, sums.input[0], "ReduceSum")
        axis, keepdims = reduced_axis(reduce_sum, view, ctx, x_rank)  # type: ignore[arg-type]
        require(not keepdims, "the sum keeps its axis and is reshaped again")
        _, total_nodes = restored(view, ctx, total, x, axis, x_rank)  # type: ignore[arg-type]
    require(reduce_sum.input[0] == e, "the sum is not of the Exp")
    nodes = [exp, reduce_sum, *total_nodes, div]
    if sub is not None:
        np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
        nodes = [*match_shift(view, ctx, sub.input[1], x, axis, x_rank, np_dtype), sub, *nodes]  # type: ignore[arg-type]
    check_private(view, nodes, div.output[0])
    needed = 1 if axis == x_rank - 1 else 13  # before 13, Softmax(axis) flattens from axis: per-axis only for the last one
    return Fusion("softmax", "Softmax", [x], div.output[0], nodes, needed, {"axis": axis})


def match_shift(view: GraphView, ctx: PassContext, name: str, x: str, axis: int, x_rank: int, dtype: np.dtype) -> list[NodeProto]:
    """The nodes of ``Max(x, axis)`` [``Max(lowest, .)``] [restored by Reshape/Unsqueeze] writing ``name``."""
    nodes: list[NodeProto] = []
    value, restore = restored(view, ctx, name, x, axis, x_rank)
    node = producer(view, value, ("ReduceMax", "Max"))
    if node.op_type == "Max":  # jax2tf: max(-inf, reduce_max(x)), a no-op on everything but all -inf rows (NaN either way)
        require(len(node.input) == 2, "the Max does not have two inputs")
        floor = [i for i in node.input if lowest_constant(view, i, dtype)]
        require(len(floor) == 1, "the Max is not against the lowest float")
        nodes.append(node)
        node = producer(view, node.input[1] if node.input[0] == floor[0] else node.input[0], "ReduceMax")
    require(node.input[0] == x, "the maximum is not of the Softmax input")
    got_axis, keepdims = reduced_axis(node, view, ctx, x_rank)
    require(got_axis == axis, "the maximum and the sum reduce different axes")
    require(keepdims == (not restore), "the maximum's kept axis does not match its reshape")
    return [node, *nodes, *restore]


@register_pass
class FuseSoftmax(Pass):
    """Fuse a decomposed Softmax over one axis into Softmax.

    Pre: types inferred (``ctx.types``: the input's float dtype and rank). Matched:
    ``Div(e, ReduceSum(e, axis))`` with ``e = Exp(Sub(x, m))``, m = ``ReduceMax(x, axis)``
    (optionally ``Max(c, .)`` with c a one-element constant no larger than the dtype's lowest
    finite value, as jax2tf writes it), or ``e = Exp(x)`` without the shift. Each reduction is
    over exactly one constant axis, with keepdims=1 or keepdims=0 and then an Unsqueeze of that
    axis or a constant Reshape that puts it back as 1 and keeps every other dim (static dims,
    0 before the axis, at most one -1). The shift is mathematically a no-op; the fused Softmax
    equals the pattern up to float rounding, and where the unshifted form overflows, Softmax is
    the exact value. Softmax over the last axis needs any opset (the 2-D coercion before 13
    then changes nothing); another axis needs opset >= 13. Every intermediate must be read only
    inside the pattern and not be a graph output. Custom-domain ops are never touched.

    Post: ``Softmax(x, axis)`` writes the Div's output.
    """

    name = "fuse_softmax"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every Div, then rewrite."""
        result = PassResult()
        view = ctx.view(scope.graph)
        matches = collect(view, "Div", lambda node: match_softmax(node, view, ctx), self.name)
        apply_fusions(scope.graph, view, select(matches, set(), ctx, self.name, result), ctx, result)
        return result
