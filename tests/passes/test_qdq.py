"""Tests of the qdq pass: placement per target (exact structure), weights, biases, opset handling, guards, fidelity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, benchmark_model, init, make_model, session_graph, tensor_input
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.qdq  # noqa: F401  (registers the pass)
from onnxopt.calibration import CalibrationData
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.verify import run_model

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    """Random normal float32 values."""
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def calib(model: ModelProto, samples: int = 8, seed: int = 1) -> CalibrationData:
    """Seeded normal calibration arrays for every model input."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        arrays[value.name] = rng.standard_normal([samples * dims[0], *dims[1:]]).astype(np.float32)
    return CalibrationData.from_arrays(arrays, model=model)


def quantize(model: ModelProto, target: str = "trt", options: str = "") -> onnxopt.OptimizeResult:
    """Run ``qdq`` (with ``options``; minmax unless a method is given) on a copy of ``model`` without fault isolation.

    The tiny models calibrate on 8 random samples, too few for the entropy method's histograms.
    """
    if "method=" not in options:
        options = ",".join(filter(None, [options, "method=minmax"]))
    spec = "qdq:" + options
    return onnxopt.optimize(model, spec, target=target, calibration=calib(model), isolate=False)


def producers(model: ModelProto) -> dict[str, NodeProto]:
    """Node by output name."""
    return {o: n for n in model.graph.node for o in n.output}


def readers(model: ModelProto, name: str) -> list[NodeProto]:
    """Nodes that read ``name``."""
    return [n for n in model.graph.node if name in n.input]


def node_named(model: ModelProto, name: str) -> NodeProto:
    """The node called ``name``."""
    return next(n for n in model.graph.node if n.name == name)


