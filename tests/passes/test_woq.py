"""Tests of woq: block-wise int4/int8 weights (DequantizeLinear, MatMulNBits), guards, GPTQ, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import init, make_model, op_types, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.calibration import CalibrationData
from onnxopt.errors import OptionError
from onnxopt.manager import PassManager
from onnxopt.passes.woq import gptq_quantize, matmulnbits_arrays, quantize_blocks
from onnxopt.pipeline import build_pipeline
from onnxopt.shapes import infer_types
from onnxopt.verify import compare_outputs, run_model

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)
K, N = 96, 64


def rand(*shape: int, dtype=np.float32) -> np.ndarray:
    """Random normal values."""
    return RNG.standard_normal(shape).astype(dtype)


def matmul_model(weight: np.ndarray, *, opset: int = 21, a_shape=("batch", 5, None), constant_node: bool = False) -> ModelProto:
    """x [batch, 5, K] -> MatMul(W) -> Relu -> y."""
    k = weight.shape[0]
    a_dims = [d if d is not None else k for d in a_shape]
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"), helper.make_node("Relu", ["mm"], ["y"])]
    inits = []
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight, "W")))
    else:
        inits.append(init("W", weight))
    out_dims = [*a_dims[:-1], weight.shape[-1]] if weight.ndim == 2 else None
    return make_model(nodes, [tensor_input("x", a_dims, elem)], [tensor_input("y", out_dims, elem)], inits, opset=opset)


def gemm_model(weight: np.ndarray, *, trans_b: int = 0, bias: np.ndarray | None = None, alpha: float = 1.0, beta: float = 1.0):
    """x [3, K] -> Gemm(W, C) -> y."""
    k, n = (weight.shape[1], weight.shape[0]) if trans_b else weight.shape
    inputs = ["x", "W"] + (["C"] if bias is not None else [])
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)
    inits = [init("W", weight)] + ([init("C", bias)] if bias is not None else [])
    return make_model([node], [tensor_input("x", [3, k])], [tensor_input("y", [3, n])], inits, opset=21)


def woq(model: ModelProto, passes: str = "woq", target: str = "portable", calibration=None) -> onnxopt.OptimizeResult:
    """Run ``passes`` on a copy of ``model`` (no fault isolation)."""
    manager = PassManager(build_pipeline(passes), target=target, calibration=calibration, isolate=False)
    work = ModelProto()
    work.CopyFrom(model)
    return manager.run(work)


def cosine(original: ModelProto, optimized: ModelProto, feeds: dict) -> float:
    """The lowest output cosine of ``optimized`` against ``original`` (both run in onnxruntime)."""
    onnx.checker.check_model(optimized)
    result = compare_outputs(run_model(original, feeds), run_model(optimized, feeds), "int8")
    return min(o.cosine for o in result.outputs)


def feeds_for(k: int = K, rows: int = 5) -> dict[str, np.ndarray]:
    return {"x": rand(2, rows, k)}


def counts(result, name: str = "woq") -> dict[str, int]:
    records = [r for r in result.report.passes if r.name == name]
    assert len(records) == 1
    return dict(records[0].counts)


def initializer_names(model: ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


MIN_COSINE = {8: 0.9999, 4: 0.99}  # int4 block 32 on Gaussian weights: about 0.995


# ----------------------------------------------------------------------------- numpy reference


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_quantization_is_within_half_a_step(bits, symmetric):
    w = rand(70, 9)
    quant = quantize_blocks(w, bits, 32, symmetric)
    assert quant.scale.shape == (3, 9)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)
    assert quant.q.min() >= low and quant.q.max() <= high
    step = quant.expand(quant.scale)
    error = np.abs(quant.dequantize() - w)
    inside = (quant.q > low) & (quant.q < high)  # not clipped: within half a step
    assert np.all(error[inside] <= step[inside] / 2 + 1e-6 * np.abs(w[inside]) + 1e-7)
    if not symmetric:  # the block's range is exactly representable, so nothing is clipped
        assert np.all(error <= step / 2 + 1e-6 * np.abs(w) + 1e-7)
        return
    # symmetric: the scale searched below absmax / qmax rounds each block column with no more squared error
    qmax = high
    for b in range(3):
        block = w[b * 32 : (b + 1) * 32]
        plain = np.abs(block).max(0) / qmax
        plain_error = ((np.clip(np.rint(block / plain), low, high) * plain - block) ** 2).sum(0)
        got_error = ((quant.dequantize()[b * 32 : (b + 1) * 32] - block) ** 2).sum(0)
        assert np.all(got_error <= plain_error * (1 + 1e-5) + 1e-12)
        assert np.all(quant.scale[b] <= plain * (1 + 1e-6)) and np.all(quant.scale[b] >= 0.7 * plain)
    assert bits == 8 or np.any(quant.q == low)  # int4: the -8 code is used


def test_all_zero_block_dequantizes_to_zero():
    w = rand(64, 4)
    w[:32, 1] = 0
    for symmetric in (True, False):
        quant = quantize_blocks(w, 4, 32, symmetric)
        assert np.all(np.isfinite(quant.scale)) and np.all(quant.dequantize()[:32, 1] == 0)


def test_gptq_with_identity_hessian_is_nearest_rounding():
    w = rand(64, 16)
    for symmetric in (True, False):
        nearest = quantize_blocks(w, 4, 32, symmetric)
        gptq = gptq_quantize(w, np.eye(64), 4, 32, symmetric, damp=0.01)
        np.testing.assert_array_equal(gptq.q, nearest.q)
        np.testing.assert_array_equal(gptq.scale, nearest.scale)


def correlated_inputs(rows: int, k: int, seed: int) -> np.ndarray:
    """Inputs with strongly correlated features (where GPTQ beats nearest rounding)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1).standard_normal((k, k)) / np.sqrt(k)
    base = rng.standard_normal((rows, 8)) @ np.random.default_rng(2).standard_normal((8, k))
    return (base + 0.1 * rng.standard_normal((rows, k)) @ mix).astype(np.float32)


