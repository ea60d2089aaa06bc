"""Hostile inputs: bloat bombs, very long chains, deep nesting. Each must finish, small and correct."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, tensor_input
from onnx import TensorProto, helper

import onnxopt

PRESETS = pytest.mark.parametrize("preset", ["cleanup", "default"])


@PRESETS
def test_self_concatenation_chain_is_not_folded_into_a_bomb(preset):
    """c_{k+1} = Concat(c_k, c_k) from a constant: 2^40 elements if folded naively."""
    depth = 40
    nodes = [helper.make_node("Concat", [f"c{k}", f"c{k}"], [f"c{k + 1}"], axis=0) for k in range(depth)]
    nodes.append(helper.make_node("Shape", [f"c{depth}"], ["s"]))
    nodes.append(helper.make_node("Add", ["x", "s"], ["y"]))
    model = make_model(
        nodes,
        [tensor_input("x", [1], TensorProto.INT64)],
        [tensor_input("y", [1], TensorProto.INT64)],
        [init("c0", np.ones(4, np.float32))],
    )
    result = onnxopt.optimize(model, preset, isolate=False)
    assert result.model.ByteSize() < 64 << 10
    assert result.report.after.parameters < 1 << 16


@pytest.mark.parametrize(
    "op, inputs, consts",
    [
        ("Expand", ["v", "shape"], {"v": np.ones((1,), np.float32), "shape": np.array([1 << 14, 1 << 12], np.int64)}),
        ("Tile", ["v", "reps"], {"v": np.ones((4, 4), np.float32), "reps": np.array([1 << 12, 1 << 10], np.int64)}),
    ],
)
@PRESETS
def test_growing_ops_on_constants_stay_unfolded(op, inputs, consts, preset):
    nodes = [
        helper.make_node(op, inputs, ["big"]),
        helper.make_node("ReduceSum", ["big"], ["t"], keepdims=0),
        helper.make_node("Add", ["x", "t"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [])], [tensor_input("y", [])], [init(k, v) for k, v in consts.items()])
    result = onnxopt.optimize(model, preset, isolate=False)
    assert result.model.ByteSize() < 64 << 10
    assert_equivalent(model, result.model)


@PRESETS
def test_constant_of_shape_bomb_stays_unfolded(preset):
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["t"], keepdims=0),
        helper.make_node("Add", ["x", "t"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [])], [tensor_input("y", [])], [init("shape", np.array([1 << 15, 1 << 15], np.int64))])
    result = onnxopt.optimize(model, preset, isolate=False)
    assert result.model.ByteSize() < 64 << 10


@pytest.mark.slow
@PRESETS
def test_long_chain_is_linear_and_recursion_free(preset):
    n = 100_000
    nodes = [helper.make_node("Identity" if i % 2 else "Relu", [f"v{i}" if i else "x"], [f"v{i + 1}"]) for i in range(n)]
    model = make_model(nodes, [tensor_input("x", [2])], [tensor_input(f"v{n}", [2])])
    result = onnxopt.optimize(model, preset, isolate=False)
    assert result.report.after.nodes == n // 2
    assert_equivalent(model, result.model)


@PRESETS
def test_deeply_nested_ifs(preset):
    depth = 20  # protobuf itself refuses to parse nesting much deeper (about 24 Ifs)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r0"])], "leaf", [], [tensor_input("r0", [2])])
    for level in range(1, depth + 1):
        other = helper.make_graph([helper.make_node("Neg", ["x"], [f"n{level}"])], f"else{level}", [], [tensor_input(f"n{level}", [2])])
        node = helper.make_node("If", ["c"], [f"r{level}"], then_branch=graph, else_branch=other)
        graph = helper.make_graph([node], f"then{level}", [], [tensor_input(f"r{level}", [2])])
    model = make_model(
        list(graph.node), [tensor_input("x", [2]), tensor_input("c", [], TensorProto.BOOL)], [tensor_input(f"r{depth}", [2])]
    )
    result = onnxopt.optimize(model, preset, isolate=False)
    for cond in (True, False):
        assert_equivalent(model, result.model, {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(cond)})


def test_big_one_dimensional_tensors_skip_value_propagation():
    """onnx's value propagation materializes 1-D tensors: 2**26 elements cost a minute and 15 GB."""
    from onnxopt.shapes import infer_types

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["r", "r"], ["y"], axis=0)]
    model = make_model(nodes, [tensor_input("x", [1 << 26])], [tensor_input("y", [1 << 27])])
    types = infer_types(model)
    assert types["y"].tensor_type.shape.dim[0].dim_value == 1 << 27
