"""Tests of fold_batchnorm, fold_conv_affine and fuse_pad_into_conv: rewrites, guards, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, run_pass, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt.passes.fuse_conv  # noqa: F401  (registers the passes)
from onnxopt.errors import OptionError
from onnxopt.passes.fuse_conv import FoldBatchNorm

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def rand(*shape: int, dtype=np.float32) -> np.ndarray:
    """Random normal values."""
    return RNG.standard_normal(shape).astype(dtype)


def any_output(name: str, rank: int = 4) -> onnx.ValueInfoProto:
    """A float graph output of known rank and unknown dims."""
    return helper.make_tensor_value_info(name, F32, [None] * rank)


def to_ir3(model: ModelProto) -> ModelProto:
    """The model as IR version 3, where every initializer is also a graph input."""
    model.ir_version = 3
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return model


def counts(result, name: str) -> dict[str, int]:
    """The counts of the single run of pass ``name`` in a result's report."""
    records = [r for r in result.report.passes if r.name == name]
    assert len(records) == 1
    return dict(records[0].counts)


def bn_params(channels: int, prefix: str = "bn", dtype=np.float32) -> list[TensorProto]:
    """Scale, bias, mean and a positive variance for a BatchNormalization."""
    return [
        init(f"{prefix}_s", rand(channels, dtype=dtype)),
        init(f"{prefix}_b", rand(channels, dtype=dtype)),
        init(f"{prefix}_m", rand(channels, dtype=dtype)),
        init(f"{prefix}_v", (RNG.random(channels) + 0.5).astype(dtype)),
    ]


def bn_node(x: str, y: str, prefix: str = "bn", outputs: tuple[str, ...] = (), **attrs) -> onnx.NodeProto:
    """A BatchNormalization reading the parameters of :func:`bn_params`."""
    return helper.make_node(
        "BatchNormalization", [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y, *outputs], epsilon=1e-3, **attrs
    )


def conv_bn_model(
    op: str = "Conv",
    *,
    group: int = 1,
    rank: int = 2,
    bias: bool = True,
    c_in: int = 4,
    c_out: int = 6,
    opset: int = 17,
    bn_attrs: dict | None = None,
    dtype=np.float32,
) -> ModelProto:
    """x -> Conv/ConvTranspose -> BatchNormalization -> y."""
    kernel = (3,) * rank
    w_shape = (c_out, c_in // group, *kernel) if op == "Conv" else (c_in, c_out // group, *kernel)
    inits = [init("w", rand(*w_shape, dtype=dtype)), *bn_params(c_out, dtype=dtype)]
    inputs = ["x", "w"]
    if bias:
        inits.append(init("b", rand(c_out, dtype=dtype)))
        inputs.append("b")
    nodes = [helper.make_node(op, inputs, ["c"], group=group, pads=[1] * (2 * rank)), bn_node("c", "y", **(bn_attrs or {}))]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    spatial = [5] * rank
    return make_model(
        nodes,
        [tensor_input("x", [2, c_in, *spatial], elem)],
        [tensor_input("y", [2, c_out, *spatial], elem)],
        inits,
        opset=opset,
    )


# ----------------------------------------------------------------------------- fold_batchnorm


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_folds_into_convolution(op, group, rank, bias):
    model = conv_bn_model(op, group=group, rank=rank, bias=bias)
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == [op]
    assert counts(result, "fold_batchnorm") == {f"batchnorm_into_{op}": 1}
    assert result.model.graph.node[0].output[0] == "y"
    assert_equivalent(model, result.model)


def test_grouped_conv_transpose_scales_axis_1_per_group():
    """Output channel g*(M/g)+j of a grouped ConvTranspose is column j of group g's rows."""
    model = conv_bn_model("ConvTranspose", group=3, c_in=6, c_out=9, bias=False)
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["ConvTranspose"]
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(
    ("opset", "attrs"),
    [(7, {"spatial": 1}), (9, {}), (14, {"training_mode": 0}), (15, {})],
)
def test_batchnorm_opsets(opset, attrs):
    model = conv_bn_model(opset=opset, bn_attrs=attrs)
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["Conv"]
    assert_equivalent(model, result.model)


def test_batchnorm_fp16_weights():
    model = conv_bn_model(dtype=np.float16)
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["Conv"]
    assert result.model.graph.initializer[-1].data_type == TensorProto.FLOAT16
    assert_equivalent(model, result.model, precision="fp16")


def gemm_bn_model(trans_b: int, c_shape: tuple[int, ...] | None, alpha: float = 1.0, beta: float = 1.0, opset: int = 17) -> ModelProto:
    """a(3x5) -> Gemm -> BatchNormalization -> y (3x4)."""
    b = rand(4, 5) if trans_b else rand(5, 4)
    inits = [init("B", b), *bn_params(4)]
    inputs = ["a", "B"]
    if c_shape is not None:
        inits.append(init("C", rand(*c_shape)))
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=alpha, beta=beta), bn_node("g", "y")]
    return make_model(nodes, [tensor_input("a", [3, 5])], [tensor_input("y", [3, 4])], inits, opset=opset)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (4,), (1, 4), (3, 1), (3, 4)])