def test_gptq_reduces_output_error_on_correlated_inputs():
    w = rand(K, N)
    x = correlated_inputs(2000, K, 3)
    hessian = x.astype(np.float64).T @ x / len(x)
    nearest = quantize_blocks(w, 4, 32, True).dequantize()
    gptq = gptq_quantize(w, hessian, 4, 32, True).dequantize()
    test = correlated_inputs(500, K, 4)
    err_nearest = np.linalg.norm(test @ (w - nearest))
    err_gptq = np.linalg.norm(test @ (w - gptq))
    assert err_gptq < 0.7 * err_nearest


def test_matmulnbits_packing_low_nibble_first():
    w = rand(40, 3)  # K = 40: two blocks of 32, the second padded
    quant = quantize_blocks(w, 4, 32, True)
    packed, scales, zeros = matmulnbits_arrays(quant)
    assert packed.shape == (3, 2, 16) and scales.shape == (3, 2) and zeros is None
    unsigned = quant.unsigned()  # [K, N]
    assert packed[1, 0, 0] == unsigned[0, 1] | (unsigned[1, 1] << 4)
    assert packed[2, 1, 3] == unsigned[38, 2] | (unsigned[39, 2] << 4)
    assert packed[0, 1, 4] == 8 | (8 << 4)  # padding holds the default zero point: dequantizes to 0


# ----------------------------------------------------------------------------- emission and numerics


@pytest.mark.parametrize("target", ["portable", "trt", "ort-cpu"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_weights_quantized_for_each_target(target, bits, symmetric):
    model = matmul_model(rand(K, N))
    result = woq(model, f"woq:bits={bits},symmetric={str(symmetric).lower()},min_size=16", target)
    out = result.model
    if target == "ort-cpu":
        assert op_types(out) == ["MatMulNBits", "Relu"]
        node = out.graph.node[0]
        assert node.domain == "com.microsoft"
        assert any(o.domain == "com.microsoft" and o.version == 1 for o in out.opset_import)
        assert len(node.input) == (3 if symmetric else 4)
        assert counts(result) == {f"weights_int{bits}": 1, "matmulnbits": 1}
    else:
        assert op_types(out) == ["DequantizeLinear", "MatMul", "Relu"]
        dq = out.graph.node[0]
        assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 32}
        assert len(dq.input) == (2 if symmetric else 3)
        assert out.ir_version >= 10
        assert counts(result) == {f"weights_int{bits}": 1, "dequantize_linear": 1}
    assert "W" not in initializer_names(out)
    assert cosine(model, out, feeds_for()) >= MIN_COSINE[bits]


DQ_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [96, 40])
def test_dequantize_linear_weight_equals_reference(bits, symmetric, k):
    w = rand(k, N)
    out = woq(matmul_model(w), f"woq:bits={bits},symmetric={str(symmetric).lower()},min_size=16").model
    dq = out.graph.node[0]
    tensors = {t.name: t for t in out.graph.initializer}
    assert tensors[dq.input[0]].data_type == DQ_TYPES[(bits, symmetric)]
    probe = helper.make_graph([dq], "probe", [], [tensor_input(dq.output[0], [k, N])], [tensors[i] for i in dq.input])
    probe_model = helper.make_model(probe, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    dequantized = run_model(probe_model, {})[dq.output[0]]
    np.testing.assert_array_equal(dequantized, quantize_blocks(w, bits, 32, symmetric).dequantize())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [96, 40])