def inits(model: ModelProto) -> dict[str, np.ndarray]:
    """Initializers as arrays."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def quantized_input(model: ModelProto, node: NodeProto, index: int) -> tuple[NodeProto, NodeProto | None]:
    """The DequantizeLinear feeding ``node.input[index]`` and the QuantizeLinear feeding it (None for a stored weight)."""
    prod = producers(model)
    dq = prod.get(node.input[index])
    assert dq is not None and dq.op_type == "DequantizeLinear", f"{node.name} input {index} is not dequantized"
    q = prod.get(dq.input[0])
    assert q is None or q.op_type == "QuantizeLinear"
    return dq, q


def folded_weight(model: ModelProto, node: NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """The int8 values and scale behind a float layer's weight read through ``Mul(Cast(q), scale)`` (ort-cpu)."""
    prod, values = producers(model), inits(model)
    mul = prod[node.input[1]]
    assert mul.op_type == "Mul", f"{node.name}'s weight is not Cast x scale"
    cast = prod[mul.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    return values[cast.input[0]], values[mul.input[1]]


def axis_of(node: NodeProto) -> int | None:
    """The axis attribute of a Q/DQ node, or None."""
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def check_fidelity(original: ModelProto, quantized: ModelProto) -> None:
    """The quantized model loads, passes onnx.checker and keeps int8 fidelity in onnxruntime."""
    onnx.checker.check_model(quantized, full_check=True)
    batch = original.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    feeds = dict(next(calib(original, batch, seed=7).batches(batch)))
    assert_equivalent(original, quantized, feeds, precision="int8")


# ----------------------------------------------------------------------------- models


def resnet_block(opset: int = 17) -> ModelProto:
    """x -> Conv1 -> Relu1 -> Conv2 -> Add(+Relu1) -> Relu2 -> GlobalAveragePool -> Flatten -> Gemm(transB) -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits_ = [
        init("w1", rand(8, 3, 3, 3, scale=0.3)),
        init("b1", rand(8, scale=0.1)),
        init("w2", rand(8, 8, 3, 3, scale=0.2)),
        init("b2", rand(8, scale=0.1)),
        init("wf", rand(5, 8, scale=0.5)),
        init("bf", rand(5, scale=0.1)),
    ]
    return make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 5])], inits_, opset=opset)


def mlp() -> ModelProto:
    """x -> MatMul(W1) -> Relu -> Gemm(W2, transB=0) -> Relu -> MatMul(W3) -> y."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["m2"], name="gemm"),
        helper.make_node("Relu", ["m2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="mm3"),
    ]
    inits_ = [init("w1", rand(16, 12, scale=0.3)), init("w2", rand(12, 10, scale=0.3)), init("b2", rand(10)), init("w3", rand(10, 4))]
    return make_model(nodes, [tensor_input("x", [2, 16])], [tensor_input("y", [2, 4])], inits_)


def concat_model(ratio: float = 1.0) -> ModelProto:
    """Two Convs concatenated, then a Conv and a Relu: x -> {convA, convB} -> Concat -> conv3 -> relu -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="convA"),
        helper.make_node("Conv", ["x", "wb"], ["b"], name="convB"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["y"], name="relu"),
    ]
    inits_ = [init("wa", rand(4, 3, 1, 1)), init("wb", rand(4, 3, 1, 1) * np.float32(ratio)), init("w3", rand(6, 8, 1, 1))]
    return make_model(nodes, [tensor_input("x", [1, 3, 6, 6])], [tensor_input("y", [1, 6, 6, 6])], inits_)


def deconv_model() -> ModelProto:
    """x -> Conv -> ConvTranspose -> Relu -> Conv -> y (the ConvTranspose weight is [C_in, C_out, k, k])."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("ConvTranspose", ["c1", "wt"], ["t"], name="deconv", strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    inits_ = [init("w1", rand(4, 3, 1, 1)), init("wt", rand(4, 6, 2, 2)), init("w2", rand(2, 6, 1, 1))]
    return make_model(nodes, [tensor_input("x", [1, 3, 4, 4])], [tensor_input("y", [1, 2, 8, 8])], inits_)


# ----------------------------------------------------------------------------- target trt


def test_trt_resnet_structure() -> None:
    model = resnet_block()
    out = quantize(model, "trt").model
    conv1, conv2, add, relu1, fc = (node_named(out, n) for n in ("conv1", "conv2", "add", "relu1", "fc"))
    values = inits(out)
    # activations: x and r1 quantized per tensor, symmetric int8, zero point 0
    for node, name in ((conv1, "x"), (conv2, "r1")):
        dq, q = quantized_input(out, node, 0)
        assert q is not None and q.input[0] == name
        assert values[q.input[1]].shape == () and values[q.input[2]].dtype == np.int8 and values[q.input[2]] == 0
    # weights: stored int8, per-channel on axis 0, zero points 0; biases float
    for node, channels in ((conv1, 8), (conv2, 8)):
        dq, q = quantized_input(out, node, 1)
        assert q is None and axis_of(dq) == 0
        assert values[dq.input[0]].dtype == np.int8 and values[dq.input[1]].shape == (channels,)
        assert not values[dq.input[2]].any()
        assert node.input[2] in values and values[node.input[2]].dtype == np.float32
    # no Q/DQ between conv1 and its Relu; residual Add reads the skip (r1) through a DQ, the branch (c2) in float
    assert relu1.input[0] == "c1"
    assert add.input[0] == "c2"
    assert producers(out)[add.input[1]].op_type == "DequantizeLinear"
    # the layer feeding the graph output stays float (keep_outputs)
    assert fc.input[0] == "f" and fc.input[1] == "wf"
    check_fidelity(model, out)


def test_trt_keep_outputs_false_quantizes_gemm_on_transposed_axis() -> None:
    out = quantize(resnet_block(), "trt", "keep_outputs=false").model
    fc = node_named(out, "fc")
    dq, q = quantized_input(out, fc, 0)
    assert q is not None
    wdq, _ = quantized_input(out, fc, 1)
    assert axis_of(wdq) == 0 and inits(out)[wdq.input[1]].shape == (5,)  # transB=1: [N, K], output channels on axis 0


def test_mlp_matmul_and_gemm_axes() -> None:
    model = mlp()
    out = quantize(model, "trt", "keep_outputs=false").model
    values = inits(out)
    for name, channels in (("mm1", 12), ("gemm", 10), ("mm3", 4)):
        dq, _ = quantized_input(out, node_named(out, name), 1)
        assert axis_of(dq) == 1 and values[dq.input[1]].shape == (channels,)
        quantized_input(out, node_named(out, name), 0)
    check_fidelity(model, out)


def test_convtranspose_axis_1() -> None:
    model = deconv_model()
    out = quantize(model, "trt", "keep_outputs=false").model
    dq, q = quantized_input(out, node_named(out, "deconv"), 1)
    assert q is None and axis_of(dq) == 1 and inits(out)[dq.input[1]].shape == (6,)
    assert node_named(out, "relu").input[0] == "t"
    check_fidelity(model, out)


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_weights_over_a_million_elements_are_quantized(target: str, rounding: str) -> None:
    """A 512 x 512 x 3 x 3 Conv weight and a 1024 x 1040 MatMul weight (over 2**20 elements each) are stored int8."""
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["p"], name="pool", axes=[2, 3], keepdims=0),
        helper.make_node("Concat", ["p", "p"], ["p2"], name="cat", axis=1),
        helper.make_node("MatMul", ["p2", "wm"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["y"], name="relu2"),
    ]
    weights = [init("wc", rand(512, 512, 3, 3, scale=0.02)), init("wm", rand(1024, 1040, scale=0.05))]
    model = make_model(nodes, [tensor_input("x", [1, 512, 4, 4])], [tensor_input("y", [1, 1040])], weights)
    out = quantize(model, target, f"keep_outputs=false,rounding={rounding}").model
    for name in ("conv", "mm"):
        dq, q = quantized_input(out, node_named(out, name), 1)
        assert q is None and inits(out)[dq.input[0]].dtype == np.int8
    assert not {"wc", "wm"} & {t.name for t in out.graph.initializer}
    check_fidelity(model, out)


def test_trt_concat_shares_one_scale() -> None:
    model = concat_model()
    out = quantize(model, "trt", "keep_outputs=false").model
    values = inits(out)
    concat, conv3 = node_named(out, "concat"), node_named(out, "conv3")
    scales = []
    for index in range(2):
        dq, q = quantized_input(out, concat, index)
        scales.append(float(values[dq.input[1]]))
    dq, _ = quantized_input(out, conv3, 0)
    scales.append(float(values[dq.input[1]]))
    assert len(set(scales)) == 1
    check_fidelity(model, out)


def test_concat_range_guard_keeps_output_path_float() -> None:
    model = concat_model(ratio=1000.0)
    result = quantize(model, "trt", "keep_outputs=false")
    out = result.model
    assert node_named(out, "conv3").input[0] == "cat"
    assert node_named(out, "conv3").input[1] == "w3"
    assert any("Concat" in w and "stays float" in w for w in result.report.notes)
    check_fidelity(model, out)


# ----------------------------------------------------------------------------- target ort-cpu


def test_ort_cpu_structure() -> None:
    model = resnet_block()
    # conv1 is a 3x3 conv on 3 channels, which ort-cpu computes in float by default (test_slow_convs_...)
    out = quantize(model, "ort-cpu", "bias_correction=false,slow_convs=true").model
    values = inits(out)
    prod = producers(out)
    conv1, conv2, fc = (node_named(out, n) for n in ("conv1", "conv2", "fc"))
    # uint8 activations, asymmetric; the Relu after conv1 is absorbed: its output's Q has zero point 0
    dq, q = quantized_input(out, conv1, 0)
    assert values[q.input[2]].dtype == np.uint8
    dq2, q2 = quantized_input(out, conv2, 0)
    assert q2.input[0] == "r1" and values[q2.input[2]] == 0
    assert [n.op_type for n in readers(out, "c1")] == ["Relu"]
    # int8 per-channel weights; int32 bias with scale = input scale * weight scale
    for conv, (act_dq, _) in ((conv1, (dq, q)), (conv2, (dq2, q2))):
        wdq, _ = quantized_input(out, conv, 1)
        bdq, _ = quantized_input(out, conv, 2)
        assert values[wdq.input[0]].dtype == np.int8 and axis_of(wdq) == 0
        assert values[bdq.input[0]].dtype == np.int32 and axis_of(bdq) == 0
        np.testing.assert_allclose(values[bdq.input[1]], values[act_dq.input[1]] * values[wdq.input[1]], rtol=1e-6)
    # every conv output is read only by its Q (or its absorbed Relu), so onnxruntime can fuse QLinearConv
    assert [n.op_type for n in readers(out, "c2")] == ["QuantizeLinear"]
    # the Add runs between DQs and a Q (QLinearAdd); its Relu is absorbed
    add = node_named(out, "add")
    assert all(prod[i].op_type == "DequantizeLinear" for i in add.input)
    assert [n.op_type for n in readers(out, "s")] == ["Relu"]
    # the output layer keeps float activations but stores an int8 weight (file size), read through
    # Cast x scale (folded into a float weight when onnxruntime loads it) rather than a DequantizeLinear
    assert fc.input[0] == prod[fc.input[0]].output[0] and prod[fc.input[0]].op_type == "DequantizeLinear"
    q, scale = folded_weight(out, fc)
    assert q.dtype == np.int8 and scale.shape == (q.shape[0], 1)  # Gemm transB=1: per output row
    assert fc.input[2] == "bf"
    assert "y" in [o.name for o in out.graph.output] and prod["y"] is fc
    check_fidelity(model, out)


def test_ort_cpu_folds_positive_scalar_mul_into_scale() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Mul", ["c1", "sixth"], ["m"], name="mul"),
        helper.make_node("Conv", ["m", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),
    ]
    inits_ = [init("w1", rand(4, 3, 1, 1)), init("sixth", np.array(1 / 6, np.float32)), init("w2", rand(4, 4, 1, 1))]
    model = make_model(nodes, [tensor_input("x", [1, 3, 4, 4])], [tensor_input("y", [1, 4, 4, 4])], inits_)
    result = quantize(model, "ort-cpu", "keep_outputs=false")
    out = result.model
    assert "Mul" not in [n.op_type for n in out.graph.node]
    values = inits(out)
    dq_m = producers(out)["m"]
    q_c1 = producers(out)[dq_m.input[0]]
    assert dq_m.op_type == "DequantizeLinear" and q_c1.input[0] == "c1"
    np.testing.assert_allclose(values[dq_m.input[1]], values[q_c1.input[1]] / 6, rtol=1e-6)
    assert "sixth" not in values  # the folded Mul's factor is not left behind (onnxruntime warns about unused initializers)
    check_fidelity(model, out)


@pytest.mark.parametrize("op", ["MaxPool", "Reshape"])
def test_ort_cpu_same_scale_op_after_a_folded_mul_gets_the_folded_parameters(op: str) -> None:
    """A hard-swish's final Mul by 1/6 is folded into a DequantizeLinear scale; the MaxPool (or Reshape) after it must
    quantize its output with exactly those parameters, or onnxruntime keeps DQ -> MaxPool -> Q in float."""
    same_scale = (
        helper.make_node("MaxPool", ["m"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
        if op == "MaxPool"
        else helper.make_node("Reshape", ["m", "shape"], ["p"], name="pool")
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Mul", ["c1", "sixth"], ["m"], name="mul"),
        same_scale,
        helper.make_node("Transpose", ["p"], ["t"], name="transpose", perm=[0, 1, 3, 2]),
        helper.make_node("Conv", ["t", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),
    ]
    inits_ = [
        init("w1", rand(4, 3, 1, 1)), init("sixth", np.array(1 / 6, np.float32)), init("w2", rand(4, 4, 1, 1)),
        init("shape", np.array([1, 4, 2, 8], np.int64)),
    ]  # fmt: skip
    out_shape = [1, 4, 2, 2] if op == "MaxPool" else [1, 4, 8, 2]
    model = make_model(nodes, [tensor_input("x", [1, 3, 4, 4])], [tensor_input("y", out_shape)], inits_)
    result = quantize(model, "ort-cpu", "keep_outputs=false")
    out = result.model
    values = inits(out)
    prod = producers(out)
    dq_m = prod["m"]
    assert dq_m.op_type == "DequantizeLinear" and prod[dq_m.input[0]].input[0] == "c1"
    pool = next(n for n in out.graph.node if n.op_type == op)
    (q_p,) = readers(out, pool.output[0])
    assert q_p.op_type == "QuantizeLinear"
    for index in (1, 2):  # scale and zero point, bit for bit
        assert values[q_p.input[index]].tobytes() == values[dq_m.input[index]].tobytes()
    transpose = next(n for n in out.graph.node if n.op_type == "Transpose")
    q_t = readers(out, transpose.output[0])[0]
    assert values[q_t.input[1]].tobytes() == values[dq_m.input[1]].tobytes()  # and onwards through the next same-scale op
    check_fidelity(model, out)


# ----------------------------------------------------------------------------- opset, exclusions, guards


def test_opset_11_is_upgraded_for_per_channel() -> None:
    model = resnet_block(opset=11)
    result = quantize(model, "ort-cpu")
    assert onnxopt.graph.opset_version(result.model) == 13
    assert any("upgraded the model from opset 11 to 13" in w for w in result.report.notes)
    check_fidelity(model, result.model)


def test_opset_11_falls_back_to_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxopt.passes.opset

    def refuse(model, version):
        raise RuntimeError("adapter missing")

    monkeypatch.setattr(onnxopt.passes.opset, "convert_version", refuse)
    model = resnet_block(opset=11)
    result = quantize(model, "portable")  # (target trt upgrades every model to opset 17 first)
    out = result.model
    assert onnxopt.graph.opset_version(out) == 11
    assert any("per-tensor" in w for w in result.report.notes)
    assert all(axis_of(n) is None for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert all(inits(out)[n.input[1]].shape == () for n in out.graph.node if n.op_type == "DequantizeLinear")
    check_fidelity(model, out)


@pytest.mark.parametrize("pattern", ["conv2", "Conv", "conv[0-9]"])
def test_exclude_by_name_op_type_and_regex(pattern: str) -> None:
    out = quantize(resnet_block(), "trt", f"exclude={pattern}").model
    conv2 = node_named(out, "conv2")
    assert conv2.input[0] == "r1" and conv2.input[1] == "w2"
    conv1 = node_named(out, "conv1")
    assert (conv1.input[1] == "w1") == (pattern != "conv2")


def test_graph_output_tensor_stays_float() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),
    ]
    inits_ = [init("w1", rand(4, 3, 1, 1)), init("w2", rand(4, 4, 1, 1))]
    outputs = [tensor_input("c1", [1, 4, 4, 4]), tensor_input("y", [1, 4, 4, 4])]
    model = make_model(nodes, [tensor_input("x", [1, 3, 4, 4])], outputs, inits_)
    for target in ("trt", "ort-cpu"):
        out = quantize(model, target).model
        conv1 = node_named(out, "conv1")
        assert producers(out)["c1"] is conv1 and conv1.input[0] == "x"
        assert (conv1.input[1] == "w1") == (target == "trt")  # ort-cpu: float activations, int8 weight
        check_fidelity(model, out)


def test_deterministic() -> None:
    model = resnet_block()
    for target in ("trt", "ort-cpu"):
        first = quantize(model, target).model.SerializeToString()
        assert quantize(model, target).model.SerializeToString() == first


def test_already_quantized_is_left_alone() -> None:
    model = quantize(resnet_block(), "trt").model
    again = quantize(model, "trt")
    assert again.model.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("method=kl", "option 'method'"),
        ("percentile=20", "option 'percentile'"),
        ("batch_size=0", "option 'batch_size'"),
        ("exclude=(", "bad regex"),
        ("keep_float=-1", "option 'keep_float'"),
        ("max_error=1.5", "option 'max_error'"),
        ("float_share=1", "option 'float_share'"),
        ("rounding=adaround", "option 'rounding'"),
        ("damp=0", "option 'damp'"),
    ],
)
def test_bad_options(options: str, message: str) -> None:
    with pytest.raises(OptionError, match=message) as info:
        quantize(resnet_block(), "trt", options)
    assert "\n" not in str(info.value)


def test_needs_calibration() -> None:
    with pytest.raises(OnnxoptError, match="calibration"):
        onnxopt.optimize(resnet_block(), "qdq", isolate=False)


def test_methods_and_calib_batches() -> None:
    model = resnet_block()
    scales = set()
    for method in ("minmax", "percentile", "entropy", "mse"):
        out = quantize(model, "trt", f"method={method},calib_batches=1,batch_size=4").model
        dq, _ = quantized_input(out, node_named(out, "conv2"), 0)
        scales.add(float(inits(out)[dq.input[1]]))
        check_fidelity(model, out)
    assert len(scales) > 1


def test_cosine_against_fp32() -> None:
    model = resnet_block()
    feeds = dict(next(calib(model, 1, seed=9).batches(1)))
    ref = run_model(model, feeds)["y"].ravel()
    for target in ("trt", "ort-cpu"):
        got = run_model(quantize(model, target, "keep_outputs=false").model, feeds)["y"].ravel()
        assert float(np.dot(ref, got) / (np.linalg.norm(ref) * np.linalg.norm(got))) > 0.99


# ----------------------------------------------------------------------------- bias correction, sensitivity


def skewed_conv(bias: bool = True, seed: int = 3) -> ModelProto:
    """x (mean 3, std 0.2) -> 1x1 Conv whose output channels differ 1000x in weight size -> y.

    With per-tensor weight scales the small channels round to (nearly) zero; on inputs with a large
    mean, the output error is then mostly a per-channel mean shift: what bias correction removes.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal([4, 4, 1, 1]).astype(np.float32)
    w1[:2] *= np.float32(0.004)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"] if bias else ["x", "w1"], ["y"], name="conv1")]
    inits_ = [init("w1", w1)] + ([init("b1", (rng.standard_normal(4) * 0.01).astype(np.float32))] if bias else [])
    return make_model(nodes, [tensor_input("x", [2, 4, 5, 5])], [tensor_input("y", [2, 4, 5, 5])], inits_)


def shifted_data(model: ModelProto, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Inputs with mean 3 and std 0.2 (so a weight error is mostly a mean error of the output)."""
    rng = np.random.default_rng(seed)
    return {"x": (3 + 0.2 * rng.standard_normal([samples, 4, 5, 5])).astype(np.float32)}


def output_mse(model: ModelProto, quantized: ModelProto) -> float:
    """Mean squared error of ``y`` on held-out inputs, both models in onnxruntime."""
    feeds = {"x": shifted_data(model, 2, seed=5)["x"]}
    return float(np.mean((run_model(model, feeds)["y"] - run_model(quantized, feeds)["y"]) ** 2))


def quantize_shifted(model: ModelProto, target: str, options: str) -> onnxopt.OptimizeResult:
    """``qdq`` (minmax, per-tensor weights, all layers) calibrated on :func:`shifted_data`."""
    data = CalibrationData.from_arrays(shifted_data(model, 16, seed=1), model=model)
    spec = "qdq:method=minmax,per_channel=false,keep_outputs=false," + options
    return onnxopt.optimize(model, spec, target=target, calibration=data, isolate=False)


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
@pytest.mark.parametrize("bias", [True, False])
def test_bias_correction_reduces_output_error(target: str, bias: bool) -> None:
    model = skewed_conv(bias)
    plain = quantize_shifted(model, target, "bias_correction=false").model
    fixed_result = quantize_shifted(model, target, "bias_correction=true")
    fixed = fixed_result.model
    onnx.checker.check_model(fixed, full_check=True)
    assert output_mse(model, fixed) < 0.5 * output_mse(model, plain)
    assert any("bias correction on 1 layers" in w for w in fixed_result.report.notes)
    conv1 = node_named(fixed, "conv1")
    assert len(conv1.input) == 3 and conv1.input[2]
    values = inits(fixed)
    if target == "ort-cpu":
        # the int32 bias keeps scale = input scale x weight scale; only its values changed
        act_dq, _ = quantized_input(fixed, conv1, 0)
        w_dq, _ = quantized_input(fixed, conv1, 1)
        b_dq, _ = quantized_input(fixed, conv1, 2)
        assert values[b_dq.input[0]].dtype == np.int32
        np.testing.assert_allclose(values[b_dq.input[1]], values[act_dq.input[1]] * values[w_dq.input[1]], rtol=1e-6)
    else:
        assert values[conv1.input[2]].dtype == np.float32 and values[conv1.input[2]].shape == (4,)
        if bias:
            assert not np.array_equal(values[conv1.input[2]], inits(model)["b1"])


def test_bias_correction_matmul_add_constant() -> None:
    """A MatMul's bias is the constant of the Add that reads it; per-tensor weights round the small columns away."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal([6, 4]).astype(np.float32)
    w[:, :2] *= np.float32(0.004)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["y"], name="bias"),
    ]
    model = make_model(
        nodes,
        [tensor_input("x", [2, 6])],
        [tensor_input("y", [2, 4])],
        [init("w", w), init("b", (rng.standard_normal(4) * 0.01).astype(np.float32))],
    )
    rng = np.random.default_rng(1)
    data = CalibrationData.from_arrays({"x": (3 + 0.2 * rng.standard_normal([32, 6])).astype(np.float32)}, model=model)
    feeds = {"x": (3 + 0.2 * np.random.default_rng(5).standard_normal([2, 6])).astype(np.float32)}
    errors = []
    for target in ("trt", "ort-cpu"):
        errors = []
        for flag in ("false", "true"):
            spec = f"qdq:method=minmax,per_channel=false,keep_outputs=false,bias_correction={flag}"
            out = onnxopt.optimize(model, spec, target=target, calibration=data, isolate=False).model
            errors.append(float(np.mean((run_model(model, feeds)["y"] - run_model(out, feeds)["y"]) ** 2)))
        assert node_named(out, "bias").input[1] != "b"  # a corrected constant (ort-cpu: re-quantized uint8 through a DQ)
        assert errors[1] < 0.5 * errors[0], target


def sensitivity_notes(result: onnxopt.OptimizeResult) -> list[str]:
    """The ranking lines of the qdq notes."""
    return [w for w in result.report.notes if "sensitivity #" in w]


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_sensitivity_ranking_and_keep_float(target: str) -> None:
    model = resnet_block()
    ranked = quantize(model, target, "keep_outputs=false,sensitivity=true,bias_correction=false,slow_convs=true")
    lines = sensitivity_notes(ranked)
    assert len(lines) == 3  # conv1, conv2, fc: one line each
    assert [int(line.split("#")[1].split()[0]) for line in lines] == [1, 2, 3]
    errors = [float(line.split("1-cos ")[1].split()[0]) for line in lines]
    assert errors == sorted(errors, reverse=True)
    top = lines[0].split("'")[1]
    kept = quantize(model, target, "keep_outputs=false,keep_float=1,bias_correction=false,slow_convs=true")
    out = kept.model
    node = node_named(out, top)
    source = producers(out).get(node.input[0])
    if target == "trt":
        assert source is None or source.op_type != "DequantizeLinear" or producers(out)[source.input[0]].op_type != "QuantizeLinear"
        assert node.input[1] in inits(model)  # float weight
    else:  # ort-cpu: the layer runs in float with an int8 weight (file size) and its float bias (no QLinear* fusion)
        q, scale = folded_weight(out, node)
        assert q.dtype == np.int8 and scale.dtype == np.float32
        if len(node.input) > 2:
            assert inits(out)[node.input[2]].dtype == np.float32
    assert any("[kept float]" in line for line in sensitivity_notes(kept))
    check_fidelity(model, out)


def test_float_layer_weight_is_folded_by_onnxruntime(tmp_path) -> None:
    """The Cast x scale weight of a float layer becomes one float initializer when onnxruntime loads it (pre-packable)."""
    import onnxruntime as ort

    model = resnet_block()
    out = quantize(model, "ort-cpu", "keep_outputs=false,keep_float=3,bias_correction=false").model
    q, scale = folded_weight(out, node_named(out, "conv2"))
    assert q.dtype == np.int8 and scale.shape == (8, 1, 1, 1)  # the file stores int8, per output channel
    loaded = session_graph(out, tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    assert not [n for n in loaded.graph.node if n.op_type == "Cast"], "onnxruntime left a weight Cast unfolded"
    conv2 = node_named(loaded, "conv2")
    folded = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}[conv2.input[1]]
    np.testing.assert_array_equal(folded, q.astype(np.float32) * scale)  # exactly the dequantized weight
    check_fidelity(model, out)


def test_layer_macs_counts_each_layout() -> None:
    from onnxopt.passes.qdq_sensitivity import layer_macs

    model = resnet_block()
    feeds = dict(next(calib(model, 1).batches(1)))
    positions = [i for i, n in enumerate(model.graph.node) if n.op_type in ("Conv", "Gemm")]
    # conv1: 8 x 8 x 8 outputs x 3 x 3 x 3; conv2: 8 x 8 x 8 x 8 x 3 x 3; fc (transB): 5 outputs x 8
    assert list(layer_macs(model, positions, feeds).values()) == [512 * 27, 512 * 72, 40]
    deconv = deconv_model()
    pos = next(i for i, n in enumerate(deconv.graph.node) if n.op_type == "ConvTranspose")
    # ConvTranspose [4, 6, 2, 2], stride 2, input 4 x 4 x 4: each input value meets C_out x k x k = 24 weights
    assert layer_macs(deconv, [pos], dict(next(calib(deconv, 1).batches(1)))) == {pos: 64 * 24}


def test_within_share_picks_by_error_per_mac() -> None:
    from onnxopt.passes.qdq_sensitivity import within_share

    ranking = [(0.04, 1), (0.03, 2), (0.001, 3), (0.0, 4)]
    macs = {1: 800, 2: 100, 3: 100, 4: 0}
    # per MAC: 2 (3e-4), then 1 (5e-5), then 3 (1e-5); 4 adds no error and is never kept
    assert within_share(ranking, macs, 0.5) == [2, 3]  # 1 does not fit in 500 MACs; the cheaper 3 after it still does
    assert within_share(ranking, macs, 0.95) == [2, 1]
    assert within_share(ranking, macs, 0.05) == []


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_float_share_keeps_layers_within_the_mac_share(target: str) -> None:
    model = resnet_block()
    result = quantize(model, target, "keep_outputs=false,float_share=0.3,bias_correction=false,slow_convs=true")
    summary = next(w for w in result.report.notes if "sensitivity of" in w)
    share = float(summary.split("(")[-1].split("%")[0]) / 100
    assert "of the quantized layers' MACs" in summary and 0 < share <= 0.3
    kept = [line.split("'")[1] for line in sensitivity_notes(result) if "[kept float]" in line]
    # conv2 holds 72% of the MACs: it cannot fit, so conv1 (27%) and fc are the candidates
    assert "conv2" not in kept and kept
    for name in kept:
        node = node_named(result.model, name)
        if target == "trt":
            assert node.input[1] in inits(model)
        else:
            assert folded_weight(result.model, node)[0].dtype == np.int8
    check_fidelity(model, result.model)


def test_max_error_keeps_layers_until_below() -> None:
    model = resnet_block()
    result = quantize(model, "trt", "keep_outputs=false,max_error=1e-12,bias_correction=false")
    summary = next(w for w in result.report.notes if "sensitivity of" in w)
    assert "kept float: 3" in summary  # nothing quantized reaches 1e-12: every layer stays float
    assert not any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    loose = quantize(model, "trt", "keep_outputs=false,max_error=0.5,bias_correction=false")
    assert "kept float: 0" in next(w for w in loose.report.notes if "sensitivity of" in w)


def test_bias_correction_and_sensitivity_deterministic() -> None:
    model = resnet_block()
    for target in ("trt", "ort-cpu"):
        options = "keep_outputs=false,keep_float=1"
        first = quantize(model, target, options).model.SerializeToString()
        assert quantize(model, target, options).model.SerializeToString() == first


# ----------------------------------------------------------------------------- real models


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr_det", "ppocr_rec", "ppocr_cls", "magika"])
def test_real_models_load_and_run(name: str) -> None:
    model, calib, feeds = benchmark_model(name)
    data = CalibrationData.from_arrays(calib, model=model)
    for target in ("ort-cpu", "trt"):
        out = onnxopt.optimize(model, "default,qdq", target=target, calibration=data, isolate=False).model
        onnx.checker.check_model(out)
        ref, got = run_model(model, feeds), run_model(out, feeds)
        for key in ref:
            a, b = ref[key].ravel().astype(np.float64), got[key].ravel().astype(np.float64)
            assert float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.9, (name, target)


# ----------------------------------------------------------------------------- gptq rounding


def correlated(samples: int, channels: int, seed: int, spatial: tuple[int, ...] = (6, 6)) -> np.ndarray:
    """Inputs whose channels are strongly correlated (a few latent factors plus small noise)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((channels, 2))
    latent = rng.standard_normal((samples, 2, *spatial))
    x = np.einsum("ck,nk...->nc...", mix, latent) + 0.05 * rng.standard_normal((samples, channels, *spatial))
    return x.astype(np.float32)


@pytest.mark.parametrize(("op", "group", "trans_b"), [("Conv", 1, 0), ("Conv", 2, 0), ("Gemm", 1, 1), ("Gemm", 1, 0), ("MatMul", 1, 0)])
def test_gptq_int8_lowers_layer_error_in_every_layout(op: str, group: int, trans_b: int) -> None:
    from onnxopt.calibration.capture import layer_rows
    from onnxopt.passes.qdq import quantize_weight, weight_axis, weight_params
    from onnxopt.passes.qdq_rounding import gptq_int8

    rng = np.random.default_rng(4)
    if op == "Conv":
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=group)
        weight = rng.standard_normal((6, 8 // group, 3, 3)).astype(np.float32)
        x = correlated(4, 8, seed=1)
    else:
        node = helper.make_node(op, ["x", "w"], ["y"], **({"transB": trans_b} if op == "Gemm" else {}))
        weight = rng.standard_normal((6, 8) if trans_b else (8, 6)).astype(np.float32)
        x = correlated(64, 8, seed=1, spatial=())
    rows = layer_rows(node, x.astype(np.float64), weight.shape)
    hessian = np.einsum("grk,grl->gkl", rows, rows) / rows.shape[1]
    axis = weight_axis(node, weight)
    params = weight_params(weight, axis)
    params.scale = params.scale * 8  # coarse steps, so rounding matters
    near = quantize_weight(weight, params).astype(np.float64)
    smart = gptq_int8(node, weight, params.scale, hessian, damp=0.01).astype(np.float64)
    assert smart.dtype == np.float64 and np.abs(smart).max() <= 127

    def error(q: np.ndarray) -> float:
        shape = [1] * weight.ndim
        shape[axis] = -1
        deq = q * params.scale.reshape(shape)
        if op == "Conv":
            per = weight.shape[0] // group
            diffs = [rows[g] @ (weight[g * per : (g + 1) * per] - deq[g * per : (g + 1) * per]).reshape(per, -1).T for g in range(group)]
            return float(sum(np.sum(d**2) for d in diffs))
        diff = (weight - deq).T if trans_b else weight - deq
        return float(np.sum((rows[0] @ diff) ** 2))

    assert error(smart) < 0.7 * error(near)


def test_gptq_rounding_lowers_model_error_and_keeps_scales() -> None:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(
        nodes,
        [tensor_input("x", [2, 8, 6, 6])],
        [tensor_input("y", [2, 6, 6, 6])],
        [init("w", rng.standard_normal((6, 8, 3, 3)).astype(np.float32)), init("b", np.zeros(6, np.float32))],
    )
    data = CalibrationData.from_arrays({"x": correlated(32, 8, seed=1)}, model=model)
    spec = "qdq:method=minmax,per_channel=false,keep_outputs=false,bias_correction=false"
    near = onnxopt.optimize(model, spec, target="trt", calibration=data, isolate=False).model
    smart_result = onnxopt.optimize(model, spec + ",rounding=gptq", target="trt", calibration=data, isolate=False)
    smart = smart_result.model
    onnx.checker.check_model(smart, full_check=True)
    assert any("gptq rounding of 1 weights" in w for w in smart_result.report.notes)
    feeds = {"x": correlated(2, 8, seed=9)}
    ref = run_model(model, feeds)["y"]
    near_err = float(np.mean((run_model(near, feeds)["y"] - ref) ** 2))
    smart_err = float(np.mean((run_model(smart, feeds)["y"] - ref) ** 2))
    assert smart_err < near_err
    scales = lambda m: sorted(v.tobytes() for k, v in inits(m).items() if k.endswith("_scale"))  # noqa: E731
    assert scales(near) == scales(smart)  # only the integers change
    again = onnxopt.optimize(model, spec + ",rounding=gptq", target="trt", calibration=data, isolate=False).model
    assert again.SerializeToString() == smart.SerializeToString()


def test_gptq_hessians_in_bounded_groups_give_the_same_model(monkeypatch) -> None:
    """With room for one Hessian at a time, each conv gets its own calibration sweep and the same integers."""
    import onnxopt.passes.gptq as gptq

    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    weights = [init(name, rng.standard_normal((out, 8, 3, 3)).astype(np.float32)) for name, out in (("w1", 8), ("w2", 6))]
    model = make_model(nodes, [tensor_input("x", [1, 8, 6, 6])], [tensor_input("y", [1, 6, 6, 6])], weights)
    data = CalibrationData.from_arrays({"x": correlated(8, 8, seed=1)}, model=model)
    spec = "qdq:method=minmax,keep_outputs=false,rounding=gptq"
    whole = onnxopt.optimize(model, spec, target="trt", calibration=data, isolate=False)
    monkeypatch.setattr(gptq, "HESSIAN_BYTES", 8 * 72 * 72)
    split = onnxopt.optimize(model, spec, target="trt", calibration=data, isolate=False)
    assert any("gptq rounding of 2 weights (2 calibration sweeps)" in n for n in split.report.notes), split.report.notes
    assert split.model.SerializeToString() == whole.model.SerializeToString()
    feeds = {"x": correlated(1, 8, seed=9)}
    ref, got = run_model(model, feeds)["y"], run_model(split.model, feeds)["y"]
    assert float(np.abs(got - ref).max()) < 0.05 * float(np.abs(ref).max())


def residual_stream() -> ModelProto:
    """x -> LayerNorm -> h; y = h + MatMul(Relu(MatMul(h, w1)), w2): h flows float to the output (a transformer's residual)."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["m1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["h", "m2"], ["y"], name="residual"),
    ]
    inits_ = [init("g", np.ones(16, np.float32)), init("b", np.zeros(16, np.float32))]
    inits_ += [init("w1", rand(16, 32, scale=0.3)), init("w2", rand(32, 16, scale=0.3))]
    return make_model(nodes, [tensor_input("x", [4, 16])], [tensor_input("y", [4, 16])], inits_, opset=17)


@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_residual_stream_input_is_quantized_for_the_layer_only(target: str) -> None:
    model = residual_stream()
    out = quantize(model, target).model
    mm1 = node_named(out, "mm1")
    quantized_input(out, mm1, 0)  # the first MatMul of the block reads h through Q/DQ
    assert node_named(out, "residual").input[0] == "h"  # the residual path to the output stays float
    check_fidelity(model, out)


def embedding_model(shared: bool = False) -> ModelProto:
    """ids -> Gather(table [1024, 64]) -> MatMul(w) -> y; ``shared``: the table is also read by a second MatMul."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
    ]
    outputs = [tensor_input("y", [2, 5, 16])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["e", "table_t"], ["z"], name="head"))
        nodes.insert(0, helper.make_node("Transpose", ["table"], ["table_t"], name="tie"))
        outputs.append(tensor_input("z", [2, 5, 1024]))
    inits_ = [init("table", rand(1024, 64, scale=0.02)), init("w", rand(64, 16))]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])
    return make_model(nodes, [ids], outputs, inits_, opset=17)


