"""qdq on ort-cpu: the convolutions onnxruntime runs slower in int8 compute in float with int8 weights.

The rule (qdq_placement.slow_int8_convs) is checked at its boundaries, and the rewritten models
are run against the float model in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_equivalent, init, make_model, tensor_input
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.calibration import CalibrationData
from onnxopt.graph import GraphView
from onnxopt.passes.qdq_placement import slow_int8_convs

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    """Seeded normal float32 values."""
    return RNG.standard_normal(shape).astype(np.float32)


def conv(name: str, x: str, y: str, weight: np.ndarray, group: int = 1) -> tuple[NodeProto, list[TensorProto]]:
    """A padded Conv with a random bias and its initializers."""
    pads = [d // 2 for d in weight.shape[2:]] * 2
    node = helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, group=group, pads=pads)
    return node, [init(f"{name}_w", weight), init(f"{name}_b", rand(weight.shape[0]) * 0.1)]


def one_conv(weight_shape: tuple[int, ...], group: int = 1) -> ModelProto:
    """x -> Conv(weight_shape, group) -> y."""
    channels = weight_shape[1] * group
    node, inits = conv("c", "x", "y", rand(*weight_shape) * 0.3, group)
    spatial = [8] * (len(weight_shape) - 2)
    outputs = [tensor_input("y", [1, weight_shape[0], *spatial])]
    return make_model([node], [tensor_input("x", [1, channels, *spatial])], outputs, inits, opset=17)


@pytest.mark.parametrize(
    ("weight_shape", "group", "slow"),
    [
        ((16, 3, 3, 3), 1, True),  # RGB stem, 27 multiply-adds per output
        ((16, 1, 5, 5), 1, True),  # grey stem, 25
        ((16, 4, 3, 3), 1, True),  # 36
        ((16, 8, 3, 3), 1, False),  # 72
        ((64, 3, 7, 7), 1, False),  # ResNet stem, 147
        ((16, 3, 1, 1), 1, False),  # 1x1: no im2col
        ((16, 1, 3), 1, True),  # Conv1d over one channel
        ((16, 1, 3, 3), 16, True),  # depthwise over 16 channels
        ((24, 1, 5, 5), 24, True),
        ((32, 1, 3, 3), 32, False),
        ((32, 1, 3, 3), 16, True),  # one input channel per group, 16 groups (channel multiplier 2)
        ((16, 2, 3, 3), 8, False),  # grouped, two channels per group: 18 but not dense or depthwise
    ],
)
def test_slow_int8_convs_boundaries(weight_shape, group, slow) -> None:
    model = one_conv(weight_shape, group)
    assert bool(slow_int8_convs(GraphView.build(model.graph))) == slow


def stem_model() -> ModelProto:
    """x[3ch] -> stem 3x3 -> Relu -> depthwise 3x3 (16) -> Relu -> 1x1 (16 -> 32) -> Relu -> 3x3 (32 -> 32) -> y."""
    nodes, inits = [], []
    for node, tensors in (
        conv("stem", "x", "s", rand(16, 3, 3, 3) * 0.3),
        conv("dw", "s_r", "d", rand(16, 1, 3, 3) * 0.3, group=16),
        conv("pw", "d_r", "p", rand(32, 16, 1, 1) * 0.3),
        conv("head", "p_r", "y", rand(32, 32, 3, 3) * 0.1),
    ):
        nodes.append(node)
        inits += tensors
    for a in ("s", "d", "p"):
        nodes.append(helper.make_node("Relu", [a], [f"{a}_r"]))
    order = {"stem": 0, "s_r": 1, "dw": 2, "d_r": 3, "pw": 4, "p_r": 5, "head": 6}
    nodes.sort(key=lambda n: order[n.name or n.output[0]])
    return make_model(nodes, [tensor_input("x", [2, 3, 12, 12])], [tensor_input("y", [2, 32, 12, 12])], inits, opset=17)


def quantize(model: ModelProto, target: str, options: str = "") -> onnxopt.OptimizeResult:
    """qdq (minmax, every layer, no bias correction) on 16 seeded samples, without fault isolation."""
    data = CalibrationData.from_arrays({"x": np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32)}, model=model)
    spec = ",".join(["qdq:method=minmax", "keep_outputs=false", "bias_correction=false", *filter(None, [options])])
    return onnxopt.optimize(model, spec, target=target, calibration=data, isolate=False)


def weight_source(model: ModelProto, name: str) -> str:
    """How layer ``name`` reads its weight: 'dq' (DequantizeLinear, int8 compute), 'cast' (Mul(Cast(int8), scale)) or 'float'."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == name)
    source = producers.get(node.input[1])
    if source is None:
        return "float"
    if source.op_type == "DequantizeLinear":
        return "dq"
    cast = producers[source.input[0]]
    assert source.op_type == "Mul" and cast.op_type == "Cast"
    stored = next(t for t in model.graph.initializer if t.name == cast.input[0])
    assert numpy_helper.to_array(stored).dtype == np.int8
    return "cast"


