"""Mean fusion: a ReduceSum scaled by 1/N (or divided by N), N the number of reduced elements, becomes ReduceMean."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, helper

from onnxopt.graph import GraphScope, GraphView
from onnxopt.passbase import Pass, PassContext, PassResult, Requirement
from onnxopt.passes.fusion_support import (
    FLOAT_TYPES,
    Fusion,
    apply_fusions,
    check_private,
    close,
    collect,
    const_name,
    elem,
    scalar,
    select,
    sole_reader,
)
from onnxopt.passes.noop_rules import default_opset, dims_of, get_attr, require
from onnxopt.registry import register_pass

SUM_AXES_INPUT_FROM = 13  # ReduceSum takes its axes as an input from opset 13 ...
MEAN_AXES_INPUT_FROM = 18  # ... ReduceMean only from 18


def sum_axes(node: NodeProto, view: GraphView, ctx: PassContext, x_rank: int) -> list[int]:
    """The sorted non-negative axes a ReduceSum reduces (all of them when none are given); NoMatch when not constant."""
    if default_opset(ctx) >= SUM_AXES_INPUT_FROM:
        if len(node.input) > 1 and node.input[1]:
            array = scalar_or_vector(view, node.input[1])
            require(array is not None, "the ReduceSum axes are not a constant")
            axes = [int(a) for a in array.reshape(-1)]  # type: ignore[union-attr]
        else:
            require(not int(get_attr(node, "noop_with_empty_axes", 0)), "a ReduceSum without axes is a no-op here")  # type: ignore[arg-type]
            axes = []
    else:
        axes = [int(a) for a in get_attr(node, "axes", [])]  # type: ignore[union-attr]
    require(all(-x_rank <= a < x_rank for a in axes), "a ReduceSum axis is out of range")
    return sorted({a % x_rank for a in axes}) if axes else list(range(x_rank))


def scalar_or_vector(view: GraphView, name: str) -> np.ndarray | None:
    """The value of an int constant of this graph, or None."""
    array = const_name(view, name)
    return array if array is not None and array.dtype.kind in "iu" else None


def match_reduce_mean(reduce_sum: NodeProto, view: GraphView, ctx: PassContext) -> Fusion:
    """``Mul(ReduceSum(x, axes), 1/N)`` or ``Div(ReduceSum(x, axes), N)`` (constant on either side of the Mul) -> ``ReduceMean``."""
    require(len(reduce_sum.output) == 1, "the ReduceSum has extra outputs")
    x = reduce_sum.input[0]
    dtype = elem(ctx, x)
    require(dtype in FLOAT_TYPES, "the input is not a float tensor of known type")
    dims = dims_of(ctx.types.get(x))
    require(dims is not None, "the input's rank is unknown")
    axes = sum_axes(reduce_sum, view, ctx, len(dims))  # type: ignore[arg-type]
    reduced = [dims[a] for a in axes]  # type: ignore[index]
    require(all(isinstance(d, int) and d > 0 for d in reduced), "a reduced dim is not static")
    count = int(np.prod(reduced, dtype=np.int64))
    scale = sole_reader(view, reduce_sum.output[0], ("Mul", "Div"))
    require(len(scale.input) == 2 and not scale.attribute, "the scaling has legacy broadcast attributes or not two inputs")
    total = reduce_sum.output[0]
    if scale.op_type == "Div":
        require(scale.input[0] == total, "the sum is the divisor")
        factor = scalar(view, scale.input[1])
        expected = float(count)
    else:
        factor = scalar(view, scale.input[1] if scale.input[0] == total else scale.input[0])
        expected = 1.0 / count
    require(factor is not None, "the scale is not a one-element float constant")
    require(factor[1] <= len(dims) - (0 if get_attr(reduce_sum, "keepdims", 1) else len(axes)), "the scale raises the rank")  # type: ignore[index,operator]
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
    require(close(factor[0], expected, np_dtype), f"the scale {factor[0]:g} is not 1/{count} (the reduced element count)")  # type: ignore[index]
    check_private(view, [reduce_sum, scale], scale.output[0])
    keepdims = int(get_attr(reduce_sum, "keepdims", 1))  # type: ignore[arg-type]
    if default_opset(ctx) >= MEAN_AXES_INPUT_FROM:
        inputs = list(reduce_sum.input[:2])
        attrs = {"keepdims": keepdims}
    else:
        inputs = [x]
        attrs = {"keepdims": keepdims, "axes": axes}
    return Fusion("reduce_mean", "ReduceMean", inputs, scale.output[0], [reduce_sum, scale], 1, attrs)  # type: ignore[arg-type]


@register_pass
class FuseReduceMean(Pass):
    """Fuse a ReduceSum scaled by 1/N (N the number of reduced elements) into ReduceMean.

    Pre: types inferred (``ctx.types``: the input's float dtype and the static sizes of the
    reduced axes). Matched: a standard ``ReduceSum(x, axes)`` (axes as attribute before
    opset 13, a constant input from 13; none given: every axis) read only by ``Mul(., c)``
    (c on either side) or ``Div(., c)``, c a one-element float constant equal to 1/N or N
    within 1e-6 relative (or the dtype's epsilon), whose rank does not raise the sum's. TF and
    jax2tf exports write means this way (magika's LayerNorms do). The sum must be read only by
    the scaling and not be a graph output. Custom-domain ops are never touched.

    Post: ``ReduceMean(x)`` with the same axes (an attribute before opset 18, the same constant
    input from 18) and keepdims writes the scaling's output; equal up to float rounding.
    """

    name = "fuse_reduce_mean"
    requires = frozenset({Requirement.SHAPES})
    preserves_types = True

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every ReduceSum, then rewrite."""
        result = PassResult()
        view = ctx.view(scope.graph)
        matches = collect(view, "ReduceSum", lambda node: match_reduce_mean(node, view, ctx), self.name)
        apply_fusions(scope.graph, view, select(matches, set(), ctx, self.name, result), ctx, result)
        return result
