"""Tests of eliminate_noops: every rule, its guards, graph outputs, subgraphs, chains."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import AttributeProto, ModelProto, TensorProto, helper

from onnxopt.errors import OptionError
from onnxopt.graph import GraphView
from onnxopt.passbase import PassContext
from onnxopt.passes.noop_rules import resolve_reshape, why_not
from onnxopt.passes.noops import EliminateNoops, resolve_roots

NOOPS = "eliminate_noops"
F32 = TensorProto.FLOAT
I64_MAX = (1 << 63) - 1
SHAPE = (2, 3, 4)


def counts(result) -> dict[str, int]:
    """The counts of the single eliminate_noops run in a result's report."""
    records = [r for r in result.report.passes if r.name == NOOPS]
    assert len(records) == 1
    assert records[0].status != "rolled back", records[0].message
    return records[0].counts


def out(name: str, dtype: int = F32, rank: int = 3) -> onnx.ValueInfoProto:
    """A graph output of known rank and unknown dims."""
    return helper.make_tensor_value_info(name, dtype, [None] * rank)


def i64(values) -> np.ndarray:
    """An int64 array."""
    return np.array(values, dtype=np.int64)


def empty_ints(node: onnx.NodeProto, name: str) -> onnx.NodeProto:
    """Add an empty INTS attribute (helper.make_node cannot infer the type of [])."""
    node.attribute.append(helper.make_attribute(name, [], attr_type=AttributeProto.INTS))
    return node


def single(
    op: str,
    inputs=("x",),
    inits=(),
    *,
    opset: int = 17,
    shape=SHAPE,
    dtype: int = F32,
    outputs=("u",),
    before=(),
    node: onnx.NodeProto | None = None,
    **attrs,
) -> ModelProto:
    """x -> op -> u -> Neg -> y, with optional nodes before (e.g. Constant operands)."""
    node = node or helper.make_node(op, list(inputs), list(outputs), **attrs)
    nodes = [*before, node, helper.make_node("Neg", ["u"], ["y"])]
    inputs = [tensor_input("x", shape, dtype)]
    draft = helper.make_graph(nodes, "draft", inputs, [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)], list(inits))
    draft_model = helper.make_model(draft, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    output = onnx.shape_inference.infer_shapes(draft_model).graph.output[0]
    rank = len(output.type.tensor_type.shape.dim) if output.type.tensor_type.HasField("shape") else len(shape)
    return make_model(nodes, inputs, [out("y", output.type.tensor_type.elem_type or dtype, rank)], list(inits), opset=opset)


def const_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    """A Constant node producing ``array``."""
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array))


# ------------------------------------------------------------------ positive cases, one per rule and form

