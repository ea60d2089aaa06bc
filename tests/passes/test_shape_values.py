"""fold_shape_values: shape computations folded when known, merged when proved equal; guards."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

from onnxopt.graph import GraphView
from onnxopt.passbase import PassContext
from onnxopt.passes.shape_values import ShapeValues

PASS = "fold_shape_values"
I64 = TensorProto.INT64
INT64_MAX = (1 << 63) - 1


def ints(name: str, values) -> TensorProto:
    """An int64 initializer."""
    return init(name, np.array(values, np.int64))


def counts(result) -> dict[str, int]:
    """The counts of the fold_shape_values run."""
    return dict(next(r.counts for r in result.report.passes if r.name == PASS))


def values_of(model: ModelProto) -> ShapeValues:
    """The symbolic values of the main graph."""
    ctx = PassContext(model)
    return ShapeValues(GraphView.build(model.graph), ctx)


def test_static_dim_of_dynamic_shape_folds():
    """Reshape(x, Concat([-1], Shape(x)[-1:])): the Slice picks a static dim; the target becomes a constant."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "minus1", "big"], ["last"]),
        helper.make_node("Concat", ["minus1", "last"], ["t"], axis=0),
        helper.make_node("Reshape", ["x", "t"], ["y"]),
    ]
    model = make_model(
        nodes, [tensor_input("x", ["N", 3, 4])], [tensor_input("y", [None, 4])], [ints("minus1", [-1]), ints("big", [INT64_MAX])]
    )
    result = run_pass(model, f"{PASS},eliminate_dead_code")
    assert op_types(result.model) == ["Reshape"]
    assert counts(result) == {"values_folded": 2}
    target = next(t for t in result.model.graph.initializer if t.name == result.model.graph.node[0].input[1])
    assert numpy_helper.to_array(target).tolist() == [-1, 4]
    for batch in (1, 3):
        assert_equivalent(model, result.model, input_shapes={"x": (batch, 3, 4)})