def test_batchnorm_folds_into_gemm(trans_b, c_shape):
    model = gemm_bn_model(trans_b, c_shape, alpha=0.7, beta=1.3)
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["Gemm"]
    assert counts(result, "fold_batchnorm") == {"batchnorm_into_Gemm": 1}
    assert_equivalent(model, result.model)


def test_gemm_without_c_before_opset_11_is_not_folded():
    model = gemm_bn_model(0, (4,), opset=10)
    assert op_types(run_pass(model, "fold_batchnorm").model) == ["Gemm"]  # with C it folds
    no_c = gemm_bn_model(0, None, opset=11)
    assert op_types(run_pass(no_c, "fold_batchnorm").model) == ["Gemm"]


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_lone_batchnorm_becomes_mul_add(rank):
    shape = [2, 3, 4, 5][:rank]
    model = make_model([bn_node("x", "y")], [tensor_input("x", shape)], [tensor_input("y", shape)], bn_params(3))
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["Mul", "Add"]
    scale = {t.name: t for t in result.model.graph.initializer}[result.model.graph.node[0].input[1]]
    assert list(scale.dims) == [3] + [1] * (rank - 2)
    assert result.model.graph.node[1].output[0] == "y"
    assert_equivalent(model, result.model)


def test_lone_batchnorm_needs_known_rank_and_the_option():
    params = bn_params(3)
    reshape = helper.make_node("Reshape", ["x", "s"], ["r"])  # a target shape of unknown length: unknown rank
    unknown = make_model(
        [reshape, bn_node("r", "y")],
        [tensor_input("x", [2, 3, 4]), tensor_input("s", [None], TensorProto.INT64)],
        [any_output("y", 3)],
        params,
    )
    assert op_types(run_pass(unknown, "fold_batchnorm").model) == ["Reshape", "BatchNormalization"]
    known = make_model([bn_node("x", "y")], [tensor_input("x", [2, 3, 4])], [tensor_input("y", [2, 3, 4])], params)
    assert op_types(run_pass(known, [FoldBatchNorm(lone_to_mul_add=False)]).model) == ["BatchNormalization"]
    assert op_types(run_pass(known, "fold_batchnorm:lone_to_mul_add=false").model) == ["BatchNormalization"]
    with pytest.raises(OptionError):
        run_pass(known, "fold_batchnorm:lone_to_mul_add=maybe")


def test_conv_output_read_elsewhere_is_not_folded():
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    model.graph.output.append(any_output("r"))
    result = run_pass(model, "fold_batchnorm:lone_to_mul_add=false")
    assert op_types(result.model) == ["Conv", "BatchNormalization", "Relu"]
    model.graph.node.pop()
    model.graph.output[1].name = "c"  # the Conv output is a graph output
    assert op_types(run_pass(model, "fold_batchnorm:lone_to_mul_add=false").model) == ["Conv", "BatchNormalization"]


def test_shared_weight_is_not_modified():
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Conv", ["x", "w", "b"], ["other"], pads=[1, 1, 1, 1]))
    model.graph.output.append(any_output("other"))
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["Conv", "Conv"]
    assert list(result.model.graph.node[1].input) == ["x", "w", "b"]
    assert_equivalent(model, result.model)


