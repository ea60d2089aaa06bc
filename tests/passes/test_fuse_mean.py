"""Tests of fuse_reduce_mean: ReduceSum scaled to a mean, across opsets; guards; determinism."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, helper

import onnxopt.passes.fuse_mean  # noqa: F401  (registers the pass)

PASS = "fuse_reduce_mean"
SHAPE = (2, 3, 8)


def mean_model(
    *,
    axes: tuple[int, ...] | None = (-1,),
    keepdims: int = 1,
    op: str = "Mul",
    factor: float | None = None,
    swap: bool = False,
    opset: int = 17,
    extra_output: bool = False,
    shape: tuple = SHAPE,
) -> ModelProto:
    """x -> ReduceSum(axes) -> Mul(1/N) or Div(N) -> Neg -> y."""
    reduced = [shape[a] for a in (axes if axes is not None else range(len(shape)))]
    count = int(np.prod([d for d in reduced if isinstance(d, int)]))
    value = factor if factor is not None else (1.0 / count if op == "Mul" else float(count))
    inits = [init("c", np.array(value, np.float32))]
    if axes is None:
        nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=keepdims)]
    elif opset >= 13:
        inits.append(init("axes", np.array(axes, np.int64)))
        nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=keepdims)]
    else:
        nodes = [helper.make_node("ReduceSum", ["x"], ["s"], axes=list(axes), keepdims=keepdims)]
    operands = ["c", "s"] if swap else ["s", "c"]
    nodes += [helper.make_node(op, operands, ["m"]), helper.make_node("Neg", ["m"], ["y"])]
    out_rank = len(shape) - (0 if keepdims else len(reduced))
    outputs = [tensor_input("y", [None] * out_rank)]
    if extra_output:
        outputs.append(tensor_input("s", [None] * out_rank))
    return make_model(nodes, [tensor_input("x", shape)], outputs, inits, opset=opset)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"swap": True},
        {"op": "Div"},
        {"keepdims": 0},
        {"axes": (1, 2)},
        {"axes": None, "keepdims": 0},
        {"opset": 11},
        {"opset": 13},
        {"opset": 18},
        {"opset": 18, "axes": None},
        {"shape": ("batch", 3, 8)},
    ],
)
def test_reduce_mean_fused(kwargs):
    model = mean_model(**kwargs)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["ReduceMean", "Neg"], kwargs
    shape = tuple(2 if isinstance(d, str) else d for d in kwargs.get("shape", SHAPE))
    assert_equivalent(model, result.model, {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)})


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"factor": 0.1}, "the scale is not 1/N"),
        ({"op": "Div", "swap": True}, "the sum is the divisor"),
        ({"extra_output": True}, "the sum is a graph output"),
        ({"shape": (2, 3, "n")}, "the reduced dim is not static"),
    ],
)
def test_guards(kwargs, why):
    model = mean_model(**kwargs)
    result = run_pass(model, PASS)
    assert "ReduceMean" not in op_types(result.model), why
    shape = tuple(8 if isinstance(d, str) else d for d in kwargs.get("shape", SHAPE))
    assert_equivalent(model, result.model, {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)})


def test_deterministic():
    model = mean_model(keepdims=0)
    first = run_pass(model, PASS).model.SerializeToString(deterministic=True)
    assert run_pass(model, PASS).model.SerializeToString(deterministic=True) == first
