"""7-bit weights (``reduce_range`` of qdq and int8_dynamic) and the host check behind their warning.

On x86 CPUs with AVX2 and no VNNI, onnxruntime's uint8 x int8 GEMM adds pairs of products in int16, so 8-bit weights
can saturate (2 x 255 x 127 > 32767); 7-bit ones cannot.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.int8_dynamic as int8_dynamic_pass
import onnxopt.passes.qdq as qdq_pass
from onnxopt.calibration import CalibrationData
from onnxopt.cpu import int8_pairs_saturate
from onnxopt.verify import run_model

RNG = np.random.default_rng(3)
AVX2_FLAGS = "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2\n"


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "expected"),
    [
        ("processor\t: 0\n" + AVX2_FLAGS, "x86_64", True),
        (AVX2_FLAGS.rstrip() + " avx512f avx512bw\n", "x86_64", True),  # AVX-512 without VNNI pairs in int16 too
        (AVX2_FLAGS.rstrip() + " avx512f avx512_vnni\n", "x86_64", False),
        (AVX2_FLAGS.rstrip() + " avx_vnni\n", "AMD64", False),
        ("flags\t\t: fpu sse sse2 sse4_1\n", "x86_64", False),  # no AVX2 kernel
        (AVX2_FLAGS, "aarch64", False),
        ("", "x86_64", False),
    ],
)
def test_int8_pairs_saturate_reads_the_cpu_flags(cpuinfo: str, machine: str, expected: bool) -> None:
    assert int8_pairs_saturate(cpuinfo, machine) is expected


def test_the_host_check_agrees_with_onnxruntime_on_this_cpu() -> None:
    """MatMulInteger of uint8 values near 255 and 8-bit weights is exact here unless the check says this CPU saturates;
    with 7-bit weights it is exact on every CPU."""
    x = RNG.integers(200, 256, (4, 64)).astype(np.uint8)
    errors = {}
    for bound in (127, 63):
        w = RNG.integers(-bound, bound + 1, (64, 8)).astype(np.int8)
        nodes = [helper.make_node("MatMulInteger", ["x", "w"], ["y"])]
        model = make_model(
            nodes, [tensor_input("x", [4, 64], TensorProto.UINT8)], [tensor_input("y", [4, 8], TensorProto.INT32)], [init("w", w)]
        )
        got = run_model(model, {"x": x})["y"]
        errors[bound] = int(np.abs(got.astype(np.int64) - x.astype(np.int64) @ w.astype(np.int64)).max())
    assert errors[63] == 0
    assert (errors[127] > 0) is int8_pairs_saturate()


def conv_mlp() -> ModelProto:
    """Conv -> Relu -> Conv -> Flatten -> MatMul -> Relu -> MatMul: layers qdq quantizes, two MatMuls int8_dynamic does."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="fc"),
        helper.make_node("Relu", ["m"], ["rm"]),
        helper.make_node("MatMul", ["rm", "wo"], ["y"], name="head"),
    ]
    inits = [
        init("w1", (RNG.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)),
        init("b1", (RNG.standard_normal(16) * 0.1).astype(np.float32)),
        init("w2", (RNG.standard_normal((8, 16, 3, 3)) * 0.2).astype(np.float32)),
        init("b2", (RNG.standard_normal(8) * 0.1).astype(np.float32)),
        init("wm", (RNG.standard_normal((8 * 6 * 6, 64)) * 0.05).astype(np.float32)),
        init("wo", (RNG.standard_normal((64, 10)) * 0.2).astype(np.float32)),
    ]
    return make_model(nodes, [tensor_input("x", [2, 8, 6, 6])], [tensor_input("y", [2, 10])], inits, opset=17)


def calibration(model: ModelProto) -> CalibrationData:
    return CalibrationData.from_arrays({"x": np.random.default_rng(1).standard_normal((16, 8, 6, 6)).astype(np.float32)}, model=model)


def int8_weights(model: ModelProto) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) >= 2]


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_qdq_reduce_range_writes_7_bit_weights(rounding: str) -> None:
    model = conv_mlp()
    spec = f"qdq:method=minmax,slow_convs=true,rounding={rounding}"
    wide = onnxopt.optimize(model, spec + ",reduce_range=false", target="ort-cpu", calibration=calibration(model), isolate=False).model
    narrow = onnxopt.optimize(model, spec + ",reduce_range=true", target="ort-cpu", calibration=calibration(model), isolate=False).model
    assert len(int8_weights(narrow)) == len(int8_weights(wide)) >= 3
    assert max(int(np.abs(w).max()) for w in int8_weights(wide)) == 127
    assert max(int(np.abs(w).max()) for w in int8_weights(narrow)) == 63
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 8, 6, 6)).astype(np.float32)}
    ref, got = run_model(model, feeds)["y"], run_model(narrow, feeds)["y"]
    assert float(np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got))) > 0.999


