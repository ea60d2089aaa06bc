"""Tests of dedupe_initializers and eliminate_common_subexpressions."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

from onnxopt.passbase import PassContext
from onnxopt.passes.cse import DedupeInitializers, EliminateCommonSubexpressions

DEDUPE = "dedupe_initializers"
CSE = "eliminate_common_subexpressions"


def counts(result, name: str) -> dict[str, int]:
    """The counts of the (single) run of pass ``name`` in a result's report."""
    records = [r for r in result.report.passes if r.name == name]
    assert len(records) == 1
    assert records[0].status != "rolled back", records[0].message
    return records[0].counts


def inputs_of(model: ModelProto) -> list[list[str]]:
    """The inputs of every main-graph node."""
    return [list(n.input) for n in model.graph.node]


def branch(name: str, nodes: list[onnx.NodeProto], output: str, initializers: list[TensorProto] = ()) -> onnx.GraphProto:
    """An If branch with one float output of shape [2, 3]."""
    return helper.make_graph(nodes, name, [], [tensor_input(output, [2, 3])], list(initializers))


def branches(node: onnx.NodeProto) -> tuple[onnx.GraphProto, onnx.GraphProto]:
    """An If node's (then, else) graphs."""
    graphs = {a.name: a.g for a in node.attribute}
    return graphs["then_branch"], graphs["else_branch"]


# ---------------------------------------------------------------------------------------
# dedupe_initializers


def test_duplicate_initializers_merged_into_first():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Add", ["x", "w1"], ["a"]),
        helper.make_node("Mul", ["a", "w2"], ["b"]),
        helper.make_node("Sub", ["b", "w3"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [2, 3])], [tensor_input("y", [2, 3])], [init("w1", w), init("w2", w), init("w3", w)])
    result = run_pass(model, DEDUPE)
    out = result.model
    assert [t.name for t in out.graph.initializer] == ["w1"]
    assert inputs_of(out) == [["x", "w1"], ["a", "w1"], ["b", "w1"]]
    assert counts(result, DEDUPE) == {"initializers_merged": 2}
    assert_equivalent(model, out)


def test_same_values_in_different_storage_fields_merged():
    raw = init("w_raw", np.array([1.5, -2.0, 3.25], dtype=np.float32))
    listed = helper.make_tensor("w_list", TensorProto.FLOAT, [3], [1.5, -2.0, 3.25])
    assert raw.raw_data and not listed.raw_data
    nodes = [helper.make_node("Add", ["x", "w_raw"], ["a"]), helper.make_node("Mul", ["a", "w_list"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [3])], [tensor_input("y", [3])], [raw, listed])
    out = run_pass(model, DEDUPE).model
    assert [t.name for t in out.graph.initializer] == ["w_raw"]
    assert_equivalent(model, out)


def test_same_bytes_with_other_dtype_shape_or_sign_not_merged():
    nodes = [
        helper.make_node("Add", ["x", "zeros_f4"], ["y1"]),
        helper.make_node("Add", ["xi", "zeros_i4"], ["y2"]),
        helper.make_node("Add", ["x22", "zeros_f22"], ["y3"]),
        helper.make_node("Add", ["x", "negzeros_f4"], ["y4"]),
    ]
    initializers = [
        init("zeros_f4", np.zeros(4, np.float32)),
        init("zeros_i4", np.zeros(4, np.int32)),  # same 16 zero bytes, other dtype
        init("zeros_f22", np.zeros((2, 2), np.float32)),  # same bytes, other shape
        init("negzeros_f4", -np.zeros(4, np.float32)),  # equal as numbers, not as bits
    ]
    inputs = [tensor_input("x", [4]), tensor_input("xi", [4], TensorProto.INT32), tensor_input("x22", [2, 2])]
    outputs = [
        tensor_input("y1", [4]),
        tensor_input("y2", [4], TensorProto.INT32),
        tensor_input("y3", [2, 2]),
        tensor_input("y4", [4]),
    ]
    model = make_model(nodes, inputs, outputs, initializers)
    result = run_pass(model, DEDUPE)
    assert [t.name for t in result.model.graph.initializer] == ["zeros_f4", "zeros_i4", "zeros_f22", "negzeros_f4"]
    assert counts(result, DEDUPE) == {}


