"""The command line: the optimize default command, subcommands, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import assert_equivalent, init, make_model, tensor_input
from onnx import helper

from onnxopt.cli import main


@pytest.fixture()
def model_path(tmp_path):
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Add", ["a", "w"], ["b"]),
            helper.make_node("Sigmoid", ["x"], ["unused"]),
            helper.make_node("Identity", ["b"], ["y"]),
        ],
        [tensor_input("x", ["N", 3])],
        [tensor_input("y", ["N", 3])],
        [init("w", np.ones((3,), np.float32))],
    )
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_optimize_writes_a_verified_model_and_report(model_path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    before = model_path.read_bytes()
    result = _run(model_path, out, "--passes", "eliminate_dead_code", "--verify", "--input-shape", "x:2x3", "--report", report)
    assert result.exit_code == 0, result.output
    assert model_path.read_bytes() == before
    assert_equivalent(onnx.load(str(model_path)), onnx.load(str(out)), input_shapes={"x": (2, 3)})
    data = json.loads(report.read_text())
    assert data["passes"][0]["counts"] == {"nodes": 1}
    assert data["verification"]["passed"] is True


def test_same_input_gives_byte_identical_output(model_path, tmp_path):
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert _run(model_path, out, "-q").exit_code == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--passes", "no_such_pass"], "unknown pass 'no_such_pass'"),
        (["--passes", "eliminate_dead_code:bogus=1"], "has no option 'bogus'"),
        (["--input-shape", "x:2xq", "--verify"], "bad --input-shape"),
    ],
)
def test_bad_options_fail_in_one_line_without_output(model_path, tmp_path, args, message):
    out = tmp_path / "out.onnx"
    result = _run(model_path, out, *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"\x93NUMPY garbage", b"PK\x03\x04 truncated zip", "npy"],
    ids=["empty", "junk", "truncated-zip", "npy-not-npz"],
)
@pytest.mark.parametrize("command", ["optimize", "bench"])
def test_unreadable_inputs_file_is_one_line(model_path, tmp_path, content, command):
    inputs = tmp_path / "inputs.npz"
    if content == "npy":
        with inputs.open("wb") as handle:
            np.save(handle, np.zeros((2, 3), np.float32))
    else:
        inputs.write_bytes(content)
    out = tmp_path / "out.onnx"
    args = [model_path, out, "--verify"] if command == "optimize" else ["bench", model_path, "--runs", 1]
    result = _run(*args, "--inputs", inputs)
    assert result.exit_code != 0
    assert "cannot read inputs from" in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert not out.exists()


def test_refuses_to_overwrite_the_input(model_path):
    result = _run(model_path, model_path)
    assert result.exit_code != 0 and "never overwritten" in result.output


def test_subprocess_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt", str(bad), str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "not a valid ONNX model" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_invalid_model_names_the_file(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["a"])], "g", [tensor_input("x", [2])], [tensor_input("y", [2])])
    path = tmp_path / "dangling.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    result = _run(path, tmp_path / "o.onnx")
    assert result.exit_code == 1
    assert "dangling.onnx: graph output 'y' is not produced" in result.output


def test_passes_listing():
    result = _run("passes")
    assert result.exit_code == 0
    assert "eliminate_dead_code" in result.output and "presets:" in result.output
    assert _run("x.onnx", "y.onnx", "--list-passes").output == result.output


def test_verify_subcommand(model_path, tmp_path):
    other = make_model([helper.make_node("Sigmoid", ["x"], ["y"])], [tensor_input("x", ["N", 3])], [tensor_input("y", ["N", 3])])
    other_path = tmp_path / "other.onnx"
    onnx.save(other, str(other_path))
    same = _run("verify", model_path, model_path, "--input-shape", "x:4x3")
    assert same.exit_code == 0 and "passed" in same.output
    diff = _run("verify", model_path, other_path, "--json")
    assert diff.exit_code == 3
    assert json.loads(diff.output)["passed"] is False


def test_inspect(model_path):
    result = _run("inspect", model_path)
    assert result.exit_code == 0
    assert "nodes 4" in result.output and "Relu=1" in result.output
    data = json.loads(_run("inspect", model_path, "--json").output)
    assert data["stats"]["nodes"] == 4 and data["inputs"][0]["name"] == "x"


def test_external_data_option(model_path, tmp_path):
    out = tmp_path / "ext.onnx"
    assert _run(model_path, out, "-q", "--passes", "eliminate_dead_code", "--external-data").exit_code == 0
    # the tiny weights stay inline (below the threshold) but the flag is accepted and the model loads
    assert onnx.load(str(out)) is not None


def test_calib_random_warns_and_runs(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    result = _run(model_path, out, "--calib", "random", "--calib-limit", "4", "-q")
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_calib_npz_is_checked_against_the_inputs(model_path, tmp_path):
    bad = tmp_path / "calib.npz"
    np.savez(bad, wrong_name=np.zeros((2, 3), np.float32))
    result = _run(model_path, tmp_path / "out.onnx", "--calib", bad)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_calib_options_need_calib(model_path, tmp_path):
    result = _run(model_path, tmp_path / "out.onnx", "--calib-limit", "3")
    assert result.exit_code != 0
    assert "need --calib" in result.output


def test_python_api_takes_calibration(model_path):
    import onnxopt

    result = onnxopt.optimize(str(model_path), "cleanup", calibration="random", calibration_limit=2)
    assert any("random data" in w for w in result.report.warnings)
    good = onnxopt.optimize(str(model_path), "cleanup", calibration={"x": np.ones((4, 3), np.float32)})
    assert not any("random data" in w for w in good.report.warnings)


def test_keep_float_and_max_error_flags_set_the_qdq_options(tmp_path):
    from models.build import cnn_with_bn

    path, out, report = tmp_path / "cnn.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(cnn_with_bn(), str(path))
    result = _run(path, out, "--passes", "default,qdq", "--target", "ort-cpu", "--calib", "random", "--keep-float", "1", "--report", report)
    assert result.exit_code == 0, result.output
    notes = [n for p in json.loads(report.read_text())["passes"] if p["name"] == "qdq" for n in p.get("notes", [])]
    assert any("kept float: 1" in n for n in notes) and any("sensitivity #1" in n for n in notes)
    result = _run(path, out, "--passes", "default", "--max-error", "0.01")
    assert result.exit_code != 0 and "qdq pass, which is not in --passes" in result.output
    assert "Traceback" not in result.output


def _failing_dead_code(monkeypatch):
    """Make eliminate_dead_code raise inside the pass (a pass bug)."""
    from onnxopt.passes.dead_code import EliminateDeadCode

    def broken(self, model, ctx):  # noqa: ANN001, ANN202
        raise ValueError("cannot convert float NaN to integer")

    monkeypatch.setattr(EliminateDeadCode, "run", broken)


def test_a_rolled_back_pass_is_reported_even_with_quiet(model_path, tmp_path, monkeypatch):
    _failing_dead_code(monkeypatch)
    out = tmp_path / "out.onnx"
    result = _run(model_path, out, "--passes", "eliminate_dead_code", "-q")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["warning: pass 'eliminate_dead_code' failed and was rolled back (ValueError: cannot convert float NaN to integer)"]
    assert_equivalent(onnx.load(str(model_path)), onnx.load(str(out)), input_shapes={"x": (2, 3)})  # the model as it was


def test_debug_stops_at_a_failing_pass_with_its_traceback(model_path, tmp_path, monkeypatch):
    _failing_dead_code(monkeypatch)
    result = _run(model_path, tmp_path / "out.onnx", "--passes", "eliminate_dead_code", "--debug")
    assert result.exit_code != 0 and not (tmp_path / "out.onnx").exists()
    assert isinstance(result.exception, Exception) and "cannot convert float NaN" in str(result.exception.__cause__)


def test_a_model_that_fails_in_onnxruntime_is_one_line_without_its_log(tmp_path):
    """An index past its table: onnxruntime's own red [E:onnxruntime] log line is not printed beside ours."""
    model = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        [tensor_input("ids", [2], onnx.TensorProto.INT64)],
        [tensor_input("y", [2, 4])],
        [init("table", np.ones((3, 4), np.float32))],
    )
    path, inputs = tmp_path / "gather.onnx", tmp_path / "inputs.npz"
    onnx.save(model, str(path))
    np.savez(inputs, ids=np.array([0, 7], np.int64))
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt", str(path), str(tmp_path / "o.onnx"), "--verify", "--inputs", str(inputs), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "out of data bounds" in proc.stderr and "[E:onnxruntime" not in proc.stderr