def test_weight_that_is_a_graph_input_is_not_folded():
    model = conv_bn_model()
    model.graph.input.append(tensor_input("w", [6, 4, 3, 3]))
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["Conv", "Mul", "Add"]  # the lone form instead
    assert result.model.graph.node[0].input[1] == "w"
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(
    ("opset", "attrs", "outputs"),
    [(15, {"training_mode": 1}, ("rm", "rv")), (9, {}, ("m", "v", "sm", "sv")), (7, {"spatial": 0}, ())],
)
def test_training_or_non_spatial_batchnorm_is_left_alone(opset, attrs, outputs):
    model = conv_bn_model(opset=opset)
    model.graph.node[1].CopyFrom(bn_node("c", "y", outputs=outputs, **attrs))
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["Conv", "BatchNormalization"]


def test_ir3_and_custom_domain_are_left_alone():
    old = to_ir3(conv_bn_model(opset=8))
    assert op_types(run_pass(old, "fold_batchnorm").model) == ["Conv", "BatchNormalization"]
    custom = conv_bn_model()
    custom.graph.node[0].domain = "custom"
    custom.opset_import.append(helper.make_opsetid("custom", 1))
    result = onnxopt_optimize_unchecked(custom, "fold_batchnorm:lone_to_mul_add=false")
    assert [n.op_type for n in result.graph.node] == ["Conv", "BatchNormalization"]


def onnxopt_optimize_unchecked(model: ModelProto, passes: str) -> ModelProto:
    """Optimize without model validation (for models onnxruntime cannot run)."""
    import onnxopt

    return onnxopt.optimize(model, passes, isolate=False, validate=False).model


def test_batchnorm_in_subgraph_is_folded():
    body = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]), bn_node("c", "yb")],
        "then",
        [],
        [any_output("yb", 3)],
        [init("w", rand(6, 4, 3)), *bn_params(6)],
    )
    other = helper.make_graph([helper.make_node("Identity", ["z"], ["ye"])], "else", [], [any_output("ye", 3)], [init("z", rand(2, 6, 5))])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=other)
    model = make_model([node], [tensor_input("cond", [], TensorProto.BOOL), tensor_input("x", [2, 4, 5])], [any_output("y", 3)])
    result = run_pass(model, "fold_batchnorm")
    then = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Conv"]
    for flag in (True, False):
        assert_equivalent(model, result.model, {"cond": np.array(flag), "x": rand(2, 4, 5)})


def test_deterministic():
    model = conv_bn_model(group=2)
    passes = "fold_batchnorm,fold_conv_affine,fuse_pad_into_conv"
    first = run_pass(model, passes).model.SerializeToString(deterministic=True)
    assert run_pass(model, passes).model.SerializeToString(deterministic=True) == first


# ----------------------------------------------------------------------------- fold_conv_affine


