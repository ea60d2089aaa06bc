"""Tests of fold_conv_input_affine: per-input-channel Mul/Add/Sub/Div before an unpadded Conv folded into it."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, helper

import onnxopt.passes.fuse_conv  # noqa: F401  (registers the pass)

PASS = "fold_conv_input_affine"
RNG = np.random.default_rng(0)
C, M = 8, 6


def rand(*shape: int) -> np.ndarray:
    """Random normal float32 values."""
    return RNG.standard_normal(shape).astype(np.float32)


def affine_conv(steps: list[tuple[str, str]], *, group: int = 1, kernel: int = 1, pads: int = 0, bias: bool = True, **attrs) -> ModelProto:
    """x [2, C, 5, 5] -> Relu -> the ``steps`` (op, constant name; the chain value first) -> Conv -> y."""
    nodes = [helper.make_node("Relu", ["x"], ["v0"])]
    for index, (op, constant) in enumerate(steps):
        nodes.append(helper.make_node(op, [f"v{index}", constant], [f"v{index + 1}"]))
    inputs = [f"v{len(steps)}", "w"] + (["b"] if bias else [])
    nodes.append(helper.make_node("Conv", inputs, ["y"], name="conv", group=group, pads=[pads] * 4, **attrs))
    inits = [
        init("w", rand(M * (group if group > 1 else 1), C // group, kernel, kernel)),
        init("scalar", np.float32(0.7)),
        init("shift", np.float32(-0.4)),
        init("per_channel", (rand(C, 1, 1) * 0.5 + 1).astype(np.float32)),
        init("per_channel_4d", rand(1, C, 1, 1)),
        init("spatial", rand(1, 1, 5, 5)),
        init("nonzero", np.float32(2.5)),
    ]
    if bias:
        inits.append(init("b", rand(M * (group if group > 1 else 1))))
    out_channels = M * (group if group > 1 else 1)
    size = 5 + 2 * pads - kernel + 1
    return make_model(nodes, [tensor_input("x", [2, C, 5, 5])], [tensor_input("y", [2, out_channels, size, size])], inits, opset=17)


def folded(result) -> dict[str, int]:
    """The pass's counts."""
    return {k: v for p in result.report.passes if p.name == PASS for k, v in p.counts.items()}


@pytest.mark.parametrize(
    "steps",
    [
        [("Mul", "scalar"), ("Add", "shift")],  # PP-LCNet's learnable affine after each activation
        [("Sub", "per_channel_4d"), ("Div", "per_channel")],  # (x - mean) / std
        [("Mul", "per_channel"), ("Add", "per_channel_4d"), ("Mul", "scalar")],
    ],
    ids=["scalar_affine", "normalize", "three_steps"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_affine_before_pointwise_conv_folds_exactly(steps, bias) -> None:
    model = affine_conv(steps, bias=bias)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Relu", "Conv"]
    assert sum(folded(result).values()) == len(steps)
    assert result.model.graph.node[1].input[0] == "v0"
    assert_equivalent(model, result.model)


@pytest.mark.parametrize("group", [2, C])  # grouped and depthwise: each output reads its own group's channels
def test_grouped_and_strided_unpadded_convs(group) -> None:
    model = affine_conv([("Mul", "per_channel"), ("Add", "per_channel_4d")], group=group, kernel=3, strides=[2, 2])
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Relu", "Conv"]
    assert_equivalent(model, result.model)


def test_padded_conv_is_left_alone() -> None:
    """Padding reads zeros where the shift would have been: not exact, so not folded."""
    padded = affine_conv([("Add", "shift")], kernel=3, pads=1)
    same = affine_conv([("Add", "shift")], kernel=3, pads=1)
    conv = same.graph.node[-1]
    kept = [a for a in conv.attribute if a.name != "pads"]
    del conv.attribute[:]
    conv.attribute.extend([*kept, helper.make_attribute("auto_pad", "SAME_UPPER")])
    for model in (padded, same):
        result = run_pass(model, PASS)
        assert "Add" in op_types(result.model)
        assert_equivalent(model, result.model)


def test_guards_keep_what_is_not_a_per_channel_affine() -> None:
    spatial = affine_conv([("Add", "spatial")])  # varies over H and W
    assert "Add" in op_types(run_pass(spatial, PASS).model)
    shared = affine_conv([("Mul", "scalar"), ("Add", "shift")])
    shared.graph.output.append(tensor_input("v1", [2, C, 5, 5]))  # the Mul's output is read outside the chain
    result = run_pass(shared, PASS)
    assert op_types(result.model) == ["Relu", "Mul", "Conv"]  # only the Add folds
    assert_equivalent(shared, result.model)
    reversed_sub = affine_conv([])  # c - x negates the chain value: not an x * s + t step
    reversed_sub.graph.node.insert(1, helper.make_node("Sub", ["shift", "v0"], ["v0b"]))
    reversed_sub.graph.node[-1].input[0] = "v0b"
    result = run_pass(reversed_sub, PASS)
    assert "Sub" in op_types(result.model)
    assert_equivalent(reversed_sub, result.model)


def test_clip_form_hardswish_keeps_its_division() -> None:
    """x * Clip(x + 3, 0, 6) / 6 -> Mul(a) -> Add(b) -> Conv: a and b fold, the / 6 stays for fuse_activations."""
    nodes = [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["g"]),
        helper.make_node("Mul", ["x", "g"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["h"]),
        helper.make_node("Mul", ["h", "scale"], ["s"]),
        helper.make_node("Add", ["s", "shift"], ["t"]),
        helper.make_node("Conv", ["t", "w"], ["y"], name="conv"),
    ]
    inits = [init(n, np.float32(v)) for n, v in (("three", 3), ("zero", 0), ("six", 6), ("scale", 0.8), ("shift", 0.1))]
    inits.append(init("w", rand(M, C, 1, 1)))
    model = make_model(nodes, [tensor_input("x", [2, C, 5, 5])], [tensor_input("y", [2, M, 5, 5])], inits, opset=17)
    result = run_pass(model, PASS)
    assert op_types(result.model) == ["Add", "Clip", "Mul", "Div", "Conv"]
    assert_equivalent(model, result.model)
    fused = run_pass(model, f"fuse_activations,{PASS}")
    assert op_types(fused.model) == ["HardSwish", "Conv"]
    assert_equivalent(model, fused.model)


def test_in_default_preset_and_deterministic() -> None:
    model = affine_conv([("Mul", "scalar"), ("Add", "shift")])
    first, second = run_pass(model, "default"), run_pass(model, "default")
    assert op_types(first.model) == ["Relu", "Conv"]
    assert first.model.SerializeToString() == second.model.SerializeToString()