def test_embedding_table_is_stored_as_int8() -> None:
    model = embedding_model()
    ids = np.random.default_rng(0).integers(0, 1024, (16, 5)).astype(np.int64)
    data = CalibrationData.from_arrays({"ids": ids}, model=model)
    out = onnxopt.optimize(model, "qdq:method=minmax", target="ort-cpu", calibration=data, isolate=False).model
    values = inits(out)
    assert "table" not in values and values["table_quantized"].dtype == np.int8
    gather = node_named(out, "embed")
    assert producers(out)[readers(out, gather.output[0])[0].output[0]].op_type == "DequantizeLinear"
    assert out.ByteSize() < 0.4 * model.ByteSize()
    feeds = {"ids": ids[:2]}
    a, b = run_model(model, feeds)["y"].ravel(), run_model(out, feeds)["y"].ravel()
    assert float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.99
    trt = onnxopt.optimize(model, "qdq:method=minmax", target="trt", calibration=data, isolate=False).model
    assert inits(trt)["table"].dtype == np.float32  # TensorRT: the table stays float


def test_shared_embedding_table_stays_float() -> None:
    model = embedding_model(shared=True)
    data = CalibrationData.from_arrays({"ids": np.zeros((8, 5), np.int64)}, model=model)
    out = onnxopt.optimize(model, "qdq:method=minmax", target="ort-cpu", calibration=data, isolate=False).model
    assert inits(out)["table"].dtype == np.float32


