"""Tests of the qdq pass's cross-layer equalization (passes/qdq_equalize.py): exact in float, better in INT8."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.qdq  # noqa: F401  (registers the pass)
from onnxopt.calibration import CalibrationData
from onnxopt.graph import GraphView
from onnxopt.passes.qdq_equalize import channel_ranges, equalize, find_pairs
from onnxopt.verify import run_model

F32 = TensorProto.FLOAT
SPREAD = np.array([0.02, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0], np.float32)  # output-channel sizes of the first conv


def stem(*, between: str | None = None, second: str = "depthwise", extra_reader: bool = False, shared: bool = False) -> ModelProto:
    """x [2, 3, 12, 12] -> Conv 3x3 (8 channels of very different sizes) -> [between] -> Conv -> Sigmoid -> Conv 1x1 -> y.

    The Sigmoid makes conv1 -> conv2 the only pair that can be rescaled exactly.
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal([8, 3, 3, 3]).astype(np.float32) * SPREAD[:, None, None, None]
    w2 = rng.standard_normal([8, 1, 3, 3] if second == "depthwise" else [8, 8, 1, 1]).astype(np.float32) * 0.5
    w2 /= (SPREAD[:, None, None, None] if second == "depthwise" else SPREAD[None, :, None, None]) ** 0.5  # c2 less uneven than c1
    group = 8 if second == "depthwise" else 1
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    value = "c1"
    if between == "Relu":
        nodes.append(helper.make_node("Relu", ["c1"], ["a1"], name="act"))
        value = "a1"
    elif between == "LeakyRelu":
        nodes.append(helper.make_node("LeakyRelu", ["c1"], ["a1"], name="act", alpha=0.1))
        value = "a1"
    elif between == "Clip":
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="act"))
        value = "a1"
    nodes += [
        helper.make_node("Conv", [value, "w2", "b2"], ["c2"], name="conv2", group=group, pads=[1, 1, 1, 1] if group > 1 else [0, 0, 0, 0]),
        helper.make_node("Sigmoid", ["c2"], ["r2"], name="sigmoid2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3"),
    ]
    outputs = [tensor_input("y", [2, 4, 12, 12])]
    if extra_reader:
        nodes.append(helper.make_node("Neg", [value], ["other"], name="other"))
        outputs.append(tensor_input("other", [2, 8, 12, 12]))
    if shared:
        nodes.append(helper.make_node("Identity", ["w2"], ["w2_copy"], name="copy"))
        outputs.append(tensor_input("w2_copy", list(w2.shape)))
    inits = [
        init("w1", w1),
        init("b1", (rng.standard_normal(8) * SPREAD).astype(np.float32)),
        init("w2", w2),
        init("b2", rng.standard_normal(8).astype(np.float32) * 0.1),
        init("w3", rng.standard_normal([4, 8, 1, 1]).astype(np.float32) * 0.3),
        init("lo", np.array(0.0, np.float32)),
        init("hi", np.array(6.0, np.float32)),
    ]
    return make_model(nodes, [tensor_input("x", [2, 3, 12, 12])], outputs, inits)


def data_for(model: ModelProto, samples: int = 16, seed: int = 1) -> CalibrationData:
    rng = np.random.default_rng(seed)
    return CalibrationData.from_arrays({"x": rng.standard_normal([samples, 3, 12, 12]).astype(np.float32)}, model=model)


def equalized(model: ModelProto) -> tuple[ModelProto, int]:
    copy = ModelProto()
    copy.CopyFrom(model)
    return copy, equalize(copy, data_for(model), 8)


@pytest.mark.parametrize("between", [None, "Relu", "LeakyRelu"])
@pytest.mark.parametrize("second", ["depthwise", "pointwise"])
def test_equalization_keeps_float_outputs(between, second) -> None:
    model = stem(between=between, second=second)
    out, pairs = equalized(model)
    assert pairs == 1
    assert numpy_helper.to_array(out.graph.initializer[0]).tolist() != numpy_helper.to_array(model.graph.initializer[0]).tolist()
    feeds = {"x": np.random.default_rng(7).standard_normal([2, 3, 12, 12]).astype(np.float32)}
    assert_equivalent(model, out, feeds)


def test_depthwise_reader_gets_even_channel_ranges() -> None:
    model = stem()
    out, _ = equalized(model)
    before = channel_ranges(model, ["c1"], data_for(model), 8)["c1"]
    after = channel_ranges(out, ["c1"], data_for(model), 8)["c1"]
    assert before.max() / before.min() > 100
    assert after.max() / after.min() < 1.01


def test_pointwise_reader_balances_activation_and_weight_ranges() -> None:
    model = stem(second="pointwise")
    out, _ = equalized(model)
    after = channel_ranges(out, ["c1"], data_for(model), 8)["c1"]
    columns = np.abs(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w2"))).max(axis=(0, 2, 3))
    products = after * columns  # invariant under scaling; balanced when both factors are sqrt(product)
    np.testing.assert_allclose(after, np.sqrt(products) * after[0] / np.sqrt(products[0]), rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs", [dict(between="Clip"), dict(extra_reader=True), dict(shared=True)], ids=["clip_between", "two_readers", "shared_weight"]
)
def test_pairs_that_cannot_be_rescaled_exactly_are_left_alone(kwargs) -> None:
    model = stem(**kwargs)
    names = {(p.producer.name, p.consumer.name) for p in find_pairs(GraphView.build(model.graph))}
    assert ("conv1", "conv2") not in names


def output_error(model: ModelProto, quantized: ModelProto) -> float:
    feeds = {"x": np.random.default_rng(9).standard_normal([2, 3, 12, 12]).astype(np.float32)}
    ref, got = run_model(model, feeds)["y"], run_model(quantized, feeds)["y"]
    return float(np.mean((ref - got) ** 2) / np.mean(ref**2))


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_qdq_with_equalization_is_closer_to_float(target) -> None:
    model = stem()
    errors, results = {}, {}
    for flag in ("true", "false"):
        spec = f"qdq:method=minmax,keep_outputs=false,bias_correction=false,equalize={flag},slow_convs=true"
        results[flag] = onnxopt.optimize(model, spec, target=target, calibration=data_for(model), isolate=False)
        errors[flag] = output_error(model, results[flag].model)
    assert errors["true"] < 0.5 * errors["false"], errors
    record = next(r for r in results["true"].report.passes if r.name == "qdq")
    assert record.counts["pairs_equalized"] == 1
    assert any("equalized the channel ranges of 1 Conv -> Conv" in n for n in record.notes)
    assert "pairs_equalized" not in next(r for r in results["false"].report.passes if r.name == "qdq").counts
