"""Tests of fuse_softmax: exporter Softmax forms, axes, opset limits, guards, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt.passes.fuse_softmax  # noqa: F401  (registers the pass)

PASS = "fuse_softmax"
SHAPE = (2, 3, 6)


def softmax_model(
    *,
    axis: int = -1,
    keepdims: bool = True,
    restore: str = "reshape",
    shift: str = "max",
    opset: int = 17,
    extra_output: str = "",
    sum_of: str = "e",
    floor: float = float("-inf"),
    shape: tuple[int | str, ...] = SHAPE,
) -> ModelProto:
    """x -> [x - max(x, axis)] -> Exp -> / sum(axis) -> Neg -> y, in the forms exporters write."""
    rank = len(shape)
    a = axis % rank
    nodes, inits = [], []
    axes_input = opset >= 13

    def reduce(op: str, src: str, out: str) -> None:
        as_input = opset >= (18 if op == "ReduceMax" else 13)
        if as_input:
            inits.append(init(f"{out}_axes", np.array([axis], np.int64)))
            nodes.append(helper.make_node(op, [src, f"{out}_axes"], [out], keepdims=int(keepdims)))
        else:
            nodes.append(helper.make_node(op, [src], [out], axes=[axis], keepdims=int(keepdims)))

    def back(src: str, out: str) -> None:
        if keepdims:
            nodes.append(helper.make_node("Identity", [src], [out]))
        elif restore == "unsqueeze":
            if axes_input:
                inits.append(init(f"{out}_uaxes", np.array([a], np.int64)))
                nodes.append(helper.make_node("Unsqueeze", [src, f"{out}_uaxes"], [out]))
            else:
                nodes.append(helper.make_node("Unsqueeze", [src], [out], axes=[a]))
        else:
            target = [int(d) if isinstance(d, int) else 0 for d in shape]
            target[a] = 1
            if restore == "minus":
                target[0] = -1
            if restore == "wrong":  # a valid Reshape of the reduced (2, 3) that does not restore it
                target = [1, 1, 6]
            inits.append(init(f"{out}_shape", np.array(target, np.int64)))
            nodes.append(helper.make_node("Reshape", [src, f"{out}_shape"], [out]))

    source = "x"
    if shift != "none":
        reduce("ReduceMax", "x", "m0")
        last = "m0"
        if shift == "floor":
            inits.append(init("floor", np.array(floor, np.float32)))
            nodes.append(helper.make_node("Max", ["floor", "m0"], ["m1"]))
            last = "m1"
        back(last, "m")
        nodes.append(helper.make_node("Sub", ["x", "m"], ["d"]))
        source = "d"
    nodes.append(helper.make_node("Exp", [source], ["e"]))
    reduce("ReduceSum", "e" if sum_of == "e" else "x", "s0")
    back("s0", "s")
    nodes.append(helper.make_node("Div", ["e", "s"], ["p"]))
    nodes.append(helper.make_node("Neg", ["p"], ["y"]))
    outputs = [tensor_input("y", shape)]
    if extra_output:
        outputs.append(tensor_input(extra_output, shape))
    return make_model(nodes, [tensor_input("x", shape)], outputs, inits, opset=opset)


def feeds(shape=SHAPE):
    return {"x": (3 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)}


def run(model):
    """fuse_softmax after the cleanup that removes the Identity nodes the keepdims forms are built with."""
    return run_pass(model, f"eliminate_noops,{PASS},eliminate_dead_code")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"keepdims": False},
        {"keepdims": False, "restore": "unsqueeze"},
        {"keepdims": False, "restore": "minus"},
        {"shift": "floor", "keepdims": False},
        {"shift": "floor", "floor": float(np.finfo(np.float32).min)},
        {"shift": "none"},
        {"axis": 1},
        {"axis": 1, "keepdims": False},
        {"opset": 11},
        {"opset": 11, "keepdims": False, "restore": "unsqueeze"},
        {"opset": 18, "keepdims": False},
        {"shape": ("batch", 3, 6), "keepdims": False},
    ],
)
def test_softmax_fused(kwargs):
    model = softmax_model(**kwargs)
    result = run(model)
    assert op_types(result.model) == ["Softmax", "Neg"], kwargs
    shape = tuple(2 if isinstance(d, str) else d for d in kwargs.get("shape", SHAPE))
    assert_equivalent(model, result.model, feeds(shape))


def test_another_axis_needs_opset_13():
    model = softmax_model(axis=1, opset=12)
    result = run(model)
    assert "Softmax" not in op_types(result.model)
    assert any("Softmax needs ai.onnx opset >= 13" in w for w in result.report.notes)


def test_fully_masked_rows_give_nan_in_both():
    model = softmax_model(shift="floor", keepdims=False)
    x = feeds()["x"]
    x[0, 1, :] = -np.inf
    result = run(model)
    assert op_types(result.model) == ["Softmax", "Neg"]
    assert_equivalent(model, result.model, {"x": x})


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"extra_output": "e"}, "an intermediate is a graph output"),
        ({"sum_of": "x"}, "the sum is not of the Exp"),
        ({"keepdims": False, "restore": "wrong"}, "the Reshape moves dims"),
    ],
)
def test_guards(kwargs, why):
    model = softmax_model(**kwargs)
    result = run(model)
    assert "Softmax" not in op_types(result.model), why
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("why", ["floor", "axes"])
def test_a_shift_that_is_not_the_maximum_stays_and_the_softmax_is_of_the_difference(why):
    """A Max floor above the lowest float, or a maximum over another axis: ``Exp(d) / sum Exp(d)`` is ``Softmax(d)``."""
    model = softmax_model(shift="floor", floor=-1e30) if why == "floor" else softmax_model()
    if why == "axes":  # opset 17: ReduceMax takes its axes as an attribute
        reduce_max = next(n for n in model.graph.node if n.op_type == "ReduceMax")
        del reduce_max.attribute[:]
        reduce_max.attribute.extend([helper.make_attribute("axes", [1]), helper.make_attribute("keepdims", 1)])
    result = run(model)
    assert op_types(result.model)[-3:] == ["Sub", "Softmax", "Neg"]
    assert result.model.graph.node[-2].input[0] == "d"
    assert_equivalent(model, result.model, feeds())


def test_in_default_preset_and_deterministic():
    model = softmax_model(shift="floor", keepdims=False)
    first = run_pass(model, "default").model
    assert op_types(first) == ["Softmax", "Neg"]
    assert_equivalent(model, first, feeds())
    assert first.SerializeToString(deterministic=True) == run_pass(model, "default").model.SerializeToString(deterministic=True)


def test_float16():
    model = softmax_model(keepdims=False)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    result = run(model)
    assert op_types(result.model) == ["Softmax", "Neg"]
    assert_equivalent(model, result.model, {"x": feeds()["x"].astype(np.float16)}, precision="fp16")
