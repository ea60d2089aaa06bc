"""Tests of fuse_activations: GELU (erf, tanh), HardSwish, Mish, Softplus forms, opset limits and guards."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt
import onnxopt.passes.fuse_activation  # noqa: F401  (registers the pass)
from models.build import transformer_block
from onnxopt.calibration import CalibrationData
from onnxopt.errors import OptionError

PASS = "fuse_activations"
F32 = TensorProto.FLOAT
SHAPE = (2, 3, 8)


def counts(result) -> dict[str, int]:
    """The counts of the fuse_activations run."""
    return next(r.counts for r in result.report.passes if r.name == PASS)


def model_of(steps: list[tuple], consts: dict[str, float], *, opset: int, last: str, extra_outputs: tuple[str, ...] = ()) -> ModelProto:
    """x -> steps (op, inputs, output, attrs) -> Neg(last) -> y; ``consts`` become scalar initializers."""
    nodes = [helper.make_node(op, list(ins), [out], **(attrs[0] if attrs else {})) for op, ins, out, *attrs in steps]
    nodes.append(helper.make_node("Neg", [last], ["y"]))
    inits = [init(name, np.array(value, np.float32)) for name, value in consts.items()]
    outputs = [helper.make_tensor_value_info(n, F32, [None] * 3) for n in ("y", *extra_outputs)]
    return make_model(nodes, [tensor_input("x", SHAPE)], outputs, inits, opset=opset)


SQRT2 = math.sqrt(2.0)
ERF_FORMS = {
    # torch legacy exporter: Div by sqrt(2), Erf, Add 1, Mul x, Mul 0.5
    "div_then_half": (
        [("Div", ("x", "k"), "u"), ("Erf", ("u",), "e"), ("Add", ("e", "one"), "a"), ("Mul", ("x", "a"), "p"), ("Mul", ("p", "half"), "g")],
        {"k": np.float32(SQRT2), "one": 1.0, "half": 0.5},
    ),
    # Mul by 1/sqrt(2), 1 + erf, 0.5 * x first
    "mul_half_first": (
        [("Mul", ("k", "x"), "u"), ("Erf", ("u",), "e"), ("Add", ("one", "e"), "a"), ("Mul", ("half", "x"), "p"), ("Mul", ("a", "p"), "g")],
        {"k": np.float32(1 / SQRT2), "one": 1.0, "half": 0.5},
    ),
    # 0.5 multiplied into the gate: x * ((1 + erf) * 0.5)
    "half_in_gate": (
        [("Div", ("x", "k"), "u"), ("Erf", ("u",), "e"), ("Add", ("e", "one"), "a"), ("Mul", ("a", "half"), "p"), ("Mul", ("x", "p"), "g")],
        {"k": np.float32(SQRT2), "one": 1.0, "half": 0.5},
    ),
}


@pytest.mark.parametrize("form", sorted(ERF_FORMS))
def test_erf_gelu(form) -> None:
    steps, consts = ERF_FORMS[form]
    model = model_of(steps, consts, opset=20, last="g")
    result = run_pass(model, PASS)
    assert counts(result) == {"gelu": 1}
    assert op_types(result.model) == ["Gelu", "Neg"]
    assert [a.s for a in result.model.graph.node[0].attribute if a.name == "approximate"] == [b"none"]
    assert_equivalent(model, result.model)


def test_erf_gelu_below_opset_20_with_note() -> None:
    steps, consts = ERF_FORMS["div_then_half"]
    model = model_of(steps, consts, opset=19, last="g")
    result = run_pass(model, PASS)
    assert "Gelu" not in op_types(result.model)
    assert any("Gelu needs ai.onnx opset >= 20" in w for w in result.report.notes)


@pytest.mark.parametrize(
    ("consts", "extra", "why"),
    [
        ({"k": 1.5, "one": 1.0, "half": 0.5}, (), "wrong sqrt(2)"),
        ({"k": np.float32(SQRT2), "one": 1.0, "half": 0.25}, (), "wrong 0.5"),
        ({"k": np.float32(SQRT2), "one": 2.0, "half": 0.5}, (), "wrong 1"),
        ({"k": np.float32(SQRT2), "one": 1.0, "half": 0.5}, ("e",), "intermediate is a graph output"),
    ],
)
def test_erf_gelu_guards(consts, extra, why) -> None:
    steps, _ = ERF_FORMS["div_then_half"]
    model = model_of(steps, consts, opset=20, last="g", extra_outputs=extra)
    result = run_pass(model, PASS)
    assert "Gelu" not in op_types(result.model), why
    assert_equivalent(model, result.model)


def test_rank_raising_constant_blocks() -> None:
    steps, consts = ERF_FORMS["div_then_half"]
    model = model_of(steps, consts, opset=20, last="g")
    model.graph.initializer[2].CopyFrom(init("half", np.full((1, 1, 1, 1), 0.5, np.float32)))  # rank 4 > rank 3
    model.graph.output[0].type.tensor_type.shape.dim.add()
    result = run_pass(model, PASS)
    assert "Gelu" not in op_types(result.model)


def test_tanh_gelu_torch_form() -> None:
    c = math.sqrt(2 / math.pi)
    steps = [
        ("Pow", ("x", "three"), "x3"),
        ("Mul", ("x3", "k"), "t"),
        ("Add", ("x", "t"), "s"),
        ("Mul", ("s", "c"), "u"),
        ("Tanh", ("u",), "h"),
        ("Add", ("h", "one"), "a"),
        ("Mul", ("half", "x"), "p"),
        ("Mul", ("p", "a"), "g"),
    ]
    model = model_of(steps, {"three": 3.0, "k": 0.044715, "c": c, "one": 1.0, "half": 0.5}, opset=20, last="g")
    result = run_pass(model, PASS)
    assert counts(result) == {"gelu_tanh": 1}
    assert op_types(result.model) == ["Gelu", "Neg"]
    assert_equivalent(model, result.model)


def test_tanh_gelu_jax2tf_form() -> None:
    """magika's form: x * (0.5 * (1 + tanh(c * (x + x * (x * (0.044715 * x))))))."""
    steps = [
        ("Mul", ("k", "x"), "m1"),
        ("Mul", ("x", "m1"), "m2"),
        ("Mul", ("x", "m2"), "m3"),
        ("Add", ("x", "m3"), "s"),
        ("Mul", ("c", "s"), "u"),
        ("Tanh", ("u",), "h"),
        ("Add", ("one", "h"), "a"),
        ("Mul", ("half", "a"), "p"),
        ("Mul", ("x", "p"), "g"),
    ]
    consts = {"k": 0.044715, "c": 0.7978845834732056, "one": 1.0, "half": 0.5}
    model = model_of(steps, consts, opset=20, last="g")
    result = run_pass(model, PASS)
    assert counts(result) == {"gelu_tanh": 1}
    assert_equivalent(model, result.model)
    wrong = model_of(steps, {**consts, "k": 0.05}, opset=20, last="g")
    assert "Gelu" not in op_types(run_pass(wrong, PASS).model)


