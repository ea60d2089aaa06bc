"""Tests of int8_dynamic: DynamicQuantizeMatMul / QAttention (ort-cpu), MatMulInteger (portable), guards, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import init, make_model, tensor_input
from onnx import ModelProto, TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.passes.int8_dynamic import quantize_weight
from onnxopt.verify import compare_outputs, run_model

RNG = np.random.default_rng(0)
# The pipelines here use 7-bit weights (reduce_range): onnxruntime's integer kernels are then exact on every CPU. On x86
# CPUs without VNNI they add pairs of uint8 x int8 products in int16, which saturates with 8-bit weights and would move
# the outputs these tests compare with the float model's.
K, N = 96, 80


def rand(*shape: int) -> np.ndarray:
    """Random normal float32 values."""
    return RNG.standard_normal(shape).astype(np.float32)


def ops(model: ModelProto) -> Counter:
    """Op histogram of the main graph, contrib ops as ``com.microsoft:Op``."""
    return Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def mlp_model(opset: int = 17) -> ModelProto:
    """x [B, 7, K] -> MatMul W1 + b1 -> Relu -> MatMul W2 + b2 -> Gemm-free MLP; and a Gemm (transB=1, C) on x[:, 0]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["o"], name="fc2"),
        helper.make_node("Add", ["b2", "o"], ["y"], name="fc2_bias"),
        helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "W3", "C3"], ["z"], name="head", transB=1, beta=0.5),
    ]
    inits = [
        init("W1", rand(K, N)),
        init("b1", rand(N)),
        init("W2", rand(N, K)),
        init("b2", rand(K)),
        init("W3", rand(N, K)),
        init("C3", rand(N)),
    ]
    return make_model(
        nodes,
        [tensor_input("x", ["batch", 7, K])],
        [tensor_input("y", ["batch", 7, K]), tensor_input("z", ["batch", N])],
        inits,
        opset=opset,
    )


def optimize(model: ModelProto, passes: str = "int8_dynamic:reduce_range=true", target: str = "ort-cpu") -> onnxopt.OptimizeResult:
    """Run ``passes`` without fault isolation (bugs raise)."""
    return onnxopt.optimize(model, passes, target=target, isolate=False)


