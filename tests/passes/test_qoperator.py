"""The ``qoperator`` pass: Q/DQ groups become onnxruntime's QLinear kernels with the Q/DQ model's outputs.

Every rewrite is checked by running the Q/DQ model and its QOperator form in onnxruntime on the
same inputs: onnxruntime's CPU QDQ transformer builds the same kernels at load time, so the
outputs agree to float rounding.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import benchmark_model, init, make_model, session_graph, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.calibration import CalibrationData
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.verify import generate_inputs, run_model

RNG = np.random.default_rng(7)
# The models here use 7-bit weights (qdq's reduce_range): onnxruntime's integer kernels are then exact on every CPU. On x86
# CPUs without VNNI they add pairs of uint8 x int8 products in int16, which saturates with 8-bit weights, and the QLinear
# outputs would no longer match the float Q/DQ arithmetic they are compared with.


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    """Seeded normal float32 values."""
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def ops(model: ModelProto) -> Counter:
    """Op types of the main graph (domain-qualified for contrib ops)."""
    return Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def se_block() -> ModelProto:
    """A MobileNet-style block: stem Conv -> Relu -> Conv; squeeze-excite (GAP -> Conv -> Sigmoid -> Mul); residual Add;
    MaxPool -> Conv -> Relu -> AveragePool -> Concat with a LeakyRelu branch -> Reshape -> MatMul -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Conv", ["g", "w3", "b3"], ["c3"], name="conv_se"),
        helper.make_node("Sigmoid", ["c3"], ["s"], name="sigmoid"),
        helper.make_node("Mul", ["c2", "s"], ["m"], name="excite"),
        helper.make_node("Add", ["m", "r1"], ["a"], name="residual"),
        helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w4", "b4"], ["c4"], name="conv4", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c4"], ["r4"], name="relu4"),
        helper.make_node("AveragePool", ["r4"], ["ap"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("LeakyRelu", ["ap"], ["lr"], name="leaky", alpha=0.1),
        helper.make_node("Concat", ["ap", "lr"], ["cat"], name="concat", axis=1),
        helper.make_node("Reshape", ["cat", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "wm"], ["mm"], name="matmul"),
        helper.make_node("Relu", ["mm"], ["rm"], name="relu_mm"),
        helper.make_node("MatMul", ["rm", "wo"], ["y"], name="head"),
    ]
    inits = [
        init("w1", rand(8, 3, 3, 3, scale=0.3)),
        init("b1", rand(8, scale=0.1)),
        init("w2", rand(8, 8, 3, 3, scale=0.2)),
        init("b2", rand(8, scale=0.1)),
        init("w3", rand(8, 8, 1, 1, scale=0.3)),
        init("b3", rand(8, scale=0.1)),
        init("w4", rand(8, 8, 3, 3, scale=0.2)),
        init("b4", rand(8, scale=0.1)),
        init("shape", np.array([2, 64], np.int64)),
        init("wm", rand(64, 16, scale=0.2)),
        init("wo", rand(16, 5, scale=0.3)),
    ]
    return make_model(nodes, [tensor_input("x", [2, 3, 8, 8])], [tensor_input("y", [2, 5])], inits, opset=17)


def quantized(model: ModelProto) -> ModelProto:
    """``qdq`` for ort-cpu (minmax, every layer but the head) calibrated on 8 random samples."""
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    data = CalibrationData.from_arrays({"x": x}, model=model)
    spec = "qdq:method=minmax,equalize=false,slow_convs=true,reduce_range=true"
    return onnxopt.optimize(model, spec, target="ort-cpu", calibration=data, isolate=False).model


def qoperator(model: ModelProto, options: str = "", target: str = "ort-cpu") -> onnxopt.OptimizeResult:
    """The ``qoperator`` pass (with ``options``) on a copy of ``model``, without fault isolation."""
    spec = f"qoperator:{options}" if options else "qoperator"
    return onnxopt.optimize(model, spec, target=target, isolate=False)


def assert_same_outputs(a: ModelProto, b: ModelProto) -> None:
    """Both models give the same outputs in onnxruntime on seeded random inputs (float rounding apart)."""
    feeds, _ = generate_inputs(a, seed=3)
    ref, got = run_model(a, feeds), run_model(b, feeds)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6 * float(np.abs(ref[key]).max()))


