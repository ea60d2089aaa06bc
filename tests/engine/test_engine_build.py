"""Real engine builds with TensorRT-RTX on the CPU (no mocks): FP32, FP16, INT8 Q/DQ, dynamic shapes, sparsity, caches."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from engine_models import matmul_net, qdq_conv_net, repeated_dim_net
from onnx import TensorProto, helper

import onnxopt
from models.build import cnn_with_bn, transformer_block
from onnxopt.engine import (
    BackendUnavailableError,
    ShapeProfileError,
    build_engine,
    cuda_device_status,
    load_backend,
    parse_shapes,
)
from onnxopt.engine.build import is_2to4, parse_workspace, sparse_weights
from onnxopt.errors import OptionError


def test_conv_net_fp32(rtx):
    result = build_engine(cnn_with_bn(), backend="tensorrt-rtx")
    report = result.report
    assert result.plan and report.engine_bytes == len(result.plan)
    assert report.backend == "tensorrt-rtx" and report.backend_version == rtx.version
    assert report.strongly_typed
    assert [(t.name, t.dtype, t.shape) for t in report.inputs] == [("input", "float32", [1, 3, 32, 32])]
    assert [(t.name, t.dtype, t.shape) for t in report.outputs] == [("logits", "float32", [1, 10])]
    assert report.network["compute_layers"] == {"float32": 5}
    assert report.build_seconds < 30


def test_matmul_net_from_a_path(rtx, tmp_path):
    path = tmp_path / "mlp.onnx"
    onnxopt.save(matmul_net(), path)
    result = build_engine(path, backend=rtx)
    assert result.report.model == str(path)
    assert result.report.network["compute_layers"] == {"float32": 2}
    engine = result.save(tmp_path / "mlp.engine")
    assert engine.read_bytes() == result.plan


def test_fp16_graph_builds_in_half(rtx):
    fp32 = build_engine(cnn_with_bn(), backend=rtx)
    fp16_model = onnxopt.optimize(cnn_with_bn(), "default,fp16").model
    fp16 = build_engine(fp16_model, backend=rtx)
    assert fp16.report.network["compute_layers"] == {"float16": 5}
    assert fp16.report.inputs[0].dtype == "float32"  # the fp16 pass keeps float32 graph inputs and outputs
    assert fp16.report.engine_bytes < fp32.report.engine_bytes


def test_int8_qdq_graph(rtx):
    report = build_engine(qdq_conv_net(), backend=rtx).report
    assert report.network["compute_layers"] == {"int8 (Q/DQ)": 1}
    assert report.network["qdq_layers"] == 3


def test_int8_from_the_qdq_pass(rtx):
    model = onnxopt.optimize(cnn_with_bn(), "default,qdq", target="trt", calibration="random").model
    report = build_engine(model, backend=rtx).report
    assert report.network["compute_layers"].get("int8 (Q/DQ)", 0) >= 3
    assert report.network["qdq_layers"] > 0


def test_int8_with_fp16_elsewhere(rtx):
    """qdq then fp16 (target trt): int8 where quantized, fp16 in between; runs in onnxruntime and builds."""
    from onnxopt.verify import compare_outputs, generate_inputs, run_model

    original = cnn_with_bn()
    model = onnxopt.optimize(original, "default,qdq,fp16", target="trt", calibration="random").model
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert any(t == TensorProto.INT8 for t in inits.values()) and any(t == TensorProto.FLOAT16 for t in inits.values())
    feeds, _ = generate_inputs(original, None)
    assert compare_outputs(run_model(original, feeds), run_model(model, feeds), "int8").passed
    report = build_engine(model, backend=rtx).report
    assert report.network["compute_layers"].get("int8 (Q/DQ)", 0) >= 3
    assert report.network["qdq_layers"] > 0


def test_dynamic_input_needs_a_profile(rtx):
    with pytest.raises(ShapeProfileError) as info:
        build_engine(transformer_block(), backend=rtx)
    message = str(info.value)
    assert "'x' [-1, -1, 32]" in message and "0 (batch), 1 (seq)" in message and "--shapes" in message
    assert "\n" not in message


def test_dynamic_input_with_a_profile(rtx):
    result = build_engine(transformer_block(), backend=rtx, shapes=["x:1x1x32/2x8x32/4x16x32"])
    (x,) = result.report.inputs
    assert x.shape == [-1, -1, 32]
    assert x.profile == {"min": [1, 1, 32], "opt": [2, 8, 32], "max": [4, 16, 32]}
    fixed = build_engine(transformer_block(), backend=rtx, shapes={"x": (2, 8, 32)})
    assert fixed.report.inputs[0].profile == {"min": [2, 8, 32], "opt": [2, 8, 32], "max": [2, 8, 32]}


@pytest.mark.parametrize(
    "shapes, message",
    [
        (["y:1x1x32"], "'y', which is not an engine input"),
        (["x:1x32"], "rank 2, the input has rank 3"),
        (["x:1x1x16/2x8x16/4x16x16"], "dim 2 to 16/16/16, but it is fixed at 32"),
    ],
)
def test_profiles_are_checked_against_the_inputs(rtx, shapes, message):
    with pytest.raises(ShapeProfileError, match=message):
        build_engine(transformer_block(), backend=rtx, shapes=shapes)


def test_repeated_dim_names_are_untied(rtx):
    model = repeated_dim_net()
    result = build_engine(model, backend=rtx, shapes=["x:1x3x48x192"])
    assert result.report.inputs[0].profile["opt"] == [1, 3, 48, 192]
    assert any("'?'" in w and "independent" in w for w in result.report.warnings)
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "?"  # the caller's model is untouched


def test_parse_shapes():
    profiles = parse_shapes(["in:put:1x3x8x8/2x3x16x16/4x3x32x32", "mask:2x5"])
    assert profiles["in:put"].opt == (2, 3, 16, 16)
    assert profiles["mask"].min == profiles["mask"].max == (2, 5)
    for bad, message in (
        ("x", "expected NAME:MIN/OPT/MAX"),
        ("x:1x2/3x4", "one shape or three"),
        ("x:1xa", "integers joined by 'x'"),
        ("x:0x3", "positive"),
        ("x:4x3/2x3/8x3", "MIN <= OPT <= MAX"),
        ("x:1x3/1x3x3/1x3", "same rank"),
    ):
        with pytest.raises(ShapeProfileError, match=message):
            parse_shapes([bad])


def test_workspace_and_opt_level(rtx):
    report = build_engine(matmul_net(), backend=rtx, workspace="64M", opt_level=0).report
    assert report.options["workspace"] == 64 << 20 and report.options["opt_level"] == 0
    assert parse_workspace("2G") == 2 << 30 and parse_workspace(4096) == 4096 and parse_workspace(None) is None
    with pytest.raises(OptionError, match="bad workspace"):
        parse_workspace("lots")


def test_sparsity_auto_follows_the_weights(rtx):
    assert is_2to4(np.array([[0, 1, 0, 2], [3, 0, 0, 0]], np.float32), axis=1)
    assert not is_2to4(np.array([[1, 1, 1, 0]], np.float32), axis=1)
    assert sparse_weights(matmul_net(sparse=True)) == (["w1", "w2"], 2)
    lifted = matmul_net(sparse=True)  # weights as Constant nodes (paddle2onnx's form) count too
    for tensor in list(lifted.graph.initializer):
        lifted.graph.node.insert(0, helper.make_node("Constant", [], [tensor.name], value=tensor))
    del lifted.graph.initializer[:]
    assert sparse_weights(lifted) == (["w1", "w2"], 2)
    dense = build_engine(matmul_net(), backend=rtx).report
    assert not dense.sparsity["enabled"] and "SPARSE_WEIGHTS" not in dense.flags
    sparse = build_engine(matmul_net(sparse=True), backend=rtx).report
    assert sparse.sparsity["enabled"] and sparse.flags == ["SPARSE_WEIGHTS"]
    assert sparse.sparsity["summary"] == "auto: 2 of 2 eligible weights are 2:4 sparse, flag on"
    off = build_engine(matmul_net(sparse=True), backend=rtx, sparsity="off").report
    assert off.flags == [] and off.sparsity == {}
    forced = build_engine(matmul_net(), backend=rtx, sparsity="on").report
    assert forced.flags == ["SPARSE_WEIGHTS"]


def test_timing_cache_on_rtx_is_reported_unused(rtx, tmp_path):
    cache = tmp_path / "timing.cache"
    for _ in range(2):
        report = build_engine(cnn_with_bn(), backend=rtx, timing_cache=cache).report
        assert report.timing_cache["used"] is False
        assert "TensorRT-RTX has no build-time timing cache" in report.timing_cache["summary"]
        assert any("timing cache" in w for w in report.warnings)
        assert not any("Cuda" in w or "CUDA" in w for w in report.warnings)  # the CPU-only build never asked for a GPU
    assert not cache.exists()


def test_timing_cache_round_trip_full_tensorrt(full_trt, tmp_path):
    cache = tmp_path / "timing.cache"
    first = build_engine(cnn_with_bn(), backend=full_trt, timing_cache=cache).report
    assert cache.stat().st_size == first.timing_cache["saved_bytes"] > 0
    second = build_engine(cnn_with_bn(), backend=full_trt, timing_cache=cache).report
    assert second.timing_cache["entries_loaded"] and second.timing_cache["loaded_bytes"] == first.timing_cache["saved_bytes"]
    assert second.build_seconds < first.build_seconds


def test_missing_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(BackendUnavailableError) as info:
        load_backend("tensorrt-rtx")
    assert str(info.value).startswith("TensorRT-RTX is not installed: pip install 'onnxopt[trt-rtx]'")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(
        BackendUnavailableError, match=r"no TensorRT back end is installed: pip install 'onnxopt\[trt-rtx\]'.*onnxopt\[trt\]"
    ):
        build_engine(cnn_with_bn())


def test_missing_full_tensorrt():
    try:
        backend = load_backend("tensorrt")
    except BackendUnavailableError as exc:
        assert "pip install 'onnxopt[trt]'" in str(exc) and "\n" not in str(exc)
    else:
        pytest.skip(f"{backend.label} is installed")


def test_options_are_checked_before_the_backend_loads(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    for kwargs, message in (
        ({"sparsity": "maybe"}, "unknown sparsity"),
        ({"opt_level": 9}, "0-5"),
        ({"hardware_compat": "any"}, "unknown hardware compatibility"),
        ({"backend": "onnx-tensorrt"}, "unknown back end"),
    ):
        with pytest.raises(OptionError, match=message):
            build_engine(cnn_with_bn(), **kwargs)


def test_rtx_refuses_full_tensorrt_options(rtx):
    with pytest.raises(OptionError, match="no hardware- or version-compatible engines"):
        build_engine(cnn_with_bn(), backend=rtx, hardware_compat="ampere+")


def test_without_cuda_the_inspector_is_skipped_with_the_reason(rtx):
    status = cuda_device_status()
    if status.available:
        pytest.skip(f"{status.devices} CUDA device(s) present: the inspector runs instead")
    report = build_engine(cnn_with_bn(), backend=rtx).report
    assert report.engine_layers is None
    assert report.gpu["skipped"].startswith("engine inspector needs the TensorRT runtime, which is never called without a CUDA device")
    assert status.reason in report.gpu["skipped"]


@pytest.mark.gpu
def test_engine_inspector_on_a_gpu(rtx):
    status = cuda_device_status()
    if not status.available:
        pytest.skip(f"needs a CUDA device: {status.reason}")
    fp16_model = onnxopt.optimize(cnn_with_bn(), "default,fp16").model
    report = build_engine(fp16_model, backend=rtx).report
    assert report.engine_layers, report.gpu
    assert report.engine_layers["layers"] > 0