POSITIVE = {
    "identity": lambda: single("Identity"),
    "dropout_17": lambda: single("Dropout"),
    "dropout_17_training_false": lambda: single(
        "Dropout", ["x", "r", "t"], [init("r", np.array(0.5, np.float32)), init("t", np.array(False))]
    ),
    "dropout_17_training_false_constant_node": lambda: single("Dropout", ["x", "", "t"], before=[const_node("t", np.array(False))]),
    "dropout_17_mask_unused": lambda: single("Dropout", outputs=("u", "mask")),
    "dropout_11_ratio_attr": lambda: single("Dropout", opset=11, ratio=0.3),
    "dropout_7": lambda: single("Dropout", opset=7),
    "cast_same_type": lambda: single("Cast", to=F32),
    "cast_same_type_int64": lambda: single("Cast", dtype=TensorProto.INT64, to=TensorProto.INT64),
    "castlike_same_type": lambda: single("CastLike", ["x", "like"], [init("like", np.zeros(1, np.float32))]),
    "reshape_same": lambda: single("Reshape", ["x", "s"], [init("s", i64([2, 3, 4]))]),
    "reshape_zero_and_minus_one": lambda: single("Reshape", ["x", "s"], [init("s", i64([0, 3, -1]))]),
    "reshape_minus_one_middle": lambda: single("Reshape", ["x", "s"], [init("s", i64([2, -1, 4]))]),
    "reshape_allowzero_14": lambda: single("Reshape", ["x", "s"], [init("s", i64([2, 3, 4]))], opset=14, allowzero=1),
    "reshape_opset9_constant_node": lambda: single("Reshape", ["x", "s"], opset=9, before=[const_node("s", i64([2, 0, 4]))]),
    "expand_same": lambda: single("Expand", ["x", "s"], [init("s", i64([3, 1]))]),
    "expand_ones_symbolic": lambda: single("Expand", ["x", "s"], [init("s", i64([1, 1, 1]))], shape=("N", 3, 4)),
    "transpose_identity": lambda: single("Transpose", perm=[0, 1, 2]),
    "transpose_rank1_default_perm": lambda: single("Transpose", shape=(5,)),
    "pad_opset9_attr": lambda: single("Pad", opset=9, pads=[0] * 6),
    "pad_opset11_input": lambda: single("Pad", ["x", "p"], [init("p", i64([0] * 6))], opset=11),
    "pad_opset13_constant_value": lambda: single(
        "Pad", ["x", "p", "v"], [init("p", i64([0] * 6)), init("v", np.array(1.0, np.float32))], opset=13
    ),
    "pad_opset17_reflect": lambda: single("Pad", ["x", "p"], [init("p", i64([0] * 6))], mode="reflect"),
    "pad_opset18_axes": lambda: single("Pad", ["x", "p", "", "a"], [init("p", i64([0, 0])), init("a", i64([1]))], opset=18),
    "slice_opset9_attr": lambda: single("Slice", opset=9, starts=[0, 0], ends=[2, 100], axes=[0, 2]),
    "slice_opset11_int64_max": lambda: single(
        "Slice", ["x", "b", "e", "a"], [init("b", i64([0])), init("e", i64([I64_MAX])), init("a", i64([1]))], opset=11
    ),
    "slice_opset13_negative_axis_start": lambda: single(
        "Slice",
        ["x", "b", "e", "a", "st"],
        [init("b", i64([-10])), init("e", i64([4])), init("a", i64([-1])), init("st", i64([1]))],
        opset=13,
    ),
    "slice_opset17_no_axes": lambda: single("Slice", ["x", "b", "e"], [init("b", i64([0, 0, 0])), init("e", i64([2, 3, 4]))]),
    "slice_symbolic_dim_int64_max": lambda: single(
        "Slice", ["x", "b", "e", "a"], [init("b", i64([0])), init("e", i64([I64_MAX])), init("a", i64([0]))], shape=("N", 3, 4)
    ),
    "squeeze_opset9_no_axes": lambda: single("Squeeze", opset=9),
    "squeeze_opset11_empty_axes_attr": lambda: single(
        "Squeeze", opset=11, node=empty_ints(helper.make_node("Squeeze", ["x"], ["u"]), "axes")
    ),
    "squeeze_opset13_no_axes": lambda: single("Squeeze", opset=13),
    "squeeze_opset17_empty_axes_input": lambda: single("Squeeze", ["x", "a"], [init("a", i64([]))]),
    "unsqueeze_opset11_empty_axes_attr": lambda: single(
        "Unsqueeze", opset=11, node=empty_ints(helper.make_node("Unsqueeze", ["x"], ["u"]), "axes")
    ),
    "unsqueeze_opset13_empty_axes_input": lambda: single("Unsqueeze", ["x", "a"], [init("a", i64([]))], opset=13),
    "concat_single": lambda: single("Concat", axis=1),
    "split_single_13": lambda: single("Split", opset=13, axis=1),
    "split_single_18": lambda: single("Split", opset=18, axis=0, num_outputs=1),
    "sum_single": lambda: single("Sum"),
    "max_single": lambda: single("Max"),
    "min_single": lambda: single("Min"),
    "mean_single": lambda: single("Mean"),
    "add_zero_right": lambda: single("Add", ["x", "z"], [init("z", np.zeros(4, np.float32))]),
    "add_zero_left_full_shape": lambda: single("Add", ["z", "x"], [init("z", np.zeros(SHAPE, np.float32))]),
    "add_zero_constant_node": lambda: single("Add", ["x", "z"], before=[const_node("z", np.zeros((3, 1), np.float32))]),
    "add_negative_zero": lambda: single("Add", ["x", "z"], [init("z", np.array(-0.0, np.float32))]),
    "add_zero_int64": lambda: single("Add", ["x", "z"], [init("z", i64([0, 0, 0, 0]))], dtype=TensorProto.INT64),
    "add_zero_symbolic_batch": lambda: single("Add", ["x", "z"], [init("z", np.zeros((1, 4), np.float32))], shape=("N", 3, 4)),
    "sub_zero": lambda: single("Sub", ["x", "z"], [init("z", np.zeros((1, 1, 1), np.float32))]),
    "mul_one_right": lambda: single("Mul", ["x", "o"], [init("o", np.ones(4, np.float32))]),
    "mul_one_left_scalar": lambda: single("Mul", ["o", "x"], [init("o", np.array(1.0, np.float32))]),
    "div_one": lambda: single("Div", ["x", "o"], [init("o", np.ones((3, 1), np.float32))]),
}
SYMBOLIC_SHAPES = {"x": (2, 3, 4)}