def initializer_names(model: ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def test_every_group_becomes_its_qlinear_kernel_with_the_qdq_outputs() -> None:
    qdq = quantized(se_block())
    result = qoperator(qdq)
    out = result.model
    onnx.checker.check_model(out)
    counts = ops(out)
    assert counts["QLinearConv"] == 4
    for op in (
        "QLinearAdd",
        "QLinearMul",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearConcat",
    ):
        assert counts[f"com.microsoft.{op}"] == 1, op
    assert counts["QLinearMatMul"] == 1  # the head feeds the graph output and keeps float activations
    assert counts["com.microsoft.NhwcMaxPool"] == 1 and counts["Reshape"] == 1 and not counts["Relu"]  # Relus: in the Q zero point
    # no DequantizeLinear reads a weight or a bias any more (the head computes in float from Cast(int8) x scale), and the
    # bias scales went with them: QLinearConv derives input scale x weight scale itself
    constants = initializer_names(out)
    assert not [n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert not {"b1_scale", "b2_scale", "b3_scale", "b4_scale"} & constants and {"b1_quantized", "w1_quantized"} <= constants
    assert {n.name for n in out.graph.node} >= {"conv1", "conv2", "conv_se", "conv4", "residual", "excite", "matmul"}
    assert result.report.passes[-1].counts["Conv_to_QLinearConv"] == 4
    assert len(out.SerializeToString()) < 0.9 * len(qdq.SerializeToString())
    assert_same_outputs(qdq, out)


def test_contrib_false_writes_standard_ops_only() -> None:
    qdq = quantized(se_block())
    out = qoperator(qdq, "contrib=false").model
    assert not any(n.domain for n in out.graph.node)
    assert ops(out)["QLinearConv"] == 4 and ops(out)["QLinearMatMul"] == 1 and ops(out)["MaxPool"] == 1
    assert all(imp.domain != "com.microsoft" for imp in out.opset_import)
    assert_same_outputs(qdq, out)


def test_exclude_keeps_the_named_group_in_qdq_form_with_a_note() -> None:
    qdq = quantized(se_block())
    result = qoperator(qdq, "exclude=conv2|Sigmoid")
    out = result.model
    assert ops(out)["QLinearConv"] == 3 and ops(out)["Sigmoid"] == 1 and ops(out)["Conv"] == 1
    assert any("stay in Q/DQ form" in n and "excluded (2)" in n for n in result.report.notes)
    assert_same_outputs(qdq, out)


def test_zero_points_shared_by_several_values_are_stored_once_under_their_value() -> None:
    """The Relu outputs share zero point 0: one initializer named after the value, not after its first reader."""
    qdq = quantized(se_block())
    out = qoperator(qdq).model
    scalars = [t for t in out.graph.initializer if not t.dims and t.data_type == TensorProto.UINT8]
    values = [int(numpy_helper.to_array(t)) for t in scalars]
    assert len(values) == len(set(values))  # no two uint8 zero points hold the same value
    shared = {t.name: int(numpy_helper.to_array(t)) for t in scalars if t.name.startswith("zp_uint8_")}
    assert shared and all(name == f"zp_uint8_{value}" for name, value in shared.items())
    before = Counter(int(numpy_helper.to_array(t)) for t in qdq.graph.initializer if t.name.endswith("_zero_point") and not t.dims)
    assert all(before[value] > 1 for value in shared.values())  # each stands for several zero points of the Q/DQ model
    assert_same_outputs(qdq, out)


def test_optimizing_twice_gives_identical_bytes() -> None:
    qdq = quantized(se_block())
    assert qoperator(qdq).model.SerializeToString() == qoperator(qdq).model.SerializeToString()


# ----------------------------------------------------------------------------- hand-built groups (the guards)


def qdq_conv(
    *, act: str = "", clip: tuple[float, float] = (0.0, 6.0), y_zero: int = 0, bias_scale_factor: float = 1.0, w_zero: int = 0
) -> ModelProto:
    """x -> Q -> DQ -> Conv(DQ(w int8 per-channel), DQ(b int32)) [-> Relu/Clip] -> Q -> DQ -> y, written by hand."""
    weight = RNG.integers(-63, 64, (4, 3, 3, 3)).astype(np.int8)  # 7-bit: exact in onnxruntime's kernels on every CPU
    w_scale = np.array([0.01, 0.02, 0.015, 0.012], np.float32)
    x_scale = np.float32(0.05)
    bias = RNG.integers(-500, 500, 4).astype(np.int32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "bs"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
    ]
    last = "c"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["a"], name="act"))
        last = "a"
    elif act == "Clip":
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["a"], name="act"))
        last = "a"
    nodes += [
        helper.make_node("QuantizeLinear", [last, "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
    ]
    inits = [
        init("xs", x_scale),
        init("xz", np.uint8(128)),
        init("w", weight),
        init("ws", w_scale),
        init("wz", np.full(4, w_zero, np.int8)),
        init("b", bias),
        init("bs", (x_scale * w_scale * bias_scale_factor).astype(np.float32)),
        init("ys", np.float32(6.0 / 255)),
        init("yz", np.uint8(y_zero)),
        init("lo", np.float32(clip[0])),
        init("hi", np.float32(clip[1])),
    ]
    return make_model(nodes, [tensor_input("x", [1, 3, 6, 6])], [tensor_input("y", [1, 4, 6, 6])], inits, opset=17)


@pytest.mark.parametrize(("act", "clip", "y_zero"), [("", (0, 6), 0), ("Relu", (0, 6), 0), ("Clip", (0, 6), 0), ("Clip", (-1, 7), 0)])
def test_conv_group_with_an_absorbed_activation_becomes_qlinearconv(act, clip, y_zero) -> None:
    model = qdq_conv(act=act, clip=clip, y_zero=y_zero)
    out = qoperator(model).model
    assert ops(out) == Counter({"QuantizeLinear": 1, "QLinearConv": 1, "DequantizeLinear": 1})
    conv = next(n for n in out.graph.node if n.op_type == "QLinearConv")
    assert conv.name == "conv" and conv.input[8] == "b"
    assert "bs" not in initializer_names(out) and "wz" not in initializer_names(out)  # derived scale, zero zero points
    if act == "Clip":
        assert not {"lo", "hi"} & initializer_names(out)  # the absorbed Clip's bounds go with it
    assert_same_outputs(model, out)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"act": "Relu", "y_zero": 10}, "zero point of the Q after it is not the type's minimum"),
        ({"act": "Clip", "clip": (0.0, 1.0)}, "clips inside the Q range"),
        ({"bias_scale_factor": 1.5}, "the bias scale is not input scale x weight scale"),
        ({"w_zero": 3}, "per-channel weight zero points other than 0"),
    ],
)
def test_groups_the_kernel_would_compute_differently_stay_qdq_with_the_reason(kwargs, reason) -> None:
    model = qdq_conv(**kwargs)
    result = qoperator(model)
    assert ops(result.model)["Conv"] == 1 and not ops(result.model)["QLinearConv"]
    assert any(reason in note for note in result.report.notes), result.report.notes
    assert result.model.SerializeToString() == model.SerializeToString()


