"""``onnxopt bench`` and onnxopt.bench: interleaved onnxruntime latency on the inputs ``onnxopt verify`` uses."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import make_model, tensor_input
from onnx import helper, numpy_helper

from onnxopt.bench import LatencyStats, bench_inputs, benchmark, interleaved_times
from onnxopt.cli import main
from onnxopt.engine import cuda_device_status
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.verify import Verifier

SHAPES = {"x": (32, 64)}


def mlp(hidden: int, seed: int = 0):
    """x[N, 64] -> MatMul(64 x hidden) -> Relu -> MatMul(hidden x 64): FLOPs grow linearly with ``hidden``."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((64, hidden)) / 8).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((hidden, 64)) / 8).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    return make_model(nodes, [tensor_input("x", ["N", 64])], [tensor_input("y", ["N", 64])], inits)


@pytest.fixture(scope="module")
def models():
    """A small and a 64x bigger (in FLOPs) model with the same inputs."""
    return {"small": mlp(32), "big": mlp(2048)}


@pytest.fixture
def paths(models, tmp_path):
    out = {}
    for name, model in models.items():
        out[name] = tmp_path / f"{name}.onnx"
        onnx.save(model, str(out[name]))
    return out


def _run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def _stdout(result) -> str:
    return getattr(result, "stdout", result.output)


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("onnxopt: error: ")
    return lines[0]


def test_two_models_medians_ratios_and_order(models):
    result = benchmark(models, runs=30, warmup=3, input_shapes=SHAPES)
    small, big = result.entry("small"), result.entry("big")
    assert [e.name for e in result.entries] == ["small", "big"]
    for entry in (small, big):
        s = entry.stats
        assert entry.kind == "onnxruntime" and s.runs == 30
        assert 0 < s.min_ms <= s.median_ms <= s.p90_ms and s.min_ms <= s.mean_ms
    assert small.ratio == 1.0
    assert big.ratio == pytest.approx(big.stats.median_ms / small.stats.median_ms)
    assert big.stats.median_ms > 3 * small.stats.median_ms, (small.stats, big.stats)
    assert result.inputs == {"x": {"shape": [32, 64], "dtype": "float32"}}
    data = json.loads(json.dumps(result.to_dict()))
    assert [r["name"] for r in data["results"]] == ["small", "big"] and data["results"][0]["ratio"] == 1.0


def test_runs_are_interleaved_one_of_each_per_round():
    calls: list[str] = []
    progress: list[tuple[int, int]] = []
    times = interleaved_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=3, warmup=2, progress=lambda d, t: progress.append((d, t))
    )
    assert calls == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in times.values() for t in v)
    assert progress == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(OptionError, match="runs must be at least 1"):
        interleaved_times({"a": lambda: None}, runs=0)
    with pytest.raises(OptionError, match="warmup must not be negative"):
        interleaved_times({"a": lambda: None}, runs=1, warmup=-1)


def test_statistics_are_computed_from_the_samples():
    stats = LatencyStats.from_seconds([0.004, 0.001, 0.002, 0.003, 0.010])
    assert stats.median_ms == pytest.approx(3.0) and stats.min_ms == pytest.approx(1.0)
    assert stats.mean_ms == pytest.approx(4.0) and stats.p90_ms == pytest.approx(7.6)


def test_inputs_are_the_ones_verify_uses(models, tmp_path):
    model = models["small"]
    feeds, notes = bench_inputs(model, None, SHAPES, seed=0)
    verifier = Verifier.from_model(model, input_shapes=SHAPES)
    np.testing.assert_array_equal(feeds["x"], verifier.feeds["x"])
    generated, notes = bench_inputs(model)
    assert generated["x"].shape == (1, 64) and notes == ["input 'x' dim 'N' set to 1 (use --input-shape to choose)"]
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((5, 64), np.float32))
    loaded, _ = bench_inputs(model, npz)
    np.testing.assert_array_equal(loaded["x"], np.ones((5, 64), np.float32))
    result = benchmark({"small": model}, runs=2, warmup=0, inputs=npz)
    assert result.inputs["x"]["shape"] == [5, 64]


