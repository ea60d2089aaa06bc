"""Tests of the channel dependency analysis on small hand-built graphs (also the graph builders of test_prune_channels)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

from onnxopt.passes.channel_groups import ChannelAnalysis, analyze_channels
from onnxopt.shapes import infer_types

RNG = np.random.default_rng(0)


def rand(*shape: int, scale: float = 0.5) -> np.ndarray:
    """Seeded normal float32 values."""
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def conv(name: str, x: str, out: str, cout: int, cin: int, k: int = 3, *, bias: bool = True, group: int = 1, stride: int = 1, inits=None):
    """A Conv node with same padding; its weight (and bias) appended to ``inits``."""
    inits.append(init(f"{name}_W", rand(cout, cin // group, k, k)))
    inputs = [x, f"{name}_W"]
    if bias:
        inits.append(init(f"{name}_B", rand(cout, scale=0.1)))
        inputs.append(f"{name}_B")
    pad = k // 2
    return helper.make_node("Conv", inputs, [out], name=name, pads=[pad] * 4, group=group, strides=[stride, stride])


def bn(name: str, x: str, out: str, channels: int, inits) -> helper.NodeProto:
    """An inference BatchNormalization with non-trivial statistics."""
    inits.append(init(f"{name}_scale", (1 + 0.3 * RNG.standard_normal(channels)).astype(np.float32)))
    inits.append(init(f"{name}_bias", rand(channels, scale=0.2)))
    inits.append(init(f"{name}_mean", rand(channels, scale=0.2)))
    inits.append(init(f"{name}_var", (0.5 + RNG.random(channels)).astype(np.float32)))
    return helper.make_node("BatchNormalization", [x, f"{name}_scale", f"{name}_bias", f"{name}_mean", f"{name}_var"], [out], name=name)


def relu(x: str, out: str) -> helper.NodeProto:
    """A Relu node named after its output."""
    return helper.make_node("Relu", [x], [out], name=f"relu_{out}")


def chain_model(hidden: int = 16) -> ModelProto:
    """x[1,3,8,8] -> c1 -> bn1 -> relu -> c2 -> y[1,8,8,8]."""
    inits: list = []
    nodes = [
        conv("c1", "x", "a", hidden, 3, inits=inits),
        bn("bn1", "a", "b", hidden, inits),
        relu("b", "r"),
        conv("c2", "r", "y", 8, hidden, inits=inits),
    ]
    return make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 8, 8, 8])], inits)


def residual_model() -> ModelProto:
    """A bottleneck block: c0 -> relu, branch ca -> relu -> cb, Add(relu(c0), cb) -> relu -> cout."""
    inits: list = []
    nodes = [
        conv("c0", "x", "a0", 16, 4, 1, inits=inits),
        relu("a0", "r0"),
        conv("ca", "r0", "a1", 8, 16, inits=inits),
        relu("a1", "r1"),
        conv("cb", "r1", "a2", 16, 8, 1, inits=inits),
        helper.make_node("Add", ["r0", "a2"], ["s"], name="add"),
        relu("s", "rs"),
        conv("cout", "rs", "y", 4, 16, 1, inits=inits),
    ]
    return make_model(nodes, [tensor_input("x", [1, 4, 8, 8])], [tensor_input("y", [1, 4, 8, 8])], inits)


def concat_model() -> ModelProto:
    """Two convs (4 and 6 channels) concatenated on the channels, read by cc."""
    inits: list = []
    nodes = [
        conv("ca", "x", "a", 4, 3, inits=inits),
        relu("a", "ra"),
        conv("cb", "x", "b", 6, 3, inits=inits),
        relu("b", "rb"),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="cat", axis=1),
        conv("cc", "cat", "y", 5, 10, 1, inits=inits),
    ]
    return make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 5, 8, 8])], inits)


def split_model() -> ModelProto:
    """c1 (8 channels) split 3 + 5 on the channels, each part read by its own conv; outputs added."""
    inits: list = [init("sizes", np.array([3, 5], np.int64))]
    nodes = [
        conv("c1", "x", "a", 8, 3, inits=inits),
        relu("a", "r"),
        helper.make_node("Split", ["r", "sizes"], ["s0", "s1"], name="split", axis=1),
        conv("cs0", "s0", "y0", 4, 3, inits=inits),
        conv("cs1", "s1", "y1", 4, 5, inits=inits),
        helper.make_node("Add", ["y0", "y1"], ["y"], name="add"),
    ]
    return make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 4, 8, 8])], inits)


def depthwise_model() -> ModelProto:
    """A MobileNet block: c1 (16) -> bn -> relu -> depthwise 3x3 -> relu -> c2."""
    inits: list = []
    nodes = [
        conv("c1", "x", "a", 16, 4, 1, inits=inits),
        bn("bn1", "a", "b", 16, inits),
        relu("b", "r"),
        conv("dw", "r", "d", 16, 16, 3, group=16, inits=inits),
        relu("d", "rd"),
        conv("c2", "rd", "y", 8, 16, 1, inits=inits),
    ]
    return make_model(nodes, [tensor_input("x", [1, 4, 8, 8])], [tensor_input("y", [1, 8, 8, 8])], inits)


def flatten_gemm_model(reshape: bool = False, alias: bool = False) -> ModelProto:
    """conv (4 channels, 3x3 output) -> relu -> Flatten (or Reshape [1, 36], its target through an Identity with ``alias``) -> Gemm."""
    inits: list = [init("B", rand(10, 36)), init("C", rand(10))]
    nodes = [conv("c1", "x", "a", 4, 3, stride=2, inits=inits), relu("a", "r")]
    if reshape:
        inits.append(init("target", np.array([1, 36], np.int64)))
        if alias:
            nodes.append(helper.make_node("Identity", ["target"], ["target_alias"], name="alias"))
        nodes.append(helper.make_node("Reshape", ["r", "target_alias" if alias else "target"], ["f"], name="flat"))
    else:
        nodes.append(helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1))
    nodes.append(helper.make_node("Gemm", ["f", "B", "C"], ["y"], name="fc", transB=1))
    return make_model(nodes, [tensor_input("x", [1, 3, 6, 6])], [tensor_input("y", [1, 10])], inits)


def mlp_model() -> ModelProto:
    """A transformer MLP: MatMul(W1) + b1 -> Gelu as Erf ops -> MatMul(W2) + b2, hidden axis last."""
    inits = [init("W1", rand(16, 32)), init("b1", rand(32)), init("W2", rand(32, 16)), init("b2", rand(16))]
    inits += [
        init("sqrt2", np.array(np.sqrt(2), np.float32)),
        init("one", np.array(1, np.float32)),
        init("half", np.array(0.5, np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
        helper.make_node("Div", ["h", "sqrt2"], ["g0"], name="gelu_div"),
        helper.make_node("Erf", ["g0"], ["g1"], name="gelu_erf"),
        helper.make_node("Add", ["g1", "one"], ["g2"], name="gelu_add"),
        helper.make_node("Mul", ["h", "g2"], ["g3"], name="gelu_mul"),
        helper.make_node("Mul", ["g3", "half"], ["g"], name="gelu_half"),
        helper.make_node("MatMul", ["g", "W2"], ["o0"], name="fc2"),
        helper.make_node("Add", ["o0", "b2"], ["y"], name="fc2_bias"),
    ]
    return make_model(nodes, [tensor_input("x", [2, 5, 16])], [tensor_input("y", [2, 5, 16])], inits)


def analyze(model: ModelProto) -> ChannelAnalysis:
    """The analysis with inferred types."""
    return analyze_channels(model, infer_types(model))


def slices(analysis: ChannelAnalysis, name: str) -> set[tuple[str, int, str]]:
    """(constant, axis, role) of the group of producer ``name``."""
    return {(s.constant, s.axis, s.role) for s in analysis.group(name).slices}


# ----------------------------------------------------------------------------- groups


def test_chain_group_slices_producer_bn_and_consumer():
    analysis = analyze(chain_model())
    group = analysis.group("c1")
    assert group.prunable and group.channels == 16 and [analysis.nodes[i].name for i in group.producers] == ["c1"]
    expected = {("c1_W", 0, "producer"), ("c1_B", 0, "producer"), ("c2_W", 1, "consumer")}
    expected |= {(f"bn1_{p}", 0, "channel") for p in ("scale", "bias", "mean", "var")}
    assert slices(analysis, "c1") == expected
    assert sorted(analysis.removal(group, 5)) == sorted((c, a, 5, 6) for c, a, _ in expected)
    assert analysis.group("c2").reasons == ["'y' is a graph output"]


def test_residual_add_ties_both_producers():
    analysis = analyze(residual_model())
    tied = analysis.group("c0")
    assert analysis.group("cb") is tied and tied.prunable
    assert sorted(analysis.nodes[i].name for i in tied.producers) == ["c0", "cb"]
    assert {analysis.nodes[i].name for i in tied.consumers()} == {"ca", "cout"}
    assert analysis.group("ca") is not tied and analysis.group("ca").channels == 8 and analysis.group("ca").prunable


def test_concat_members_map_to_offsets():
    analysis = analyze(concat_model())
    first, second = analysis.group("ca"), analysis.group("cb")
    assert first is not second and first.prunable and second.prunable
    assert ("cc_W", 1, 2, 3) in analysis.removal(first, 2)
    assert ("cc_W", 1, 6, 7) in analysis.removal(second, 2)  # behind ca's 4 channels
    assert analysis.maps["cat"].channels == 10


def test_split_hands_out_ranges_and_rewrites_sizes():
    analysis = analyze(split_model())
    group = analysis.group("c1")
    assert group.prunable and [e.kind for e in group.edits] == ["split"]
    assert ("cs0_W", 1, 2, 3) in analysis.removal(group, 2)
    assert ("cs1_W", 1, 1, 2) in analysis.removal(group, 4)  # channel 4 is channel 1 of the second part
    assert analysis.group("cs0") is analysis.group("cs1") and not analysis.group("cs0").prunable  # tied by the output Add


def test_depthwise_conv_continues_the_group():
    analysis = analyze(depthwise_model())
    group = analysis.group("c1")
    assert group.prunable
    assert {("dw_W", 0, "channel"), ("dw_B", 0, "channel"), ("c2_W", 1, "consumer")} <= slices(analysis, "c1")
    assert [(e.kind, analysis.nodes[e.node].name) for e in group.edits] == [("group", "dw")]
    assert len(analysis.groups) == 2  # c1 and the output conv: the depthwise conv is no producer


@pytest.mark.parametrize("reshape", [False, True])
def test_flatten_into_gemm_maps_rows_per_channel(reshape):
    analysis = analyze(flatten_gemm_model(reshape))
    group = analysis.group("c1")
    assert group.prunable and analysis.maps["f"].inner == 9
    assert ("B", 1, 9, 18) in analysis.removal(group, 1)
    assert [e.kind for e in group.edits] == (["reshape"] if reshape else [])
    assert analysis.group("fc").reasons == ["'y' is a graph output"]


def test_matmul_mlp_tracks_the_last_axis():
    analysis = analyze(mlp_model())
    group = analysis.group("fc1")
    assert group.prunable and group.channels == 32
    assert slices(analysis, "fc1") == {("W1", 1, "producer"), ("b1", 0, "channel"), ("W2", 0, "consumer")}
    assert analysis.maps["g"].axis == 2 and analysis.maps["g"].rank == 3
    assert not analysis.group("fc2").prunable


# ----------------------------------------------------------------------------- blocked


def blocked_model(reader: str) -> ModelProto:
    """c1 (8 channels) -> relu -> ``reader`` -> ... -> y; the reader decides whether c1's group is prunable."""
    inits: list = []
    nodes = [conv("c1", "x", "a", 8, 3, inits=inits), relu("a", "r")]
    outputs = [tensor_input("y", None)]
    if reader == "reshape":
        inits.append(init("shape", np.array([1, 8, 64], np.int64)))
        nodes.append(helper.make_node("Reshape", ["r", "shape"], ["y"], name="reader"))
    elif reader == "softmax":
        nodes += [helper.make_node("Softmax", ["r"], ["s"], name="reader", axis=1), conv("c2", "s", "y", 4, 8, inits=inits)]
    elif reader == "custom":
        nodes.append(helper.make_node("Foo", ["r"], ["y"], name="reader", domain="com.example"))
    elif reader == "subgraph":
        then = helper.make_graph([helper.make_node("Identity", ["r"], ["t"])], "then", [], [tensor_input("t", None)])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [tensor_input("e", None)])
        inits.append(init("cond", np.array(True)))
        nodes.append(helper.make_node("If", ["cond"], ["y"], name="reader", then_branch=then, else_branch=other))
    elif reader == "output":
        nodes += [conv("c2", "r", "y", 4, 8, inits=inits)]
        outputs.append(tensor_input("r", None))
    elif reader == "transpose":
        nodes += [helper.make_node("Transpose", ["r"], ["y"], name="reader", perm=[0, 2, 3, 1])]
    elif reader == "grouped":
        nodes += [conv("reader", "r", "y", 16, 8, group=8, inits=inits)]  # a depthwise conv with channel multiplier 2
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    graph = helper.make_graph(nodes, "blocked", [tensor_input("x", [1, 3, 8, 8])], outputs, inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


@pytest.mark.parametrize(
    ("reader", "reason"),
    [
        ("reshape", "'reader' (Reshape) reshapes the channels"),
        ("softmax", "'reader' (Softmax) normalises over the channels"),
        ("custom", "read by 'reader' (Foo) of domain 'com.example'"),
        ("subgraph", "read inside a subgraph of 'reader' (If)"),
        ("output", "'r' is a graph output"),
        ("transpose", "read by 'reader' (Transpose)"),
        ("grouped", "grouped 'reader' (Conv) (group=8) reads one input channel per group"),
    ],
)
def test_blocked_readers_keep_the_group_whole_with_a_reason(reader, reason):
    analysis = analyze_channels(blocked_model(reader), infer_types(blocked_model(reader)))
    group = analysis.group("c1")
    assert not group.prunable
    assert any(r.startswith(reason) for r in group.reasons), group.reasons


def test_shared_weight_blocks_both_groups():
    inits: list = []
    nodes = [conv("c1", "x", "a", 8, 3, bias=False, inits=inits), relu("a", "r1")]
    nodes.append(helper.make_node("Conv", ["x", "c1_W"], ["b"], name="c1_twin", pads=[1, 1, 1, 1]))
    nodes += [relu("b", "r2"), helper.make_node("Concat", ["r1", "r2"], ["c"], axis=1), conv("c2", "c", "y", 4, 16, inits=inits)]
    model = make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 4, 8, 8])], inits)
    analysis = analyze(model)
    for name in ("c1", "c1_twin"):
        assert analysis.group(name).reasons == ["weight 'c1_W' is shared by 2 nodes"]