def in_if_branch(inner: ModelProto, y_shape: list[int]) -> ModelProto:
    """``inner``'s graph as the then-branch of an If on input ``cond`` (reading ``inner``'s inputs from outside); the
    else-branch gives zeros of ``y_shape``."""
    branch = helper.make_graph(list(inner.graph.node), "then", [], [tensor_input("y", y_shape)], list(inner.graph.initializer))
    other = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["y_else"])], "else", [], [tensor_input("y_else", y_shape)],
        [init("zeros", np.zeros(y_shape, np.float32))],
    )  # fmt: skip
    nodes = [helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)]
    inputs = [*inner.graph.input, tensor_input("cond", [], TensorProto.BOOL)]
    return make_model(nodes, inputs, [tensor_input("out", y_shape)], opset=17)


def test_group_inside_an_if_branch_is_rewritten() -> None:
    model = in_if_branch(qdq_conv(act="Relu"), [1, 4, 6, 6])
    out = qoperator(model).model
    then = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert Counter(n.op_type for n in then.node)["QLinearConv"] == 1
    feeds = {"x": rand(1, 3, 6, 6), "cond": np.array(True)}
    np.testing.assert_allclose(run_model(out, feeds)["out"], run_model(model, feeds)["out"], rtol=1e-5, atol=1e-6)


def test_per_tensor_value_with_a_one_element_vector_scale_stays_qdq() -> None:
    model = qdq_conv()
    scale = next(t for t in model.graph.initializer if t.name == "xs")
    scale.CopyFrom(numpy_helper.from_array(np.array([0.05], np.float32), "xs"))
    result = qoperator(model)
    assert not ops(result.model)["QLinearConv"]
    assert any("no rank-0 scale and zero point" in n for n in result.report.notes)