def test_matmulnbits_weight_equals_reference(bits, symmetric, k):
    """MatMulNBits(I) is the dequantized weight: equal to the numpy reference."""
    w = rand(k, N)
    model = matmul_model(w, a_shape=(k, None))
    out = woq(model, f"woq:bits={bits},symmetric={str(symmetric).lower()},min_size=16", "ort-cpu").model
    assert op_types(out) == ["MatMulNBits", "Relu"]
    identity = {"x": np.eye(k, dtype=np.float32)}
    mm = out.graph.node[0].output[0]
    probe = ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.append(tensor_input(mm, [k, N]))
    got = run_model(probe, identity)[mm]
    np.testing.assert_allclose(got, quantize_blocks(w, bits, 32, symmetric).dequantize(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (N,), (1, N), (3, N)])
def test_gemm_weights(target, trans_b, bias_shape):
    w = rand(N, K) if trans_b else rand(K, N)
    bias = rand(*bias_shape) if bias_shape else None
    model = gemm_model(w, trans_b=trans_b, bias=bias)
    out = woq(model, "woq:bits=8,min_size=16", target).model
    if target == "ort-cpu":
        expected = ["MatMulNBits", "Add"] if bias_shape == (3, N) else ["MatMulNBits"]
        assert op_types(out) == expected
    else:
        assert op_types(out) == ["DequantizeLinear", "Gemm"]
        axis = {a.name: a.i for a in out.graph.node[0].attribute}["axis"]
        assert axis == trans_b
    assert "W" not in initializer_names(out)
    read = {i for n in out.graph.node for i in n.input}
    assert initializer_names(out) <= read  # no unread initializer (MatMulNBits takes its own copy of the bias)
    assert cosine(model, out, {"x": rand(3, K)}) >= MIN_COSINE[8]


def test_gemm_alpha_beta():
    model = gemm_model(rand(K, N), bias=rand(N), alpha=0.5, beta=2.0)
    portable = woq(model, "woq:bits=8,min_size=16").model
    assert op_types(portable) == ["DequantizeLinear", "Gemm"]
    assert cosine(model, portable, {"x": rand(3, K)}) >= MIN_COSINE[8]
    ort = woq(model, "woq:bits=8,min_size=16", "ort-cpu")
    assert op_types(ort.model) == ["Gemm"]  # alpha != 1 has no MatMulNBits form
    assert any("alpha != 1" in w for w in ort.report.notes)
    beta_only = gemm_model(rand(K, N), bias=rand(N), beta=2.0)
    out = woq(beta_only, "woq:bits=8,min_size=16", "ort-cpu").model
    assert op_types(out) == ["MatMulNBits"]  # beta * C folded into the bias input
    assert cosine(beta_only, out, {"x": rand(3, K)}) >= MIN_COSINE[8]


def test_constant_node_weight():
    model = matmul_model(rand(K, N), constant_node=True)
    for target, expected in (("portable", ["DequantizeLinear", "MatMul", "Relu"]), ("ort-cpu", ["MatMulNBits", "Relu"])):
        out = woq(model, "woq:min_size=16", target).model
        assert op_types(out) == expected  # the float Constant is gone
        assert cosine(model, out, feeds_for()) >= MIN_COSINE[4]


def test_float16_weights():
    model = matmul_model(rand(K, N, dtype=np.float16))
    out = woq(model, "woq:bits=8,min_size=16").model
    assert op_types(out) == ["DequantizeLinear", "MatMul", "Relu"]
    assert cosine(model, out, {"x": rand(2, 5, K, dtype=np.float16)}) >= 0.999
    cpu = woq(model, "woq:bits=8,min_size=16", "ort-cpu")
    assert op_types(cpu.model) == ["MatMul", "Relu"]  # no float16 MatMulNBits kernel on CPU
    assert any("no MatMulNBits kernel" in w for w in cpu.report.notes)