def input_is_dequantized(model: ModelProto, name: str) -> bool:
    """Whether layer ``name`` reads its activation through a DequantizeLinear."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == name)
    source = producers.get(node.input[0])
    return source is not None and source.op_type == "DequantizeLinear"


def check_fidelity(original: ModelProto, quantized: ModelProto) -> None:
    """The quantized model runs in onnxruntime and keeps int8 fidelity on unseen inputs."""
    feeds = {"x": np.random.default_rng(7).standard_normal((2, 3, 12, 12)).astype(np.float32)}
    assert_equivalent(original, quantized, feeds, precision="int8")


def test_ort_cpu_computes_the_stem_and_small_depthwise_in_float_with_int8_weights() -> None:
    model = stem_model()
    result = quantize(model, "ort-cpu")
    out = result.model
    assert [weight_source(out, n) for n in ("stem", "dw", "pw", "head")] == ["cast", "cast", "dq", "dq"]
    assert not input_is_dequantized(out, "stem") and not input_is_dequantized(out, "dw")
    assert input_is_dequantized(out, "pw") and input_is_dequantized(out, "head")
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in out.graph.node)  # the image is not quantized
    record = next(r for r in result.report.passes if r.name == "qdq")
    assert record.counts["slow_convs_float"] == 2
    assert any("2 convolution(s) that onnxruntime runs slower in int8" in n and "stem, dw" in n for n in record.notes)
    check_fidelity(model, out)


def test_slow_convs_true_quantizes_them_and_trt_always_does() -> None:
    model = stem_model()
    for target, options in (("ort-cpu", "slow_convs=true"), ("trt", "")):
        result = quantize(model, target, options)
        out = result.model
        assert [weight_source(out, n) for n in ("stem", "dw", "pw", "head")] == ["dq"] * 4, target
        assert all(input_is_dequantized(out, n) for n in ("stem", "dw", "pw", "head")), target
        assert "slow_convs_float" not in next(r for r in result.report.passes if r.name == "qdq").counts
        check_fidelity(model, out)


def test_slow_convs_are_not_sensitivity_candidates() -> None:
    result = quantize(stem_model(), "ort-cpu", "sensitivity=true")
    ranked = [n for n in result.report.notes if "qdq: sensitivity #" in n]
    assert len(ranked) == 2 and not any("'stem'" in n or "'dw'" in n for n in ranked), ranked


def test_the_float_weight_is_int8_in_the_file() -> None:
    model = stem_model()
    out = quantize(model, "ort-cpu").model
    stored = {t.name: t.data_type for t in out.graph.initializer}
    assert "stem_w" not in stored and "dw_w" not in stored
    assert sum(1 for t in stored.values() if t == TensorProto.INT8) >= 4


def upsampling_head() -> ModelProto:
    """x[3ch] -> 1x1 Conv (3 -> 8) -> Relu -> ConvTranspose 2x2/2 (8 -> 8) -> Relu -> ConvTranspose 2x2/2 (8 -> 1) -> y."""
    up1 = helper.make_node("ConvTranspose", ["c_r", "t1_w", "t1_b"], ["t1"], name="t1", kernel_shape=[2, 2], strides=[2, 2])
    up2 = helper.make_node("ConvTranspose", ["t1_r", "t2_w"], ["y"], name="t2", kernel_shape=[2, 2], strides=[2, 2])
    first, inits = conv("c", "x", "c_out", rand(8, 3, 1, 1) * 0.3)
    nodes = [first, helper.make_node("Relu", ["c_out"], ["c_r"]), up1, helper.make_node("Relu", ["t1"], ["t1_r"]), up2]
    inits += [init("t1_w", rand(8, 8, 2, 2) * 0.3), init("t1_b", rand(8) * 0.1), init("t2_w", rand(8, 1, 2, 2) * 0.3)]
    return make_model(nodes, [tensor_input("x", [2, 3, 12, 12])], [tensor_input("y", [2, 1, 48, 48])], inits, opset=17)


def test_ort_cpu_computes_conv_transpose_in_float_with_int8_weights() -> None:
    """onnxruntime's CPU provider has no integer ConvTranspose: no Q/DQ round trip between the two upsampling layers."""
    model = upsampling_head()
    out = quantize(model, "ort-cpu").model
    quantized = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & {"t1", "t1_r", "y"}, quantized
    assert input_is_dequantized(out, "t1") and not input_is_dequantized(out, "t2")  # t1 reads the QLinearConv's uint8 output
    assert weight_source(out, "c") == "dq" and weight_source(out, "t1") != "float" and weight_source(out, "t2") != "float"
    assert not any(t.name in ("t1_w", "t2_w") for t in out.graph.initializer)  # stored as int8 under new names
    check_fidelity(model, out)
    trt = quantize(model, "trt").model
    assert input_is_dequantized(trt, "t1") and input_is_dequantized(trt, "t2")