HSWISH = [("HardSigmoid", ("x",), "h", {"alpha": 1 / 6, "beta": 0.5}), ("Mul", ("x", "h"), "g")]


def test_hardswish() -> None:
    model = model_of(HSWISH, {}, opset=14, last="g")
    result = run_pass(model, PASS)
    assert counts(result) == {"hardswish": 1}
    assert op_types(result.model) == ["HardSwish", "Neg"]
    assert_equivalent(model, result.model)


def test_hardswish_guards() -> None:
    assert "HardSwish" not in op_types(run_pass(model_of(HSWISH, {}, opset=13, last="g"), PASS).model)
    steps = [("HardSigmoid", ("x",), "h", {"alpha": 0.2, "beta": 0.5}), ("Mul", ("x", "h"), "g")]
    assert "HardSwish" not in op_types(run_pass(model_of(steps, {}, opset=14, last="g"), PASS).model)
    steps = [*HSWISH, ("Add", ("g", "h"), "z")]  # h read outside the pattern
    assert "HardSwish" not in op_types(run_pass(model_of(steps, {}, opset=14, last="z"), PASS).model)


def clip_steps(opset: int) -> tuple:
    """``Clip(x + 3, 0, 6)`` writing "c": bounds as inputs from opset 11, as attributes before."""
    if opset >= 11:
        return ("Clip", ("a", "zero", "six"), "c")
    return ("Clip", ("a",), "c", {"min": 0.0, "max": 6.0})


