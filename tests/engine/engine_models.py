"""Small models for the engine-build tests, built in code."""

from __future__ import annotations

import numpy as np
from helpers import make_model, tensor_input
from onnx import helper, numpy_helper


def matmul_net(*, sparse: bool = False, batch: int | str = 2):
    """MatMul+Add+Relu, MatMul+Add: a two-layer MLP on [batch, 16]; ``sparse`` zeroes 2 of every 4 weights along K."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    if sparse:
        for w in (w1, w2):
            w.reshape(-1, 4, w.shape[1])[:, :2, :] = 0.0
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="mm2"),
        helper.make_node("Add", ["h3", "b2"], ["y"], name="add2"),
    ]
    return make_model(nodes, [tensor_input("x", [batch, 16])], [tensor_input("y", [batch, 8])], inits)


def qdq_conv_net(zero_point: int = 0, zp_type=np.int8):
    """Input Q/DQ, weight Q/DQ (per channel), Conv, Relu: what ``qdq:target=trt`` emits, by hand."""
    rng = np.random.default_rng(1)
    w = rng.integers(-100, 100, size=(8, 4, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(zero_point, zp_type), "x_zp"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_dq", axis=0),
        helper.make_node("Conv", ["xdq", "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return make_model(nodes, [tensor_input("x", [1, 4, 16, 16])], [tensor_input("y", [1, 8, 16, 16])], inits)


def custom_op_net():
    """Relu, then two custom-domain ops the parser has no importer or plugin for."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu0"),
        helper.make_node("FooOp", ["a"], ["b"], name="foo_node", domain="my.ops"),
        helper.make_node("BarOp", ["b"], ["y"], name="bar_node", domain="my.ops"),
    ]
    graph = helper.make_graph(nodes, "custom", [tensor_input("x", [1, 4])], [tensor_input("y", [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)], ir_version=8)


def unique_net():
    """A standard op (Unique) that TensorRT's parser rejects."""
    nodes = [helper.make_node("Unique", ["x"], ["y"], name="uniq")]
    return make_model(nodes, [tensor_input("x", [6])], [tensor_input("y", [None])])


def repeated_dim_net():
    """Conv on x[N,3,?,?]: both spatial dims are named '?', as PP-OCR's classifier writes them."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return make_model(nodes, [tensor_input("x", ["N", 3, "?", "?"])], [tensor_input("y", ["N", 4, "?", "?"])], inits)