def hardswish_chain() -> ModelProto:
    """x -> conv1 -> x * Clip(x + 3, 0, 6) / 6 -> conv2 -> the same -> conv3 -> y (paddle2onnx's hard-swish, opset 13)."""
    nodes, inits_, source = [], [init("three", np.float32(3)), init("zero", np.float32(0)), init("six", np.float32(6))], "x"
    for index, cin in ((1, 3), (2, 8)):
        c = f"c{index}"
        nodes += [
            helper.make_node("Conv", [source, f"w{index}", f"b{index}"], [c], name=f"conv{index}", pads=[1, 1, 1, 1]),
            helper.make_node("Add", [c, "three"], [f"a{index}"]),
            helper.make_node("Clip", [f"a{index}", "zero", "six"], [f"g{index}"]),
            helper.make_node("Mul", [c, f"g{index}"], [f"m{index}"]),
            helper.make_node("Div", [f"m{index}", "six"], [f"h{index}"]),
        ]
        inits_ += [init(f"w{index}", rand(8, cin, 3, 3, scale=0.4)), init(f"b{index}", rand(8, scale=0.1))]
        source = f"h{index}"
    nodes.append(helper.make_node("Conv", [source, "w3", "b3"], ["y"], name="conv3", pads=[1, 1, 1, 1]))
    inits_ += [init("w3", rand(4, 8, 3, 3, scale=0.3)), init("b3", rand(4, scale=0.1))]
    return make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 4, 8, 8])], inits_, opset=13)