def legacy_expand_model() -> ModelProto:
    """The legacy BERT guard: Expand(c, Where(Equal([d, -1], -1), 1, [d, -1])) with d = Shape(Slice(c))[0] = 1."""
    nodes = [
        helper.make_node("Shape", ["ids"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["seq"], axis=0),
        helper.make_node("Unsqueeze", ["seq", "zero1"], ["seq1"]),
        helper.make_node("Slice", ["table", "zero1", "seq1", "one1"], ["sl"]),
        helper.make_node("Shape", ["sl"], ["s2"]),
        helper.make_node("Gather", ["s2", "zero"], ["d"], axis=0),
        helper.make_node("Unsqueeze", ["d", "zero1"], ["d1"]),
        helper.make_node("Concat", ["d1", "minus1"], ["c"], axis=0),
        helper.make_node("Equal", ["c", "minus1x2"], ["e"]),
        helper.make_node("Where", ["e", "ones", "c"], ["w"]),
        helper.make_node("Expand", ["sl", "w"], ["y"]),
    ]
    inits = [
        ints("one", 1),
        ints("zero", 0),
        ints("zero1", [0]),
        ints("one1", [1]),
        ints("minus1", [-1]),
        ints("minus1x2", [-1, -1]),
        ints("ones", [1, 1]),
        ints("table", np.arange(10).reshape(1, 10)),
    ]
    return make_model(nodes, [tensor_input("ids", ["B", "S"], I64)], [tensor_input("y", [1, None], I64)], inits)


def test_equal_where_guard_folds_and_expand_goes():
    model = legacy_expand_model()
    result = run_pass(model, f"{PASS},eliminate_noops,eliminate_dead_code")
    assert op_types(result.model) == ["Shape", "Gather", "Unsqueeze", "Slice"]
    for shape in ((2, 4), (1, 12)):
        assert_equivalent(model, result.model, input_shapes={"ids": shape})


def bert_shapes_model() -> ModelProto:
    """Two head-merge targets [Shape(a)[0], Shape(a)[1], -1] computed from two tensors with the same symbolic dims."""
    nodes = [helper.make_node("Relu", ["x"], ["a0"]), helper.make_node("Sigmoid", ["a0"], ["a1"])]
    outputs = []
    for i in (0, 1):
        nodes += [
            helper.make_node("Shape", [f"a{i}"], [f"s{i}"]),
            helper.make_node("Gather", [f"s{i}", "zero"], [f"b{i}"], axis=0),
            helper.make_node("Gather", [f"s{i}", "one"], [f"q{i}"], axis=0),
            helper.make_node("Unsqueeze", [f"b{i}", "zero1"], [f"b1{i}"]),
            helper.make_node("Unsqueeze", [f"q{i}", "zero1"], [f"q1{i}"]),
            helper.make_node("Concat", [f"b1{i}", f"q1{i}", "minus1"], [f"t{i}"], axis=0),
            helper.make_node("Reshape", [f"a{i}", f"t{i}"], [f"y{i}"]),
        ]
        outputs.append(tensor_input(f"y{i}", ["B", "S", None]))
    inits = [ints("zero", 0), ints("one", 1), ints("zero1", [0]), ints("minus1", [-1])]
    return make_model(nodes, [tensor_input("x", ["B", "S", 4, 2])], outputs, inits)


def test_equal_values_merge_into_the_first():
    model = bert_shapes_model()
    result = run_pass(model, f"{PASS},eliminate_dead_code")
    assert op_types(result.model).count("Shape") == 1
    assert op_types(result.model).count("Concat") == 1
    assert counts(result) == {"values_merged": 6}
    for shape in ((2, 3, 4, 2), (1, 5, 4, 2)):
        assert_equivalent(model, result.model, input_shapes={"x": shape})


def test_where_of_known_false_condition_merges_into_its_input():
    """Where(Equal([B, S], -1), 1, [B, S]) is [B, S]: its readers read the Concat."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Equal", ["s", "minus1x2"], ["e"]),
        helper.make_node("Where", ["e", "ones", "s"], ["w"]),
        helper.make_node("Expand", ["row", "w"], ["y"]),
    ]
    inits = [ints("minus1x2", [-1, -1]), ints("ones", [1, 1]), init("row", np.ones((1, 1), np.float32))]
    model = make_model(nodes, [tensor_input("x", ["B", "S"])], [tensor_input("y", ["B", "S"])], inits)
    result = run_pass(model, f"{PASS},eliminate_dead_code")
    assert op_types(result.model) == ["Shape", "Expand"]
    assert counts(result) == {"values_folded": 1, "values_merged": 1}
    assert_equivalent(model, result.model, input_shapes={"x": (3, 2)})


def test_integer_arithmetic_is_exact():
    """Div of ints truncates toward zero; Sub of a dim from itself is 0; x*1 and x+0 forward x."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["seven"], axis=0),
        helper.make_node("Div", ["seven", "minus2"], ["q"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Sub", ["n", "n"], ["z"]),
        helper.make_node("Mul", ["n", "one"], ["n1"]),
        helper.make_node("Add", ["n1", "z"], ["n2"]),
        helper.make_node("Add", ["n2", "q"], ["y"]),
    ]
    inits = [ints("one", 1), ints("zero", 0), ints("minus2", -2)]
    model = make_model(nodes, [tensor_input("x", ["N", 7])], [tensor_input("y", [], I64)], inits)
    values = values_of(model)
    assert values.value("q").elems == (-3,)
    assert values.value("z").elems == (0,)
    assert values.value("n2").elems == (("p", "N"),)
    result = run_pass(model, f"{PASS},eliminate_dead_code")
    for batch in (1, 6):
        assert_equivalent(model, result.model, input_shapes={"x": (batch, 7)})


def test_narrowing_cast_of_a_dim_is_not_the_dim():
    """Cast(int64 -> int32) of a dynamic dim may wrap: its value stays opaque, widening keeps it."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
        helper.make_node("Cast", ["s32"], ["s64"], to=I64),
        helper.make_node("Add", ["s64", "s"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", ["N"])], [tensor_input("y", [1], I64)])
    values = values_of(model)
    assert values.value("s").elems == (("p", "N"),)
    assert values.value("s32").elems == (("v", "s32", 0),)
    assert values.value("s64").elems == (("v", "s32", 0),)
    assert run_pass(model, PASS).report.passes[0].status == "unchanged"


@pytest.mark.parametrize(
    ("starts", "ends", "steps", "expected"),
    [([1], [INT64_MAX], [1], (3, 4)), ([-2], [-1], [1], (3,)), ([0], [3], [2], ("N", 4)), ([5], [9], [1], ())],
)
def test_slice_of_a_shape(starts, ends, steps, expected):
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "b", "e", "a", "st"], ["y"])]
    inits = [ints("b", starts), ints("e", ends), ints("a", [0]), ints("st", steps)]
    model = make_model(nodes, [tensor_input("x", ["N", 3, 4])], [tensor_input("y", [None], I64)], inits)
    got = values_of(model).value("y").elems
    assert got == tuple(("p", e) if isinstance(e, str) else e for e in expected)


def test_guards():
    """Negative steps, graph outputs, custom-domain ops and undecidable Equal are left alone."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "minus1", "lowest", "zero1", "minus1"], ["rev"]),
        helper.make_node("Gather", ["s", "one"], ["three"], axis=0),
        helper.make_node("Custom", ["s"], ["c"], domain="custom"),
        helper.make_node("Equal", ["c", "minus1x2"], ["e"]),
        helper.make_node("Cast", ["e"], ["y"], to=I64),
    ]
    inits = [ints("minus1", [-1]), ints("lowest", [-(1 << 63)]), ints("zero1", [0]), ints("one", 1), ints("minus1x2", [-1, -1])]
    outputs = [tensor_input("rev", [None], I64), tensor_input("three", [], I64), tensor_input("y", [2], I64)]
    graph = helper.make_graph(nodes, "guards", [tensor_input("x", ["N", 3])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)], ir_version=8)
    values = values_of(model)
    assert values.value("rev").elems == (("v", "rev", 0), ("v", "rev", 1))  # not derived (negative step): opaque
    assert values.value("three").elems == (3,)
    assert values.value("c") is None  # opaque op, type unknown
    assert values.value("e") is None
    result = run_pass(model, PASS)
    assert result.report.passes[0].status == "unchanged"  # 'three' is known but a graph output


