"""Tests of fuse_attention: exporter attention forms (legacy eager, sdpa, dynamo), each target, guards."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent, init, make_model, tensor_input
from onnx import ModelProto, TensorProto, helper

import onnxopt
import onnxopt.passes.fuse_attention  # noqa: F401  (registers the pass)

PASS = "fuse_attention"
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
N, H = 2, 4
D = N * H
RNG = np.random.default_rng(0)
WEIGHTS = {k: (0.3 * RNG.standard_normal((D, D))).astype(np.float32) for k in "qkvo"}
BIASES = {k: (0.1 * RNG.standard_normal(D)).astype(np.float32) for k in "qkv"}
MIN = float(np.finfo(np.float32).min)


def ints(name: str, values: list[int]) -> TensorProto:
    """A 1-D int64 initializer."""
    return init(name, np.array(values, np.int64))


def attention(
    *,
    style: str = "eager",
    opset: int = 17,
    batch: int | str = "B",
    seq: int | str = "S",
    mask: str = "padding",
    k_form: str = "direct",
    scale: str = "div",
    bias: bool = True,
    softmax_axis: int = -1,
    extra_output: str = "",
    extra_reader: str = "",
    shared_weight: bool = False,
    mask_shape: tuple[int | str, ...] | None = None,
    unproven_out: bool = False,
    scaled_value: bool = False,
) -> ModelProto:
    """x (B, S, D) [+ attention_mask (B, S)] -> one exporter attention block -> out-proj MatMul -> y.

    style "eager": constant Reshape targets [0, 0, N, H] / [0, 0, D], the scale on the scores,
    the extended mask (1 - m) * min as (B, 1, 1, S). style "sdpa": Shape/Gather/Concat targets,
    sqrt(scale) on Q and K separately, a (B, 1, S, S) Where(bool, 0, -inf) mask and the
    IsNaN/Where guard after the Softmax, an identity Reshape after the value MatMul.
    """
    nodes: list[onnx.NodeProto] = []
    inits = [init(f"W{k}", WEIGHTS[k]) for k in "qkvo"]
    inputs = [tensor_input("x", [batch, seq, D])]
    inits += [ints("heads_shape", [0, 0, N, H]), ints("merge_shape", [0, 0, D])]
    sdpa = style == "sdpa"
    if sdpa:
        inits += [ints("i0", [0]), ints("i1", [1]), ints("i2", [2]), ints("cNH", [N, H]), ints("cm1", [-1])]
        nodes += [
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Gather", ["xs", "i0"], ["xb"], axis=0),
            helper.make_node("Gather", ["xs", "i1"], ["xq"], axis=0),
            helper.make_node("Concat", ["xb", "xq", "cNH"], ["split_shape"], axis=0),
        ]
    for k in "qkv":
        w = "Wq" if shared_weight and k == "k" else f"W{k}"
        nodes.append(helper.make_node("MatMul", ["x", w], [f"{k}m" if bias else f"{k}3"]))
        if bias:
            inits.append(init(f"b{k}", BIASES[k]))
            nodes.append(helper.make_node("Add", [f"{k}m", f"b{k}"], [f"{k}3"]))
        nodes.append(helper.make_node("Reshape", [f"{k}3", "split_shape" if sdpa else "heads_shape"], [f"{k}r"]))
    nodes.append(helper.make_node("Transpose", ["qr"], ["qt"], perm=[0, 2, 1, 3]))
    nodes.append(helper.make_node("Transpose", ["vr"], ["vt"], perm=[0, 2, 1, 3]))
    if k_form == "direct":
        nodes.append(helper.make_node("Transpose", ["kr"], ["kT"], perm=[0, 2, 3, 1]))
    elif k_form == "double":
        nodes.append(helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Transpose", ["kt"], ["kT"], perm=[0, 1, 3, 2]))
    else:  # "3d": the dynamo sdpa form, K^T through a 3-D reshape
        inits += [ints("sl_m1", [-1]), ints("sl_big", [2**62]), ints("sl_m2", [-2]), ints("sl_min", [-(2**62)])]
        nodes += [
            helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 2, 1, 3]),
            helper.make_node("Shape", ["kt"], ["kts"]),
            helper.make_node("Slice", ["kts", "sl_m1", "sl_big"], ["k_last"]),
            helper.make_node("Slice", ["kts", "sl_m2", "sl_m1"], ["k_seq"]),
            helper.make_node("Slice", ["kts", "sl_min", "sl_m2"], ["k_lead"]),
            helper.make_node("Concat", ["sl_m1", "k_seq", "k_last"], ["k3d_shape"], axis=0),
            helper.make_node("Reshape", ["kt", "k3d_shape"], ["k3d"]),
            helper.make_node("Transpose", ["k3d"], ["k3dT"], perm=[0, 2, 1]),
            helper.make_node("Concat", ["k_lead", "k_last", "k_seq"], ["k4d_shape"], axis=0),
            helper.make_node("Reshape", ["k3dT", "k4d_shape"], ["kT"]),
        ]
    q_in, k_in = "qt", "kT"
    if scale == "qk":
        inits.append(init("sqrt_scale", np.array(H**-0.25, np.float32)))
        nodes += [helper.make_node("Mul", ["qt", "sqrt_scale"], ["qs"]), helper.make_node("Mul", ["kT", "sqrt_scale"], ["ks"])]
        q_in, k_in = "qs", "ks"
    nodes.append(helper.make_node("MatMul", [q_in, k_in], ["scores"]))
    scaled = "scores"
    if scale == "div":
        inits.append(init("sqrt_h", np.array(np.sqrt(H), np.float32)))
        nodes.append(helper.make_node("Div", ["scores", "sqrt_h"], ["scaled"]))
        scaled = "scaled"
    elif scale == "mul":
        inits.append(init("inv_sqrt_h", np.array(1 / np.sqrt(H), np.float32)))
        nodes.append(helper.make_node("Mul", ["inv_sqrt_h", "scores"], ["scaled"]))
        scaled = "scaled"
    elif scale == "input":
        inputs.append(tensor_input("s_in", []))
        nodes.append(helper.make_node("Mul", ["scores", "s_in"], ["scaled"]))
        scaled = "scaled"
    logits = scaled
    if mask == "padding":  # legacy eager: (1 - m) * min, shape (B, 1, 1, S)
        inputs.append(tensor_input("attention_mask", [batch, seq], I64))
        inits += [ints("ax12", [1, 2]), init("one", np.array(1.0, np.float32)), init("fmin", np.array(MIN, np.float32))]
        nodes += [
            helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
            helper.make_node("Cast", ["m4"], ["mf"], to=F32),
            helper.make_node("Sub", ["one", "mf"], ["inv"]),
            helper.make_node("Mul", ["inv", "fmin"], ["ext"]),
            helper.make_node("Add", [scaled, "ext"], ["logits"]),
        ]
        logits = "logits"
    elif mask in ("where", "where_min"):  # sdpa: Where(Expand(bool (B, 1, 1, S), (B, 1, S, S)), 0, -inf or min)
        inputs.append(tensor_input("attention_mask", [batch, seq], I64))
        low = -np.inf if mask == "where" else MIN
        inits += [ints("ax12", [1, 2]), init("zero", np.array(0.0, np.float32)), init("ninf", np.array(low, np.float32))]
        nodes += [
            helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
            helper.make_node("Cast", ["m4"], ["mb"], to=TensorProto.BOOL),
            helper.make_node("Gather", ["xs", "i1"], ["xq2"], axis=0),
            helper.make_node("Concat", ["xb", "i1", "xq2", "xq"], ["mshape"], axis=0),
            helper.make_node("Expand", ["mb", "mshape"], ["mbe"]),
            helper.make_node("Where", ["mbe", "zero", "ninf"], ["ext"]),
            helper.make_node("Add", [scaled, "ext"], ["logits"]),
        ]
        logits = "logits"
    elif mask == "input":
        inputs.append(tensor_input("mask", list(mask_shape or (batch, 1, seq, seq))))
        nodes.append(helper.make_node("Add", [scaled, "mask"], ["logits"]))
        logits = "logits"
    nodes.append(helper.make_node("Softmax", [logits], ["probs"], axis=softmax_axis))
    probs = "probs"
    if sdpa:
        inits.append(init("fzero", np.array(0.0, np.float32)))
        nodes += [helper.make_node("IsNaN", ["probs"], ["nan"]), helper.make_node("Where", ["nan", "fzero", "probs"], ["probs_ok"])]
        probs = "probs_ok"
    value = "vt"
    if scaled_value:  # a constant factor on V is not part of the softmax scale
        inits.append(init("v_factor", np.array(2.0, np.float32)))
        nodes.append(helper.make_node("Mul", ["vt", "v_factor"], ["vt_scaled"]))
        value = "vt_scaled"
    nodes.append(helper.make_node("MatMul", [probs, value], ["ctx"]))
    ctx = "ctx"
    if sdpa:  # identity Reshape from shapes of the pattern's own tensors
        nodes += [
            helper.make_node("Shape", ["ctx"], ["cs"]),
            helper.make_node("Gather", ["cs", "i0"], ["cb"], axis=0),
            helper.make_node("Shape", ["qt"], ["qts"]),
            helper.make_node("Gather", ["qts", "i2"], ["cq"], axis=0),
            helper.make_node("Concat", ["cb", "cm1", "cq", init_name(inits, "cH", [H])], ["ctx_shape"], axis=0),
            helper.make_node("Reshape", ["ctx", "ctx_shape"], ["ctx_id"]),
        ]
        ctx = "ctx_id"
    nodes.append(helper.make_node("Transpose", [ctx], ["ctx_t"], perm=[0, 2, 1, 3]))
    merge = "out_shape" if sdpa else "merge_shape"
    if sdpa:
        nodes.append(helper.make_node("Concat", ["xb", "xq", "cm1"], ["out_shape"], axis=0))
    if unproven_out:  # the output Reshape takes its dims from an unrelated input: it cannot be proven, so it stays
        inputs.append(tensor_input("other", ["P", "Q"]))
        inits.append(ints("cm1_out", [-1]))
        nodes += [
            helper.make_node("Shape", ["other"], ["other_shape"]),
            helper.make_node("Concat", ["other_shape", "cm1_out"], ["free_shape"], axis=0),
        ]
        merge = "free_shape"
    nodes.append(helper.make_node("Reshape", ["ctx_t", merge], ["attn"]))
    nodes.append(helper.make_node("MatMul", ["attn", "Wo"], ["y"]))
    outputs = [tensor_input("y", ["Y0", "Y1", "Y2"] if unproven_out else [batch, "Y" if mask_shape else seq, D])]
    rank = {"k3": 3}
    if extra_output:
        outputs.append(tensor_input(extra_output, [f"{extra_output}_{i}" for i in range(rank.get(extra_output, 4))]))
    if extra_reader.startswith("Shape:"):  # a shape computation of another block reads an intermediate's shape
        nodes.append(helper.make_node("Shape", [extra_reader[6:]], ["side"], start=0, end=3))
        outputs.append(tensor_input("side", [3], I64))
    elif extra_reader:
        nodes.append(helper.make_node("Neg", [extra_reader], ["side"]))
        outputs.append(tensor_input("side", [f"side_{i}" for i in range(rank.get(extra_reader, 4))]))
    return make_model(nodes, inputs, outputs, inits, opset=opset, ir_version=11 if opset >= 23 else 8)


def init_name(inits: list[TensorProto], name: str, values: list[int]) -> str:
    """Add a 1-D int64 initializer and return its name (for building node lists inline)."""
    inits.append(ints(name, values))
    return name


def feeds(model: ModelProto, batch: int = 2, seq: int = 5, *, full_pad_row: bool = False) -> dict[str, np.ndarray]:
    """Inputs for ``model``: x, a padding mask with ragged lengths (optionally one row fully padded), other inputs."""
    rng = np.random.default_rng(1)
    out: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name == "x":
            out["x"] = rng.standard_normal((batch, seq, D)).astype(np.float32)
        elif value.name == "attention_mask":
            m = np.ones((batch, seq), np.int64)
            for b in range(batch):
                m[b, max(1, seq - b) :] = 0
            if full_pad_row:
                m[0] = 0
            out["attention_mask"] = m
        elif value.name == "other":
            out["other"] = np.zeros((batch, seq), np.float32)
        elif value.name == "s_in":
            out["s_in"] = np.array(0.5, np.float32)
        elif value.name == "mask":
            dims = [d.dim_value or {"B": batch, "S": seq}[d.dim_param] for d in value.type.tensor_type.shape.dim]
            out["mask"] = rng.standard_normal(dims).astype(np.float32)
    return out


def optimize(model: ModelProto, target: str = "ort-cpu", passes: str = PASS) -> onnxopt.OptimizeResult:
    """Run the pass on a copy of ``model`` for ``target`` without fault isolation."""
    copy = ModelProto()
    copy.CopyFrom(model)
    return onnxopt.optimize(copy, passes, target=target, isolate=False)


def counts(result: onnxopt.OptimizeResult) -> dict[str, int]:
    """The counts of the fuse_attention run."""
    return next(r.counts for r in result.report.passes if r.name == PASS)


def ops(model: ModelProto) -> list[tuple[str, str]]:
    """(domain, op_type) of the main graph's nodes."""
    return [(n.domain, n.op_type) for n in model.graph.node]