def shared_bias_model() -> ModelProto:
    """Two MatMuls whose bias Adds read one shared bias, one of them through an Identity (as legacy exporters dedupe)."""
    inits = [init("W1", rand(16, 24)), init("W2", rand(16, 24)), init("bias", rand(24)), init("W3", rand(24, 8)), init("W4", rand(24, 8))]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "bias"], ["a1"], name="bias1"),
        helper.make_node("Identity", ["bias"], ["bias_alias"], name="alias"),
        helper.make_node("MatMul", ["x", "W2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "bias_alias"], ["a2"], name="bias2"),
        relu("a1", "r1"),
        relu("a2", "r2"),
        helper.make_node("MatMul", ["r1", "W3"], ["o1"], name="fc3"),
        helper.make_node("MatMul", ["r2", "W4"], ["o2"], name="fc4"),
        helper.make_node("Add", ["o1", "o2"], ["y"], name="sum"),
    ]
    return make_model(nodes, [tensor_input("x", [3, 16])], [tensor_input("y", [3, 8])], inits)


def test_shared_or_aliased_per_channel_constants_get_private_copies():
    analysis = analyze(shared_bias_model())
    for name, read_as in (("fc1", "bias"), ("fc2", "bias_alias")):
        group = analysis.group(name)
        assert group.prunable
        (bias,) = [s for s in group.slices if s.constant == read_as]
        assert bias.private and bias.source == "bias" and bias.axis == 0


def test_exclude_and_ops_limit_the_producers():
    model = residual_model()
    types = infer_types(model)
    excluded = analyze_channels(model, types, exclude=("c[b]",))
    assert "excluded by option 'exclude'" in excluded.group("c0").reasons and excluded.group("ca").prunable
    gemm_only = analyze_channels(model, types, producer_ops=("Gemm",))
    assert gemm_only.groups == []


def test_elementwise_with_untracked_activation_blocks():
    inits: list = []
    nodes = [
        conv("c1", "x", "a", 3, 3, inits=inits),
        helper.make_node("Add", ["a", "x"], ["s"], name="skip"),
        conv("c2", "s", "y", 4, 3, inits=inits),
    ]
    model = make_model(nodes, [tensor_input("x", [1, 3, 8, 8])], [tensor_input("y", [1, 4, 8, 8])], inits)
    group = analyze(model).group("c1")
    assert group.reasons == ["'skip' (Add) combines the channels with 'x', which is not a per-channel constant"]


def test_analysis_does_not_mutate_the_model():
    model = depthwise_model()
    before = model.SerializeToString()
    analyze(model)
    assert model.SerializeToString() == before


def test_float16_model_is_analysed():
    model = chain_model()
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    assert analyze(model).group("c1").prunable