def test_subgraph_and_determinism():
    """The pass runs in If branches too and gives the same bytes twice."""

    def build() -> ModelProto:
        branch_nodes = [
            helper.make_node("Shape", ["x"], ["bs"]),
            helper.make_node("Gather", ["bs", "one"], ["b3"], axis=0),
            helper.make_node("Unsqueeze", ["b3", "zero1"], ["b31"]),
            helper.make_node("Concat", ["minus1", "b31"], ["bt"], axis=0),
            helper.make_node("Reshape", ["x", "bt"], ["out"]),
        ]
        inits = [ints("one", 1), ints("zero1", [0]), ints("minus1", [-1])]  # the branch's own (outer ones are not constants there)
        branch = helper.make_graph(branch_nodes, "then", [], [tensor_input("out", [None, 3])], inits)
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["out2"])], "else", [], [tensor_input("out2", ["N", 3])])
        nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
        inputs = [tensor_input("x", ["N", 3]), tensor_input("cond", [], TensorProto.BOOL)]
        return make_model(nodes, inputs, [tensor_input("y", [None, 3])])

    first, second = run_pass(build(), PASS), run_pass(build(), PASS)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    body = next(a.g for a in first.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["Shape", "Reshape"]  # Gather, Unsqueeze, Concat folded; Shape is dead
    for flag in (True, False):
        feeds = {"x": np.ones((2, 3), np.float32), "cond": np.array(flag)}
        assert_equivalent(build(), first.model, feeds)
    onnx.checker.check_model(first.model)
