"""Layers inside If/Loop/Scan bodies whose weights the body captures from the main graph (legacy scripted exports).

int8_dynamic, woq and fp16 leave them float32; each says so in a note instead of ending "unchanged"
in silence, and the model still runs with its original results.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt
from onnxopt.calibration import CalibrationData
from onnxopt.verify import run_model


def branch_model() -> ModelProto:
    """y = If(flag, then: Relu(x @ W) @ V, else: x @ W), with W [64, 64] and V [64, 64] initializers of the main graph."""
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)
    then_nodes = [helper.make_node("MatMul", ["x", "W"], ["t1"]), helper.make_node("Relu", ["t1"], ["t2"])]
    then_nodes.append(helper.make_node("MatMul", ["t2", "V"], ["b"]))
    then_branch = helper.make_graph(then_nodes, "then", [], [out])
    else_branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["b"])], "else", [], [out])
    node = helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)
    rng = np.random.default_rng(0)
    inits = [init("W", rng.standard_normal((64, 64)).astype(np.float32)), init("V", rng.standard_normal((64, 64)).astype(np.float32))]
    inputs = [tensor_input("x", [2, 64]), tensor_input("flag", [], TensorProto.BOOL)]
    return make_model([node], inputs, [tensor_input("y", [2, 64])], inits, opset=17)


@pytest.mark.parametrize(
    ("passes", "note"),
    [
        ("int8_dynamic", "int8_dynamic: 3 layer(s) kept in float: the weight is captured from an enclosing graph"),
        ("woq:bits=4", "woq: 3 MatMul/Gemm weight(s) kept in float: the weight is captured from an enclosing graph"),
        ("fp16", "fp16: kept in float32: If=1"),
    ],
)
def test_body_layers_with_captured_weights_are_noted_and_left_float(passes, note) -> None:
    model = branch_model()
    data = CalibrationData.from_arrays(
        {"x": np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32), "flag": np.ones(8, bool)}, model=model
    )
    result = onnxopt.optimize(model, passes, target="ort-cpu", calibration=data, isolate=False)
    assert any(n.startswith(note) for n in result.report.notes), result.report.notes
    for flag in (True, False):
        feeds = {"x": np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32), "flag": np.array(flag)}
        np.testing.assert_allclose(run_model(result.model, feeds)["y"], run_model(model, feeds)["y"], rtol=1e-5, atol=1e-5)
