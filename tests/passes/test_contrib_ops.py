"""Shape stand-ins of the com.microsoft ops the fusions emit: inferred shapes equal what onnxruntime computes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, tensor_input
from onnx import TensorProto, helper

import onnxopt.passes.contrib_ops  # noqa: F401  (registers the stand-ins)
from onnxopt.shapes import infer_types
from onnxopt.verify import run_model

MS = "com.microsoft"
B, S, H, N = 2, 5, 8, 2
RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def model_with(node, inputs, initializers, opset: int = 17):
    """``node`` (writing 'c') followed by a standard Relu (writing 'y'), every dim symbolic but H."""
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["c"], ["y"])],
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    imports = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=imports, ir_version=8)


CASES = {
    "Gelu": (helper.make_node("Gelu", ["x"], ["c"], domain=MS), []),
    "FastGelu": (helper.make_node("FastGelu", ["x", "bias"], ["c"], domain=MS), [init("bias", rand(H))]),
    "BiasGelu": (helper.make_node("BiasGelu", ["x", "bias"], ["c"], domain=MS), [init("bias", rand(H))]),
    "SkipLayerNormalization": (
        helper.make_node("SkipLayerNormalization", ["x", "x2", "gamma", "beta"], ["c", "", "", "sum"], domain=MS),
        [init("gamma", rand(H)), init("beta", rand(H))],
    ),
    "Attention": (
        helper.make_node("Attention", ["x", "w", "b"], ["c"], domain=MS, num_heads=N),
        [init("w", rand(H, 3 * H)), init("b", rand(3 * H))],
    ),
    "MultiHeadAttention": (helper.make_node("MultiHeadAttention", ["x", "x2", "x2"], ["c"], domain=MS, num_heads=N), []),
}


@pytest.mark.parametrize("op", list(CASES))
def test_standin_shapes_match_onnxruntime(op):
    node, initializers = CASES[op]
    inputs = [tensor_input("x", ["batch", "seq", H]), tensor_input("x2", ["batch", "seq", H])]
    model = model_with(node, inputs, initializers)
    types = infer_types(model)
    inferred = [d.dim_param or d.dim_value for d in types["y"].tensor_type.shape.dim]
    assert inferred == ["batch", "seq", H]
    feeds = {"x": rand(B, S, H), "x2": rand(B, S, H)}
    assert run_model(model, feeds)["y"].shape == (B, S, H)


def test_standin_inside_a_subgraph():
    node, initializers = CASES["Attention"]
    branch = helper.make_graph([node, helper.make_node("Relu", ["c"], ["y_then"])], "then", [], [tensor_input("y_then", None)])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["y_else"])], "else", [], [tensor_input("y_else", None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)],
        "g",
        [tensor_input("cond", [], TensorProto.BOOL), tensor_input("x", ["batch", "seq", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)
    types = infer_types(model)
    assert [d.dim_param or d.dim_value for d in types["y_then"].tensor_type.shape.dim] == ["batch", "seq", H]
    assert run_model(model, {"cond": np.array(True), "x": rand(B, S, H)})["y"].shape == (B, S, H)


def test_unknown_custom_ops_stay_unknown():
    node = helper.make_node("Mystery", ["x"], ["c"], domain="custom.dom")
    graph = helper.make_graph(
        [node, helper.make_node("Relu", ["c"], ["y"])], "g", [tensor_input("x", ["batch", H])], [tensor_input("y", None)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.dom", 1)], ir_version=8)
    assert not infer_types(model)["y"].tensor_type.HasField("shape")
