"""constant_reshape_shapes: computed Reshape targets become constants proved by inference."""

from __future__ import annotations

import numpy as np
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import TensorProto, helper, numpy_helper

from onnxopt.graph import GraphView
from onnxopt.passbase import PassContext
from onnxopt.passes.shape_values import ShapeValues, reshape_target


def _model(tail: list[int], in_shape=("N", 8, 4), out_shape=("N", 32)):
    """x -> Reshape(x, Concat(Shape(x)[0:1], tail)) -> Relu."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
        helper.make_node("Concat", ["n", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    inits = [init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64)), init("tail", np.array(tail, np.int64))]
    return make_model(nodes, [tensor_input("x", list(in_shape))], [tensor_input("y", list(out_shape))], inits)


def _target(model):
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    tensor = next(t for t in model.graph.initializer if t.name == reshape.input[1])
    return numpy_helper.to_array(tensor).tolist()


def test_dynamic_batch_target_becomes_constant():
    model = _model([32])
    result = run_pass(model, "constant_reshape_shapes,eliminate_dead_code")
    assert _target(result.model) == [0, 32]  # the batch dim is proved equal to the input's: copied
    assert op_types(result.model) == ["Reshape", "Relu"]
    assert result.report.passes[0].counts == {"reshape_targets": 1}
    for batch in (1, 5):
        assert_equivalent(model, result.model, input_shapes={"x": (batch, 8, 4)})


def test_static_target_has_no_minus_one():
    model = _model([32], in_shape=(3, 8, 4), out_shape=(3, 32))
    result = run_pass(model, "constant_reshape_shapes")
    assert _target(result.model) == [3, 32]
    assert_equivalent(model, result.model)


def test_zero_sized_dim_is_copied_exactly():
    """[N, 0, 4] -> Concat(Shape(x)[0:1], [0]): inference cannot write the target, the symbolic value can: [0, 0]."""
    model = _model([0], in_shape=("N", 0, 4), out_shape=("N", None))
    result = run_pass(model, "constant_reshape_shapes")
    assert _target(result.model) == [0, 0]
    assert_equivalent(model, result.model, input_shapes={"x": (3, 0, 4)})


def _cast_model(in_shape, tail, out_rank):
    """Reshape(x, Concat(Cast64(Slice(Cast32(Shape(x)), 0, 1)), tail)): the PP-OCR classifier's flatten."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["s32", "zero", "one"], ["n32"]),
        helper.make_node("Cast", ["n32"], ["n"], to=TensorProto.INT64),
        helper.make_node("Concat", ["n", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64)), init("tail", np.array(tail, np.int64))]
    return make_model(nodes, [tensor_input("x", list(in_shape))], [tensor_input("y", [None] * out_rank)], inits)


def test_one_unknown_entry_next_to_positive_numbers_becomes_minus_one():
    """The narrowed batch may not be the batch, but the element count forces it: [-1, 200]."""
    model = _cast_model((None, 200, 1, 1), [200], 2)
    result = run_pass(model, "constant_reshape_shapes,eliminate_dead_code")
    assert _target(result.model) == [-1, 200]
    assert op_types(result.model) == ["Reshape"]
    for batch in (1, 4):
        assert_equivalent(model, result.model, input_shapes={"x": (batch, 200, 1, 1)})


def test_unknown_entry_next_to_a_copy_gets_no_minus_one():
    """[narrowed N, 0 (copy), 2]: -1 next to a copied dim that may be 0 could not be inferred."""
    model = _cast_model((None, "M", 2), [0, 2], 3)
    reshape = model.graph.node[-1]
    values = ShapeValues(GraphView.build(model.graph), PassContext(model))
    assert values.value("target").elems == (("v", "s32", 0), 0, 2)
    assert reshape_target(reshape, values, PassContext(model)) is None
    positive = _cast_model((None, "M", 2), [3, 2], 3)  # the same with positive numbers only
    values = ShapeValues(GraphView.build(positive.graph), PassContext(positive))
    assert reshape_target(positive.graph.node[-1], values, PassContext(positive)) == [-1, 3, 2]


