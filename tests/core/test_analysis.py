"""Model statistics: parameters, bytes and FLOPs of the compute ops."""

from __future__ import annotations

import numpy as np
from helpers import init, make_model, tensor_input
from onnx import helper

from onnxopt.analysis import analyze
from onnxopt.shapes import infer_types


def test_conv_and_gemm_flops():
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
        ],
        [tensor_input("x", [1, 3, 8, 8])],
        [tensor_input("y", [1, 10])],
        [init("w", np.zeros((4, 3, 3, 3), np.float32)), init("g", np.zeros((10, 256), np.float32))],
    )
    stats = analyze(model, infer_types(model))
    conv = 2 * (1 * 4 * 8 * 8) * (3 * 3 * 3)
    gemm = 2 * 10 * 256
    assert stats.flops == conv + gemm
    assert stats.parameters == 4 * 3 * 3 * 3 + 10 * 256
    assert stats.op_types == {"Conv": 1, "Flatten": 1, "Gemm": 1}
    assert stats.flops_unknown == 0


def test_unknown_shapes_are_counted_not_guessed():
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor_input("x", ["N", "K"])],
        [tensor_input("y", ["N", 4])],
        [init("w", np.zeros((6, 4), np.float32))],
    )
    stats = analyze(model, infer_types(model))
    assert stats.flops == 0 and stats.flops_unknown == 1


def test_shapes_follow_a_resize_whose_scales_are_an_initializer():
    """lift_constants turns Resize's scales into an initializer; shape inference still needs their values."""
    nodes = [
        helper.make_node("Resize", ["x", "roi", "scales"], ["up"], mode="nearest"),
        helper.make_node("Conv", ["up", "W"], ["y"]),
    ]
    inits = [init("roi", np.zeros(0, np.float32)), init("scales", np.array([1, 1, 2, 2], np.float32))]
    inits.append(init("W", np.ones((4, 3, 1, 1), np.float32)))
    model = make_model(nodes, [tensor_input("x", [1, 3, 5, 7])], [tensor_input("y", [1, 4, "h", "w"])], inits)
    dims = [d.dim_value for d in infer_types(model)["y"].tensor_type.shape.dim]
    assert dims == [1, 4, 10, 14]
    assert analyze(model, infer_types(model)).flops_unknown == 0