def _op_of(case: str, model: ModelProto) -> str:
    return [n.op_type for n in model.graph.node if n.op_type not in ("Constant", "Neg")][0]


@pytest.mark.parametrize("case", sorted(POSITIVE))
def test_noop_is_removed(case: str) -> None:
    model = POSITIVE[case]()
    op = _op_of(case, model)
    result = run_pass(model, NOOPS)
    assert op not in op_types(result.model)
    assert counts(result) == {op: 1}
    assert result.model.graph.node[-1].input[0] in ("x",), "Neg must read x directly"
    assert_equivalent(model, result.model, input_shapes=SYMBOLIC_SHAPES if "symbolic" in case else None)


def test_signed_zero_and_infinities_survive_add_and_mul() -> None:
    """x + 0.0 would turn -0.0 into +0.0; removing it keeps -0.0, which compares equal."""
    nodes = [helper.make_node("Add", ["x", "z"], ["a"]), helper.make_node("Mul", ["a", "o"], ["y"])]
    inits = [init("z", np.zeros(3, np.float32)), init("o", np.ones(3, np.float32))]
    model = make_model(nodes, [tensor_input("x", [3])], [out("y")], inits)
    result = run_pass(model, NOOPS)
    assert op_types(result.model) == ["Identity"]  # y is a graph output read straight from the input x
    assert counts(result) == {"Add": 1, "replaced_by_identity": 1}
    feeds = {"x": np.array([-0.0, np.inf, -np.inf], np.float32)}
    assert_equivalent(model, result.model, feeds)


# ------------------------------------------------------------------ negative cases: guards that must keep the node


