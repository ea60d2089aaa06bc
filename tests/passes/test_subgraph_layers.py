"""Layers inside If/Loop/Scan bodies whose weights the body captures from the main graph (legacy scripted exports).

int8_dynamic and woq quantize them (the int8/int4 copy lives in the body; the float weight goes once
nothing reads it); fp16 keeps the whole If in float32 and says so. Every result runs in onnxruntime.
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


def body_ops(model: ModelProto) -> list[str]:
    """Op types inside the If's branches (domain-qualified for contrib ops)."""
    node = next(n for n in model.graph.node if n.op_type == "If")
    return sorted(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for a in node.attribute for n in a.g.node)


def calibration(model: ModelProto) -> CalibrationData:
    """Eight seeded samples, both branches taken."""
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    return CalibrationData.from_arrays({"x": x, "flag": np.array([True, False] * 4)}, model=model)


def check(original: ModelProto, result: ModelProto, precision: str) -> None:
    """Both branches run in onnxruntime and match the original (to int8 fidelity, or exactly)."""
    for flag in (True, False):
        feeds = {"x": np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32), "flag": np.array(flag)}
        want, got = run_model(original, feeds)["y"], run_model(result, feeds)["y"]
        if precision == "exact":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert float(np.dot(want.ravel(), got.ravel()) / (np.linalg.norm(want) * np.linalg.norm(got))) > 0.99


@pytest.mark.parametrize(
    ("passes", "target", "layer"),
    [
        ("int8_dynamic", "ort-cpu", "com.microsoft:DynamicQuantizeMatMul"),
        ("int8_dynamic", "portable", "MatMulInteger"),
        ("woq:bits=4", "ort-cpu", "com.microsoft:MatMulNBits"),
        ("woq:bits=4,rounding=gptq", "ort-cpu", "com.microsoft:MatMulNBits"),
    ],
)
def test_body_layers_quantize_the_weights_they_capture(passes, target, layer) -> None:
    model = branch_model()
    result = onnxopt.optimize(model, passes, target=target, calibration=calibration(model), isolate=False)
    out = result.model
    assert body_ops(out).count(layer) == 3 and "MatMul" not in body_ops(out)
    assert not {"W", "V"} & {t.name for t in out.graph.initializer}  # the float weights are gone once nothing reads them
    assert not [t.name for t in out.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2]
    check(model, out, "int8")


def test_a_captured_weight_also_read_elsewhere_stays() -> None:
    model = branch_model()
    model.graph.node.append(helper.make_node("Identity", ["W"], ["w_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [64, 64]))
    out = onnxopt.optimize(model, "int8_dynamic", target="ort-cpu", isolate=False).model
    assert "W" in {t.name for t in out.graph.initializer} and "V" not in {t.name for t in out.graph.initializer}
    check(model, out, "int8")


def test_fp16_keeps_the_if_float32_and_says_so() -> None:
    model = branch_model()
    result = onnxopt.optimize(model, "fp16", target="portable", isolate=False)
    assert "fp16: kept in float32: If=1" in result.report.notes
    check(model, result.model, "exact")