# ----------------------------------------------------------------------------- errors and notes


@pytest.mark.parametrize("target", ["trt", "portable", "ort-gpu"])
def test_other_targets_are_refused_with_the_reason(target) -> None:
    with pytest.raises(OnnxoptError, match="runs in onnxruntime's CPU provider only"):
        qoperator(qdq_conv(), target=target)


def test_a_float_model_is_left_alone_with_a_note() -> None:
    model = se_block()
    result = qoperator(model)
    assert result.model.SerializeToString() == model.SerializeToString()
    assert any("no Q/DQ groups" in n for n in result.report.notes)


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(OptionError, match="bad regex"):
        qoperator(qdq_conv(), "exclude=(")
    with pytest.raises(OptionError, match="has no option 'format'"):
        qoperator(qdq_conv(), "format=x")


def test_shapes_are_inferred_through_the_contrib_kernels() -> None:
    from onnxopt.shapes import infer_types

    out = qoperator(quantized(se_block())).model
    types = infer_types(out)
    mul = next(n for n in out.graph.node if n.op_type == "QLinearMul")
    dims = [d.dim_value for d in types[mul.output[0]].tensor_type.shape.dim]
    assert dims == [2, 8, 8, 8] and types[mul.output[0]].tensor_type.elem_type == TensorProto.UINT8


def test_bias_corrected_matmul_add_keeps_rank0_scales_and_becomes_qlinearadd() -> None:
    """Bias correction rewrites the quantized bias constant of a transformer-style MatMul -> Add; its scale and zero
    point must stay rank 0 (numpy's ascontiguousarray made them [1]), so the Add still becomes QLinearAdd."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm1"], name="dense1"),
        helper.make_node("Add", ["mm1", "b1"], ["h"], name="dense1_bias"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["mm2"], name="dense2"),
        helper.make_node("Add", ["mm2", "b2"], ["y"], name="dense2_bias"),
    ]
    inits = [init("w1", rand(16, 32, scale=0.3)), init("b1", rand(32, scale=0.5)), init("w2", rand(32, 8, scale=0.3)), init("b2", rand(8))]
    model = make_model(nodes, [tensor_input("x", [4, 16])], [tensor_input("y", [4, 8])], inits, opset=17)
    x = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
    data = CalibrationData.from_arrays({"x": x}, model=model)
    result = onnxopt.optimize(
        model, "qdq:method=minmax,bias_correction=true,reduce_range=true", target="ort-cpu", calibration=data, isolate=False
    )
    assert any("bias correction" in note for note in result.report.notes), result.report.notes
    qdq = result.model
    constants = {t.name: t for t in qdq.graph.initializer}
    quantizers = [n for n in qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in constants]
    weights = {"w1_quantized", "w2_quantized"}  # per-channel: their scales are vectors by design
    vector_scaled = [n.input[0] for n in quantizers if n.input[0] not in weights and len(constants[n.input[1]].dims)]
    assert not vector_scaled, f"per-tensor Q/DQ with a vector scale: {vector_scaled}"
    out = qoperator(qdq).model
    assert ops(out)["com.microsoft.QLinearAdd"] == 1  # dense1_bias; dense2_bias feeds the graph output and stays float
    assert_same_outputs(qdq, out)


def test_layers_qdq_keeps_float_with_int8_weights_are_noted_as_a_choice() -> None:
    """A depthwise conv over 8 channels computes in float on ort-cpu (int8 weights read as Cast x scale): qoperator keeps
    it, says why, and does not count it among the groups it failed to rewrite."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "wd"], ["c2"], name="depthwise", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["c2", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1]),
    ]
    inits = [init("w1", rand(8, 8, 3, 3, scale=0.2)), init("wd", rand(8, 1, 3, 3, scale=0.3)), init("w3", rand(4, 8, 3, 3, scale=0.2))]
    model = make_model(nodes, [tensor_input("x", [1, 8, 6, 6])], [tensor_input("y", [1, 4, 6, 6])], inits, opset=17)
    x = np.random.default_rng(1).standard_normal((16, 8, 6, 6)).astype(np.float32)
    data = CalibrationData.from_arrays({"x": x}, model=model)
    q = onnxopt.optimize(model, "qdq:method=minmax,reduce_range=true", target="ort-cpu", calibration=data, isolate=False).model
    result = qoperator(q)
    depthwise = next(n for n in result.model.graph.node if n.name == "depthwise")
    assert depthwise.op_type == "Conv"
    assert ops(result.model)["QLinearConv"] == 1  # conv1 (conv3 writes the float graph output)
    notes = result.report.notes
    assert any("1 layer(s) that qdq left to compute in float with int8 weights" in n for n in notes), notes
    assert not any("wd_dq" in n for n in notes), notes  # the weight-only layer is not reported as a failed match
    assert_same_outputs(q, result.model)


