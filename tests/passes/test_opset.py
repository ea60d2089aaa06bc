"""upgrade_opset: onnx's version converter, verified in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, tensor_input
from onnx import helper

import onnxopt
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import opset_version


def _old_model():
    """Opset 11: Squeeze/Unsqueeze axes and ReduceSum as attributes (inputs from opset 13)."""
    return make_model(
        [
            helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
            helper.make_node("ReduceSum", ["u"], ["r"], axes=[2], keepdims=1),
            helper.make_node("Squeeze", ["r"], ["s"], axes=[0]),
            helper.make_node("Add", ["s", "b"], ["y"]),
        ],
        [tensor_input("x", [3, 4])],
        [tensor_input("y", [3, 1])],
        [init("b", np.ones((3, 1), np.float32))],
        opset=11,
        ir_version=6,
    )


def test_upgrade_to_17_keeps_outputs():
    model = _old_model()
    result = onnxopt.optimize(model, "eliminate_dead_code", opset=17, isolate=False)
    assert opset_version(result.model) == 17
    assert result.report.passes[0].counts == {"opset_11_to_17": 1}
    squeeze = next(n for n in result.model.graph.node if n.op_type == "Squeeze")
    assert len(squeeze.input) == 2  # axes moved to an input at opset 13
    assert_equivalent(model, result.model)


def test_upgrade_keeps_the_models_value_info_and_adds_none():
    """onnx's converter writes every shape it inferred into the file; the upgraded model keeps only its own."""
    model = _old_model()
    model.graph.value_info.append(helper.make_tensor_value_info("u", 1, [1, 3, 4]))
    upgraded = onnxopt.optimize(model, "upgrade_opset:version=17", isolate=False).model
    assert [v.name for v in upgraded.graph.value_info] == ["u"]
    assert_equivalent(model, upgraded)


def test_never_downgrades():
    model = _old_model()
    result = onnxopt.optimize(model, "upgrade_opset:version=9", isolate=False)
    assert opset_version(result.model) == 11
    assert result.report.passes[0].status == "unchanged"


def test_bad_version_is_an_option_error():
    with pytest.raises(OptionError, match="must be in 1"):
        onnxopt.optimize(_old_model(), "upgrade_opset:version=999")


def test_cli_opset_option(tmp_path):
    import onnx
    from click.testing import CliRunner

    from onnxopt.cli import main

    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_old_model(), str(src))
    result = CliRunner().invoke(main, [str(src), str(out), "--opset", "17", "-q"])
    assert result.exit_code == 0, result.output
    assert opset_version(onnx.load(str(out))) == 17


def test_unverifiable_conversion_is_noted():
    node = helper.make_node("Foo", ["x"], ["y"], domain="custom.dom")
    graph = helper.make_graph([node], "g", [tensor_input("x", [2])], [tensor_input("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("custom.dom", 1)], ir_version=6)
    result = onnxopt.optimize(model, "eliminate_dead_code", opset=17, isolate=False)
    assert opset_version(result.model) == 17
    assert any("not verified" in w for w in result.report.warnings)


def test_converter_failure_is_one_line():
    model = _old_model()
    model.graph.node[0].input[0] = "undefined"  # the converter refuses graphs with dangling reads
    with pytest.raises(OnnxoptError, match="upgrade_opset") as info:
        onnxopt.optimize(model, "eliminate_dead_code", opset=17, validate=False)
    assert "\n" not in str(info.value)


def test_trt_target_upgrades_to_17():
    model = _old_model()
    result = onnxopt.optimize(model, "eliminate_dead_code", target="trt", isolate=False)
    assert opset_version(result.model) == 17
    assert_equivalent(model, result.model)


def test_trt_target_keeps_a_higher_requested_opset():
    result = onnxopt.optimize(_old_model(), "eliminate_dead_code", target="trt", opset=18, isolate=False)
    assert opset_version(result.model) == 18


def test_trt_target_goes_on_when_the_upgrade_is_impossible():
    model = _old_model()
    model.graph.node[0].input[0] = "undefined"
    result = onnxopt.optimize(model, "eliminate_dead_code", target="trt", validate=False)
    assert opset_version(result.model) == 11
    assert any("upgrade_opset" in w and "keeps opset 11" in w for w in result.report.warnings)


def test_portable_target_never_upgrades():
    assert opset_version(onnxopt.optimize(_old_model(), "eliminate_dead_code").model) == 11
