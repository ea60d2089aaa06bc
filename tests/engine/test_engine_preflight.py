"""Pre-flight: every parser error with its node name, op type and message; known rejections with the pass that fixes them."""

from __future__ import annotations

import numpy as np
import pytest
from engine_models import custom_op_net, qdq_conv_net, unique_net
from helpers import make_model, tensor_input
from onnx import helper

from models.build import cnn_with_bn
from onnxopt.engine import PreflightError, build_engine, check_model, preflight


def test_every_parser_error_is_listed_with_its_node(rtx):
    report = preflight(custom_op_net(), backend=rtx)
    assert not report.ok
    assert [(e.node, e.op_type) for e in report.parser_errors] == [("foo_node", "my.ops::FooOp"), ("bar_node", "my.ops::BarOp")]
    assert all("no importer and no plugin named" in e.message for e in report.parser_errors)
    with pytest.raises(PreflightError) as info:
        build_engine(custom_op_net(), backend=rtx)
    message = str(info.value)
    assert "rejected the model with 2 errors" in message
    assert "(1) node 'foo_node' (my.ops::FooOp)" in message and "(2) node 'bar_node' (my.ops::BarOp)" in message
    assert "\n" not in message
    assert info.value.report.parser_errors == report.parser_errors


def test_a_standard_op_the_parser_rejects(rtx):
    (error,) = preflight(unique_net(), backend=rtx).parser_errors
    assert (error.node, error.op_type, error.code) == ("uniq", "Unique", "UNSUPPORTED_NODE")
    assert "no importer for Unique" in error.message


def test_asymmetric_qdq_suggests_the_qdq_pass(rtx):
    model = qdq_conv_net(zero_point=3)
    findings = check_model(model)
    assert [(f.node, f.level) for f in findings] == [("x_q", "error"), ("x_dq", "error")]
    assert all("qdq:target=trt" in f.suggestion for f in findings)
    with pytest.raises(PreflightError, match=r"node 'x_q' \(QuantizeLinear\): .*zero point.*fix: .*qdq:target=trt"):
        build_engine(model, backend=rtx)
    uint8 = check_model(qdq_conv_net(zero_point=128, zp_type=np.uint8))
    assert "uint8 Q/DQ" in uint8[0].message


def test_static_checks_need_no_backend():
    nodes = [helper.make_node("FastGelu", ["x"], ["y"], name="gelu", domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [tensor_input("x", [2, 4])], [tensor_input("y", [2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    (finding,) = check_model(model)
    assert finding.node == "gelu" and finding.op_type == "com.microsoft::FastGelu" and "--target trt" in finding.suggestion
    assert check_model(cnn_with_bn()) == []
    double = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [tensor_input("x", [2], 11)], [tensor_input("y", [2], 11)])
    assert [f.level for f in check_model(double)] == ["warning", "warning"]


def test_a_good_model_passes_and_the_parser_prints_nothing(rtx, capfd):
    assert preflight(cnn_with_bn(), backend=rtx).ok
    preflight(custom_op_net(), backend=rtx)
    out, _ = capfd.readouterr()
    assert "Node name" not in out