def custom_identity() -> ModelProto:
    node = helper.make_node("Identity", ["x"], ["u"], domain="com.example")
    graph = helper.make_graph([node, helper.make_node("Neg", ["u"], ["y"])], "g", [tensor_input("x", SHAPE)], [out("y")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=8)


def overridable_zero() -> ModelProto:
    """The zero is an initializer that is also a graph input: it can be overridden at run time."""
    nodes = [helper.make_node("Add", ["x", "z"], ["u"]), helper.make_node("Neg", ["u"], ["y"])]
    inputs = [tensor_input("x", SHAPE), tensor_input("z", [4])]
    return make_model(nodes, inputs, [out("y")], [init("z", np.zeros(4, np.float32))])


def mask_used() -> ModelProto:
    nodes = [helper.make_node("Dropout", ["x"], ["u", "mask"]), helper.make_node("Neg", ["u"], ["y"])]
    return make_model(nodes, [tensor_input("x", SHAPE)], [out("y"), out("mask", TensorProto.BOOL)])


NEGATIVE = {
    "transpose_permutes": (lambda: single("Transpose", perm=[1, 0, 2]), "is not the identity"),
    "transpose_default_rank3": (lambda: single("Transpose"), "default perm"),
    "reshape_changes_shape": (lambda: single("Reshape", ["x", "s"], [init("s", i64([6, 4]))]), "reshapes [2, 3, 4] to [6, 4]"),
    "reshape_symbolic_input": (
        lambda: single("Reshape", ["x", "s"], [init("s", i64([0, 12]))], shape=("N", 3, 4)),
        "not fully static",
    ),
    "reshape_allowzero_keeps_zero": (
        lambda: single("Reshape", ["x", "s"], [init("s", i64([0, 3, 4]))], opset=14, shape=(0, 3, 4), allowzero=1),
        None,  # allowzero=1 makes 0 a literal size: same shape here, so it is a no-op after all
    ),
    "cast_other_type": (lambda: single("Cast", to=TensorProto.DOUBLE), "casts FLOAT to DOUBLE"),
    "add_nonzero": (lambda: single("Add", ["x", "z"], [init("z", np.array([0, 0, 1e-30, 0], np.float32))]), "is not all 0"),
    "add_zero_raises_rank": (lambda: single("Add", ["x", "z"], [init("z", np.zeros((5, 2, 3, 4), np.float32))]), "raises the rank"),
    "add_zero_enlarges_dim": (
        lambda: single("Add", ["x", "z"], [init("z", np.zeros((3, 4), np.float32))], shape=(2, 1, 4)),
        "changes or may change the shape",
    ),
    "add_zero_symbolic_dim": (
        lambda: single("Add", ["x", "z"], [init("z", np.zeros((3, 4), np.float32))], shape=(2, "M", 4)),
        "changes or may change the shape",
    ),
    "add_overridable_zero": (overridable_zero, "not a constant"),
    "sub_zero_first": (lambda: single("Sub", ["z", "x"], [init("z", np.zeros(4, np.float32))]), "'x' is not a constant"),
    "div_one_first": (lambda: single("Div", ["o", "x"], [init("o", np.ones(4, np.float32))]), "'x' is not a constant"),
    "mul_two": (lambda: single("Mul", ["x", "o"], [init("o", np.full(4, 2.0, np.float32))]), "is not all 1"),
    "squeeze_no_axes_with_one_dims": (lambda: single("Squeeze", shape=(2, 1, 4)), "removes the 1-dims"),
    "squeeze_no_axes_symbolic": (lambda: single("Squeeze", shape=("N", 3, 4)), "not static"),
    "squeeze_axes": (lambda: single("Squeeze", ["x", "a"], [init("a", i64([1]))], shape=(2, 1, 4)), "removes axes [1]"),
    "unsqueeze_axes": (lambda: single("Unsqueeze", ["x", "a"], [init("a", i64([0]))]), "inserts axes [0]"),
    "dropout_training_true": (
        lambda: single("Dropout", ["x", "r", "t"], [init("r", np.array(0.0, np.float32)), init("t", np.array(True))]),
        "training_mode is true",
    ),
    "dropout_mask_used": (mask_used, "output 'mask' is used"),
    "slice_start_one": (lambda: single("Slice", ["x", "b", "e"], [init("b", i64([1])), init("e", i64([I64_MAX]))]), "start 1"),
    "slice_end_short": (
        lambda: single("Slice", ["x", "b", "e", "a"], [init("b", i64([0])), init("e", i64([3])), init("a", i64([2]))]),
        "cuts",
    ),
    "slice_step_two": (
        lambda: single("Slice", ["x", "b", "e", "a", "s"], [init(n, i64([v])) for n, v in zip("beas", (0, 9, 0, 2))]),
        "step 2",
    ),
    "slice_symbolic_int32_max": (
        lambda: single(
            "Slice", ["x", "b", "e", "a"], [init("b", i64([0])), init("e", i64([2**31 - 1])), init("a", i64([0]))], shape=("N", 3, 4)
        ),
        "unknown size",
    ),
    "pad_nonzero_opset9": (lambda: single("Pad", opset=9, pads=[0, 1, 0, 0, 0, 0]), "not all zero"),
    "pad_nonzero_opset17": (lambda: single("Pad", ["x", "p"], [init("p", i64([0, 0, 0, 0, 0, -1]))]), "not all zero"),
    "expand_enlarges": (lambda: single("Expand", ["x", "s"], [init("s", i64([2, 1, 1, 1]))]), "raises the rank"),
    "expand_dim": (lambda: single("Expand", ["x", "s"], [init("s", i64([2, 3, 4]))], shape=(1, 3, 4)), "changes"),
    "concat_two": (lambda: single("Concat", ["x", "x"], axis=0), "Concat of 2 inputs"),
    "sum_two": (lambda: single("Sum", ["x", "x"]), "Sum of 2 inputs"),
    "custom_domain": (custom_identity, "opaque"),
}
ORT_CANNOT_RUN = {"custom_domain"}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_guard_keeps_node(case: str) -> None:
    build, reason = NEGATIVE[case]
    model = build()
    node = [n for n in model.graph.node if n.op_type not in ("Constant", "Neg")][0]
    why = why_not(node, GraphView.build(model.graph), PassContext(model))
    if reason is None:
        assert why is None
        return
    assert why is not None and reason in why, why
    result = run_pass(model, NOOPS)
    assert node.op_type in op_types(result.model)
    assert counts(result) == {}
    if case not in ORT_CANNOT_RUN:
        assert_equivalent(model, result.model, input_shapes={"x": (2, 3, 4)} if "symbolic" in case else None)


def test_dropout_before_opset7_needs_is_test() -> None:
    """onnxruntime has no Dropout-6, so only the rule's decision is checked."""
    for is_test, expected in ((0, "training mode"), (1, None)):
        model = single("Dropout", opset=6, is_test=is_test)
        why = why_not(model.graph.node[0], GraphView.build(model.graph), PassContext(model))
        assert why == expected or (expected is not None and expected in why)


def test_reshape_semantics() -> None:
    assert resolve_reshape((2, 3, 4), (0, -1), False) == (2, 12)
    assert resolve_reshape((2, 3, 4), (0, 0, 0), False) == (2, 3, 4)
    assert resolve_reshape((2, 3, 4), (0, 0, 0), True) == (0, 0, 0)
    assert resolve_reshape((2, 3, 4), (-1, -1), False) is None
    assert resolve_reshape((0, 3), (-1, 0), False) == (0, 3)
    assert resolve_reshape((0, 3), (0, -1), False) is None  # -1 beside a 0 size is ambiguous


def test_exclude_option() -> None:
    model = POSITIVE["add_zero_right"]()
    result = run_pass(model, [EliminateNoops(exclude=("Add",))])
    assert "Add" in op_types(result.model)
    with pytest.raises(OptionError, match="unknown op type 'Relu'"):
        run_pass(model, "eliminate_noops:exclude=Relu")
    result = run_pass(model, "eliminate_noops:exclude=Mul|Sub")
    assert "Add" not in op_types(result.model)


# ------------------------------------------------------------------ graph outputs


def test_identity_from_graph_input_to_output_is_kept() -> None:
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [tensor_input("x", SHAPE)], [out("y")])
    result = run_pass(model, NOOPS)
    assert op_types(result.model) == ["Identity"]
    assert counts(result) == {}
    assert result.model.SerializeToString() == model.SerializeToString()