def closeness(original: ModelProto, rewritten: ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Cosine of every output of the rewritten model to the original's (onnxruntime)."""
    ref, got = run_model(original, feeds), run_model(rewritten, feeds)
    out = {}
    for name in ref:
        a, b = np.asarray(ref[name], np.float64).ravel(), np.asarray(got[name], np.float64).ravel()
        out[name] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return out


def feeds(batch: int = 3) -> dict[str, np.ndarray]:
    """Inputs of mlp_model."""
    return {"x": rand(batch, 7, K)}


def test_ort_cpu_writes_dynamic_quantize_matmul_with_folded_biases():
    model = mlp_model()
    result = optimize(model)
    counts = ops(result.model)
    assert counts["com.microsoft:DynamicQuantizeMatMul"] == 3
    assert counts["MatMul"] == counts["Gemm"] == counts["Add"] == 0  # both bias Adds and Gemm's C went into the kernel
    assert {t.name for t in result.model.graph.initializer}.isdisjoint({"W1", "W2", "W3", "b1", "b2", "C3"})  # nothing left unused
    used = {i for n in result.model.graph.node for i in n.input}
    assert all(t.name in used for t in result.model.graph.initializer)
    assert all(c > 0.999 for c in closeness(model, result.model, feeds()).values())
    assert result.report.passes[-1].counts["layers_int8"] == 3


def test_portable_uses_standard_ops_and_one_dynamic_quantize_per_activation():
    model = mlp_model()
    # a second MatMul reading x: both share one DynamicQuantizeLinear
    graph = model.graph
    graph.node.append(helper.make_node("MatMul", ["x", "W4"], ["w"], name="side"))
    graph.initializer.append(init("W4", rand(K, 64)))
    graph.output.append(tensor_input("w", ["batch", 7, 64]))
    result = optimize(model, target="portable")
    counts = ops(result.model)
    assert not any(op.startswith("com.microsoft") for op in counts)
    assert counts["MatMulInteger"] == 4 and counts["DynamicQuantizeLinear"] == 3  # x (fc1, side), r (fc2), pooled (head)
    onnx.checker.check_model(result.model)
    assert all(c > 0.999 for c in closeness(model, result.model, feeds()).values())


@pytest.mark.parametrize("target", ["ort-cpu", "portable"])
def test_quantization_error_is_the_int8_error(target):
    model = mlp_model()
    x = feeds(4)
    result = optimize(model, target=target)
    check = compare_outputs(run_model(model, x), run_model(result.model, x), "int8")
    assert check.passed, check.failures()
    # and it is a real quantization: outputs are not bit-identical to float
    assert not np.array_equal(run_model(model, x)["y"], run_model(result.model, x)["y"])


def test_weights_are_symmetric_int8_per_column():
    weight = rand(K, N) * np.linspace(0.1, 10, N, dtype=np.float32)
    quant = quantize_weight(weight, per_channel=True, reduce_range=False)
    assert quant.values.dtype == np.int8 and quant.scale.shape == (N,)
    assert np.abs(quant.values).max() == 127 and np.abs(quant.values).min() >= 0
    np.testing.assert_allclose(quant.values * quant.scale, weight, atol=float(quant.scale.max()) / 2 + 1e-6)
    narrow = quantize_weight(weight, per_channel=False, reduce_range=True)
    assert narrow.scale.shape == () and np.abs(narrow.values).max() == 63


def test_guards_keep_shared_small_excluded_and_non_float_weights():
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"], name="uses_w"),
        helper.make_node("Transpose", ["Wrow"], ["wt"]),
        helper.make_node("MatMul", ["x", "S"], ["s"], name="small"),
        helper.make_node("MatMul", ["x", "E"], ["e"], name="excluded_one"),
        helper.make_node("MatMul", ["x", "Wrow"], ["shared"], name="shares_with_add"),
    ]
    inits = [init("W", rand(K, K)), init("Wrow", rand(K, K)), init("S", rand(K, 4)), init("E", rand(K, 64))]
    outs = [tensor_input("y", [2, K]), tensor_input("s", [2, 4]), tensor_input("e", [2, 64]), tensor_input("shared", [2, K])]
    outs.append(tensor_input("wt", [K, K]))
    model = make_model(nodes, [tensor_input("x", [2, K])], outs, inits)
    result = optimize(model, "int8_dynamic:reduce_range=true,exclude=excluded_one,min_size=1000")
    kinds = {n.name: n.op_type for n in result.model.graph.node}
    assert kinds["uses_w"] == "DynamicQuantizeMatMul"
    assert kinds["small"] == kinds["excluded_one"] == kinds["shares_with_add"] == "MatMul"
    note = next(n for n in result.report.notes if n.startswith("int8_dynamic: 3 layer(s) kept"))
    assert "excluded (1)" in note and "smaller than min_size=1000 (1)" in note and "also read by another op (1)" in note
    assert all(c > 0.999 for c in closeness(model, result.model, {"x": rand(2, K)}).values())