# ----------------------------------------------------------------------------- integer MaxPool in NHWC


def pool_head(pool_rank: int = 2, **pool: object) -> ModelProto:
    """Conv -> c * (c + 3) -> MaxPool -> GlobalAveragePool -> Reshape -> MatMul: after the QLinearAdd and QLinearMul,
    onnxruntime's layout pass carries no Transpose to the pool and keeps an integer MaxPool in NCHW, as after PP-OCR
    cls's last hard-swish."""
    spatial = [6, 8] if pool_rank == 2 else [12]
    kernel = [2] * pool_rank
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1] * (2 * pool_rank)),
        helper.make_node("Add", ["c", "three"], ["a"], name="add"),
        helper.make_node("Mul", ["c", "a"], ["m"], name="mul"),
        helper.make_node("MaxPool", ["m"], ["p"], name="pool", **(pool or {"kernel_shape": kernel, "strides": kernel, "storage_order": 0})),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Reshape", ["g", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "wo"], ["y"], name="head"),
    ]
    inits = [
        init("w1", rand(16, 4, *[3] * pool_rank, scale=0.3)),
        init("b1", rand(16, scale=0.1)),
        init("three", np.float32(3.0)),
        init("shape", np.array([1, 16], np.int64)),
        init("wo", rand(16, 3, scale=0.3)),
    ]
    return make_model(nodes, [tensor_input("x", [1, 4, *spatial])], [tensor_input("y", [1, 3])], inits, opset=17)


def as_nchw_max_pool(model: ModelProto) -> ModelProto:
    """``model`` with each Transpose -> NhwcMaxPool -> Transpose written back as one MaxPool (the form before this rewrite)."""
    out = ModelProto.FromString(model.SerializeToString())
    by_output = {o: n for n in out.graph.node for o in n.output}
    dropped: set[str] = set()
    for node in out.graph.node:
        if node.op_type == "NhwcMaxPool":
            before = by_output[node.input[0]]
            after = next(n for n in out.graph.node if node.output[0] in n.input)
            node.op_type, node.domain = "MaxPool", ""
            node.input[0], node.output[0] = before.input[0], after.output[0]
            dropped |= {before.name, after.name}
    kept = [n for n in out.graph.node if n.name not in dropped]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def quantized_pool_head(pool_rank: int = 2, **pool: object) -> ModelProto:
    model = pool_head(pool_rank, **pool)
    x = np.random.default_rng(1).standard_normal((8, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]))
    data = CalibrationData.from_arrays({"x": x.astype(np.float32)}, model=model)
    return onnxopt.optimize(
        model, "qdq:method=minmax,slow_convs=true,reduce_range=true", target="ort-cpu", calibration=data, isolate=False
    ).model


def test_integer_max_pool_is_written_nhwc_so_onnxruntime_runs_its_fast_kernel(tmp_path) -> None:
    """onnxruntime leaves this pool's integer MaxPool in NCHW (about 25x slower than its NhwcMaxPool) when given it as
    MaxPool; written as Transpose -> NhwcMaxPool -> Transpose it runs the NHWC kernel, with the same outputs."""
    qdq = quantized_pool_head()
    out = qoperator(qdq).model
    onnx.checker.check_model(out)
    plain = as_nchw_max_pool(out)
    assert ops(session_graph(plain, tmp_path))["MaxPool"] == 1  # the case this rewrite is for: onnxruntime keeps NCHW here
    nodes = {n.op_type: n for n in out.graph.node}
    pool = nodes["NhwcMaxPool"]
    assert pool.name == "pool" and pool.domain == "com.microsoft"
    assert {a.name for a in pool.attribute} == {"kernel_shape", "strides"}  # storage_order (indices only) is dropped
    before, after = (
        next(n for n in out.graph.node if n.output[0] == pool.input[0]),
        next(n for n in out.graph.node if pool.output[0] in n.input),
    )
    assert (before.op_type, list(before.attribute[0].ints)) == ("Transpose", [0, 2, 3, 1])
    assert (after.op_type, list(after.attribute[0].ints)) == ("Transpose", [0, 3, 1, 2])
    session = ops(session_graph(out, tmp_path))
    assert session["MaxPool"] == 0 and session["com.microsoft.NhwcMaxPool"] == 1
    feeds, _ = generate_inputs(qdq, seed=3)
    for key, value in run_model(plain, feeds).items():  # an integer max: exact
        np.testing.assert_array_equal(run_model(out, feeds)[key], value)
    assert_same_outputs(qdq, out)