def check(model: ModelProto, result: onnxopt.OptimizeResult, **feed_args) -> None:
    """The rewritten model computes what the original did, on the default and on a second shape."""
    assert_equivalent(model, result.model, feeds(model, **feed_args))
    if model.graph.input[0].type.tensor_type.shape.dim[0].dim_param:
        assert_equivalent(model, result.model, feeds(model, batch=3, seq=7, **feed_args))


# ----------------------------------------------------------------------------- forms and targets


@pytest.mark.parametrize("scale", ["div", "mul", "none"])
@pytest.mark.parametrize("k_form", ["direct", "double"])
def test_eager_fuses_packed(scale: str, k_form: str) -> None:
    model = attention(scale=scale, k_form=k_form)
    result = optimize(model)
    assert counts(result) == {"attention": 1}
    kinds = ops(result.model)
    assert ("com.microsoft", "Attention") in kinds
    assert not any(op in ("Softmax", "Transpose", "Reshape") for _, op in kinds)
    assert [n.op_type for n in result.model.graph.node].count("MatMul") == 1  # only the output projection is left
    assert any(o.domain == "com.microsoft" and o.version == 1 for o in result.model.opset_import)
    node = next(n for n in result.model.graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == N
    assert attrs["scale"] == pytest.approx(1.0 if scale == "none" else 1 / np.sqrt(H), rel=1e-6)
    check(model, result)


@pytest.mark.parametrize("target", ["ort-cpu", "ort-gpu"])
def test_eager_multihead_without_packing(target: str) -> None:
    model = attention()
    result = optimize(model, target, "fuse_attention:packed=false")
    kinds = ops(result.model)
    assert ("com.microsoft", "MultiHeadAttention") in kinds
    assert [op for _, op in kinds].count("MatMul") == 4  # the projections stay
    check(model, result)


def test_eager_without_bias_packs_zero_bias() -> None:
    model = attention(bias=False)
    result = optimize(model)
    assert ("com.microsoft", "Attention") in ops(result.model)
    check(model, result)


@pytest.mark.parametrize("k_form", ["direct", "double", "3d"])
def test_sdpa_form(k_form: str) -> None:
    model = attention(style="sdpa", mask="where", scale="qk", k_form=k_form)
    result = optimize(model)
    assert counts(result) == {"attention": 1}
    kinds = [op for _, op in ops(result.model)]
    assert "Softmax" not in kinds and "Transpose" not in kinds
    assert kinds.count("IsNaN") == 1  # the -inf mask is not finite: the guard moves to the output
    check(model, result)
    check(model, result, full_pad_row=True)  # a fully masked row gives 0, as in the original


def test_sdpa_guard_absorbed_for_finite_mask() -> None:
    model = attention(style="sdpa", mask="where_min", scale="qk")
    result = optimize(model)
    assert counts(result) == {"attention": 1}
    assert "IsNaN" not in [op for _, op in ops(result.model)]  # Where(bool, 0, min) cannot make a NaN row
    check(model, result)
    check(model, result, full_pad_row=True)


def test_dynamic_shapes_and_static_shapes() -> None:
    model = attention(style="sdpa", mask="where", scale="qk", k_form="3d")
    result = optimize(model)
    for batch, seq in ((1, 1), (2, 5), (4, 9)):
        assert_equivalent(model, result.model, feeds(model, batch, seq))
    static = attention(batch=1, seq=6)
    fused = optimize(static)
    assert counts(fused) == {"attention": 1}
    assert_equivalent(static, fused.model, feeds(static, 1, 6))


@pytest.mark.parametrize("shape", [("B", 1, "S", "S"), (1, 1, "S", "S"), ("B", N, "S", "S"), ("B", 1, 1, "S"), ("S", "S"), ("S",)])
def test_mask_shapes(shape: tuple) -> None:
    model = attention(mask="input", mask_shape=shape)
    result = optimize(model, "ort-cpu", "fuse_attention:packed=false")
    assert counts(result) == {"attention": 1}
    expanded = "Expand" in [op for _, op in ops(result.model)]
    assert expanded == (len(shape) < 4 or shape[2] == 1)
    check(model, result)


@pytest.mark.parametrize("mask", ["input", "none"])
def test_portable_opset23_standard_attention(mask: str) -> None:
    model = attention(opset=23, mask=mask)
    result = optimize(model, "portable")
    assert counts(result) == {"attention": 1}
    assert ("", "Attention") in ops(result.model)
    assert all(o.domain in ("", "ai.onnx") for o in result.model.opset_import)
    check(model, result)


def test_portable_opset23_sdpa_inf_mask() -> None:
    """-inf mask with the NaN guard: fully masked rows give 0 in the original and in Attention."""
    sdpa = attention(opset=23, style="sdpa", mask="where", scale="qk")
    fused = optimize(sdpa, "portable")
    assert ("", "Attention") in ops(fused.model)
    check(sdpa, fused)
    check(sdpa, fused, full_pad_row=True)


def test_portable_opset23_lowest_float_mask_kept_with_note() -> None:
    """The eager mask (1 - m) * min: onnxruntime's Attention would write 0 where the original averages V."""
    model = attention(opset=23)
    result = optimize(model, "portable")
    assert counts(result) == {}
    assert ops(result.model) == ops(model)
    assert any("mask uses the lowest float" in w for w in result.report.notes)


def test_portable_below_opset23_keeps_graph_with_note() -> None:
    model = attention(opset=17)
    result = optimize(model, "portable")
    assert counts(result) == {}
    assert ops(result.model) == ops(model)
    assert any("Attention needs ai.onnx opset >= 23, the model imports 17" in w for w in result.report.notes)


def test_trt_keeps_graph_with_note() -> None:
    model = attention()
    result = optimize(model, "trt")
    assert counts(result) == {}
    assert ops(result.model) == ops(model)
    assert any("TensorRT" in w and "1 attention subgraph" in w for w in result.report.notes)


def test_unproven_output_reshape_stays() -> None:
    model = attention(unproven_out=True)
    result = optimize(model)
    assert counts(result) == {"attention": 1}
    kinds = [op for _, op in ops(result.model)]
    assert "Softmax" not in kinds and kinds.count("Reshape") == 1
    check(model, result)
    odd = {**feeds(model), "other": np.zeros((10, 1), np.float32)}  # (B*S, 1): the kept Reshape still does what it did
    assert_equivalent(model, result.model, odd)


def test_inside_if_branches() -> None:
    """The pass runs on subgraphs: an attention block in each If branch, reading outer-scope values, is fused."""
    body = attention().graph
    branches = []
    for tag in ("then", "else"):
        graph = onnx.GraphProto()
        graph.CopyFrom(body)
        graph.name = tag
        del graph.input[:]
        branches.append(graph)
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1])
    inputs = [tensor_input("cond", [], TensorProto.BOOL), *body.input]
    model = make_model([node], inputs, [tensor_input("y", ["B", "S", D])])
    result = optimize(model)
    assert counts(result) == {"attention": 2}
    for branch in result.model.graph.node[0].attribute:
        assert "Softmax" not in [n.op_type for n in branch.g.node]
    for cond in (True, False):
        feed = {**feeds(model), "cond": np.array(cond)}
        assert_equivalent(model, result.model, feed)


