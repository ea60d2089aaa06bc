"""Tests of fuse_contrib: BiasGelu / FastGelu with bias, SkipLayerNormalization, targets and guards."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, op_types, session_graph, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt
import onnxopt.passes.fuse_contrib  # noqa: F401  (registers the pass)
from onnxopt.errors import OptionError

PASS = "fuse_contrib"
# SkipLayerNormalization is opt-in on ort-cpu (slower kernel there); the rule tests opt in.
PASS_ALL = "fuse_contrib:skip_layernorm_on_cpu=true"
F32 = TensorProto.FLOAT
H = 8
RNG = np.random.default_rng(0)


def weights(*shape: int, dtype: type = np.float32) -> np.ndarray:
    """Random weights of ``shape``."""
    return RNG.standard_normal(shape).astype(dtype)


def run(model: ModelProto, passes: str = PASS_ALL, target: str = "ort-cpu") -> onnxopt.OptimizeResult:
    """Optimize ``model`` on ``target`` without fault isolation (bugs raise)."""
    return onnxopt.optimize(model, passes, target=target, isolate=False)


def ops(model: ModelProto) -> list[str]:
    """The main graph's ops, prefixed by their domain when not standard."""
    return [f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node]


def domains(model: ModelProto) -> dict[str, int]:
    """The model's opset imports by domain."""
    return {imp.domain: imp.version for imp in model.opset_import}


def node_of(model: ModelProto, op_type: str) -> onnx.NodeProto:
    """The main graph's only node of ``op_type``."""
    found = [n for n in model.graph.node if n.op_type == op_type]
    assert len(found) == 1, ops(model)
    return found[0]


# ----------------------------------------------------------------------------- SkipLayerNormalization