def test_models_with_other_inputs_are_rejected(models):
    other = make_model([helper.make_node("Relu", ["z"], ["y"])], [tensor_input("z", ["N", 64])], [tensor_input("y", ["N", 64])])
    with pytest.raises(OnnxoptError, match=r"model 'other' has inputs \['z'\], the first model \['x'\]"):
        benchmark({"small": models["small"], "other": other}, runs=1)
    wrong = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_input("x", ["N", 8])], [tensor_input("y", ["N", 8])])
    with pytest.raises(OnnxoptError, match="onnxruntime failed to run 'wrong'"):
        benchmark({"small": models["small"], "wrong": wrong}, runs=1, input_shapes=SHAPES)


def test_cli_json(paths):
    result = _run("bench", paths["small"], paths["big"], "--runs", "20", "--warmup", "2", "--input-shape", "x:32x64", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(_stdout(result))
    assert [r["name"] for r in data["results"]] == [str(paths["small"]), str(paths["big"])]
    small, big = data["results"]
    assert small["ratio"] == 1.0 and big["median_ms"] > 3 * small["median_ms"]
    assert data["runs"] == 20 and data["warmup"] == 2 and data["threads"] == 1 and data["provider"] == "cpu"


def test_cli_table(paths):
    result = _run("bench", paths["small"], paths["big"], "--runs", "5", "--threads", "2", "--input-shape", "x:8x64")
    assert result.exit_code == 0, result.output
    lines = _stdout(result).splitlines()
    assert lines[0].split() == ["model", "median", "ms", "p90", "ms", "mean", "ms", "min", "ms", "ratio"]
    assert lines[1].startswith(str(paths["small"])) and lines[1].endswith("1.00x")
    assert lines[2].startswith(str(paths["big"]))
    assert lines[-1] == "5 runs after 5 warm-up, interleaved; onnxruntime cpu, 2 thread(s)"


def test_cli_errors_are_one_line(paths, tmp_path):
    missing = _run("bench", tmp_path / "missing.onnx")
    assert missing.exit_code == 1 and "missing.onnx: no such file" in _error_line(missing)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    assert _run("bench", garbage).exit_code == 1
    bad_shape = _run("bench", paths["small"], "--input-shape", "y:2x64")
    assert bad_shape.exit_code == 1 and "--input-shape names 'y', which is not a model input" in _error_line(bad_shape)
    no_engine = _run("bench", paths["small"], "--engine", tmp_path / "missing.engine")
    assert no_engine.exit_code == 1 and "cannot read the engine" in _error_line(no_engine)
    assert _run("bench", paths["small"], "--runs", "0").exit_code == 2
    assert _run("bench").exit_code == 2


@pytest.mark.skipif(cuda_device_status().available, reason="a CUDA device is present: the engine would run")
def test_engine_without_device_is_skipped_with_the_reason(paths, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"any bytes: nothing reads them without a device")
    result = _run("bench", paths["small"], "--engine", engine, "--runs", "3")
    assert result.exit_code == 0, result.output
    reason = cuda_device_status().reason
    assert f"engine {engine}: skipped: running a TensorRT engine needs a CUDA device: {reason}" in _stdout(result).splitlines()
    entry = benchmark({"small": paths["small"]}, engines=[engine], runs=2).entry(str(engine))
    assert entry.stats is None and entry.ratio is None and reason in entry.skipped


def test_benchmarks_timing_latency_uses_the_same_timer(models, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    timing = importlib.import_module("timing")
    seen = []
    real = timing.interleaved_times

    def spy(calls, runs, warmup):
        seen.append((list(calls), runs, warmup))
        return real(calls, runs, warmup)

    monkeypatch.setattr(timing, "interleaved_times", spy)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    medians = timing.latency(models, feeds, runs=15)
    assert seen == [(["small", "big"], 15, 3)]
    assert set(medians) == {"small", "big"} and 0 < medians["small"] < medians["big"]
    sys.modules.pop("timing", None)