def test_deterministic() -> None:
    model = attention(style="sdpa", mask="where", scale="qk")
    first = optimize(model).model.SerializeToString()
    assert optimize(model).model.SerializeToString() == first


# ----------------------------------------------------------------------------- guards


def assert_untouched(model: ModelProto, target: str = "ort-cpu", batch: int = 2, seq: int = 5) -> None:
    """The pass leaves ``model`` as it is."""
    result = optimize(model, target)
    assert counts(result) == {}
    assert ops(result.model) == ops(model)
    assert_equivalent(model, result.model, feeds(model, batch, seq))


def test_guard_mask_not_broadcastable() -> None:
    """A mask that enlarges the scores (valid ONNX, but no attention op computes it) is left alone."""
    assert_untouched(attention(mask="input", batch=2, seq=1, mask_shape=(2, 1, 3, 1)), seq=1)
    assert_untouched(attention(mask="input", batch=1, seq=1, mask_shape=(3, 1, 1, 1)), batch=1, seq=1)


def test_guard_scale_not_constant() -> None:
    assert_untouched(attention(scale="input"))


def test_guard_scaled_value() -> None:
    assert_untouched(attention(scaled_value=True))


def test_guard_softmax_other_axis() -> None:
    assert_untouched(attention(softmax_axis=2))