HARD_CONSTS = {"three": 3.0, "zero": 0.0, "six": 6.0, "sixth": np.float32(1 / 6)}
# every form ends in "g"; "a" = x + 3 and "c" = Clip(a, 0, 6) come first
HARD_SWISH_FORMS = {
    "paddle_div": [("Mul", ("x", "c"), "m"), ("Div", ("m", "six"), "g")],  # x * clip / 6 (paddle2onnx)
    "tf_mul_sixth": [("Mul", ("c", "x"), "m"), ("Mul", ("sixth", "m"), "g")],  # 1/6 * (clip * x) (tf2onnx)
    "sixth_first": [("Mul", ("x", "sixth"), "m"), ("Mul", ("m", "c"), "g")],  # (x / 6 as a product) * clip
}
WIDE = {"x": np.linspace(-8, 8, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)}  # across both kinks at -3 and 3


def hard_model(tail: list[tuple], *, opset: int, add=("x", "three"), **kw) -> ModelProto:
    """x + 3 -> Clip(0, 6) -> ``tail``."""
    return model_of([("Add", add, "a"), clip_steps(opset), *tail], HARD_CONSTS, opset=opset, last="g", **kw)


@pytest.mark.parametrize("form", sorted(HARD_SWISH_FORMS))
def test_clip_hardswish_becomes_hardswish_at_opset_14(form) -> None:
    model = hard_model(HARD_SWISH_FORMS[form], opset=14)
    result = run_pass(model, PASS)
    assert counts(result) == {"hardswish": 1}
    assert op_types(result.model) == ["HardSwish", "Neg"]
    assert_equivalent(model, result.model, WIDE)


@pytest.mark.parametrize("opset", [10, 13])
def test_clip_hardswish_below_opset_14_becomes_hardsigmoid_times_x(opset) -> None:
    model = hard_model(HARD_SWISH_FORMS["paddle_div"], opset=opset, add=("three", "x"))
    result = run_pass(model, PASS)
    assert counts(result) == {"hardswish": 1}
    assert op_types(result.model) == ["HardSigmoid", "Mul", "Neg"]
    hsig = result.model.graph.node[0]
    assert [(a.name, round(a.f, 7)) for a in hsig.attribute] == [("alpha", round(1 / 6, 7)), ("beta", 0.5)]
    assert_equivalent(model, result.model, WIDE)
    again = run_pass(result.model, PASS)  # the pair is the fused form below 14: no "kept, needs opset 14" note
    assert op_types(again.model) == ["HardSigmoid", "Mul", "Neg"]
    assert not [n for r in again.report.passes for n in r.notes if "opset >= 14" in n]


def test_clip_hardsigmoid_alone() -> None:
    model = hard_model([("Div", ("c", "six"), "g")], opset=13)
    result = run_pass(model, PASS)
    assert counts(result) == {"hardsigmoid": 1}
    assert op_types(result.model) == ["HardSigmoid", "Neg"]
    assert_equivalent(model, result.model, WIDE)


def test_gate_divided_before_the_product_ends_as_one_hardswish() -> None:
    model = hard_model([("Mul", ("c", "sixth"), "h"), ("Mul", ("x", "h"), "g")], opset=14)
    result = run_pass(model, PASS)  # HardSigmoid first, then the HardSigmoid matcher on the manager's next round
    assert op_types(result.model) == ["HardSwish", "Neg"]
    assert_equivalent(model, result.model, WIDE)


@pytest.mark.parametrize(
    "consts, tail, extra",
    [
        ({"three": 2.0}, HARD_SWISH_FORMS["paddle_div"], ()),  # x + 2
        ({"six": 5.0}, HARD_SWISH_FORMS["paddle_div"], ()),  # Clip(., 0, 5) and / 5
        ({"sixth": np.float32(0.2)}, HARD_SWISH_FORMS["tf_mul_sixth"], ()),  # * 0.2
        ({}, [("Mul", ("x", "c"), "m"), ("Div", ("m", "six"), "g")], ("c",)),  # the gate is a graph output
        ({}, [("Mul", ("a", "c"), "m"), ("Div", ("m", "six"), "g")], ()),  # (x + 3) * clip
    ],
    ids=["add_2", "clip_5", "times_0.2", "gate_is_output", "wrong_factor"],
)
def test_clip_hardswish_guards(consts, tail, extra) -> None:
    steps = [("Add", ("x", "three"), "a"), clip_steps(14), *tail]
    model = model_of(steps, {**HARD_CONSTS, **consts}, opset=14, last="g", extra_outputs=extra)
    result = run_pass(model, PASS)
    assert "HardSwish" not in op_types(result.model) and "HardSigmoid" not in op_types(result.model)
    assert_equivalent(model, result.model, WIDE)