def test_identity_between_graph_outputs_is_kept() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Identity", ["t"], ["y"])]
    model = make_model(nodes, [tensor_input("x", SHAPE)], [out("t"), out("y")])
    result = run_pass(model, NOOPS)
    assert op_types(result.model) == ["Relu", "Identity"]
    assert counts(result) == {}


def test_identity_from_initializer_to_output_is_kept() -> None:
    nodes = [
        helper.make_node("Identity", ["c"], ["y"]),
        helper.make_node("Identity", ["c"], ["u"]),
        helper.make_node("Add", ["x", "u"], ["z"]),
    ]
    model = make_model(nodes, [tensor_input("x", [3])], [out("y"), out("z")], [init("c", np.arange(3, dtype=np.float32))])
    result = run_pass(model, NOOPS)
    assert op_types(result.model) == ["Identity", "Add"]
    assert list(result.model.graph.node[1].input) == ["x", "c"]
    assert_equivalent(model, result.model)


def test_output_producer_is_renamed() -> None:
    """Relu -> t -> Identity -> y(output): Relu writes y; other readers of t read y."""
    nodes = [
        helper.make_node("Relu", ["x"], ["t"]),
        helper.make_node("Identity", ["t"], ["y"]),
        helper.make_node("Neg", ["t"], ["z"]),
    ]
    model = make_model(nodes, [tensor_input("x", SHAPE)], [out("y"), out("z")])
    model.graph.value_info.append(tensor_input("t", SHAPE))
    result = run_pass(model, NOOPS)
    graph = result.model.graph
    assert op_types(result.model) == ["Relu", "Neg"]
    assert list(graph.node[0].output) == ["y"] and list(graph.node[1].input) == ["y"]
    assert [v.name for v in graph.value_info] == []
    assert counts(result) == {"Identity": 1}
    assert_equivalent(model, result.model)