@pytest.mark.parametrize("name", ["probs", "scores", "qt", "ctx_t"])
def test_guard_intermediate_graph_output(name: str) -> None:
    assert_untouched(attention(extra_output=name))


def test_guard_transposed_key_read_elsewhere() -> None:
    assert_untouched(attention(extra_reader="kT"))


def test_shared_key_projection_is_not_packed() -> None:
    """A K projection read elsewhere stays (it feeds MultiHeadAttention); the packed form needs private projections."""
    model = attention(extra_reader="k3")
    result = optimize(model)
    assert ("com.microsoft", "MultiHeadAttention") in ops(result.model)
    check(model, result)
    shared = attention(shared_weight=True)
    result = optimize(shared)
    assert ("com.microsoft", "MultiHeadAttention") in ops(result.model)
    check(shared, result)


@pytest.mark.parametrize("options", ["", ":packed=false"])
@pytest.mark.parametrize("name", ["kT", "qt", "ctx"])
def test_shape_of_intermediate_read_elsewhere_is_rebuilt(name: str, options: str) -> None:
    """A Shape of a pattern tensor feeding other computations is rebuilt from the surviving sources."""
    model = attention(extra_reader=f"Shape:{name}")
    result = optimize(model, "ort-cpu", PASS + options)
    assert counts(result) == {"attention": 1}
    assert "Softmax" not in [op for _, op in ops(result.model)]
    check(model, result)


