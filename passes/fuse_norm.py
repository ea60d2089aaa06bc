"""Normalization fusions: decomposed LayerNorm / RMSNorm subgraphs become one standard op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper

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


def match_affine(view: GraphView, value: str, shape: tuple[int, ...], x_rank: int) -> tuple[list[NodeProto], str, Any, Any]:
    """Optional Mul(gamma) then Add(beta) (either operand order): (nodes, output, gamma, beta)."""
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
            operand = affine_operand(view, other_input(node, value), shape, x_rank, role)
        except NoMatch:
            continue
        if role == "scale":
            gamma = operand
        else:
            beta = operand
        nodes.append(node)
        value = node.output[0]
    return nodes, value, gamma, beta


def match_layernorm(sub: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``Sub(x, ReduceMean(x))`` anchoring the exporter LayerNorm pattern (see :class:`FuseLayerNorm`)."""
    require(sub.op_type == "Sub" and is_standard(sub) and len(sub.input) == 2, "not a Sub")
    x, mean_out = sub.input
    mean = producer(view, mean_out, "ReduceMean")
    require(mean.input[0] == x, "the Sub does not subtract the mean of its own first input")
    x_rank = rank(ctx, x)
    require(x_rank is not None and x_rank >= 1, f"the rank of '{x}' is unknown")
    dtype = elem(ctx, x)
    require(dtype in FLOAT_TYPES, "the input is not a float tensor")
    axes = reduce_axes(mean, view, ctx, x_rank)  # type: ignore[arg-type]
    k = trailing(axes, x_rank)  # type: ignore[arg-type]
    shape = norm_shape(ctx, x, k)
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
    affine, output, gamma, beta = match_affine(view, normed, shape, x_rank)  # type: ignore[arg-type]
    nodes = [mean, sub, square, var, *eps_nodes, *scale_nodes, *affine]  # type: ignore[list-item]
    check_private(view, nodes, output)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inputs: list[str | np.ndarray] = [x, gamma if gamma is not None else np.ones(shape, np_dtype)]
    if beta is not None:
        inputs.append(beta)
    attrs: dict[str, Any] = {"axis": -k, "epsilon": eps}
    if dtype == TensorProto.DOUBLE:
        attrs["stash_type"] = TensorProto.DOUBLE
    return Fusion("layernorm", "LayerNormalization", inputs, output, nodes, 17, attrs)


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
    affine, output, gamma, beta = match_affine(view, normed, shape, x_rank)  # type: ignore[arg-type]
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


@register_pass
class FuseLayerNorm(Pass):
    """Fuse decomposed LayerNorm into LayerNormalization (opset >= 17) and RMSNorm into RMSNormalization (opset >= 23).

    Pre: types inferred (``ctx.types``: rank, dtype and static normalized dims of the input).
    LayerNorm: ``m = ReduceMean(x); d = Sub(x, m); v = ReduceMean(Pow(d, 2) | Mul(d, d));
    Div(d, Sqrt(Add(v, eps)))`` (or ``Mul(d, Reciprocal(Sqrt(..)))``), then optionally
    ``Mul(gamma)`` and ``Add(beta)`` in either operand order. ReduceMean axes as attribute
    (opset < 18) or constant input (opset >= 18), keepdims=1, both reductions over exactly
    the trailing k axes (LayerNormalization axis=-k); eps a one-element float constant;
    gamma/beta constants that vary only along the normalized axes and broadcast to exactly
    their static shape (materialized to that shape when needed; gamma absent: ones; beta
    absent: no bias input). Every intermediate must be read only inside the pattern and not
    be a graph output. A fp16 export's Casts around the float part stay; the inner part is
    fused. RMSNorm: ``x / Sqrt(Add(ReduceMean(x^2), eps))`` (Div, Reciprocal+Mul or
    Div(1, .)+Mul) then optional ``Mul(gamma)``. Below the needed opset nothing is rewritten
    and a note says why. Float, float16, double and bfloat16 inputs (double: stash_type
    double). Custom-domain ops are never touched; nothing is done in IR < 4 models.

    Post: the fused node writes the pattern's last value (graph outputs keep their names);
    new gamma tensors are new initializers; original constants are left for
    ``eliminate_dead_code``.
    """

    name = "fuse_layernorm"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    @dataclass
    class Options(PassOptions):
        """Options of fuse_layernorm."""

        layernorm: bool = option(True, "fuse LayerNorm into LayerNormalization (opset >= 17)")
        rmsnorm: bool = option(True, "fuse RMSNorm into RMSNormalization (opset >= 23)")

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every LayerNorm, then every RMSNorm on the nodes left, then rewrite."""
        result = PassResult()
        if ctx.model.ir_version < 4:
            return result
        view = ctx.view(scope.graph)
        claimed: set[int] = set()
        found: list[Fusion] = []
        wanted = {"layernorm": self.options.layernorm, "rmsnorm": self.options.rmsnorm}  # type: ignore[attr-defined]
        for kind, anchor, matcher in (("layernorm", "Sub", match_layernorm), ("rmsnorm", "ReduceMean", match_rmsnorm)):
            if not wanted[kind]:
                continue
            matches: list[Fusion] = []
            for node in view.nodes:
                if node.op_type != anchor or not is_standard(node) or id(node) in claimed:
                    continue
                try:
                    matches.append(matcher(node, view, ctx))
                except NoMatch as exc:
                    debug(self.name, node, exc)
            found.extend(select(matches, claimed, ctx, self.name, result))
        apply_fusions(scope.graph, view, found, ctx, result)
        return result
