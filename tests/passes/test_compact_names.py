"""The ``compact_names`` pass: short value names, no node names or doc strings, the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

from onnxopt.passes.compact_names import short_names, value_names
from onnxopt.verify import run_model

RNG = np.random.default_rng(5)


def exported_style() -> ModelProto:
    """Exporter-style long names: a MatMul/Add/Relu chain whose If branch reads an outer value and an initializer.

    The input is named 'a' and the output 'b', the first two short names, so renaming must skip them."""
    long = "/encoder/layer.{}/attention/self/query/{}_output_0"
    then_nodes = [helper.make_node("Mul", [long.format(0, "Relu"), "/branch/scale"], ["/branch/Mul_output_0"], name="/branch/Mul")]
    then_branch = helper.make_graph(
        then_nodes, "then", [], [tensor_input("/branch/Mul_output_0", [2, 8])], [init("/branch/scale", np.float32(2.0))]
    )
    else_nodes = [helper.make_node("Neg", [long.format(0, "Relu")], ["/branch/Neg_output_0"], name="/branch/Neg", doc_string="trace")]
    else_branch = helper.make_graph(else_nodes, "else", [], [tensor_input("/branch/Neg_output_0", [2, 8])])
    nodes = [
        helper.make_node("MatMul", ["a", "encoder.layer.0.weight"], [long.format(0, "MatMul")], name="/encoder/MatMul"),
        helper.make_node("Add", [long.format(0, "MatMul"), "encoder.layer.0.bias"], [long.format(0, "Add")], name="/encoder/Add"),
        helper.make_node("Relu", [long.format(0, "Add")], [long.format(0, "Relu")], name="/encoder/Relu", doc_string="stack"),
        helper.make_node("If", ["flag"], [long.format(1, "If")], name="/encoder/If", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Sigmoid", [long.format(1, "If")], ["b"], name="/head/Sigmoid"),
    ]
    weight = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    inits = [init("encoder.layer.0.weight", weight), init("encoder.layer.0.bias", np.ones(8, np.float32))]
    inputs = [tensor_input("a", [2, 4]), tensor_input("flag", [], TensorProto.BOOL)]
    model = make_model(nodes, inputs, [tensor_input("b", [2, 8])], inits)
    model.graph.value_info.append(tensor_input(long.format(0, "Add"), [2, 8]))
    model.graph.doc_string = "graph doc"
    return model


def feeds(flag: bool) -> dict[str, np.ndarray]:
    return {"a": RNG.standard_normal((2, 4)).astype(np.float32), "flag": np.array(flag)}


def test_internal_names_become_short_and_outputs_stay_identical() -> None:
    model = exported_style()
    result = run_pass(model, "compact_names")
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [v.name for v in out.graph.input] == ["a", "flag"] and [v.name for v in out.graph.output] == ["b"]
    internal = set(value_names(out.graph)) - {"a", "flag", "b", ""}
    assert internal and all(len(name) == 1 for name in internal), internal  # 9 values fit in one letter
    assert not {"a", "b"} & internal
    assert not any(n.name or n.doc_string for n in out.graph.node) and not out.graph.doc_string
    assert result.report.passes[-1].counts["values_renamed"] == len(internal)
    assert any("values renamed" in note for note in result.report.notes)
    for flag in (True, False):
        inputs = feeds(flag)
        np.testing.assert_array_equal(run_model(out, inputs)["b"], run_model(model, inputs)["b"])
    assert len(out.SerializeToString()) < len(model.SerializeToString()) // 2


def test_a_second_run_changes_nothing_and_bytes_are_deterministic() -> None:
    once = run_pass(exported_style(), "compact_names").model
    again = run_pass(once, "compact_names")
    assert again.model.SerializeToString() == once.SerializeToString()
    assert not again.report.passes[-1].counts
    assert run_pass(exported_style(), "compact_names").model.SerializeToString() == once.SerializeToString()


def test_options_keep_node_names_and_doc_strings() -> None:
    out = run_pass(exported_style(), "compact_names:node_names=true,doc_strings=true").model
    assert [n.name for n in out.graph.node][0] == "/encoder/MatMul" and out.graph.node[2].doc_string == "stack"
    assert out.graph.doc_string == "graph doc"
    assert_equivalent(exported_style(), out, feeds(True))


def test_a_model_with_training_info_is_left_alone_with_a_note() -> None:
    model = exported_style()
    model.training_info.add().algorithm.CopyFrom(helper.make_graph([], "train", [], []))
    result = run_pass(model, "compact_names")
    assert result.model.graph.node[0].input[1] == "encoder.layer.0.weight"
    assert any("training_info" in note for note in result.report.notes)


def test_short_names_are_identifiers_in_length_order_skipping_reserved() -> None:
    names = short_names({"b", "ab"})
    first = [next(names) for _ in range(60)]
    assert first[:3] == ["a", "c", "d"] and "b" not in first and "ab" not in first
    assert first[50:54] == ["Z", "_", "aa", "ac"]  # 53 one-letter names minus 'b', then two letters minus 'ab'
    assert len(set(first)) == len(first) and all(n.isidentifier() for n in first)


@pytest.mark.parametrize("count", [1, 53, 54, 53 * 63 + 54])
def test_the_generator_never_repeats_a_name(count: int) -> None:
    names = short_names(set())
    drawn = [next(names) for _ in range(count)]
    assert len(set(drawn)) == count and all(n.isidentifier() for n in drawn)