def test_head_merge_target_from_another_tensor():
    """Reshape(t, [Shape(a)[0], Shape(a)[1], -1]) where t and a share the symbolic batch and sequence dims."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Shape", ["a"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Gather", ["s", "one"], ["q"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
        helper.make_node("Unsqueeze", ["q", "zero1"], ["q1"]),
        helper.make_node("Concat", ["b1", "q1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["t", "target"], ["y"]),
    ]
    inits = [
        init("zero", np.array(0, np.int64)),
        init("one", np.array(1, np.int64)),
        init("zero1", np.array([0], np.int64)),
        init("minus1", np.array([-1], np.int64)),
    ]
    inputs = [tensor_input("x", ["B", "S", 8]), tensor_input("t", ["B", "S", 2, 4])]
    model = make_model(nodes, inputs, [tensor_input("y", ["B", "S", None])], inits)
    result = run_pass(model, "constant_reshape_shapes,eliminate_dead_code")
    assert _target(result.model) == [0, 0, -1]
    assert op_types(result.model) == ["Reshape"]
    assert_equivalent(model, result.model, input_shapes={"x": (2, 3, 8), "t": (2, 3, 2, 4)})


def test_two_unknown_dims_in_new_positions_are_left_alone():
    """[N, M] -> [M, N]: neither dim is copied from the same position; -1 can stand for only one."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "one", "two"], ["m"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
        helper.make_node("Concat", ["m", "n"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [init(k, np.array([v], np.int64)) for k, v in (("zero", 0), ("one", 1), ("two", 2))]
    model = make_model(nodes, [tensor_input("x", ["N", "M"])], [tensor_input("y", ["M", "N"])], inits)
    assert run_pass(model, "constant_reshape_shapes").report.passes[0].status == "unchanged"


def test_constant_targets_and_old_ir_are_left_alone():
    model = make_model(
        [helper.make_node("Reshape", ["x", "t"], ["y"])],
        [tensor_input("x", ["N", 8])],
        [tensor_input("y", ["N", 2, 4])],
        [init("t", np.array([0, 2, 4], np.int64))],
    )
    assert run_pass(model, "constant_reshape_shapes").report.passes[0].status == "unchanged"
    old = _model([32])
    old.ir_version = 3  # IR 3: every initializer must also be a graph input
    old.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in old.graph.initializer)
    assert run_pass(old, "constant_reshape_shapes").report.passes[0].status == "unchanged"


def test_inside_a_loop_body_is_handled_per_graph():
    body = helper.make_graph(
        [
            helper.make_node("Shape", ["v"], ["s"]),
            helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
            helper.make_node("Concat", ["n", "tail"], ["target"], axis=0),
            helper.make_node("Reshape", ["v", "target"], ["r"]),
            helper.make_node("Reshape", ["r", "back"], ["v_out"]),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
        ],
        "body",
        [tensor_input("i", [], 7), tensor_input("cond", [], 9), tensor_input("v", ["N", 8, 4])],
        [tensor_input("cond_out", [], 9), tensor_input("v_out", ["N", 8, 4])],
        [
            init("zero", np.array([0], np.int64)),
            init("one", np.array([1], np.int64)),
            init("tail", np.array([32], np.int64)),
            init("back", np.array([0, 8, 4], np.int64)),
        ],
    )
    model = make_model(
        [helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)],
        [tensor_input("x", ["N", 8, 4])],
        [tensor_input("y", ["N", 8, 4])],
        [init("trip", np.array(2, np.int64))],
    )
    result = run_pass(model, "constant_reshape_shapes")
    assert result.report.passes[0].counts == {"reshape_targets": 1}
    assert_equivalent(model, result.model, input_shapes={"x": (3, 8, 4)})


def test_dims_copied_from_the_input_become_zero():
    """[batch, seq, 384] -> [batch, seq, 12, 32] with batch and seq computed by Shape/Gather."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "two"], ["bs"]),
        helper.make_node("Concat", ["bs", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    inits = [init("zero", np.array([0], np.int64)), init("two", np.array([2], np.int64)), init("tail", np.array([12, 32], np.int64))]
    model = make_model(nodes, [tensor_input("x", ["B", "S", 384])], [tensor_input("y", ["B", "S", 12, 32])], inits)
    result = run_pass(model, "constant_reshape_shapes,eliminate_dead_code")
    assert _target(result.model) == [0, 0, 12, 32]
    assert op_types(result.model) == ["Reshape", "Relu"]
    for shape in ((1, 5, 384), (3, 2, 384)):
        assert_equivalent(model, result.model, input_shapes={"x": shape})


def test_allowzero_never_uses_zero_for_copies():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "two"], ["bs"]),
        helper.make_node("Concat", ["bs", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], allowzero=1),
    ]
    inits = [init("zero", np.array([0], np.int64)), init("two", np.array([2], np.int64)), init("tail", np.array([12, 32], np.int64))]
    model = make_model(nodes, [tensor_input("x", ["B", "S", 384])], [tensor_input("y", ["B", "S", 12, 32])], inits, opset=18)
    assert run_pass(model, "constant_reshape_shapes").report.passes[0].status == "unchanged"