def test_guard_custom_domain_in_pattern() -> None:
    model = attention()
    for node in model.graph.node:
        if node.op_type == "Softmax":
            node.domain = "custom.domain"
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    result = optimize(model)
    assert counts(result) == {}


# ----------------------------------------------------------------------------- a real export


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_bert_export(attn: str, tmp_path) -> None:  # noqa: ANN001
    torch = pytest.importorskip("torch", reason="torch is an optional extra (export); the BERT export test needs it")
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (export)")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, attn_implementation=attn
    )
    bert = transformers.BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = tmp_path / "bert.onnx"
    ids = torch.randint(0, 100, (2, 8))
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}}
    torch.onnx.export(
        Encoder().eval(),
        (ids, torch.ones(2, 8, dtype=torch.int64)),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["y"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    model = onnx.load(str(path))
    result = onnxopt.optimize(model, f"default,{PASS}", target="ort-cpu", isolate=False)
    assert counts(result) == {"attention": 2}
    assert "Softmax" not in [n.op_type for n in result.model.graph.node]
    rng = np.random.default_rng(0)
    for batch, seq in ((2, 8), (3, 11)):
        mask = np.ones((batch, seq), np.int64)
        mask[1:, seq // 2 :] = 0
        feed = {"input_ids": rng.integers(0, 100, (batch, seq)).astype(np.int64), "attention_mask": mask}
        assert_equivalent(model, result.model, feed)


def test_left_unfused_when_qdq_follows() -> None:
    """A later qdq pass quantizes every MatMul of the attention (projections and scores): no fused op."""
    model = attention()
    result = onnxopt.optimize(model, "fuse_attention,qdq", target="ort-cpu", calibration="random", isolate=False)
    assert not any(n.domain == "com.microsoft" for n in result.model.graph.node)
    assert any("left unfused" in w for w in result.report.notes)
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    matmuls = [n for n in result.model.graph.node if n.op_type == "MatMul"]
    assert sum(producers.get(n.input[1]) == "DequantizeLinear" for n in matmuls) >= 5  # weights and attention scores