def residual_ln(
    *,
    x_shape: tuple = (2, 3, H),
    skip_shape: tuple | None = None,
    bias: bool = False,
    axis: int = -1,
    gamma_input: bool = False,
    beta: bool = True,
    sum_read: bool = False,
    bias_read: bool = False,
    dtype: int = F32,
    opset: int = 17,
) -> ModelProto:
    """x -> MatMul(W) [+ b] -> + skip -> LayerNormalization(gamma, beta) -> y, with optional extra readers."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    hidden = x_shape[-1] if isinstance(x_shape[-1], int) else H
    norm = [hidden] if axis == -1 else [3, hidden]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"])]
    inits = [init("w", weights(hidden, hidden, dtype=np_dtype)), init("gamma", weights(*norm, dtype=np_dtype) + 1)]
    last = "m"
    if bias:
        nodes.append(helper.make_node("Add", ["m", "b"], ["mb"]))
        inits.append(init("b", weights(hidden, dtype=np_dtype)))
        last = "mb"
    nodes.append(helper.make_node("Add", [last, "skip"], ["s"]))
    ln_inputs = ["s", "gamma_in" if gamma_input else "gamma"]
    if beta:
        ln_inputs.append("beta")
        inits.append(init("beta", weights(*norm, dtype=np_dtype)))
    nodes.append(helper.make_node("LayerNormalization", ln_inputs, ["y"], axis=axis, epsilon=1e-3))
    inputs = [tensor_input("x", x_shape, dtype), tensor_input("skip", skip_shape or x_shape, dtype)]
    if gamma_input:
        inputs.append(tensor_input("gamma_in", norm, dtype))
    outputs = [tensor_input("y", x_shape, dtype)]
    if sum_read:
        nodes.append(helper.make_node("Add", ["y", "s"], ["next"]))
        outputs.append(tensor_input("next", x_shape, dtype))
    if bias_read:
        nodes.append(helper.make_node("Neg", ["mb"], ["nb"]))
        outputs.append(tensor_input("nb", x_shape, dtype))
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def test_skip_layernorm() -> None:
    model = residual_ln()
    result = run(model)
    assert ops(result.model) == ["MatMul", "com.microsoft:SkipLayerNormalization"]
    node = node_of(result.model, "SkipLayerNormalization")
    assert list(node.input) == ["m", "skip", "gamma", "beta"] and list(node.output) == ["y"]
    assert [a.f for a in node.attribute if a.name == "epsilon"] == [pytest.approx(1e-3)]
    assert domains(result.model) == {"": 17, "com.microsoft": 1}
    assert next(r.counts for r in result.report.passes if r.name == PASS) == {"skip_layernorm": 1}
    assert_equivalent(model, result.model)


def test_skip_layernorm_absorbs_bias_add_and_no_beta() -> None:
    model = residual_ln(bias=True, beta=False)
    result = run(model)
    assert ops(result.model) == ["MatMul", "com.microsoft:SkipLayerNormalization"]
    assert list(node_of(result.model, "SkipLayerNormalization").input) == ["m", "skip", "gamma", "", "b"]
    assert_equivalent(model, result.model)


def test_sum_read_elsewhere_uses_fourth_output() -> None:
    """The residual of the next block reads the sum: input_skip_bias_sum (checked against onnxruntime 1.32) writes it."""
    model = residual_ln(bias=True, sum_read=True)
    result = run(model)
    node = node_of(result.model, "SkipLayerNormalization")
    assert list(node.output) == ["y", "", "", "s"]
    assert ops(result.model) == ["MatMul", "com.microsoft:SkipLayerNormalization", "Add"]
    assert_equivalent(model, result.model)


def test_sum_as_graph_output() -> None:
    model = residual_ln()
    model.graph.output.append(tensor_input("s", (2, 3, H)))
    result = run(model)
    assert list(node_of(result.model, "SkipLayerNormalization").output) == ["y", "", "", "s"]
    assert_equivalent(model, result.model)


def test_shared_bias_add_is_not_absorbed() -> None:
    """The biased value is read outside the pattern: the bias Add stays, the residual Add still fuses."""
    model = residual_ln(bias=True, bias_read=True)
    result = run(model)
    assert ops(result.model) == ["MatMul", "Add", "com.microsoft:SkipLayerNormalization", "Neg"]
    assert list(node_of(result.model, "SkipLayerNormalization").input) == ["mb", "skip", "gamma", "beta"]
    assert_equivalent(model, result.model)


def test_dynamic_shapes() -> None:
    model = residual_ln(x_shape=("batch", "seq", H))
    result = run(model)
    assert "com.microsoft:SkipLayerNormalization" in ops(result.model)
    for shape in ((1, 5, H), (3, 2, H)):
        assert_equivalent(model, result.model, input_shapes={"x": shape, "skip": shape})


@pytest.mark.parametrize("target", ["portable", "trt"])
def test_other_targets_untouched(target) -> None:
    model = residual_ln(bias=True)
    result = run(model, target=target)
    assert ops(result.model) == ["MatMul", "Add", "Add", "LayerNormalization"]
    assert domains(result.model) == {"": 17}


def test_broadcast_skip() -> None:
    """A (1, S, H) skip fuses on ort-cpu (onnxruntime 1.32 takes it), not on ort-gpu; a (B, 1, H) skip never."""
    model = residual_ln(skip_shape=(1, 3, H))
    fused = run(model)
    assert "com.microsoft:SkipLayerNormalization" in ops(fused.model)
    assert_equivalent(model, fused.model)
    assert "LayerNormalization" in ops(run(model, target="ort-gpu").model)
    bad = residual_ln(skip_shape=(2, 1, H))
    assert ops(run(bad).model) == ["MatMul", "Add", "LayerNormalization"]


def test_input_that_broadcasts_is_not_the_sum_shape() -> None:
    """Add(x (1,3,H), skip (2,3,H)): no operand has the sum's shape and the skip cannot broadcast."""
    model = residual_ln(x_shape=(1, 3, H), skip_shape=(2, 3, H))
    model.graph.output[0].CopyFrom(tensor_input("y", (2, 3, H)))
    result = run(model)
    assert "com.microsoft:SkipLayerNormalization" not in ops(result.model)


def test_unprovable_symbolic_shapes() -> None:
    model = residual_ln(x_shape=("a", "b", H), skip_shape=("c", "d", H))
    result = run(model)
    assert ops(result.model) == ["MatMul", "Add", "LayerNormalization"]


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"axis": -2}, "normalizes two axes"),
        ({"gamma_input": True}, "gamma is not a constant"),
        ({"x_shape": (2, 3, 4, H)}, "4-D"),
        ({"x_shape": (6, H)}, "2-D"),
        ({"dtype": TensorProto.DOUBLE}, "no double kernel"),
    ],
)
def test_skip_layernorm_guards(kwargs, why) -> None:
    model = residual_ln(**kwargs)
    result = run(model)
    assert "LayerNormalization" in ops(result.model), why
    assert "com.microsoft" not in domains(result.model)
    assert_equivalent(model, result.model)