def test_shapes_are_inferred_through_nhwc_max_pool() -> None:
    from onnxopt.shapes import infer_types

    out = qoperator(quantized_pool_head()).model
    pool = next(n for n in out.graph.node if n.op_type == "NhwcMaxPool")
    types = infer_types(out)
    assert [d.dim_value for d in types[pool.output[0]].tensor_type.shape.dim] == [1, 3, 4, 16]
    assert types[pool.output[0]].tensor_type.elem_type == TensorProto.UINT8


def test_one_dimensional_integer_max_pool_stays_max_pool() -> None:
    qdq = quantized_pool_head(pool_rank=1)
    out = qoperator(qdq).model
    assert ops(out)["MaxPool"] == 1 and not ops(out)["com.microsoft.NhwcMaxPool"]
    assert_same_outputs(qdq, out)


@pytest.mark.parametrize(
    "pool",
    [
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
        {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
        {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
        {"kernel_shape": [2, 2], "dilations": [2, 2]},
        {"kernel_shape": [3, 2], "pads": [1, 0, 0, 1]},
    ],
)
def test_nhwc_max_pool_keeps_every_pooling_attribute_exactly(pool) -> None:
    qdq = quantized_pool_head(**pool)
    out = qoperator(qdq).model
    assert ops(out)["com.microsoft.NhwcMaxPool"] == 1
    feeds, _ = generate_inputs(qdq, seed=5)
    plain = run_model(as_nchw_max_pool(out), feeds)
    for key, value in run_model(out, feeds).items():
        np.testing.assert_array_equal(value, plain[key])
    assert_same_outputs(qdq, out)


def test_nhwc_max_pool_inside_an_if_branch() -> None:
    model = in_if_branch(quantized_pool_head(), [1, 3])
    out = qoperator(model).model
    onnx.checker.check_model(out)
    then = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert Counter(n.op_type for n in then.node)["NhwcMaxPool"] == 1 and Counter(n.op_type for n in then.node)["Transpose"] == 2
    feeds = {"x": rand(1, 4, 6, 8), "cond": np.array(True)}
    np.testing.assert_array_equal(run_model(out, feeds)["out"], run_model(as_nchw_max_pool_in_branch(out), feeds)["out"])


def as_nchw_max_pool_in_branch(model: ModelProto) -> ModelProto:
    """``model`` with its If's then-branch written back to a plain MaxPool (:func:`as_nchw_max_pool`)."""
    out = ModelProto.FromString(model.SerializeToString())
    attr = next(a for a in out.graph.node[0].attribute if a.name == "then_branch")
    holder = ModelProto()
    holder.graph.CopyFrom(attr.g)
    attr.g.CopyFrom(as_nchw_max_pool(holder).graph)
    return out


# ----------------------------------------------------------------------------- nearest upsampling


def upsample_head(scales: list[float], spatial: tuple[object, object] = (5, 6), **resize: object) -> ModelProto:
    """Conv -> Resize -> Add (a Conv of the input at the upsampled size) -> Conv -> Relu -> Conv, an FPN merge as in
    PP-OCR det; the integer Convs run NHWC in onnxruntime, so its layout pass would carry that layout to the Resize."""
    attrs = resize or {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["up"], name="upsample", **attrs),
        helper.make_node("Conv", ["big", "w2", "b2"], ["lateral"], name="lateral", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["up", "lateral"], ["merged"], name="merge"),
        helper.make_node("Conv", ["merged", "w3", "b3"], ["h"], name="head", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w4", "b4"], ["y"], name="out", pads=[1, 1, 1, 1]),
    ]
    inits = [
        init("scales", np.array(scales, np.float32)),
        *(init(f"w{i}", rand(16, 4 if i < 3 else 16, 3, 3, scale=0.3)) for i in (1, 2, 3, 4)),
        *(init(f"b{i}", rand(16, scale=0.1)) for i in (1, 2, 3, 4)),
    ]
    h, w = spatial
    big = [d * int(f) if isinstance(d, int) else f"{d}_up" for d, f in zip((h, w), scales[2:], strict=True)]
    inputs = [tensor_input("x", [1, 4, h, w]), tensor_input("big", [1, 4, *big])]
    return make_model(nodes, inputs, [tensor_input("y", [1, 16, *big])], inits, opset=17)


def quantized_upsample_head(scales: list[float], **resize: object) -> ModelProto:
    model = upsample_head(scales, **resize)
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((8, 4, 5, 6)), "big": rng.standard_normal((8, 4, 5 * int(scales[2]), 6 * int(scales[3])))}
    calib = CalibrationData.from_arrays({k: v.astype(np.float32) for k, v in data.items()}, model=model)
    return onnxopt.optimize(
        model, "qdq:method=minmax,slow_convs=true,reduce_range=true", target="ort-cpu", calibration=calib, isolate=False
    ).model


def run_optimized(model: ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` in onnxruntime with its graph optimizations on: the integer kernels it builds from Q/DQ groups
    (without them a Q/DQ model runs in float, which the QOperator form cannot match exactly)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def upsample_feeds(factor: float, h: int = 5, w: int = 6, w_factor: float | None = None) -> dict[str, np.ndarray]:
    return {"x": rand(1, 4, h, w), "big": rand(1, 4, h * int(factor), w * int(w_factor or factor))}


def resize_scales(model: ModelProto) -> list[list[float]]:
    """The scales of every Resize in ``model``'s main graph (an onnxruntime session graph's layout shows in them)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [values[n.input[2]].tolist() for n in model.graph.node if n.op_type == "Resize"]


def without_keep_nchw(model: ModelProto) -> ModelProto:
    """``model`` with the no-op Reshapes after its Resizes dropped (the Resizes then write their readers' input)."""
    out = ModelProto.FromString(model.SerializeToString())
    guards = [n for n in out.graph.node if n.op_type == "Reshape" and n.name.endswith("_keep_nchw")]
    for guard in guards:
        next(n for n in out.graph.node if n.output and n.output[0] == guard.input[0]).output[0] = guard.output[0]
    kept = [n for n in out.graph.node if n not in guards]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def test_integer_upsampling_by_two_stays_nchw_in_onnxruntime(tmp_path) -> None:
    """Between NHWC convolutions onnxruntime moves an integer Resize to NHWC, where its generic loop is about 20x slower
    than its NCHW x2 copy; the no-op Reshape after it keeps it NCHW, with the Q/DQ model's outputs exactly."""
    qdq = quantized_upsample_head([1, 1, 2, 2])
    out = qoperator(qdq).model
    onnx.checker.check_model(out)
    resize = next(n for n in out.graph.node if n.op_type == "Resize")
    assert resize.name == "upsample" and next(n for n in out.graph.node if resize.input[0] in n.output).op_type == "QLinearConv"
    guard = next(n for n in out.graph.node if resize.output[0] in n.input)
    assert (
        guard.op_type == "Reshape"
        and numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == guard.input[1])).tolist() == [0] * 4
    )
    assert resize_scales(session_graph(without_keep_nchw(out), tmp_path)) == [[1, 2, 2, 1]]  # the case this is for: NHWC
    assert resize_scales(session_graph(out, tmp_path)) == [[1, 1, 2, 2]]
    feeds = upsample_feeds(2)
    for key, value in run_optimized(qdq, feeds).items():
        np.testing.assert_array_equal(run_optimized(out, feeds)[key], value)


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize(
    ("transform", "rounding"),
    [
        ("asymmetric", "floor"),
        ("half_pixel", "round_prefer_floor"),
        ("pytorch_half_pixel", "round_prefer_ceil"),
        ("tf_half_pixel_for_nn", "floor"),
    ],
)
def test_nearest_upsampling_by_a_power_of_two_becomes_steps_of_two_exactly(factor, transform, rounding) -> None:
    qdq = quantized_upsample_head([1, 1, factor, factor], mode="nearest", coordinate_transformation_mode=transform, nearest_mode=rounding)
    result = qoperator(qdq)
    resizes = [n for n in result.model.graph.node if n.op_type == "Resize"]
    assert len(resizes) == int(np.log2(factor)) and resize_scales(result.model) == [[1, 1, 2, 2]] * len(resizes)
    assert {(get(n, "coordinate_transformation_mode"), get(n, "nearest_mode")) for n in resizes} == {(b"asymmetric", b"floor")}
    feeds = upsample_feeds(factor)
    for key, value in run_optimized(qdq, feeds).items():
        np.testing.assert_array_equal(run_optimized(result.model, feeds)[key], value)


def get(node: onnx.NodeProto, name: str) -> object:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.mark.parametrize(
    ("scales", "resize", "reason"),
    [
        ([1, 1, 3, 3], {}, "are not [1, 1, 2^k, 2^k]"),
        ([1, 1, 2, 1], {}, "are not [1, 1, 2^k, 2^k]"),
        (
            [1, 1, 2, 2],
            {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "round_prefer_floor"},
            "does not read floor",
        ),
        ([1, 1, 2, 2], {"mode": "nearest", "coordinate_transformation_mode": "align_corners"}, "does not read floor"),
        ([1, 1, 2, 2], {"mode": "linear"}, "interpolates"),
    ],
)
def test_other_resizes_stay_qdq_with_the_reason(scales, resize, reason) -> None:
    qdq = quantized_upsample_head(scales, **resize)
    result = qoperator(qdq)
    resize_node = next(n for n in result.model.graph.node if n.op_type == "Resize")
    assert any(n.op_type == "DequantizeLinear" and n.output[0] == resize_node.input[0] for n in result.model.graph.node)
    assert any(reason in note for note in result.report.notes), result.report.notes
    feeds = upsample_feeds(scales[2], w_factor=scales[3])
    for key, value in run_optimized(qdq, feeds).items():
        np.testing.assert_array_equal(run_optimized(result.model, feeds)[key], value)


def test_upsampling_with_free_spatial_dims_runs_at_any_size() -> None:
    model = upsample_head([1, 1, 4, 4], spatial=("h", "w"))
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((8, 4, 5, 6)), "big": rng.standard_normal((8, 4, 20, 24))}
    calib = CalibrationData.from_arrays({k: v.astype(np.float32) for k, v in data.items()}, model=model)
    qdq = onnxopt.optimize(
        model, "qdq:method=minmax,slow_convs=true,reduce_range=true", target="ort-cpu", calibration=calib, isolate=False
    ).model
    out = qoperator(qdq).model
    assert Counter(n.op_type for n in out.graph.node)["Resize"] == 2
    for h, w in ((5, 6), (3, 9)):
        feeds = upsample_feeds(4, h, w)
        for key, value in run_optimized(qdq, feeds).items():
            np.testing.assert_array_equal(run_optimized(out, feeds)[key], value)


def test_upsampling_inside_an_if_branch() -> None:
    model = in_if_branch(quantized_upsample_head([1, 1, 4, 4]), [1, 16, 20, 24])
    out = qoperator(model).model
    onnx.checker.check_model(out)
    then = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert Counter(n.op_type for n in then.node)["Resize"] == 2 and Counter(n.op_type for n in then.node)["Reshape"] == 1
    feeds = {**upsample_feeds(4), "cond": np.array(True)}
    np.testing.assert_array_equal(run_optimized(out, feeds)["out"], run_optimized(model, feeds)["out"])


# ----------------------------------------------------------------------------- real models


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr_det", "ppocr_rec", "ppocr_cls", "magika"])
def test_real_models_give_the_qdq_outputs(name: str) -> None:
    """Each real model's QOperator form gives its Q/DQ form's outputs exactly in onnxruntime with its graph
    optimizations on (which build the same kernels from the Q/DQ groups; without them the Q/DQ model runs in float)."""
    model, calib, feeds = benchmark_model(name)
    data = CalibrationData.from_arrays(calib, model=model)
    qdq = onnxopt.optimize(model, "default,qdq", target="ort-cpu", calibration=data, isolate=False).model
    out = qoperator(qdq).model
    onnx.checker.check_model(out)
    assert not any(n.op_type == "MaxPool" for n in out.graph.node)  # PP-OCR cls's integer pool is written NHWC
    ref, got = run_optimized(qdq, feeds), run_optimized(out, feeds)
    assert ref.keys() == got.keys()
    for key, value in ref.items():
        np.testing.assert_array_equal(got[key], value, err_msg=name)