def quantized_chain(exclude: str) -> tuple[ModelProto, onnxopt.OptimizeResult]:
    """A ``hardswish_chain`` and its result after fuse_activations and qdq (ort-cpu, minmax, keep_outputs=false),
    ``exclude`` kept float."""
    model = hardswish_chain()
    spec = f"fuse_activations,qdq:method=minmax,keep_outputs=false,exclude={exclude}"
    return model, onnxopt.optimize(model, spec, target="ort-cpu", calibration=calib(model), isolate=False)


def test_ort_cpu_fuses_the_hardswish_of_float_layers_only() -> None:
    """fuse_activations leaves Clip forms to qdq on ort-cpu; qdq fuses those left float, keeps the dequantized ones."""
    model, result = quantized_chain("conv1")
    out = result.model
    assert result.report.passes[-1].counts["float_activations_fused"] == 1
    assert any("fused 1 Clip-form hard-swish" in n for n in result.report.notes)
    hsig = [n for n in out.graph.node if n.op_type == "HardSigmoid"]
    assert len(hsig) == 1 and hsig[0].input[0] == "c1"  # conv1's (float) hard-swish, as x * HardSigmoid(x) below opset 14
    clip = next(n for n in out.graph.node if n.op_type == "Clip")
    add = producers(out)[clip.input[0]]
    assert producers(out)[add.input[0]].op_type == "DequantizeLinear"  # conv2's stays for onnxruntime's uint8 kernels
    check_fidelity(model, out)
    again = onnxopt.optimize(out, "fuse_activations", target="ort-cpu", isolate=False)  # its Q/DQ pairs stop a later fusion
    assert sum(n.op_type == "Clip" for n in again.model.graph.node) == 1