def test_unknown_rank_is_left_alone() -> None:
    """The sum's rank is unknown (an Add of Reshapes to a shape given at run time)."""
    model = residual_ln()
    graph = model.graph
    graph.node[1].input[0] = "mr"
    graph.node[1].input[1] = "sr"
    graph.node.insert(1, helper.make_node("Reshape", ["m", "shape"], ["mr"]))
    graph.node.insert(2, helper.make_node("Reshape", ["skip", "shape"], ["sr"]))
    graph.input.append(tensor_input("shape", ["n"], TensorProto.INT64))
    result = run(model)
    assert "LayerNormalization" in ops(result.model)
    feeds = {"x": weights(2, 3, H), "skip": weights(2, 3, H), "shape": np.array([3, 2, H])}
    assert_equivalent(model, result.model, feeds)


def test_layernorm_writing_mean_is_left_alone() -> None:
    model = residual_ln()
    node = model.graph.node[-1]
    node.output.append("mean")
    model.graph.output.append(tensor_input("mean", (2, 3, 1)))
    assert "LayerNormalization" in ops(run(model).model)


def test_two_blocks_fuse_in_one_run_and_types_survive() -> None:
    """Block 2 reads block 1's SkipLayerNormalization output; a later run still proves the shapes (stand-in inference)."""
    nodes = [
        helper.make_node("Add", ["x", "skip"], ["s1"]),
        helper.make_node("LayerNormalization", ["s1", "gamma", "beta"], ["y1"]),
        helper.make_node("MatMul", ["y1", "w"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["r"]),
        helper.make_node("Add", ["r", "y1"], ["s2"]),
        helper.make_node("LayerNormalization", ["s2", "gamma", "beta"], ["y"]),
    ]
    inits = [init("w", weights(H, H)), init("gamma", weights(H) + 1), init("beta", weights(H)), init("shape", np.array([0, 0, H]))]
    shape = ("batch", "seq", H)
    model = make_model(nodes, [tensor_input("x", shape), tensor_input("skip", shape)], [tensor_input("y", shape)], inits)
    once = run(model, f"{PASS_ALL},kinds=skip_layernorm")
    assert ops(once.model).count("com.microsoft:SkipLayerNormalization") == 2
    assert_equivalent(model, once.model, input_shapes={"x": (2, 5, H), "skip": (2, 5, H)})
    # first block fused by an earlier run: the second one is still matched from the stand-in types
    first = make_model(nodes[:2], [tensor_input("x", shape), tensor_input("skip", shape)], [tensor_input("y1", shape)], inits[1:3])
    partial = run(first)
    graph = partial.model.graph
    graph.node.extend(nodes[2:])
    graph.initializer.extend([inits[0], inits[3]])
    del graph.output[:]
    graph.output.append(tensor_input("y", shape))
    again = run(partial.model)
    assert ops(again.model).count("com.microsoft:SkipLayerNormalization") == 2
    assert_equivalent(model, again.model, input_shapes={"x": (2, 5, H), "skip": (2, 5, H)})


# ----------------------------------------------------------------------------- BiasGelu / FastGelu with bias


def erf_gelu_steps(x: str) -> list[onnx.NodeProto]:
    """The torch legacy exporter's erf GELU of ``x`` writing ``g``."""
    return [
        helper.make_node("Div", [x, "k"], ["u"]),
        helper.make_node("Erf", ["u"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", [x, "a"], ["p"]),
        helper.make_node("Mul", ["p", "half"], ["g"]),
    ]


def tanh_gelu_steps(x: str) -> list[onnx.NodeProto]:
    """torch's tanh GELU of ``x`` writing ``g``."""
    return [
        helper.make_node("Pow", [x, "three"], ["x3"]),
        helper.make_node("Mul", ["x3", "c3"], ["t"]),
        helper.make_node("Add", [x, "t"], ["s"]),
        helper.make_node("Mul", ["s", "c"], ["u"]),
        helper.make_node("Tanh", ["u"], ["h"]),
        helper.make_node("Add", ["h", "one"], ["a"]),
        helper.make_node("Mul", ["half", x], ["p"]),
        helper.make_node("Mul", ["p", "a"], ["g"]),
    ]


SCALARS = {"k": math.sqrt(2.0), "one": 1.0, "half": 0.5, "three": 3.0, "c3": 0.044715, "c": math.sqrt(2 / math.pi)}


def biased_gelu(form: str = "erf", *, bias: np.ndarray | None = None, bias_read: bool = False, opset: int = 17) -> ModelProto:
    """x -> MatMul(W) -> + bias -> GELU -> Neg -> y."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["mb"])]
    if form == "standard":
        nodes.append(helper.make_node("Gelu", ["mb"], ["g"]))
    else:
        nodes.extend(erf_gelu_steps("mb") if form == "erf" else tanh_gelu_steps("mb"))
    nodes.append(helper.make_node("Neg", ["g"], ["y"]))
    inits = [init("w", weights(H, 4 * H)), init("b", weights(4 * H) if bias is None else bias)]
    inits += [init(name, np.array(value, np.float32)) for name, value in SCALARS.items()]
    outputs = [tensor_input("y", (2, 3, 4 * H))]
    if bias_read:
        outputs.append(tensor_input("mb", (2, 3, 4 * H)))
    return make_model(nodes, [tensor_input("x", (2, 3, H))], outputs, inits, opset=opset)


@pytest.mark.parametrize(("form", "opset", "op_type"), [("erf", 17, "BiasGelu"), ("tanh", 17, "FastGelu"), ("standard", 20, "BiasGelu")])
def test_bias_gelu(form, opset, op_type) -> None:
    model = biased_gelu(form, opset=opset)
    result = run(model, "fuse_activations,fuse_contrib")
    assert ops(result.model) == ["MatMul", f"com.microsoft:{op_type}", "Neg"]
    assert list(node_of(result.model, op_type).input) == ["m", "b"]
    assert domains(result.model)["com.microsoft"] == 1
    assert_equivalent(model, result.model)


def test_bias_of_shape_1_1_h_is_made_1d() -> None:
    model = biased_gelu(bias=weights(1, 1, 4 * H))
    result = run(model, "fuse_activations,fuse_contrib")
    node = node_of(result.model, "BiasGelu")
    bias = next(t for t in result.model.graph.initializer if t.name == node.input[1])
    assert list(bias.dims) == [4 * H]
    assert_equivalent(model, result.model)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"bias_read": True}, "the biased value is a graph output"),
        ({"bias": weights(3, 4 * H)}, "the bias varies along the sequence axis"),
        ({"bias": weights(1)}, "a scalar bias is not a vector of the hidden size"),
    ],
)
def test_bias_gelu_guards(kwargs, why) -> None:
    model = biased_gelu(**kwargs)
    result = run(model, "fuse_activations,fuse_contrib")
    assert "com.microsoft:BiasGelu" not in ops(result.model), why
    assert "com.microsoft:Gelu" in ops(result.model)
    assert_equivalent(model, result.model)


def test_standard_gelu_with_two_readers_of_the_sum() -> None:
    model = biased_gelu("standard", opset=20)
    model.graph.node.append(helper.make_node("Neg", ["mb"], ["z"]))
    model.graph.output.append(tensor_input("z", (2, 3, 4 * H)))
    result = run(model)
    assert ops(result.model) == ["MatMul", "Add", "Gelu", "Neg", "Neg"]
    assert "com.microsoft" not in domains(result.model)


def test_portable_standard_gelu_untouched() -> None:
    model = biased_gelu("standard", opset=20)
    assert ops(run(model, target="portable").model) == ["MatMul", "Add", "Gelu", "Neg"]


# ----------------------------------------------------------------------------- pass-level


def test_deterministic() -> None:
    model = residual_ln(bias=True, sum_read=True)
    first = run(model, "fuse_activations,fuse_contrib").model.SerializeToString()
    second = run(model, "fuse_activations,fuse_contrib").model.SerializeToString()
    assert first == second


def test_kinds_option() -> None:
    model = residual_ln()
    assert "LayerNormalization" in ops(run(model, "fuse_contrib:kinds=bias_gelu").model)
    with pytest.raises(OptionError, match="unknown kind 'nope'"):
        run(model, "fuse_contrib:kinds=nope")


def test_subgraph_is_fused() -> None:
    inner = residual_ln().graph
    then = helper.make_graph(list(inner.node), "then", [], [tensor_input("y", (2, 3, H))], list(inner.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [], [tensor_input("y2", (2, 3, H))])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other)
    inputs = [tensor_input("cond", (), TensorProto.BOOL), tensor_input("x", (2, 3, H)), tensor_input("skip", (2, 3, H))]
    model = make_model([node], inputs, [tensor_input("out", (2, 3, H))])
    result = run(model)
    branch = next(a.g for a in result.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["MatMul", "SkipLayerNormalization"]
    feeds = {"cond": np.array(True), "x": weights(2, 3, H), "skip": weights(2, 3, H)}
    assert_equivalent(model, result.model, feeds)


def test_skip_layernorm_is_opt_in_on_ort_cpu_only():
    model = residual_ln()
    assert "com.microsoft:SkipLayerNormalization" not in ops(run(model, PASS).model)
    assert "com.microsoft:SkipLayerNormalization" in ops(run(model, PASS, target="ort-gpu").model)
    fused = run(model, PASS_ALL).model
    assert "com.microsoft:SkipLayerNormalization" in ops(fused)
    assert_equivalent(model, fused)


def test_left_for_a_later_qdq() -> None:
    """With qdq later in the run, the bias Add stays next to the MatMul (onnxruntime fuses it into the INT8 MatMul)."""
    model = biased_gelu("erf", opset=17)
    result = onnxopt.optimize(model, "fuse_activations,fuse_contrib,qdq", target="ort-cpu", calibration="random", isolate=False)
    assert not any(n.domain == "com.microsoft" and n.op_type in ("BiasGelu", "FastGelu") for n in result.model.graph.node)
    assert any("skipped: qdq runs later" in w for w in result.report.notes)


# ----------------------------------------------------------------------------- residual Sum (ort-cpu)


@pytest.mark.parametrize("x_shape", [(2, 3, H), ("batch", "seq", H)])
def test_residual_add_becomes_sum_so_onnxruntime_keeps_its_fast_layernorm(x_shape, tmp_path) -> None:
    """ort-cpu: onnxruntime fuses the original's Add + LayerNormalization into its slow SkipLayerNormalization, not the Sum."""
    model = residual_ln(x_shape=x_shape, bias=True)
    result = run(model, PASS)
    assert ops(result.model) == ["MatMul", "Add", "Sum", "LayerNormalization"]
    assert "SkipLayerNormalization" in op_types(session_graph(model, tmp_path))
    assert "SkipLayerNormalization" not in op_types(session_graph(result.model, tmp_path))
    assert_equivalent(model, result.model, {"x": weights(2, 3, H), "skip": weights(2, 3, H)})


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"sum_read": True}, "the sum is also read by the next block (onnxruntime does not fuse it)"),
        ({"dtype": TensorProto.FLOAT16}, "float16: only float32 is rewritten"),
    ],
)
def test_residual_sum_guards(kwargs, why) -> None:
    model = residual_ln(**kwargs)
    result = run(model, PASS)
    assert "Sum" not in ops(result.model), why
    assert_equivalent(model, result.model)


def test_residual_sum_leaves_bias_adds_and_graph_outputs() -> None:
    """An Add of a constant (a bias) and an Add whose sum is a graph output stay Adds."""
    model = residual_ln()
    model.graph.node[1].input[1] = "c"
    model.graph.initializer.append(init("c", weights(2, 3, H)))
    model.graph.input.pop()
    assert "Sum" not in ops(run(model, PASS).model)
    exposed = residual_ln()
    exposed.graph.output.append(tensor_input("s", (2, 3, H)))
    assert "Sum" not in ops(run(exposed, PASS).model)


def test_residual_sum_is_ort_cpu_only_and_gives_way_to_skip_layernorm() -> None:
    model = residual_ln()
    assert "Sum" not in ops(run(model, PASS, target="ort-gpu").model)
    assert "Sum" not in ops(run(model, PASS, target="portable").model)
    assert "Sum" not in ops(run(model, PASS_ALL).model)
    assert "Sum" not in ops(run(model, "fuse_contrib:kinds=bias_gelu").model)