def test_clip_forms_stay_when_qdq_follows_on_ort_cpu() -> None:
    model = hard_model(HARD_SWISH_FORMS["paddle_div"], opset=14)
    data = CalibrationData.from_arrays({"x": WIDE["x"]}, model=model)
    result = onnxopt.optimize(model, f"{PASS},qdq:keep_outputs=false", target="ort-cpu", calibration=data, isolate=False)
    assert "HardSwish" not in op_types(result.model) and "Clip" in op_types(result.model)
    assert any("1 Clip-form hard-swish/hard-sigmoid(s) kept: qdq runs later" in n for r in result.report.passes for n in r.notes)
    result = onnxopt.optimize(model, f"{PASS},qdq:keep_outputs=false", target="trt", calibration=data, isolate=False)
    assert "HardSwish" in op_types(result.model)  # trt keeps activations float between Q/DQ: one op is better there


def test_clip_kinds_are_separate() -> None:
    model = hard_model(HARD_SWISH_FORMS["paddle_div"], opset=14)
    assert op_types(run_pass(model, f"{PASS}:kinds=hardsigmoid").model)[:2] == ["Add", "Clip"]
    lone = hard_model([("Div", ("c", "six"), "g")], opset=14)
    assert op_types(run_pass(lone, f"{PASS}:kinds=hardswish").model)[:2] == ["Add", "Clip"]


MISH_OP = [("Softplus", ("x",), "s"), ("Tanh", ("s",), "t"), ("Mul", ("t", "x"), "g")]
MISH_LOG = [("Exp", ("x",), "e"), ("Add", ("e", "one"), "a"), ("Log", ("a",), "s"), ("Tanh", ("s",), "t"), ("Mul", ("x", "t"), "g")]


@pytest.mark.parametrize("steps", [MISH_OP, MISH_LOG], ids=["softplus_op", "log_exp"])
def test_mish(steps) -> None:
    model = model_of(steps, {"one": 1.0}, opset=18, last="g")
    result = run_pass(model, PASS)
    assert counts(result) == {"mish": 1}
    assert op_types(result.model) == ["Mish", "Neg"]
    assert_equivalent(model, result.model)


def test_mish_below_opset_18_keeps_softplus_fusion() -> None:
    model = model_of(MISH_LOG, {"one": 1.0}, opset=17, last="g")
    result = run_pass(model, PASS)
    assert counts(result) == {"softplus": 1}
    assert op_types(result.model) == ["Softplus", "Tanh", "Mul", "Neg"]
    assert_equivalent(model, result.model)


def test_softplus_guard_extra_reader() -> None:
    steps = [("Exp", ("x",), "e"), ("Add", ("e", "one"), "a"), ("Log", ("a",), "s"), ("Add", ("s", "e"), "z")]
    model = model_of(steps, {"one": 1.0}, opset=17, last="z")
    assert "Softplus" not in op_types(run_pass(model, PASS).model)


def test_swish_is_left_alone() -> None:
    model = model_of([("Sigmoid", ("x",), "s"), ("Mul", ("x", "s"), "g")], {}, opset=20, last="g")
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Sigmoid", "Mul", "Neg"]


def test_transformer_block_at_opset_20() -> None:
    model = transformer_block()
    assert "Gelu" not in op_types(run_pass(model, PASS).model)  # opset 17: no Gelu
    result = run_pass(model, "upgrade_opset:version=20," + PASS)
    assert counts(result) == {"gelu": 1}
    assert "Erf" not in op_types(result.model)
    assert_equivalent(model, result.model, input_shapes={"x": (2, 5, 32)})


def test_kinds_option() -> None:
    steps, consts = ERF_FORMS["div_then_half"]
    model = model_of(steps, consts, opset=20, last="g")
    assert "Gelu" not in op_types(run_pass(model, [f"{PASS}:kinds=mish"]).model)
    with pytest.raises(OptionError):
        run_pass(model, f"{PASS}:kinds=nope")


def test_deterministic() -> None:
    model = transformer_block()
    spec = "upgrade_opset:version=20," + PASS
    assert run_pass(model, spec).model.SerializeToString(deterministic=True) == run_pass(model, spec).model.SerializeToString(
        deterministic=True
    )