def test_string_initializers_compare_element_boundaries():
    initializers = [
        helper.make_tensor("s1", TensorProto.STRING, [2], [b"a", b"bc"]),
        helper.make_tensor("s2", TensorProto.STRING, [2], [b"a", b"bc"]),
        helper.make_tensor("s3", TensorProto.STRING, [2], [b"ab", b"c"]),  # same concatenation
    ]
    nodes = [helper.make_node("Identity", [f"s{i}"], [f"y{i}"]) for i in (1, 2, 3)]
    outputs = [tensor_input(f"y{i}", [2], TensorProto.STRING) for i in (1, 2, 3)]
    model = make_model(nodes, [], outputs, initializers)
    out = run_pass(model, DEDUPE).model
    assert [t.name for t in out.graph.initializer] == ["s1", "s3"]
    assert inputs_of(out) == [["s1"], ["s1"], ["s3"]]
    assert_equivalent(model, out)


def test_initializer_that_is_graph_input_not_merged():
    w = np.ones((2, 3), np.float32)
    nodes = [
        helper.make_node("Add", ["x", "w_in"], ["a"]),
        helper.make_node("Mul", ["a", "w1"], ["b"]),
        helper.make_node("Sub", ["b", "w2"], ["y"]),
    ]
    inputs = [tensor_input("x", [2, 3]), tensor_input("w_in", [2, 3])]
    model = make_model(nodes, inputs, [tensor_input("y", [2, 3])], [init("w_in", w), init("w1", w), init("w2", w)])
    out = run_pass(model, DEDUPE).model
    # w_in comes first but is overridable: the plain duplicates merge among themselves.
    assert [t.name for t in out.graph.initializer] == ["w_in", "w1"]
    assert inputs_of(out) == [["x", "w_in"], ["a", "w1"], ["b", "w1"]]
    override = {"x": np.full((2, 3), 0.5, np.float32), "w_in": np.full((2, 3), 7.0, np.float32)}
    assert_equivalent(model, out, override)


def test_initializer_that_is_graph_output_not_merged():
    w = np.arange(3, dtype=np.float32)
    nodes = [helper.make_node("Add", ["x", "w2"], ["y"])]
    outputs = [tensor_input("y", [3]), tensor_input("w1", [3])]
    model = make_model(nodes, [tensor_input("x", [3])], outputs, [init("w1", w), init("w2", w)])
    result = run_pass(model, DEDUPE)
    assert [t.name for t in result.model.graph.initializer] == ["w1", "w2"]
    assert [o.name for o in result.model.graph.output] == ["y", "w1"]
    assert counts(result, DEDUPE) == {}
    assert_equivalent(model, result.model)


