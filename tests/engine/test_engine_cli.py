"""``onnxopt build`` and ``onnxopt IN OUT --engine``: real builds, one-line errors, the JSON report."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from engine_models import custom_op_net

import onnxopt
from models.build import cnn_with_bn, transformer_block
from onnxopt.cli import main
from onnxopt.engine import BackendUnavailableError, load_backend


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("onnxopt: error: ")
    return lines[0]


@pytest.fixture
def cnn_path(tmp_path):
    return onnxopt.save(cnn_with_bn(), tmp_path / "cnn.onnx")


def test_build_writes_the_engine_and_the_report(rtx, cnn_path, tmp_path):
    engine, report = tmp_path / "cnn.engine", tmp_path / "build.json"
    result = _run("build", cnn_path, "-o", engine, "--report", report, "--workspace", "256M", "--opt-level", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["engine_bytes"] == engine.stat().st_size > 0
    assert data["backend"] == "tensorrt-rtx" and data["strongly_typed"] is True
    assert data["options"]["workspace"] == 256 << 20 and data["options"]["opt_level"] == 2
    assert data["model"] == str(cnn_path)
    assert "engine build: tensorrt-rtx" in result.output and "engine written to" in result.output


def test_dynamic_model_without_shapes_is_one_line(rtx, tmp_path):
    path = onnxopt.save(transformer_block(), tmp_path / "tb.onnx")
    result = _run("build", path, "-o", tmp_path / "tb.engine")
    assert result.exit_code == 2
    line = _error_line(result)
    assert "dynamic inputs need an optimization profile (--shapes NAME:MIN/OPT/MAX): 'x' [-1, -1, 32] dims 0 (batch), 1 (seq)" in line
    assert not (tmp_path / "tb.engine").exists()
    ok = _run("build", path, "-o", tmp_path / "tb.engine", "--shapes", "x:1x1x32/2x8x32/4x16x32", "-q")
    assert ok.exit_code == 0 and ok.output == ""
    assert (tmp_path / "tb.engine").stat().st_size > 0


def test_parser_errors_are_one_line_with_node_names(rtx, tmp_path):
    path = tmp_path / "custom.onnx"
    path.write_bytes(custom_op_net().SerializeToString())
    result = _run("build", path, "-o", tmp_path / "custom.engine")
    assert result.exit_code == 1
    line = _error_line(result)
    assert "node 'foo_node' (my.ops::FooOp)" in line and "node 'bar_node' (my.ops::BarOp)" in line
    check = _run("build", path, "--check", "--report", tmp_path / "pre.json")
    assert check.exit_code == 1
    data = json.loads((tmp_path / "pre.json").read_text())
    assert [e["node"] for e in data["parser_errors"]] == ["foo_node", "bar_node"]
    assert [f["node"] for f in data["findings"]] == ["foo_node", "bar_node"]


def test_check_only_parses(rtx, cnn_path, tmp_path):
    result = _run("build", cnn_path, "--check")
    assert result.exit_code == 0 and "accepts the model" in result.output
    assert not list(tmp_path.glob("*.engine"))


def test_output_is_required_and_never_the_input(rtx, cnn_path):
    assert "give the engine file with -o" in _error_line(_run("build", cnn_path))
    assert "the engine file is the input model" in _error_line(_run("build", cnn_path, "-o", cnn_path))


def test_optimize_then_build(rtx, cnn_path, tmp_path):
    out, engine, report = tmp_path / "opt.onnx", tmp_path / "opt.engine", tmp_path / "run.json"
    result = _run(cnn_path, out, "--passes", "default,fp16", "--engine", engine, "--report", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["engine"]["engine_bytes"] == engine.stat().st_size
    assert data["engine"]["network"]["compute_layers"] == {"float16": 5}
    assert data["engine"]["model"] == str(out) and out.exists()


def test_optimize_engine_uses_input_shapes_for_dynamic_dims(rtx, tmp_path):
    path = onnxopt.save(transformer_block(), tmp_path / "tb.onnx")
    failed = _run(path, tmp_path / "o.onnx", "--engine", tmp_path / "o.engine", "-q")
    assert failed.exit_code == 2 and "--input-shape" in _error_line(failed)
    ok = _run(path, tmp_path / "o.onnx", "--engine", tmp_path / "o.engine", "--input-shape", "x:2x8x32", "-q")
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "o.engine").stat().st_size > 0


def test_missing_tensorrt_is_one_line(cnn_path, tmp_path):
    try:
        backend = load_backend("tensorrt")
        pytest.skip(f"{backend.label} is installed")
    except BackendUnavailableError:
        pass
    result = _run("build", cnn_path, "-o", tmp_path / "x.engine", "--backend", "tensorrt")
    assert result.exit_code == 1
    assert "TensorRT is not installed: pip install 'onnxopt[trt]'" in _error_line(result)
