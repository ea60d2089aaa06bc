"""Streaming activations and layer rows (im2col): checked against onnxruntime's own Conv/MatMul/Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor_input
from onnx import helper

from onnxopt.calibration import CalibrationData, CalibrationError
from onnxopt.calibration.capture import gram_matrices, layer_rows, output_rows, stream_values
from onnxopt.calibration.fidelity import FidelityProbe, output_error
from onnxopt.verify import run_model

RNG = np.random.default_rng(3)

CONV_CASES = [
    # cin, cout, kernel, strides, dilations, pads, groups, auto_pad
    (6, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, None),
    (6, 6, (3, 3), (2, 2), (2, 2), (2, 1, 0, 2), 3, None),
    (8, 4, (3, 1), (2, 1), (1, 1), None, 2, "SAME_UPPER"),
    (8, 8, (3, 3), (2, 2), (1, 1), None, 8, "SAME_LOWER"),
    (4, 8, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1, None),
]


def conv_model(cin, cout, kernel, strides, dilations, pads, groups, auto_pad):
    """x [2, cin, 9, 11] -> Conv -> y, and the weight."""
    weight = RNG.standard_normal((cout, cin // groups, *kernel)).astype(np.float32)
    attrs = {"strides": list(strides), "dilations": list(dilations), "group": groups}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    model = make_model([node], [tensor_input("x", [2, cin, 9, 11])], [tensor_input("y", ["n", "c", "h", "w"])], [init("w", weight)])
    return model, node, weight


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_rows_times_weight_is_the_convolution(case):
    model, node, weight = conv_model(*case)
    x = RNG.standard_normal((2, case[0], 9, 11)).astype(np.float32)
    y = run_model(model, {"x": x})["y"]
    groups = case[6]
    rows = layer_rows(node, x.astype(np.float64), weight.shape)
    targets = output_rows(node, y, groups)
    per_group = weight.shape[0] // groups
    for g in range(groups):
        w2d = weight[g * per_group : (g + 1) * per_group].reshape(per_group, -1).astype(np.float64)
        np.testing.assert_allclose(rows[g] @ w2d.T, targets[g], atol=1e-4)


def test_matmul_and_gemm_rows():
    x = RNG.standard_normal((3, 5, 4))
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert layer_rows(matmul, x, (4, 7)).shape == (1, 15, 4)
    gemm = helper.make_node("Gemm", ["a", "w"], ["y"], transA=1)
    a = RNG.standard_normal((4, 6))
    np.testing.assert_array_equal(layer_rows(gemm, a, (4, 7))[0], a.T)
    with pytest.raises(CalibrationError, match="not a Conv"):
        layer_rows(helper.make_node("Relu", ["x"], ["y"]), x, (1,))


def mlp_model():
    """x [n, 4] -> MatMul(w1) -> h -> Relu -> y."""
    w1 = RNG.standard_normal((4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    return make_model(nodes, [tensor_input("x", ["n", 4])], [tensor_input("y", ["n", 3])], [init("w1", w1)]), w1


def test_stream_values_and_gram_match_numpy_and_leave_the_model_alone():
    model, w1 = mlp_model()
    before = model.SerializeToString()
    x = RNG.standard_normal((10, 4)).astype(np.float32)
    data = CalibrationData.from_arrays({"x": x}, model=model)
    batches = list(stream_values(model, ["x", "h"], data, batch_size=4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    np.testing.assert_allclose(np.concatenate([b["h"] for b in batches]), x @ w1, rtol=1e-5, atol=1e-6)
    assert len(list(stream_values(model, ["h"], data, batch_size=4, limit=2))) == 2
    node = model.graph.node[0]
    grams = gram_matrices(model, {"x": (node, w1.shape)}, data, batch_size=4)
    np.testing.assert_allclose(grams["x"][0], x.astype(np.float64).T @ x / 10, rtol=1e-10)
    assert model.SerializeToString() == before
    with pytest.raises(CalibrationError, match="not computed"):
        list(stream_values(model, ["nope"], data))


def test_sampled_gram_of_a_layer_does_not_depend_on_the_other_layers_measured() -> None:
    """Row subsets are drawn per layer key, so grouping layers into several sweeps gives the same matrices."""
    model, w1 = mlp_model()
    data = CalibrationData.from_arrays({"x": RNG.standard_normal((10, 4)).astype(np.float32)}, model=model)
    node = model.graph.node[0]
    other = helper.make_node("MatMul", ["x", "w1"], ["h2"], name="other")
    alone = gram_matrices(model, {"mm": (node, w1.shape)}, data, batch_size=10, rows_per_sample=3)
    both = gram_matrices(model, {"other": (other, w1.shape), "mm": (node, w1.shape)}, data, batch_size=10, rows_per_sample=3)
    np.testing.assert_array_equal(alone["mm"], both["mm"])
    assert not np.array_equal(both["other"], both["mm"])  # different keys draw different rows


def test_fidelity_probe_scores_a_changed_model():
    model, _ = mlp_model()
    data = CalibrationData.from_arrays({"x": RNG.standard_normal((16, 4)).astype(np.float32)}, model=model)
    probe = FidelityProbe.of(model, data, batches=2, batch_size=8)
    assert probe.error(model) == pytest.approx(0.0, abs=1e-7)
    changed = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Sigmoid", ["h"], ["y"])],
        [tensor_input("x", ["n", 4])],
        [tensor_input("y", ["n", 3])],
        [model.graph.initializer[0]],
    )
    assert probe.error(changed) > 1e-3
    assert output_error([[np.ones(3)]], [[-np.ones(3)]]) == pytest.approx(2.0)