def test_subgraph_reads_of_a_duplicate_are_redirected_and_subgraphs_deduped():
    w = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    then_branch = branch("then", [helper.make_node("Add", ["x", "w2"], ["t"])], "t")
    else_nodes = [helper.make_node("Mul", ["x", "l1"], ["e0"]), helper.make_node("Sub", ["e0", "l2"], ["e"])]
    else_branch = branch("else", else_nodes, "e", [init("l1", w * 3), init("l2", w * 3)])
    nodes = [
        helper.make_node("Add", ["x", "w1"], ["a"]),
        helper.make_node("If", ["cond"], ["b"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    inputs = [tensor_input("x", [2, 3]), tensor_input("cond", [], TensorProto.BOOL)]
    model = make_model(nodes, inputs, [tensor_input("y", [2, 3])], [init("w1", w), init("w2", w)])
    result = run_pass(model, DEDUPE)
    out = result.model
    assert [t.name for t in out.graph.initializer] == ["w1"]
    then_out, else_out = branches(out.graph.node[1])
    assert list(then_out.node[0].input) == ["x", "w1"]
    assert [t.name for t in else_out.initializer] == ["l1"]
    assert [list(n.input) for n in else_out.node] == [["x", "l1"], ["e0", "l1"]]
    assert counts(result, DEDUPE) == {"initializers_merged": 2}
    x = np.linspace(0, 5, 6, dtype=np.float32).reshape(2, 3)
    for cond in (True, False):
        assert_equivalent(model, out, {"x": x, "cond": np.array(cond)})


def test_dedupe_drops_value_info_of_removed_initializers():
    w = np.ones(3, np.float32)
    nodes = [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "w2"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [3])], [tensor_input("y", [3])], [init("w1", w), init("w2", w)])
    model.graph.value_info.extend([tensor_input("w2", [3]), tensor_input("a", [3])])
    out = run_pass(model, DEDUPE).model
    assert [v.name for v in out.graph.value_info] == ["a"]
    assert_equivalent(model, out)


# ---------------------------------------------------------------------------------------
# eliminate_common_subexpressions


def conv_chains_model() -> ModelProto:
    """Two identical Relu -> Add -> Conv chains on x, the second listed first, summed."""
    weight = init("W", np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32))
    nodes = [
        helper.make_node("Relu", ["x"], ["r2"]),
        helper.make_node("Relu", ["x"], ["r1"]),
        helper.make_node("Add", ["r1", "x"], ["a1"]),
        helper.make_node("Conv", ["a1", "W"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Add", ["r2", "x"], ["a2"]),
        helper.make_node("Conv", ["a2", "W"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c1", "c2"], ["y"]),
    ]
    return make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 4, 8, 8])], [weight])


def test_identical_chains_collapse_in_one_run():
    model = conv_chains_model()
    model.graph.value_info.extend([tensor_input("a2", [1, 3, 8, 8]), tensor_input("a1", [1, 3, 8, 8])])
    result = run_pass(model, CSE)
    out = result.model
    assert op_types(out) == ["Relu", "Add", "Conv", "Add"]
    assert inputs_of(out) == [["x"], ["r2", "x"], ["a1", "W"], ["c1", "c1"]]
    assert [v.name for v in out.graph.value_info] == ["a1"]
    assert counts(result, CSE) == {"nodes_merged": 3}
    assert_equivalent(model, out)


def test_random_ops_not_merged():
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["n1"], seed=1.0),
        helper.make_node("RandomNormalLike", ["x"], ["n2"], seed=1.0),
        helper.make_node("RandomUniformLike", ["x"], ["u1"]),
        helper.make_node("RandomUniformLike", ["x"], ["u2"]),
        helper.make_node("Sum", ["n1", "n2", "u1", "u2"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [2, 3])], [tensor_input("y", [2, 3])])
    result = run_pass(model, CSE)
    assert op_types(result.model) == op_types(model)
    assert counts(result, CSE) == {}


def test_training_dropout_not_merged_but_inference_dropout_is():
    flags = [init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))]
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d1"]),
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d2"]),
        helper.make_node("Dropout", ["x"], ["e1"]),
        helper.make_node("Dropout", ["x"], ["e2"]),
        helper.make_node("Sum", ["d1", "d2", "e1", "e2"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [2, 3])], [tensor_input("y", [2, 3])], flags)
    out = run_pass(model, CSE).model
    assert inputs_of(out) == [["x", "ratio", "train"], ["x", "ratio", "train"], ["x"], ["d1", "d2", "e1", "e1"]]


