"""Validation of hostile and broken models: every rejection is one clear line."""

from __future__ import annotations

import pytest
from helpers import make_model, tensor_input
from onnx import TensorProto, helper

from onnxopt.errors import InvalidModelError
from onnxopt.validate import validate_model

X = tensor_input("x", [2])
Y = tensor_input("y", [2])


def _raw(nodes, inputs=(X,), outputs=(Y,), opset=17):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize(
    "model, message",
    [
        (_raw([helper.make_node("FooBar", ["x"], ["y"])]), "No Op registered for FooBar"),
        (_raw([helper.make_node("Relu", ["x"], ["y"])], opset=99), "opset 99"),
        (
            _raw([helper.make_node("Add", ["x", "i"], ["y"])], inputs=(X, tensor_input("i", [2], TensorProto.INT64))),
            "inconsistent type",
        ),
        (
            _raw(
                [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Add", ["x", "a"], ["y"])]
            ),
            "cycle",
        ),
        (_raw([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["y"])]), "written twice"),
        (_raw([helper.make_node("Relu", ["x"], ["a"])]), "graph output 'y' is not produced"),
        (_raw([helper.make_node("Add", ["x", "zz"], ["y"])]), "reads 'zz'"),
        (_raw([helper.make_node("Foo", ["x"], ["y"], domain="unknown.dom")]), "does not import"),
    ],
    ids=["unknown-op", "opset-99", "type-mismatch", "cycle", "two-writers", "dangling-output", "undefined-input", "unimported-domain"],
)
def test_broken_models_are_rejected(model, message):
    with pytest.raises(InvalidModelError, match=message) as info:
        validate_model(model)
    assert "\n" not in str(info.value)


def test_unsorted_graph_is_sorted_with_a_warning():
    model = _raw([helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])])
    warnings = validate_model(model)
    assert any("topological" in w for w in warnings)
    assert [n.output[0] for n in model.graph.node] == ["a", "y"]


def test_custom_domain_ops_are_accepted():
    model = _raw([helper.make_node("Foo", ["x"], ["y"], domain="my.dom")])
    model.opset_import.append(helper.make_opsetid("my.dom", 1))
    assert validate_model(model) == []


def test_subgraph_reads_outer_values():
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [tensor_input("t", [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor_input("e", [2])])
    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [X, tensor_input("c", [], TensorProto.BOOL)],
        [Y],
    )
    assert validate_model(model) == []
    model.graph.node[0].attribute[0].g.node[0].input[0] = "nowhere"
    with pytest.raises(InvalidModelError, match="reads 'nowhere'"):
        validate_model(model)


def test_long_chain_does_not_recurse():
    nodes = [helper.make_node("Relu", [f"v{i}" if i else "x"], [f"v{i + 1}"]) for i in range(20000)]
    nodes.append(helper.make_node("Identity", ["v20000"], ["y"]))
    model = _raw(list(reversed(nodes)))  # reversed: also exercises the sort
    validate_model(model, types=False)
    assert model.graph.node[-1].output[0] == "y"