def test_subgraph_is_fused() -> None:
    body = onnx.helper.make_graph(
        [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5), helper.make_node("Mul", ["x", "h"], ["o"])],
        "then",
        [],
        [helper.make_tensor_value_info("o", F32, list(SHAPE))],
    )
    other = onnx.helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o2"])], "else", [], [helper.make_tensor_value_info("o2", F32, list(SHAPE))]
    )
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)]
    model = make_model(nodes, [tensor_input("x", SHAPE), tensor_input("c", [], TensorProto.BOOL)], [tensor_input("y", SHAPE)], opset=14)
    result = run_pass(model, PASS)
    branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["HardSwish"]
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * 4, "c": np.array(True)}
    assert_equivalent(model, result.model, feeds)


# ----------------------------------------------------------------------------- onnxruntime targets

TANH_TORCH = (
    [
        ("Pow", ("x", "three"), "x3"),
        ("Mul", ("x3", "k"), "t"),
        ("Add", ("x", "t"), "s"),
        ("Mul", ("s", "c"), "u"),
        ("Tanh", ("u",), "h"),
        ("Add", ("h", "one"), "a"),
        ("Mul", ("half", "x"), "p"),
        ("Mul", ("p", "a"), "g"),
    ],
    {"three": 3.0, "k": 0.044715, "c": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5},
)


def run_target(model: ModelProto, target: str):
    """fuse_activations on ``target`` without fault isolation."""
    return onnxopt.optimize(model, PASS, target=target, isolate=False)


def domains(model: ModelProto) -> dict[str, int]:
    """The model's opset imports by domain."""
    return {imp.domain: imp.version for imp in model.opset_import}


@pytest.mark.parametrize("target", ["ort-cpu", "ort-gpu"])
@pytest.mark.parametrize(("form", "op_type"), [("erf", "Gelu"), ("tanh", "FastGelu")])
def test_gelu_becomes_contrib_op_on_ort_targets_at_opset_17(target, form, op_type) -> None:
    steps, consts = ERF_FORMS["div_then_half"] if form == "erf" else TANH_TORCH
    model = model_of(steps, consts, opset=17, last="g")
    result = run_target(model, target)
    node = result.model.graph.node[0]
    assert (node.domain, node.op_type) == ("com.microsoft", op_type)
    assert op_types(result.model) == [op_type, "Neg"]
    assert domains(result.model) == {"": 17, "com.microsoft": 1}
    assert not result.report.notes
    assert_equivalent(model, result.model)


def test_contrib_gelu_at_opset_20_too_and_shapes_inferred_through_it() -> None:
    from onnxopt.shapes import infer_types

    steps, consts = ERF_FORMS["mul_half_first"]
    model = model_of(steps, consts, opset=20, last="g")
    result = run_target(model, "ort-cpu")
    assert [(n.domain, n.op_type) for n in result.model.graph.node] == [("com.microsoft", "Gelu"), ("", "Neg")]
    types = infer_types(result.model)  # the contrib Gelu's shape stand-in keeps the shapes after it known
    assert [d.dim_value for d in types["y"].tensor_type.shape.dim] == list(SHAPE)
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("target", ["portable", "trt"])
def test_no_contrib_op_for_portable_and_trt(target) -> None:
    steps, consts = ERF_FORMS["div_then_half"]
    low = run_target(model_of(steps, consts, opset=17, last="g"), target)
    assert "Gelu" not in op_types(low.model) and domains(low.model) == {"": 17}
    assert any("Gelu needs ai.onnx opset >= 20" in w for w in low.report.notes)
    high = run_target(model_of(steps, consts, opset=20, last="g"), target)
    assert [(n.domain, n.op_type) for n in high.model.graph.node] == [("", "Gelu"), ("", "Neg")]
    assert domains(high.model) == {"": 20}


def test_double_has_no_contrib_kernel_on_ort_cpu() -> None:
    """onnxruntime CPU has no double Gelu kernel: the standard rule applies (kept below opset 20, with a note)."""
    steps, consts = ERF_FORMS["div_then_half"]
    nodes = [helper.make_node(op, list(ins), [out]) for op, ins, out in steps] + [helper.make_node("Neg", ["g"], ["y"])]
    inits = [init(name, np.array(value, np.float64)) for name, value in consts.items()]
    model = make_model(nodes, [tensor_input("x", SHAPE, TensorProto.DOUBLE)], [tensor_input("y", SHAPE, TensorProto.DOUBLE)], inits)
    result = run_target(model, "ort-cpu")
    assert all(n.domain == "" for n in result.model.graph.node) and "Erf" in op_types(result.model)
    assert any("Gelu needs ai.onnx opset >= 20" in w for w in result.report.notes)