def test_two_outputs_of_one_value() -> None:
    """Relu -> t -> Identity -> y1, t -> Identity -> y2: Relu writes y1, y2 = Identity(y1)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["t"]),
        helper.make_node("Identity", ["t"], ["y1"]),
        helper.make_node("Identity", ["t"], ["y2"]),
    ]
    model = make_model(nodes, [tensor_input("x", SHAPE)], [out("y1"), out("y2")])
    result = run_pass(model, NOOPS)
    graph = result.model.graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in graph.node] == [("Relu", ["x"], ["y1"]), ("Identity", ["y1"], ["y2"])]
    assert_equivalent(model, result.model)
    again = run_pass(result.model, NOOPS)
    assert counts(again) == {}


def test_non_identity_noop_on_interface_becomes_identity() -> None:
    """x -> Reshape(same) -> y: y must stay produced, by an Identity instead of the Reshape."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"])]
    model = make_model(nodes, [tensor_input("x", SHAPE)], [out("y")], [init("s", i64([2, 3, 4]))])
    result = run_pass(model, NOOPS)
    node = result.model.graph.node[0]
    assert (node.op_type, list(node.input), list(node.output), len(node.attribute)) == ("Identity", ["x"], ["y"], 0)
    assert counts(result) == {"replaced_by_identity": 1}
    assert_equivalent(model, result.model)
    assert counts(run_pass(result.model, NOOPS)) == {}


def test_dropout_with_unused_mask_on_interface_becomes_identity() -> None:
    model = make_model([helper.make_node("Dropout", ["x"], ["y", "mask"])], [tensor_input("x", SHAPE)], [out("y")])
    model.graph.value_info.append(tensor_input("mask", SHAPE, TensorProto.BOOL))
    result = run_pass(model, NOOPS)
    node = result.model.graph.node[0]
    assert (node.op_type, list(node.output)) == ("Identity", ["y"])
    assert len(result.model.graph.value_info) == 0
    assert_equivalent(model, result.model)


# ------------------------------------------------------------------ chains


def test_identity_chain_resolves_in_one_run() -> None:
    nodes = [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(4)]
    nodes.append(helper.make_node("Relu", ["t4"], ["y"]))
    model = make_model(nodes, [tensor_input("t0", SHAPE)], [out("y")])
    result = run_pass(model, NOOPS)
    assert op_types(result.model) == ["Relu"]
    assert list(result.model.graph.node[0].input) == ["t0"]
    assert counts(result) == {"Identity": 4}
    assert_equivalent(model, result.model)