def affine_model(op: str, steps: list[tuple[str, np.ndarray, bool]], *, group: int = 1, bias: bool = False, opset: int = 17) -> ModelProto:
    """x -> Conv/ConvTranspose -> steps (op, constant, constant_first) -> y."""
    w_shape = (6, 4 // group, 3, 3) if op == "Conv" else (4, 6 // group, 3, 3)
    inits = [init("w", rand(*w_shape))]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(init("b", rand(6)))
        conv_inputs.append("b")
    nodes = [helper.make_node(op, conv_inputs, ["v0"], group=group, pads=[1, 1, 1, 1])]
    for i, (kind, value, first) in enumerate(steps):
        inits.append(init(f"k{i}", value))
        operands = [f"k{i}", f"v{i}"] if first else [f"v{i}", f"k{i}"]
        nodes.append(helper.make_node(kind, operands, [f"v{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"v{len(steps)}"], ["y"]))
    return make_model(nodes, [tensor_input("x", [2, 4, 5, 5])], [any_output("y")], inits, opset=opset)


PER_CHANNEL = [(6, 1, 1), (1, 6, 1, 1), (), (1,), (1, 1, 1), (1, 6, 1, 1)]


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("shape", PER_CHANNEL)
def test_mul_add_fold_into_convolution(op, group, shape):
    steps = [("Mul", rand(*shape), False), ("Add", rand(*shape), True), ("Sub", rand(6, 1, 1), False), ("Div", rand(6, 1, 1) + 3, False)]
    model = affine_model(op, steps, group=group)
    result = run_pass(model, "fold_conv_affine")
    assert op_types(result.model) == [op, "Identity"]
    assert counts(result, "fold_conv_affine") == {f"{k}_into_{op}": 1 for k in ("Mul", "Add", "Sub", "Div")}
    assert len(result.model.graph.node[0].input) == 3  # a bias was created
    assert_equivalent(model, result.model)


def test_add_into_existing_bias():
    model = affine_model("Conv", [("Add", rand(1, 6, 1, 1), False)], bias=True)
    result = run_pass(model, "fold_conv_affine")
    assert op_types(result.model) == ["Conv", "Identity"]
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(
    "steps",
    [
        [("Mul", rand(5, 1), False)],  # broadcasts along H, not per channel
        [("Mul", rand(1, 1, 1, 5), False)],  # per position
        [("Mul", rand(1, 1, 6, 1, 1), False)],  # raises the rank
        [("Mul", rand(2, 6, 1, 1), False)],  # broadcasts along N
        [("Sub", rand(6, 1, 1), True)],  # c - y
        [("Div", np.zeros((6, 1, 1), np.float32), False)],  # division by zero
        [("Mul", np.full((6, 1, 1), np.inf, np.float32), False)],  # not finite
    ],
)
def test_non_per_channel_operands_are_not_folded(steps):
    model = affine_model("Conv", steps)
    result = run_pass(model, "fold_conv_affine")
    assert op_types(result.model) == op_types(model)


def test_chain_stops_at_a_shared_value():
    model = affine_model("Conv", [("Mul", rand(6, 1, 1), False), ("Add", rand(6, 1, 1), False)])
    model.graph.node.append(helper.make_node("Relu", ["v1"], ["r"]))
    model.graph.output.append(any_output("r"))
    result = run_pass(model, "fold_conv_affine")
    assert op_types(result.model) == ["Conv", "Add", "Identity", "Relu"]
    assert result.model.graph.node[0].output[0] == "v1"
    assert_equivalent(model, result.model)


def test_non_constant_operand_and_ir3_are_left_alone():
    model = affine_model("Conv", [("Mul", rand(6, 1, 1), False)])
    model.graph.input.append(tensor_input("k0", [6, 1, 1]))
    assert op_types(run_pass(model, "fold_conv_affine").model) == ["Conv", "Mul", "Identity"]
    old = to_ir3(affine_model("Conv", [("Mul", rand(6, 1, 1), False)], opset=8))
    assert op_types(run_pass(old, "fold_conv_affine").model) == ["Conv", "Mul", "Identity"]


def test_batchnorm_then_affine_pipeline():
    """A lone BatchNormalization after Conv+Relu stays; one after a Conv folds completely."""
    model = affine_model("Conv", [("Mul", rand(6, 1, 1), True)])
    model.graph.node[-1].CopyFrom(bn_node("v1", "y"))
    model.graph.initializer.extend(bn_params(6))
    result = run_pass(model, "fold_batchnorm,fold_conv_affine,fold_batchnorm")
    assert op_types(result.model) == ["Conv"]
    assert_equivalent(model, result.model)


# ----------------------------------------------------------------------------- fuse_pad_into_conv


def pad_model(
    consumer: str = "Conv",
    pads: list[int] | None = None,
    *,
    opset: int = 17,
    value: float | None = None,
    mode: str = "constant",
    axes: list[int] | None = None,
    conv_pads: list[int] | None = None,
    **attrs,
) -> ModelProto:
    """x (2x3x6x6) -> Pad -> Conv/AveragePool/MaxPool -> y."""
    pads = pads if pads is not None else [0, 0, 1, 2, 0, 0, 2, 1]
    inits: list[TensorProto] = []
    if opset < 11:
        pad_attrs = {"pads": pads, "mode": mode}
        if value is not None:
            pad_attrs["value"] = value
        pad = helper.make_node("Pad", ["x"], ["p"], **pad_attrs)
    else:
        inits.append(init("pads", np.array(pads, np.int64)))
        inputs = ["x", "pads"]
        if value is not None or axes is not None:
            inputs.append("")
            if value is not None:
                inits.append(init("pv", np.array(value, np.float32)))
                inputs[2] = "pv"
        if axes is not None:
            inits.append(init("axes", np.array(axes, np.int64)))
            inputs.append("axes")
        pad = helper.make_node("Pad", inputs, ["p"], mode=mode)
    if conv_pads is not None:
        attrs["pads"] = conv_pads
    if consumer == "Conv":
        inits.append(init("w", rand(4, 3, 3, 3)))
        node = helper.make_node("Conv", ["p", "w"], ["y"], **attrs)
    else:
        node = helper.make_node(consumer, ["p"], ["y"], kernel_shape=[3, 3], **attrs)
    return make_model([pad, node], [tensor_input("x", [2, 3, 6, 6])], [any_output("y")], inits, opset=opset)


@pytest.mark.parametrize(
    ("opset", "axes", "pads"),
    [(10, None, None), (13, None, None), (18, None, None), (18, [2, 3], [1, 2, 2, 1]), (18, [-1], [1, 2])],
)
def test_pad_folds_into_conv(opset, axes, pads):
    model = pad_model(opset=opset, axes=axes, pads=pads, strides=[2, 1])
    result = run_pass(model, "fuse_pad_into_conv")
    assert op_types(result.model) == ["Conv"]
    assert counts(result, "fuse_pad_into_conv") == {"pad_into_Conv": 1}
    assert_equivalent(model, result.model)


def test_pad_adds_to_existing_pads_and_replaces_valid():
    for attrs in ({"conv_pads": [1, 0, 0, 1]}, {"auto_pad": "VALID"}):
        model = pad_model(**attrs)
        result = run_pass(model, "fuse_pad_into_conv")
        assert op_types(result.model) == ["Conv"]
        assert_equivalent(model, result.model)


def test_pad_folds_into_pools():
    avg = pad_model("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], count_include_pad=1)
    result = run_pass(avg, "fuse_pad_into_conv")
    assert op_types(result.model) == ["AveragePool"]
    assert_equivalent(avg, result.model)
    top = pad_model("MaxPool", [0, 0, 1, 2, 0, 0, 2, 1], value=-np.inf)
    result = run_pass(top, "fuse_pad_into_conv")
    assert op_types(result.model) == ["MaxPool"]
    feeds = {"x": -np.abs(rand(2, 3, 6, 6)) - 1}
    assert_equivalent(top, result.model, feeds)


@pytest.mark.parametrize(
    ("consumer", "pads", "kwargs"),
    [
        ("Conv", [0, 1, 1, 1, 0, 0, 1, 1], {}),  # channel axis padded
        ("Conv", [0, 0, -1, 1, 0, 0, 1, 1], {}),  # negative pad crops
        ("Conv", None, {"mode": "reflect"}),
        ("Conv", None, {"value": 1.0}),
        ("Conv", None, {"auto_pad": "SAME_UPPER"}),
        ("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], {}),  # count_include_pad=0 excludes pads
        ("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1], {}),  # zero pads change a MaxPool of negatives
        ("MaxPool", [0, 0, 3, 1, 0, 0, 1, 1], {"value": -np.inf}),  # pad >= kernel
        ("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], {"count_include_pad": 1, "ceil_mode": 1}),
    ],
)
def test_pad_guards(consumer, pads, kwargs):
    model = pad_model(consumer, pads, **kwargs)
    result = run_pass(model, "fuse_pad_into_conv")
    assert op_types(result.model) == ["Pad", consumer]


def test_pad_read_elsewhere_is_kept():
    model = pad_model()
    model.graph.output.append(any_output("p"))
    assert op_types(run_pass(model, "fuse_pad_into_conv").model) == ["Pad", "Conv"]


def test_batchnorm_6_needs_is_test():
    """onnxruntime has no BatchNormalization-6 kernel: onnx's reference evaluator checks the fold."""
    from onnx.reference import ReferenceEvaluator

    model = conv_bn_model(opset=6, bn_attrs={"is_test": 1})
    result = run_pass(model, "fold_batchnorm")
    assert op_types(result.model) == ["Conv"]
    x = rand(2, 4, 5, 5)
    expected, actual = (ReferenceEvaluator(m).run(None, {"x": x})[0] for m in (model, result.model))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    training = conv_bn_model(opset=6)
    assert op_types(run_pass(training, "fold_batchnorm").model) == ["Conv", "BatchNormalization"]
