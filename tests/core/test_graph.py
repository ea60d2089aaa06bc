"""Graph views, subgraph references, renaming, and topological sorting."""

from __future__ import annotations

import pytest
from helpers import make_model, tensor_input
from onnx import TensorProto, helper

from onnxopt.errors import InvalidModelError
from onnxopt.graph import GraphView, NameGenerator, iter_scopes, outer_references, rename_inputs
from onnxopt.toposort import sort_graph, topological_order


def _if_model():
    then = helper.make_graph([helper.make_node("Add", ["a", "b"], ["t"])], "then", [], [tensor_input("t", [2])])
    other = helper.make_graph([helper.make_node("Identity", ["b"], ["e"])], "else", [], [tensor_input("e", [2])])
    return make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Neg", ["x"], ["b"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        ],
        [tensor_input("x", [2]), tensor_input("c", [], TensorProto.BOOL)],
        [tensor_input("y", [2])],
    )


def _branch(model, name):
    return next(a.g for a in model.graph.node[2].attribute if a.name == name)


def test_subgraph_reads_count_as_uses():
    model = _if_model()
    view = GraphView.build(model.graph)
    if_node = model.graph.node[2]
    assert view.all_inputs(if_node) == ["c", "a", "b"]
    assert [n.op_type for n in view.consumers["a"]] == ["If"]
    assert outer_references(_branch(model, "else_branch")) == {"b"}
    assert outer_references(_branch(model, "then_branch")) == {"a", "b"}


def test_rename_inputs_reaches_subgraphs_and_resolves_chains():
    model = _if_model()
    count = rename_inputs(model.graph, {"a": "b", "b": "x"})
    then, other = _branch(model, "then_branch"), _branch(model, "else_branch")
    assert list(then.node[0].input) == ["x", "x"]
    assert list(other.node[0].input) == ["x"]
    assert count == 3
    with pytest.raises(ValueError, match="cycle"):
        rename_inputs(model.graph, {"p": "q", "q": "p"})


def test_iter_scopes_is_preorder():
    names = [s.graph.name for s in iter_scopes(_if_model().graph)]
    assert names == ["test", "else", "then"]  # attribute order (make_node sorts by name)


def test_sort_is_stable_and_detects_cycles():
    model = _if_model()
    assert sort_graph(model.graph) is False
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([nodes[2], nodes[1], nodes[0]])
    assert sort_graph(model.graph) is True
    assert [n.op_type for n in model.graph.node] == ["Neg", "Relu", "If"]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["q"], ["p"], name="first"), helper.make_node("Relu", ["p"], ["q"], name="second")], "g", [], []
    )
    with pytest.raises(InvalidModelError, match="cycle"):
        topological_order(graph)


def test_name_generator_avoids_existing_names():
    gen = NameGenerator(_if_model())
    assert gen.fresh("a") == "a_1"
    assert gen.fresh("a") == "a_2"
    assert gen.fresh("new") == "new"
