"""Tests of fuse_layernorm: exporter LayerNorm/RMSNorm forms, opset limits and guards."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt.passes.fuse_norm  # noqa: F401  (registers the pass)
from models.build import transformer_block

PASS = "fuse_layernorm"
F32 = TensorProto.FLOAT
C = 8
SHAPE = (2, 3, C)
RNG = np.random.default_rng(0)
GAMMA = (1 + 0.1 * RNG.standard_normal(C)).astype(np.float32)
BETA = (0.1 * RNG.standard_normal(C)).astype(np.float32)


def counts(result) -> dict[str, int]:
    """The counts of the fuse_layernorm run."""
    return next(r.counts for r in result.report.passes if r.name == PASS)


def layernorm(
    *,
    opset: int = 17,
    axes: tuple[int, ...] = (-1,),
    square: str = "Pow",
    divide: str = "Div",
    gamma: bool = True,
    beta: bool = True,
    swap: bool = False,
    shape: tuple[int, ...] = SHAPE,
    extra_output: str = "",
    cast: bool = False,
    gamma_array: np.ndarray | None = None,
    ir_version: int = 8,
    gamma_is_input: bool = False,
) -> ModelProto:
    """x -> (Cast) -> exporter LayerNorm -> (Cast) -> Neg -> y, with the variations named by the arguments."""
    nodes: list[onnx.NodeProto] = []
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(1e-5, np.float32))]
    x = "x"
    if cast:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=F32))
        x = "xf"

    def reduce(src: str, out: str) -> onnx.NodeProto:
        if opset >= 18:
            return helper.make_node("ReduceMean", [src, f"{out}_axes"], [out])
        return helper.make_node("ReduceMean", [src], [out], axes=list(axes))

    if opset >= 18:
        inits += [init("m_axes", np.array(axes, np.int64)), init("v_axes", np.array(axes, np.int64))]
    nodes.append(reduce(x, "m"))
    nodes.append(helper.make_node("Sub", [x, "m"], ["d"]))
    nodes.append(helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "Pow" else helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes.append(reduce("sq", "v"))
    nodes.append(helper.make_node("Add", ["eps", "v"] if swap else ["v", "eps"], ["ve"]))
    nodes.append(helper.make_node("Sqrt", ["ve"], ["s"]))
    if divide == "Div":
        nodes.append(helper.make_node("Div", ["d", "s"], ["n"]))
    else:
        nodes.append(helper.make_node("Reciprocal", ["s"], ["r"]))
        nodes.append(helper.make_node("Mul", ["r", "d"] if swap else ["d", "r"], ["n"]))
    last = "n"
    if cast:
        nodes.append(helper.make_node("Cast", ["n"], ["nh"], to=TensorProto.FLOAT16))
        last = "nh"
    inputs = [tensor_input("x", shape, TensorProto.FLOAT16 if cast else F32)]
    if gamma:
        inits.append(init("gamma", GAMMA if gamma_array is None else gamma_array))
        if gamma_is_input:
            inputs.append(tensor_input("gamma", list(inits[-1].dims)))
        nodes.append(helper.make_node("Mul", ["gamma", last] if swap else [last, "gamma"], ["g"]))
        last = "g"
    if beta:
        inits.append(init("beta", BETA))
        nodes.append(helper.make_node("Add", ["beta", last] if swap else [last, "beta"], ["b"]))
        last = "b"
    nodes.append(helper.make_node("Neg", [last], ["y"]))
    elem = TensorProto.FLOAT16 if cast else F32
    outputs = [helper.make_tensor_value_info("y", elem, [None] * 3)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, F32, [None] * 3))
    return make_model(nodes, inputs, outputs, inits, opset=opset, ir_version=ir_version)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"opset": 18},
        {"square": "Mul", "swap": True},
        {"divide": "Reciprocal"},
        {"gamma": False},
        {"beta": False},
        {"gamma": False, "beta": False},
        {"axes": (1, 2), "shape": (2, 3, C), "gamma": False, "beta": False},
        {"axes": (-1,), "gamma_array": np.full((1, 1, C), 1.5, np.float32)},
    ],
)
def test_layernorm_fused(kwargs) -> None:
    model = layernorm(**kwargs)
    result = run_pass(model, PASS)
    assert counts(result) == {"layernorm": 1}
    assert op_types(result.model) == ["LayerNormalization", "Neg"]
    node = result.model.graph.node[0]
    expected_axis = -len(kwargs.get("axes", (-1,)))
    assert [a.i for a in node.attribute if a.name == "axis"] == [expected_axis]
    assert len(node.input) == (3 if kwargs.get("beta", True) else 2)
    assert_equivalent(model, result.model)


def test_fp16_casts_are_kept() -> None:
    model = layernorm(cast=True, gamma=False, beta=False)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Cast", "LayerNormalization", "Cast", "Neg"]
    assert_equivalent(model, result.model, precision="fp16")


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"opset": 16}, "opset below 17"),
        ({"extra_output": "d"}, "intermediate is a graph output"),
        ({"axes": (0, 1)}, "neither the trailing, the spatial nor the channel axes"),
        ({"axes": (0, 2)}, "not the trailing axes"),
    ],
)
def test_layernorm_guards(kwargs, why) -> None:
    model = layernorm(**kwargs)
    result = run_pass(model, PASS)
    assert "LayerNormalization" not in op_types(result.model), why
    assert_equivalent(model, result.model)


def test_ir3_model_is_left_alone() -> None:
    model = layernorm()
    model.ir_version = 3
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer)
    onnx.checker.check_model(model)
    result = run_pass(model, PASS)
    assert "LayerNormalization" not in op_types(result.model)


def test_extra_reader_blocks() -> None:
    model = layernorm()
    model.graph.node.append(helper.make_node("Identity", ["v"], ["v_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("v_copy", F32, [None] * 3))
    result = run_pass(model, PASS)
    assert "LayerNormalization" not in op_types(result.model)


def test_gamma_graph_input_is_not_constant() -> None:
    model = layernorm(gamma_is_input=True)
    result = run_pass(model, PASS)
    node = next(n for n in result.model.graph.node if n.op_type == "LayerNormalization")
    assert "gamma" not in node.input  # the Mul with the overridable gamma stays outside
    assert "Mul" in op_types(result.model)
    assert_equivalent(model, result.model)


def test_gamma_varying_along_other_axes_is_kept_outside() -> None:
    model = layernorm(gamma_array=(1 + RNG.random((3, C))).astype(np.float32))
    result = run_pass(model, PASS)
    assert "Mul" in op_types(result.model) and "LayerNormalization" in op_types(result.model)
    assert_equivalent(model, result.model)


def test_opset_note() -> None:
    result = run_pass(layernorm(opset=16), PASS)
    assert any("LayerNormalization needs ai.onnx opset >= 17" in w for w in result.report.notes)


def rmsnorm(opset: int, form: str = "Reciprocal", gamma: bool = True) -> ModelProto:
    """x -> x / sqrt(mean(x^2) + eps) (* gamma) -> Neg -> y."""
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(1e-6, np.float32)), init("axes", np.array([-1], np.int64))]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["v"]),
        helper.make_node("Add", ["v", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["s"]),
    ]
    if form == "Reciprocal":
        nodes += [helper.make_node("Reciprocal", ["s"], ["r"]), helper.make_node("Mul", ["x", "r"], ["n"])]
    else:
        nodes.append(helper.make_node("Div", ["x", "s"], ["n"]))
    last = "n"
    if gamma:
        inits.append(init("gamma", GAMMA))
        nodes.append(helper.make_node("Mul", ["gamma", "n"], ["g"]))
        last = "g"
    nodes.append(helper.make_node("Neg", [last], ["y"]))
    return make_model(
        nodes, [tensor_input("x", SHAPE)], [helper.make_tensor_value_info("y", F32, [None] * 3)], inits, opset=opset, ir_version=10
    )


@pytest.mark.parametrize(("form", "gamma"), [("Reciprocal", True), ("Div", False)])
def test_rmsnorm_fused_at_opset_23(form, gamma) -> None:
    model = rmsnorm(23, form, gamma)
    result = run_pass(model, PASS)
    assert counts(result) == {"rmsnorm": 1}
    assert op_types(result.model) == ["RMSNormalization", "Neg"]
    assert_equivalent(model, result.model)


def test_rmsnorm_left_below_opset_23() -> None:
    model = rmsnorm(22)
    result = run_pass(model, PASS)
    assert "RMSNormalization" not in op_types(result.model)
    assert any("RMSNormalization needs ai.onnx opset >= 23" in w for w in result.report.notes)


def test_transformer_block() -> None:
    model = transformer_block()
    result = run_pass(model, PASS)
    assert counts(result) == {"layernorm": 2}
    assert op_types(result.model).count("LayerNormalization") == 2
    assert "ReduceMean" not in op_types(result.model)
    assert_equivalent(model, result.model, input_shapes={"x": (2, 5, 32)})


def test_deterministic() -> None:
    model = transformer_block()
    first = run_pass(model, PASS).model.SerializeToString(deterministic=True)
    assert first == run_pass(model, PASS).model.SerializeToString(deterministic=True)