def test_standin_infers_matmulnbits_shape():
    out = woq(matmul_model(rand(K, N)), "woq:min_size=16", "ort-cpu").model
    types = infer_types(out)
    dims = [d.dim_param or d.dim_value for d in types["mm"].tensor_type.shape.dim]
    assert dims == ["batch", 5, N]


# ----------------------------------------------------------------------------- guards


def two_readers(weight_reader: str) -> ModelProto:
    """W read by a MatMul and by a second node: another MatMul, a Gather or a Gemm."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="first")]
    outputs = [tensor_input("a", ["batch", 5, N])]
    if weight_reader == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x2", "W"], ["b"], name="second"))
        outputs.append(tensor_input("b", [3, N]))
    elif weight_reader == "Gather":
        nodes.append(helper.make_node("Gather", ["W", "ids"], ["b"], name="second"))
        outputs.append(tensor_input("b", [2, N]))
    elif weight_reader == "MatMulA":
        nodes.append(helper.make_node("MatMul", ["W", "x3"], ["b"], name="second"))
        outputs.append(tensor_input("b", [K, 2]))
    inputs = [
        tensor_input("x", ["batch", 5, K]),
        tensor_input("x2", [3, K]),
        tensor_input("ids", [2], TensorProto.INT64),
        tensor_input("x3", [N, 2]),
    ]
    return make_model(nodes, inputs, outputs, [init("W", rand(K, N))], opset=21)


SHARED_FEEDS = {"x": rand(2, 5, K), "x2": rand(3, K), "ids": np.array([0, 7], np.int64), "x3": rand(N, 2)}


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_shared_weight_quantized_once(target):
    model = two_readers("MatMul")
    out = woq(model, "woq:bits=8,min_size=16", target).model
    if target == "portable":
        assert op_types(out) == ["DequantizeLinear", "MatMul", "MatMul"]
        dq_out = out.graph.node[0].output[0]
        assert out.graph.node[1].input[1] == dq_out and out.graph.node[2].input[1] == dq_out
    else:
        assert op_types(out) == ["MatMulNBits", "MatMulNBits"]
        assert list(out.graph.node[0].input[1:]) == list(out.graph.node[1].input[1:])
    assert "W" not in initializer_names(out) and len(out.graph.initializer) == 2
    assert cosine(model, out, SHARED_FEEDS) >= MIN_COSINE[8]


@pytest.mark.parametrize("reader", ["Gather", "MatMulA"])
def test_weight_read_by_another_op_stays_float(reader):
    model = two_readers(reader)
    for target in ("portable", "ort-cpu"):
        result = woq(model, "woq:min_size=16", target)
        assert not counts(result)
        assert result.model.SerializeToString() == model.SerializeToString()
        assert any("kept in float" in w and "also read" in w for w in result.report.notes)


def test_1d_and_3d_weights_skipped():
    one_d = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], [tensor_input("x", [4, 5000])], [tensor_input("y", [4])], [init("W", rand(5000))]
    )
    three_d = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [tensor_input("x", [2, 5, K])],
        [tensor_input("y", [2, 5, N])],
        [init("W", rand(2, K, N))],
        opset=21,
    )
    for model, rank in ((one_d, 1), (three_d, 3)):
        for target in ("portable", "ort-cpu"):
            result = woq(model, "woq:min_size=16", target)
            assert not counts(result)
            assert any(f"rank {rank}, not 2" in w for w in result.report.notes)


def test_weight_that_is_a_graph_input_or_output_stays_float():
    model = matmul_model(rand(K, N))
    model.graph.input.append(tensor_input("W", [K, N]))
    assert not counts(woq(model, "woq:min_size=16"))
    model = matmul_model(rand(K, N))
    model.graph.output.append(tensor_input("W", [K, N]))
    assert not counts(woq(model, "woq:min_size=16", "ort-cpu"))


def test_opset_below_21_is_noted_and_upgrade_unlocks_it():
    model = matmul_model(rand(K, N), opset=17)
    for target in ("portable", "trt"):
        result = onnxopt.optimize(model, "woq:min_size=16", target=target, isolate=False)
        assert "DequantizeLinear" not in op_types(result.model)
        assert any("opset >= 21" in w and "--opset 21" in w for w in result.report.notes)
    upgraded = onnxopt.optimize(model, "woq:min_size=16", opset=21, isolate=False).model
    assert op_types(upgraded) == ["DequantizeLinear", "MatMul", "Relu"]
    assert cosine(model, upgraded, feeds_for()) >= MIN_COSINE[4]
    ort = onnxopt.optimize(model, "woq:min_size=16", target="ort-cpu", isolate=False).model  # MatMulNBits needs no opset 21
    assert op_types(ort) == ["MatMulNBits", "Relu"]


def test_min_size_and_exclude():
    model = matmul_model(rand(K, N))
    assert not counts(woq(model, f"woq:min_size={K * N + 1}"))
    assert counts(woq(model, f"woq:min_size={K * N}"))
    assert not counts(woq(model, "woq:min_size=16,exclude=mm"))  # node name
    assert not counts(woq(model, "woq:min_size=16,exclude=other|^W$"))  # weight name by regex
    assert counts(woq(model, "woq:min_size=16,exclude=other|^V$"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("woq:bits=3", "'bits'"),
        ("woq:block_size=8", "'block_size'"),
        ("woq:block_size=48", "'block_size'"),
        ("woq:exclude=[", "bad regex"),
        ("woq:rounding=awq", "rounding"),
        ("woq:accuracy_level=7", "accuracy_level"),
        ("woq:damp=0", "'damp'"),
    ],
)
def test_bad_options(spec, message):
    with pytest.raises(OptionError, match=message):
        build_pipeline(spec)


def test_block_size_64_and_16():
    model = matmul_model(rand(K, N))
    for block in (16, 64):
        out = woq(model, f"woq:min_size=16,block_size={block}").model
        assert {a.name: a.i for a in out.graph.node[0].attribute}["block_size"] == block
        assert cosine(model, out, feeds_for()) >= MIN_COSINE[4]


def test_subgraph_weight():
    body_w = rand(K, N)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wb"], ["yb"], name="inner")],
        "then",
        [],
        [tensor_input("yb", ["batch", 5, N])],
        [init("Wb", body_w)],
    )
    other = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["yo"], name="outer_in_branch")], "else", [], [tensor_input("yo", ["batch", 5, N])]
    )
    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
        [tensor_input("x", ["batch", 5, K]), tensor_input("c", [], TensorProto.BOOL)],
        [tensor_input("y", ["batch", 5, N])],
        [init("W", rand(K, N))],
        opset=21,
    )
    for target in ("portable", "ort-cpu"):
        result = woq(model, "woq:bits=8,min_size=16", target)
        # the branch's own weight and the one the other branch captures from the main graph (tests/passes/test_subgraph_layers.py)
        assert counts(result) == {"weights_int8": 2, "dequantize_linear" if target == "portable" else "matmulnbits": 2}
        then_graph = result.model.graph.node[0].attribute[0].g
        assert "Wb" not in {t.name for t in then_graph.initializer}
        assert "W" not in initializer_names(result.model)  # nothing reads the float weight any more
        for flag in (True, False):
            assert cosine(model, result.model, {"x": rand(2, 5, K), "c": np.array(flag)}) >= MIN_COSINE[8]


# ----------------------------------------------------------------------------- GPTQ and determinism


def correlated_calibration(k: int = K) -> CalibrationData:
    """Calibration data of correlated inputs: four batches of eight [5, k] samples, each from its own seed."""
    samples = [correlated_inputs(8 * 5, k, 10 + index).reshape(8, 5, k) for index in range(4)]
    return CalibrationData.from_arrays({"x": np.concatenate(samples)})


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_gptq_beats_nearest_in_onnxruntime(target):
    model = matmul_model(rand(K, N))
    nearest = woq(model, "woq:min_size=16", target).model
    result = woq(model, "woq:min_size=16,rounding=gptq", target, calibration=correlated_calibration())
    assert counts(result)["weights_int4_gptq"] == 1
    test = {"x": correlated_inputs(40, K, 99).reshape(8, 5, K)}
    reference = run_model(model, test)["y"]
    err_nearest = np.linalg.norm(run_model(nearest, test)["y"] - reference)
    err_gptq = np.linalg.norm(run_model(result.model, test)["y"] - reference)
    assert err_gptq < 0.8 * err_nearest
    assert cosine(model, result.model, test) >= 0.99


def test_gptq_without_calibration_is_a_requirement_error():
    with pytest.raises(onnxopt.OnnxoptError, match="pass 'woq' needs calibration data with the options given"):
        woq(matmul_model(rand(K, N)), "woq:min_size=16,rounding=gptq")


def test_gptq_bad_calibration_is_one_line_error():
    wrong = CalibrationData.from_arrays({"not_x": np.zeros((1, 5, K), np.float32)})
    with pytest.raises(onnxopt.OnnxoptError, match="no array for model input .x."):
        woq(matmul_model(rand(K, N)), "woq:min_size=16,rounding=gptq", calibration=wrong)


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_deterministic(target, rounding):
    """A weight shared by two MatMuls (nearest) and two chained weights (GPTQ, correlated calibration)."""
    if rounding == "nearest":
        model, calibration = two_readers("MatMul"), None
    else:
        model, calibration = chained_model(), correlated_calibration()
    spec = f"woq:min_size=16,symmetric=false,rounding={rounding}"
    runs = [woq(model, spec, target, calibration).model.SerializeToString() for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_tiny_bert_export(tmp_path):
    """A tiny BERT export (opset 17): MatMulNBits for ort-cpu; DequantizeLinear after an opset-21 upgrade."""
    pytest.importorskip("torch", reason="the export extra (torch==2.13.0) is not installed: pip install -e '.[export]'")
    pytest.importorskip("transformers", reason="the export extra (transformers) is not installed: pip install -e '.[export]'")
    from models.exports import export

    path = export("legacy-eager", tmp_path, "tiny")
    model = onnx.load(path)
    feeds = {"input_ids": RNG.integers(0, 100, (2, 8)).astype(np.int64), "attention_mask": np.ones((2, 8), np.int64)}
    for target, opset in (("ort-cpu", None), ("portable", 21)):
        result = onnxopt.optimize(model, "woq:bits=8,min_size=1024", target=target, opset=opset, isolate=False)
        assert sum(counts(result).values()) > 0
        assert cosine(model, result.model, feeds) >= 0.999


def test_matmulnbits_takes_1d_inputs():
    w = rand(K, N)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [tensor_input("x", [K])], [tensor_input("y", [N])], [init("W", w)])
    out = woq(model, "woq:bits=8,min_size=16", "ort-cpu").model
    assert op_types(out) == ["MatMulNBits"]
    assert cosine(model, out, {"x": rand(K)}) >= MIN_COSINE[8]


def chained_model() -> ModelProto:
    """x -> MatMul(W) -> y -> MatMul(W2) -> z: two weights with their own inputs."""
    model = matmul_model(rand(K, N))
    model.graph.node.append(helper.make_node("MatMul", ["y", "W2"], ["z"], name="mm2"))
    model.graph.initializer.append(init("W2", rand(N, K)))
    model.graph.output.append(tensor_input("z", ["batch", 5, K]))
    return model


def test_gptq_in_bounded_groups_gives_the_same_model(monkeypatch):
    """With room for one Hessian at a time, each weight gets its own calibration sweep and the same values."""
    import onnxopt.passes.gptq as gptq

    model = chained_model()
    whole = woq(model, "woq:min_size=16,rounding=gptq", "ort-cpu", calibration=correlated_calibration())
    import onnxopt.passes.woq as woq_module

    sweeps = []
    collect = woq_module.collect_hessians
    monkeypatch.setattr(woq_module, "collect_hessians", lambda *args: sweeps.append(sorted(args[1])) or collect(*args))
    monkeypatch.setattr(gptq, "HESSIAN_BYTES", 8 * max(K, N) ** 2)
    split = woq(model, "woq:min_size=16,rounding=gptq", "ort-cpu", calibration=correlated_calibration())
    assert sweeps == [["x"], ["y"]]  # one calibration sweep per weight's input
    assert counts(split)["weights_int4_gptq"] == 2
    assert split.model.SerializeToString() == whole.model.SerializeToString()


@pytest.mark.parametrize("spec", ["woq:min_size=16,rounding=gptq", "int8_dynamic:rounding=gptq", "qdq:rounding=gptq"])
def test_gptq_without_the_memory_is_a_one_line_error_before_any_work(spec, monkeypatch):
    """Hessians that cannot fit in the available memory stop the run with one line, not a kernel kill halfway."""
    import onnxopt.passes.gptq as gptq

    monkeypatch.setattr(gptq, "available_memory", lambda: 1024)
    with pytest.raises(onnxopt.OnnxoptError, match=r"rounding=gptq needs about .* GiB .* use rounding=nearest") as caught:
        onnxopt.optimize(matmul_model(rand(K, N)), spec, target="ort-cpu", calibration=correlated_calibration())
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(gptq, "available_memory", lambda: None)  # unknown (not Linux): no check
    onnxopt.optimize(matmul_model(rand(K, N)), spec, target="ort-cpu", calibration=correlated_calibration())