def test_attention_without_mask_bias_becomes_qattention():
    hidden, heads = 64, 4
    nodes = [helper.make_node("Attention", ["x", "Wqkv", "Bqkv"], ["y"], name="attn", domain="com.microsoft", num_heads=heads)]
    inits = [init("Wqkv", rand(hidden, 3 * hidden) * 0.2), init("Bqkv", rand(3 * hidden) * 0.1)]
    graph = helper.make_graph(nodes, "attn", [tensor_input("x", ["batch", 9, hidden])], [tensor_input("y", ["batch", 9, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    result = optimize(model)
    counts = ops(result.model)
    assert counts["com.microsoft:QAttention"] == 1 and counts["DynamicQuantizeLinear"] == 1 and counts["com.microsoft:Attention"] == 0
    cos = closeness(model, result.model, {"x": rand(2, 9, hidden)})
    assert cos["y"] > 0.999


def test_attention_with_attention_bias_stays_float_with_a_note():
    hidden, heads = 32, 2
    inputs = ["x", "Wqkv", "Bqkv", "", "", "bias"]
    nodes = [helper.make_node("Attention", inputs, ["y"], name="attn", domain="com.microsoft", num_heads=heads)]
    inits = [init("Wqkv", rand(hidden, 3 * hidden)), init("Bqkv", rand(3 * hidden)), init("bias", np.zeros((1, 1, 5, 5), np.float32))]
    graph = helper.make_graph(nodes, "attn", [tensor_input("x", [1, 5, hidden])], [tensor_input("y", [1, 5, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    result = optimize(model)
    assert ops(result.model)["com.microsoft:Attention"] == 1
    assert any("Attention: it takes attention_bias" in n for n in result.report.notes)


def test_matmul_inside_an_if_branch_is_quantized_and_the_model_runs():
    branch_nodes = [helper.make_node("MatMul", ["x", "Wb"], ["yb"], name="in_branch")]
    then_graph = helper.make_graph(branch_nodes, "then", [], [tensor_input("yb", [2, 3, N])], [init("Wb", rand(K, N))])
    else_graph = helper.make_graph([helper.make_node("Neg", ["z0"], ["ye"])], "else", [], [tensor_input("ye", [2, 3, N])])
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["z0"], name="outer"),
        helper.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    inputs = [tensor_input("x", [2, 3, K]), tensor_input("flag", [], TensorProto.BOOL)]
    model = make_model(nodes, inputs, [tensor_input("y", [2, 3, N])], [init("W0", rand(K, N))])
    result = optimize(model)
    branch = next(a.g for a in result.model.graph.node[-1].attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["DynamicQuantizeMatMul"]
    for flag in (True, False):
        cos = closeness(model, result.model, {"x": rand(2, 3, K), "flag": np.array(flag)})
        assert cos["y"] > 0.999


def test_embedding_tables_are_int8():
    table = rand(70000 // 16, 16)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]), helper.make_node("MatMul", ["rows", "W"], ["y"], name="proj")]
    inputs = [tensor_input("ids", [2, 5], TensorProto.INT64)]
    model = make_model(nodes, inputs, [tensor_input("y", [2, 5, 128])], [init("table", table), init("W", rand(16, 128))])
    result = optimize(model)
    assert "table" not in {t.name for t in result.model.graph.initializer}
    assert result.report.passes[-1].counts["embedding_tables_int8"] == 1
    ids = {"ids": RNG.integers(0, table.shape[0], (2, 5)).astype(np.int64)}
    assert closeness(model, result.model, ids)["y"] > 0.999


def test_constant_node_weights_are_read_and_removed():
    weight = numpy_helper.from_array(rand(K, N), "Wc")
    nodes = [helper.make_node("Constant", [], ["Wc"], value=weight), helper.make_node("MatMul", ["x", "Wc"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_input("x", [2, 4, K])], [tensor_input("y", [2, 4, N])])
    result = optimize(model)
    assert ops(result.model) == Counter({"com.microsoft:DynamicQuantizeMatMul": 1})
    assert closeness(model, result.model, {"x": rand(2, 4, K)})["y"] > 0.999


@pytest.mark.parametrize("target", ["trt", "ort-gpu"])
def test_gpu_targets_are_refused_with_the_pass_to_use(target):
    with pytest.raises(OnnxoptError, match="int8_dynamic: dynamic INT8 runs on CPUs .* use qdq"):
        optimize(mlp_model(), target=target)


def test_old_opset_is_refused_with_the_fix():
    model = mlp_model(opset=10)
    with pytest.raises(OnnxoptError, match="opset >= 11 .* --opset 11"):
        optimize(model)


def test_bad_options_are_one_line_errors():
    with pytest.raises(OptionError):
        optimize(mlp_model(), "int8_dynamic:reduce_range=true,min_size=0")
    with pytest.raises(OptionError):
        optimize(mlp_model(), "int8_dynamic:reduce_range=true,exclude=(")


@pytest.mark.parametrize("target", ["ort-cpu", "portable"])
def test_output_is_deterministic(target):
    model = mlp_model()
    a = optimize(model, "default,int8_dynamic:reduce_range=true", target=target).model.SerializeToString()
    b = optimize(model, "default,int8_dynamic:reduce_range=true", target=target).model.SerializeToString()
    assert a == b


def test_cli_needs_no_calibration(tmp_path):
    from click.testing import CliRunner

    from onnxopt.cli import main

    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(mlp_model(), str(src))
    before = src.read_bytes()
    run = CliRunner().invoke(main, [str(src), str(dst), "--passes", "default,int8_dynamic:reduce_range=true", "--target", "ort-cpu", "-q"])
    assert run.exit_code == 0, run.output
    assert src.read_bytes() == before
    assert ops(onnx.load(str(dst)))["com.microsoft:DynamicQuantizeMatMul"] == 3


@pytest.mark.parametrize("target", ["ort-cpu", "portable"])
def test_input_of_unknown_rank_is_quantized_and_runs_at_any_rank(target):
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["xr"]),  # hides A's rank from shape inference
        helper.make_node("MatMul", ["xr", "W"], ["mm"], name="mm"),
        helper.make_node("Flatten", ["mm"], ["y"], axis=0),
    ]
    inputs = [tensor_input("x", ["n"]), tensor_input("shape", ["r"], TensorProto.INT64)]
    model = make_model(nodes, inputs, [tensor_input("y", [1, "m"])], [init("W", rand(K, N))])
    result = optimize(model, target=target)
    assert "MatMul" not in ops(result.model)
    for shape in ((K,), (3, K), (2, 3, K)):
        x = {"x": rand(int(np.prod(shape))), "shape": np.array(shape, np.int64)}
        assert closeness(model, result.model, x)["y"] > 0.999


def test_combines_with_qdq_for_conv_and_matmul_models():
    """int8_dynamic takes the MatMuls, qdq then quantizes the convolutions statically around them."""
    nodes = [
        helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["seq"]),
        helper.make_node("MatMul", ["seq", "Wm"], ["y"], name="proj"),
    ]
    inits = [init("Wc", rand(16, 8, 3, 3) * 0.3), init("Bc", rand(16) * 0.1), init("shape", np.array([2, 16, 64], np.int64))]
    inits.append(init("Wm", rand(64, 96) * 0.2))
    model = make_model(nodes, [tensor_input("x", [2, 8, 8, 8])], [tensor_input("y", [2, 16, 96])], inits, opset=17)
    data = {"x": rand(16, 8, 8, 8)}
    from onnxopt.calibration import CalibrationData

    result = onnxopt.optimize(
        model,
        "int8_dynamic:reduce_range=true,qdq:reduce_range=true",
        target="ort-cpu",
        calibration=CalibrationData.from_arrays(data, model=model),
    )
    counts = ops(result.model)
    assert counts["com.microsoft:DynamicQuantizeMatMul"] == 1 and counts["Conv"] == 1
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv")
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert producers[conv.input[0]] == "DequantizeLinear" and producers[conv.input[1]] == "DequantizeLinear"
    assert closeness(model, result.model, {"x": rand(2, 8, 8, 8)})["y"] > 0.99


def correlated(rows: int, seed: int) -> np.ndarray:
    """Inputs [rows, K] with strongly correlated features (where GPTQ beats nearest rounding)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((rows, 8)) @ np.random.default_rng(2).standard_normal((8, K))
    return (base + 0.1 * rng.standard_normal((rows, K))).astype(np.float32)


def projection_model() -> ModelProto:
    """x [B, 5, K] -> MatMul W + b, and a Gemm (transB=1) on x[:, 0]: two layers GPTQ can round."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "b"], ["y"], name="proj_bias"),
        helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["pooled", "Wt"], ["z"], name="head", transB=1),
    ]
    inits = [init("W", rand(K, N)), init("b", rand(N)), init("Wt", rand(N, K))]
    outputs = [tensor_input("y", ["batch", 5, N]), tensor_input("z", ["batch", N])]
    return make_model(nodes, [tensor_input("x", ["batch", 5, K])], outputs, inits, opset=17)


def gptq_calibration(model: ModelProto):
    """Calibration arrays of correlated rows for :func:`projection_model`."""
    from onnxopt.calibration import CalibrationData

    return CalibrationData.from_arrays({"x": correlated(32 * 5, 10).reshape(32, 5, K)}, model=model)


@pytest.mark.parametrize("target", ["ort-cpu", "portable"])
def test_gptq_rounding_beats_nearest_in_onnxruntime(target):
    model = projection_model()
    nearest = optimize(model, "int8_dynamic:reduce_range=true", target=target).model
    result = onnxopt.optimize(
        model, "int8_dynamic:reduce_range=true,rounding=gptq", target=target, calibration=gptq_calibration(model), isolate=False
    )
    assert result.report.passes[-1].counts["weights_int8_gptq"] == 2
    held_out = {"x": correlated(8 * 5, 99).reshape(8, 5, K)}
    reference = run_model(model, held_out)
    for name in ("y", "z"):
        err_nearest = np.linalg.norm(run_model(nearest, held_out)[name] - reference[name])
        err_gptq = np.linalg.norm(run_model(result.model, held_out)[name] - reference[name])
        assert err_gptq < 0.9 * err_nearest, (name, err_gptq, err_nearest)  # the rest is the inputs' per-call rounding
    # only the integers change: the scales are nearest rounding's per-column maxima
    scales = {t.name: numpy_helper.to_array(t) for t in nearest.graph.initializer if t.name.endswith("_scale")}
    mine = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name in scales}
    assert scales.keys() == mine.keys() and all(np.array_equal(scales[k], mine[k]) for k in scales)


def test_gptq_rounding_without_calibration_is_a_requirement_error():
    with pytest.raises(
        onnxopt.OnnxoptError, match="pass 'int8_dynamic' needs calibration data with the options given; give it with --calib"
    ):
        optimize(projection_model(), "int8_dynamic:reduce_range=true,rounding=gptq")


def test_gptq_rounding_is_deterministic_and_leaves_subgraphs_to_nearest():
    model = projection_model()
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wb"], ["yb"], name="in_branch")],
        "then",
        [],
        [tensor_input("yb", ["batch", 5, N])],
        [init("Wb", rand(K, N))],
    )
    other = helper.make_graph([helper.make_node("Identity", ["y"], ["ye"])], "else", [], [tensor_input("ye", ["batch", 5, N])])
    model.graph.node.append(helper.make_node("If", ["flag"], ["branch_out"], then_branch=branch, else_branch=other))
    model.graph.node.insert(0, helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0))
    model.graph.node.insert(1, helper.make_node("Greater", ["peak", "floor"], ["flag"]))
    model.graph.initializer.append(init("floor", np.array(-1e9, np.float32)))
    model.graph.output.append(tensor_input("branch_out", ["batch", 5, N]))
    runs = [
        onnxopt.optimize(
            model, "int8_dynamic:reduce_range=true,rounding=gptq", target="ort-cpu", calibration=gptq_calibration(model), isolate=False
        )
        for _ in range(2)
    ]
    assert runs[0].model.SerializeToString() == runs[1].model.SerializeToString()
    counts = runs[0].report.passes[-1].counts
    assert counts["weights_int8"] == 3 and counts["weights_int8_gptq"] == 2
    assert any("layers inside subgraphs are rounded to nearest" in n for n in runs[0].report.notes)
    feeds = {"x": correlated(2 * 5, 7).reshape(2, 5, K)}
    assert min(closeness(model, runs[0].model, feeds).values()) > 0.999


def test_gptq_options_are_checked():
    with pytest.raises(OptionError, match="damp"):
        optimize(projection_model(), "int8_dynamic:reduce_range=true,rounding=gptq,damp=0")
    with pytest.raises(OptionError, match="rounding"):
        optimize(projection_model(), "int8_dynamic:reduce_range=true,rounding=adaround")


def test_gptq_hessians_in_bounded_groups_give_the_same_model(monkeypatch):
    """With room for one Hessian at a time, each weight gets its own calibration sweep and the same integers."""
    import onnxopt.passes.gptq as gptq

    model = projection_model()
    whole = onnxopt.optimize(
        model, "int8_dynamic:reduce_range=true,rounding=gptq", target="ort-cpu", calibration=gptq_calibration(model), isolate=False
    )
    monkeypatch.setattr(gptq, "HESSIAN_BYTES", 8 * K * K)
    split = onnxopt.optimize(
        model, "int8_dynamic:reduce_range=true,rounding=gptq", target="ort-cpu", calibration=gptq_calibration(model), isolate=False
    )
    assert any("gptq rounding of 2 weight(s) (2 calibration sweeps)" in n for n in split.report.notes)
    assert split.model.SerializeToString() == whole.model.SerializeToString()