@pytest.mark.parametrize(
    ("passes", "target", "warned"),
    [
        ("qdq:reduce_range=false", "ort-cpu", True),
        ("qdq", "ort-cpu", False),  # auto: the layers that would saturate get 7 bits
        ("qdq", "portable", True),  # auto checks uint8 activations (ort-cpu) only
        ("qdq:reduce_range=true", "portable", False),
        ("qdq:reduce_range=false", "trt", False),
        ("int8_dynamic", "ort-cpu", True),
        ("int8_dynamic:reduce_range=true", "portable", False),
    ],
)
def test_a_cpu_that_saturates_gets_a_warning_naming_reduce_range(monkeypatch, passes: str, target: str, warned: bool) -> None:
    monkeypatch.setattr(qdq_pass, "int8_pairs_saturate", lambda: True)
    monkeypatch.setattr(int8_dynamic_pass, "int8_pairs_saturate", lambda: True)
    model = conv_mlp()
    result = onnxopt.optimize(model, passes, target=target, calibration=calibration(model), isolate=False)
    found = [w for w in result.report.warnings if "AVX2 but no VNNI" in w and "reduce_range=" in w]
    assert bool(found) is warned


def test_no_warning_where_the_cpu_is_exact(monkeypatch) -> None:
    monkeypatch.setattr(qdq_pass, "int8_pairs_saturate", lambda: False)
    model = conv_mlp()
    result = onnxopt.optimize(model, "qdq:reduce_range=false", target="ort-cpu", calibration=calibration(model), isolate=False)
    assert not [w for w in result.report.warnings if "VNNI" in w]


# ----------------------------------------------------------------------------- reduce_range=auto


def test_pair_sums_beyond_int16_are_found_in_either_order_and_alignment() -> None:
    from onnxopt.passes.qdq_saturation import _pairs_exceed

    a = np.array([[255, 255, 0, 0]], np.int32)
    assert _pairs_exceed(a, np.array([[127, 127, 0, 0]], np.int32))  # 64770
    assert not _pairs_exceed(a, np.array([[63, 63, 0, 0]], np.int32))  # 32130
    assert not _pairs_exceed(a, np.array([[127, 1, 0, 0]], np.int32))  # 32640
    assert _pairs_exceed(np.array([[0, 255, 255, 0]], np.int32), np.array([[0, -127, -127, 0]], np.int32))  # odd alignment, negative
    assert not _pairs_exceed(np.array([[255, 0, 255, 0]], np.int32), np.array([[127, 127, 127, 127]], np.int32))


def two_layer_mlp() -> ModelProto:
    """x -> MatMul (dense weights: large neighbouring products) -> Relu -> MatMul (one large weight per column, the rest
    at most one step: no pair can leave the int16 range) -> y."""
    sparse = np.full((32, 16), 0.004, np.float32) * np.sign(RNG.standard_normal((32, 16))).astype(np.float32)
    sparse[RNG.integers(0, 32, 16), np.arange(16)] = 1.0
    nodes = [
        helper.make_node("MatMul", ["x", "dense"], ["h"], name="dense"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "sparse"], ["y0"], name="sparse"),
        helper.make_node("Relu", ["y0"], ["y"]),
    ]
    inits = [init("dense", np.abs(RNG.standard_normal((24, 32))).astype(np.float32)), init("sparse", sparse)]
    return make_model(nodes, [tensor_input("x", [4, 24])], [tensor_input("y", [4, 16])], inits, opset=17)


def test_auto_gives_7_bits_only_to_the_layer_whose_pairs_saturate_and_onnxruntime_is_then_exact() -> None:
    """With reduce_range=auto the QOperator model computes what the Q/DQ arithmetic says on any CPU (the dense layer
    would saturate on AVX2 without VNNI), while the layer that cannot saturate keeps 8-bit weights."""
    import onnxruntime as ort

    model = two_layer_mlp()
    x = np.abs(np.random.default_rng(5).standard_normal((32, 24))).astype(np.float32) + 1.0  # large, all positive
    data = CalibrationData.from_arrays({"x": x}, model=model)
    result = onnxopt.optimize(model, "qdq:method=minmax,keep_outputs=false,qoperator", target="ort-cpu", calibration=data, isolate=False)
    qdq_step = result.report.passes[-2]
    assert qdq_step.counts["weights_7bit"] == 1 and any("7-bit weights for 1 of 2 layers" in n for n in result.report.notes)
    weights = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer if t.data_type == TensorProto.INT8}
    bounds = sorted(int(np.abs(w).max()) for w in weights.values() if w.ndim == 2)
    assert bounds == [63, 127]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    qdq_only = onnxopt.optimize(model, "qdq:method=minmax,keep_outputs=false", target="ort-cpu", calibration=data, isolate=False).model
    feeds = {"x": x[:4]}
    exact = run_model(qdq_only, feeds)["y"]  # Q/DQ without graph optimizations: float arithmetic on the integers
    got = ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, exact, rtol=0, atol=float(np.abs(exact).max()) * 1e-4)  # 8-bit: 4e-3 off here on AVX2