def test_different_attributes_not_merged_same_attributes_in_any_order_are():
    gemm_a = helper.make_node("Gemm", ["x", "w"], ["g1"], alpha=0.5, beta=2.0, transB=1)
    gemm_b = helper.make_node("Gemm", ["x", "w"], ["g2"], alpha=0.5, beta=2.0, transB=1)
    reordered = list(reversed(gemm_b.attribute))
    del gemm_b.attribute[:]
    gemm_b.attribute.extend(reordered)
    assert [a.name for a in gemm_a.attribute] != [a.name for a in gemm_b.attribute]
    nodes = [
        helper.make_node("LeakyRelu", ["x"], ["l1"], alpha=0.1),
        helper.make_node("LeakyRelu", ["x"], ["l2"], alpha=0.2),
        helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 1]),
        helper.make_node("Transpose", ["x"], ["t2"], perm=[1, 0]),
        gemm_a,
        gemm_b,
        helper.make_node("Sum", ["l1", "l2", "g1", "g2"], ["s"]),
        helper.make_node("MatMul", ["t1", "t2"], ["y"]),
    ]
    w = init("w", np.random.default_rng(1).standard_normal((3, 3)).astype(np.float32))
    outputs = [tensor_input("s", [3, 3]), tensor_input("y", [3, 3])]
    model = make_model(nodes, [tensor_input("x", [3, 3])], outputs, [w])
    result = run_pass(model, CSE)
    out = result.model
    assert op_types(out) == ["LeakyRelu", "LeakyRelu", "Transpose", "Transpose", "Gemm", "Sum", "MatMul"]
    assert list(out.graph.node[5].input) == ["l1", "l2", "g1", "g1"]
    assert counts(result, CSE) == {"nodes_merged": 1}
    assert_equivalent(model, out)