def test_mixed_chain_ending_in_graph_outputs() -> None:
    """Relu -> Identity -> a(output) -> Reshape(same) -> Transpose(id) -> b(output) -> Neg."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["a"]),
        helper.make_node("Reshape", ["a", "s"], ["m"]),
        helper.make_node("Transpose", ["m"], ["b"], perm=[0, 1, 2]),
        helper.make_node("Neg", ["m"], ["c"]),
    ]
    model = make_model(nodes, [tensor_input("x", SHAPE)], [out("a"), out("b"), out("c")], [init("s", i64([2, 3, 4]))])
    result = run_pass(model, NOOPS)
    got = [(n.op_type, list(n.input), list(n.output)) for n in result.model.graph.node]
    assert got == [("Relu", ["x"], ["a"]), ("Identity", ["a"], ["b"]), ("Neg", ["a"], ["c"])]
    assert counts(result) == {"Identity": 1, "Reshape": 1, "replaced_by_identity": 1}
    assert_equivalent(model, result.model)
    assert counts(run_pass(result.model, NOOPS)) == {}


def test_long_chain_is_linear_and_iterative() -> None:
    length = 3000
    nodes = [helper.make_node("Identity", [f"t{i}"], [f"t{i + 1}"]) for i in range(length)]
    nodes.append(helper.make_node("Neg", [f"t{length}"], ["y"]))
    model = make_model(nodes, [tensor_input("t0", [2])], [out("y")])
    result = run_pass(model, NOOPS)
    assert op_types(result.model) == ["Neg"]
    assert counts(result) == {"Identity": length}


def test_resolve_roots_compresses_paths() -> None:
    forward = {"b": "a", "c": "b", "d": "c", "e": "b", "q": "p"}
    assert resolve_roots(forward) == {"b": "a", "c": "a", "d": "a", "e": "a", "q": "p"}


# ------------------------------------------------------------------ subgraphs


def branch(name: str, nodes: list[onnx.NodeProto], output: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [tensor_input(output, [2, 3])])


def if_model() -> ModelProto:
    """u = Identity(x) read inside the then-branch; no-ops inside both branches."""
    then_branch = branch(
        "then",
        [
            helper.make_node("Identity", ["u"], ["a"]),  # reads an outer no-op output
            helper.make_node("Neg", ["a"], ["n"]),
            helper.make_node("Identity", ["n"], ["then_out"]),  # Neg gets renamed to the branch output
        ],
        "then_out",
    )
    else_branch = branch("else", [helper.make_node("Identity", ["x"], ["else_out"])], "else_out")  # outer value: kept
    nodes = [
        helper.make_node("Identity", ["x"], ["u"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    return make_model(nodes, [tensor_input("x", [2, 3]), tensor_input("cond", [], TensorProto.BOOL)], [out("y")])


def test_noops_inside_if_branches() -> None:
    model = if_model()
    result = run_pass(model, NOOPS)
    main = result.model.graph
    assert op_types(result.model) == ["If"]
    graphs = {a.name: a.g for a in main.node[0].attribute}
    then_graph, else_graph = graphs["then_branch"], graphs["else_branch"]
    assert [(n.op_type, list(n.input), list(n.output)) for n in then_graph.node] == [("Neg", ["x"], ["then_out"])]
    assert [(n.op_type, list(n.input)) for n in else_graph.node] == [("Identity", ["x"])]
    assert counts(result) == {"Identity": 3}
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for cond in (True, False):
        assert_equivalent(model, result.model, {"x": x, "cond": np.array(cond)})


# ------------------------------------------------------------------ determinism

SCRIPT = """
import hashlib, sys, onnx, onnxopt
model = onnx.load(sys.argv[1])
result = onnxopt.optimize(model, "eliminate_noops", isolate=False)
print(hashlib.sha256(result.model.SerializeToString()).hexdigest())
"""


def busy_model() -> ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["a"]),
        helper.make_node("Identity", ["r"], ["b"]),
        helper.make_node("Add", ["a", "z"], ["c"]),
        helper.make_node("Mul", ["o", "b"], ["d"]),
        helper.make_node("Concat", ["c", "d"], ["e"], axis=0),
        helper.make_node("Transpose", ["e"], ["f"], perm=[0, 1, 2]),
        helper.make_node("Identity", ["f"], ["y1"]),
        helper.make_node("Identity", ["f"], ["y2"]),
        helper.make_node("Identity", ["x"], ["y3"]),
    ]
    inits = [init("z", np.zeros(4, np.float32)), init("o", np.ones(1, np.float32))]
    return make_model(nodes, [tensor_input("x", SHAPE)], [out("y1"), out("y2"), out("y3")], inits)


def test_deterministic_across_runs_and_hash_seeds(tmp_path) -> None:
    model = busy_model()
    first, second = run_pass(model, NOOPS), run_pass(model, NOOPS)
    data = first.model.SerializeToString()
    assert data == second.model.SerializeToString()
    assert op_types(first.model) == ["Relu", "Concat", "Identity", "Identity"]
    assert_equivalent(model, first.model)
    path = tmp_path / "busy.onnx"
    onnx.save(model, path)
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == hashlib.sha256(data).hexdigest()


def _dynamic_shape_model(op: str):
    """x[N,4] -> Reshape(x, Concat(Shape(x)[0:1], [4])) or Expand with that shape: shapes provably equal."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
        helper.make_node("Concat", ["n", "four"], ["target"], axis=0),
        helper.make_node(op, ["x", "target"], ["y"]),
        helper.make_node("Relu", ["y"], ["out"]),
    ]
    inits = [init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64)), init("four", np.array([4], np.int64))]
    return make_model(nodes, [tensor_input("x", ["N", 4])], [tensor_input("out", ["N", 4])], inits)


@pytest.mark.parametrize("op", ["Reshape", "Expand"])
def test_computed_shape_proved_equal_is_a_noop(op):
    model = _dynamic_shape_model(op)
    result = run_pass(model, "eliminate_noops,eliminate_dead_code")
    assert op not in op_types(result.model)
    assert op_types(result.model) == ["Relu"]
    for batch in (1, 3):
        assert_equivalent(model, result.model, input_shapes={"x": (batch, 4)})


def test_reshape_copying_a_symbolic_dim_is_a_noop():
    model = single("Reshape", ["x", "s"], [init("s", i64([0, 3, 4]))], shape=("N", 3, 4))
    result = run_pass(model, "eliminate_noops")
    assert "Reshape" not in op_types(result.model)
    assert_equivalent(model, result.model, input_shapes={"x": (2, 3, 4)})


def test_computed_shape_with_different_symbols_is_kept():
    model = _dynamic_shape_model("Expand")
    model.graph.input[0].type.tensor_type.shape.dim[1].ClearField("dim_value")  # x: [N, ?]: the target may broadcast
    result = run_pass(model, "eliminate_noops")
    assert "Expand" in op_types(result.model)