def test_fusing_the_float_hardswishes_drops_their_constants() -> None:
    """Both hard-swishes stay float and are fused; their Add/Clip/Div constants, read by nothing now, go too."""
    model, result = quantized_chain("conv1|conv2")
    out = result.model
    assert result.report.passes[-1].counts["float_activations_fused"] == 2
    read = {name for node in out.graph.node for name in node.input}
    assert not {"three", "zero", "six"} & {t.name for t in out.graph.initializer}
    assert all(t.name in read for t in out.graph.initializer)
    check_fidelity(model, out)


def test_a_model_with_nothing_to_quantize_says_why() -> None:
    """A lone Gemm writing the graph output stays float under keep_outputs (the note says how to quantize it); a model
    without any layer says only that; the model is unchanged either way."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [tensor_input("x", [2, 8])], [tensor_input("y", [2, 4])], [init("w", rand(4, 8)), init("b", rand(4))])
    result = quantize(model, "trt")
    assert "qdq: no quantizable layer found (1 layer(s) feed graph outputs and stay float: keep_outputs=false quantizes them)" in (
        result.report.notes
    )
    assert result.model.SerializeToString() == model.SerializeToString()
    quantized = quantize(model, "trt", "keep_outputs=false").model
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) == 1
    check_fidelity(model, quantized)
    relu = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_input("x", [2, 8])], [tensor_input("y", [2, 8])])
    assert "qdq: no quantizable layer found" in quantize(relu, "trt").report.notes