def test_custom_domain_nodes_not_merged():
    nodes = [
        helper.make_node("Relu", ["x"], ["r1"]),
        helper.make_node("Relu", ["x"], ["r2"]),
        helper.make_node("Log", ["r1"], ["c1"], domain="my.ops"),
        helper.make_node("Log", ["r2"], ["c2"], domain="my.ops"),
        helper.make_node("Add", ["c1", "c2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "custom", [tensor_input("x", [3])], [tensor_input("y", [3])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    result = EliminateCommonSubexpressions().run(model, PassContext(model))
    assert result.counts == {"nodes_merged": 1}  # the Relus only
    assert op_types(model) == ["Relu", "Log", "Log", "Add"]
    assert inputs_of(model) == [["x"], ["r1"], ["r1"], ["c1", "c2"]]


def test_graph_output_names_kept():
    nodes = [
        helper.make_node("Relu", ["x"], ["y1"]),
        helper.make_node("Relu", ["x"], ["y2"]),  # both graph outputs: not merged
        helper.make_node("Relu", ["x"], ["t"]),  # not an output: merged into y1
        helper.make_node("Neg", ["t"], ["y3"]),
    ]
    outputs = [tensor_input(n, [3]) for n in ("y1", "y2", "y3")]
    model = make_model(nodes, [tensor_input("x", [3])], outputs)
    out = run_pass(model, CSE).model
    assert [o.name for o in out.graph.output] == ["y1", "y2", "y3"]
    assert inputs_of(out) == [["x"], ["x"], ["y1"]]
    assert [list(n.output) for n in out.graph.node] == [["y1"], ["y2"], ["y3"]]
    assert_equivalent(model, out)


def test_reads_from_if_subgraphs_are_redirected():
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    then_nodes = [helper.make_node("Constant", [], ["one"], value=one), helper.make_node("Add", ["b", "one"], ["t"])]
    then_branch = branch("then", then_nodes, "t")
    else_branch = branch("else", [helper.make_node("Neg", ["b"], ["e"])], "e")
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["x"], ["b"]),  # read only inside the If branches
        helper.make_node("If", ["cond"], ["i"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Mul", ["a", "i"], ["y"]),
    ]
    inputs = [tensor_input("x", [2, 3]), tensor_input("cond", [], TensorProto.BOOL)]
    model = make_model(nodes, inputs, [tensor_input("y", [2, 3])])
    out = run_pass(model, CSE).model
    assert op_types(out) == ["Relu", "If", "Mul"]
    then_out, else_out = branches(out.graph.node[1])
    assert list(then_out.node[1].input) == ["a", "one"]
    assert list(else_out.node[0].input) == ["a"]
    x = np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)
    for cond in (True, False):
        assert_equivalent(model, out, {"x": x, "cond": np.array(cond)})


def test_duplicates_inside_a_subgraph_merged_and_if_nodes_left_alone():
    def body(tag: str) -> onnx.GraphProto:
        nodes = [
            helper.make_node("Neg", ["x"], [f"{tag}_n1"]),
            helper.make_node("Neg", ["x"], [f"{tag}_n2"]),
            helper.make_node("Add", [f"{tag}_n1", f"{tag}_n2"], [f"{tag}_out"]),
        ]
        return branch(tag, nodes, f"{tag}_out")

    nodes = [
        helper.make_node("If", ["cond"], ["i1"], then_branch=body("p"), else_branch=body("q")),
        helper.make_node("If", ["cond"], ["i2"], then_branch=body("r"), else_branch=body("s")),
        helper.make_node("Add", ["i1", "i2"], ["y"]),
    ]
    inputs = [tensor_input("x", [2, 3]), tensor_input("cond", [], TensorProto.BOOL)]
    model = make_model(nodes, inputs, [tensor_input("y", [2, 3])])
    result = run_pass(model, CSE)
    out = result.model
    assert op_types(out) == ["If", "If", "Add"]
    for node in out.graph.node[:2]:
        for attr in node.attribute:
            assert [n.op_type for n in attr.g.node] == ["Neg", "Add"]
            assert attr.g.node[1].input[0] == attr.g.node[1].input[1]
    assert counts(result, CSE) == {"nodes_merged": 4}
    x = np.linspace(-3, 3, 6, dtype=np.float32).reshape(2, 3)
    for cond in (True, False):
        assert_equivalent(model, out, {"x": x, "cond": np.array(cond)})


def test_identical_constant_nodes_merged_whatever_their_tensor_names():
    def const(out: str, tensor_name: str, values: list[float]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [out], value=helper.make_tensor(tensor_name, TensorProto.FLOAT, [3], values))

    nodes = [
        const("c1", "first", [1.0, 2.0, 3.0]),
        const("c2", "second", [1.0, 2.0, 3.0]),
        const("c3", "third", [1.0, 2.0, 4.0]),
        helper.make_node("Add", ["x", "c1"], ["a"]),
        helper.make_node("Add", ["x", "c2"], ["b"]),
        helper.make_node("Add", ["x", "c3"], ["c"]),
        helper.make_node("Sum", ["a", "b", "c"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [3])], [tensor_input("y", [3])])
    result = run_pass(model, CSE)
    out = result.model
    assert op_types(out) == ["Constant", "Constant", "Add", "Add", "Sum"]
    assert inputs_of(out)[-1] == ["a", "a", "c"]
    assert counts(result, CSE) == {"nodes_merged": 2}
    assert_equivalent(model, out)


def test_missing_optional_output_not_merged_into():
    nodes = [
        helper.make_node("Dropout", ["x"], ["d1", ""]),
        helper.make_node("Dropout", ["x"], ["d2", "m2"]),
        helper.make_node("Not", ["m2"], ["y2"]),
        helper.make_node("Add", ["d1", "d2"], ["y1"]),
    ]
    outputs = [tensor_input("y1", [3]), tensor_input("y2", [3], TensorProto.BOOL)]
    model = make_model(nodes, [tensor_input("x", [3])], outputs)
    result = run_pass(model, CSE)
    assert op_types(result.model) == op_types(model)
    assert_equivalent(model, result.model)


def test_determinism_byte_identical_output():
    model = conv_chains_model()
    model.graph.initializer.append(init("W_copy", onnx.numpy_helper.to_array(model.graph.initializer[0])))
    model.graph.node[5].input[1] = "W_copy"
    spec = f"{DEDUPE},{CSE}"
    first = run_pass(model, spec).model.SerializeToString()
    second = run_pass(model, spec).model.SerializeToString()
    assert first == second
    assert op_types(onnx.load_from_string(first)) == ["Relu", "Add", "Conv", "Add"]


def test_direct_pass_objects_report_no_change_on_clean_model():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_input("x", [3])], [tensor_input("y", [3])])
    for pass_ in (DedupeInitializers(), EliminateCommonSubexpressions()):
        assert not pass_.run(model, PassContext(model)).modified


def test_hash_collisions_are_caught_by_the_byte_comparison(monkeypatch):
    from onnxopt.passes import cse

    monkeypatch.setattr(cse, "_payload_digest", lambda tensor, payload: b"collide")
    monkeypatch.setattr(cse, "_attribute_key", lambda node: b"collide" if len(node.attribute) else b"")
    a, b = np.arange(3, dtype=np.float32), np.ones(3, np.float32)
    initializers = [init("a1", a), init("b1", b), init("a2", a), init("b2", b)]
    nodes = [
        helper.make_node("Sum", ["x", "a1", "b1", "a2", "b2"], ["s"]),
        helper.make_node("LeakyRelu", ["s"], ["l1"], alpha=0.1),
        helper.make_node("LeakyRelu", ["s"], ["l2"], alpha=0.2),
        helper.make_node("LeakyRelu", ["s"], ["l3"], alpha=0.1),
        helper.make_node("Sum", ["l1", "l2", "l3"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [3])], [tensor_input("y", [3])], initializers)
    result = run_pass(model, f"{DEDUPE},{CSE}")
    out = result.model
    assert [t.name for t in out.graph.initializer] == ["a1", "b1"]
    assert inputs_of(out) == [["x", "a1", "b1", "a1", "b1"], ["s"], ["s"], ["l1", "l2", "l1"]]
    assert_equivalent(model, out)


def test_unsorted_graph_still_collapses_in_one_run():
    model = conv_chains_model()
    nodes = list(model.graph.node)
    unsorted = [nodes[i] for i in (6, 5, 4, 3, 2, 1, 0)]  # consumers before producers
    del model.graph.node[:]
    model.graph.node.extend(unsorted)
    result = EliminateCommonSubexpressions().run(model, PassContext(model))
    assert result.counts == {"nodes_merged": 3}
    assert sorted(op_types(model)) == ["Add", "Add", "Conv", "Relu"]


def test_legacy_dropout_merged_only_in_test_mode():
    nodes = [
        helper.make_node("Dropout", ["x"], ["d1"]),  # opset 6: is_test defaults to 0 (training)
        helper.make_node("Dropout", ["x"], ["d2"]),
        helper.make_node("Dropout", ["x"], ["e1"], is_test=1),
        helper.make_node("Dropout", ["x"], ["e2"], is_test=1),
        helper.make_node("Sum", ["d1", "d2", "e1", "e2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "legacy", [tensor_input("x", [3])], [tensor_input("y", [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    result = EliminateCommonSubexpressions().run(model, PassContext(model))
    assert result.counts == {"nodes_merged": 1}
    assert list(model.graph.node[-1].input) == ["d1", "d2", "e1", "e1"]


def test_large_initializers_equal_in_every_sampled_byte_but_one_are_not_merged():
    """Fingerprints sample every k-th byte of large tensors; exact comparison must still decide."""
    base = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)  # 400 KB: sampled
    near = base.copy()
    near.view(np.uint8)[1] ^= 1  # byte 1 is never sampled (stride 6), so the fingerprints agree
    model = make_model(
        [
            helper.make_node("Add", ["x", "a"], ["t1"]),
            helper.make_node("Add", ["t1", "b"], ["t2"]),
            helper.make_node("Add", ["t2", "c"], ["y"]),
        ],
        [tensor_input("x", [100_000])],
        [tensor_input("y", [100_000])],
        [init("a", base), init("b", near), init("c", base.copy())],
    )
    result = run_pass(model, "dedupe_initializers")
    assert sorted(t.name for t in result.model.graph.initializer) == ["a", "b"]
    assert_equivalent(model, result.model)
