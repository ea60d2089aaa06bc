"""qdq and attention masks: -inf / float-min masks and the scores they are added to stay float.

Quantizing Add(scores, mask) before a Softmax rounds every score to the mask's scale (the causal
mask of a legacy export dequantized to 0; a dynamo export's float-min mask made attention uniform).
Each model is run in onnxruntime against its float original with peaked attention.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import init, make_model, tensor_input
from onnx import ModelProto, helper

import onnxopt
from onnxopt.calibration import CalibrationData
from onnxopt.verify import run_model

D, S = 32, 8
FLOAT_MIN = float(np.finfo(np.float32).min)


def weights() -> list:
    """Q/K/V/O projections; Q and K scaled up so attention is peaked (a mask that vanishes shows)."""
    rng = np.random.default_rng(0)
    scale = {"wq": 1.5 / np.sqrt(D), "wk": 1.5 / np.sqrt(D), "wv": 0.3, "wo": 0.3}
    return [init(name, (rng.standard_normal((D, D)) * s).astype(np.float32)) for name, s in scale.items()]


def attention(mask_nodes: list, mask: str, extra_inputs: list, extra_inits: list, dims: tuple = (2, S)) -> ModelProto:
    """x[*dims, D] -> masked single-head attention -> y, with the mask built by ``mask_nodes``."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        *mask_nodes,
        helper.make_node("Add", ["s", mask], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("MatMul", ["o", "wo"], ["y"]),
    ]
    inputs = [tensor_input("x", [*dims, D]), *extra_inputs]
    return make_model(nodes, inputs, [tensor_input("y", [*dims, D])], weights() + extra_inits, opset=17)


def runtime_causal_mask() -> ModelProto:
    """Legacy-exporter style: Where(Trilu(ones) == 0, -inf, 0) computed at run time from the (dynamic) sequence length."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "one_i", "two_i"], ["seq"]),
        helper.make_node("Concat", ["seq", "seq"], ["square"], axis=0),
        helper.make_node("Expand", ["one_f", "square"], ["ones"]),
        helper.make_node("Trilu", ["ones"], ["lower"], upper=0),
        helper.make_node("Equal", ["lower", "zero_f"], ["above"]),
        helper.make_node("Where", ["above", "minus_inf", "zero_f"], ["mask"]),
    ]
    consts = [
        init("one_i", np.array([1], np.int64)),
        init("two_i", np.array([2], np.int64)),
        init("one_f", np.array(1.0, np.float32)),
        init("zero_f", np.array(0.0, np.float32)),
        init("minus_inf", np.array(-np.inf, np.float32)),
    ]
    return attention(nodes, "mask", [], consts, dims=("batch", "seq"))


def constant_causal_mask() -> ModelProto:
    """The causal mask folded to a constant [S, S] of 0 and -inf."""
    mask = np.where(np.triu(np.ones((S, S), bool), 1), -np.inf, 0.0).astype(np.float32)
    return attention([], "mask", [], [init("mask", mask)])


def padding_mask_float_min() -> ModelProto:
    """Dynamo / transformers style: (1 - attention_mask) * float32 min, broadcast over the query axis."""
    nodes = [
        helper.make_node("Sub", ["one_f", "attention_mask"], ["masked"]),
        helper.make_node("Mul", ["masked", "fmin"], ["additive"]),
        helper.make_node("Unsqueeze", ["additive", "axis1"], ["mask"]),
    ]
    consts = [init("one_f", np.array(1.0, np.float32)), init("fmin", np.array(FLOAT_MIN, np.float32))]
    consts.append(init("axis1", np.array([1], np.int64)))
    return attention(nodes, "mask", [tensor_input("attention_mask", [2, S])], consts)


def feeds(model: ModelProto, seed: int, batch: int = 2) -> dict[str, np.ndarray]:
    """Normal x; an attention mask (when the model has one) padding the last three positions of the first row, two of the next.

    (Every row is padded: full attention over all keys with these peaked scores is where int8 noise alone flips
    near-tied keys, which is not what these tests are about.)
    """
    rng = np.random.default_rng(seed)
    out = {"x": rng.standard_normal((batch, S, D)).astype(np.float32)}
    if any(i.name == "attention_mask" for i in model.graph.input):
        mask = np.ones((batch, S), np.float32)
        mask[0::2, -3:] = 0
        mask[1::2, -2:] = 0
        out["attention_mask"] = mask
    return out


def quantize(model: ModelProto, target: str = "ort-cpu") -> onnxopt.OptimizeResult:
    """default,qdq on 8 batches of 2 seeded samples, without fault isolation (a failure raises)."""
    batches = [feeds(model, seed) for seed in range(8)]
    arrays = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    data = CalibrationData.from_arrays(arrays, model=model)
    return onnxopt.optimize(model, "default,qdq", target=target, calibration=data, isolate=False)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def quantized_tensors(model: ModelProto) -> set[str]:
    """Tensors that pass through a QuantizeLinear."""
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("build", [runtime_causal_mask, constant_causal_mask, padding_mask_float_min])
@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_masked_attention_keeps_its_mask(build, target) -> None:
    model = build()
    result = quantize(model, target)
    assert not [w for w in result.report.warnings if "rolled back" in w], result.report.warnings
    out = result.model
    assert {"s", "q", "k", "v"} & quantized_tensors(out)  # the projections are quantized
    assert not {"mask", "sm", "additive"} & quantized_tensors(out)  # the mask and the Softmax input are not
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in ("mask_dq", "sm_dq") for n in out.graph.node)
    check = feeds(model, seed=11)
    reference, got = run_model(model, check)["y"], run_model(out, check)["y"]
    assert np.isfinite(got).all()
    assert cosine(reference, got) > 0.995, cosine(reference, got)


def test_constant_with_inf_is_never_quantized() -> None:
    """A -inf constant operand of an int8-capable Add (here before a MatMul) keeps the Add float: no NaN scale, no rollback."""
    rng = np.random.default_rng(3)
    bias = rng.standard_normal(D).astype(np.float32)
    bias[5] = -np.inf
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "bias"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = [init("w1", rng.standard_normal((D, D)).astype(np.float32) * 0.3), init("bias", bias)]
    inits.append(init("w2", rng.standard_normal((D, D)).astype(np.float32) * 0.3))
    model = make_model(nodes, [tensor_input("x", [2, S, D])], [tensor_input("y", [2, S, D])], inits, opset=17)
    result = quantize(model)
    out = result.model
    assert "bias" not in quantized_tensors(out) and not any("bias_quantized" == t.name for t in out.graph.initializer)
    check = feeds(model, seed=5)
    reference, got = run_model(model, check)["y"], run_model(out, check)["y"]
    assert np.isfinite(got).all() and cosine(reference, got) > 0.99


def test_activation_holding_inf_stays_float_with_a_note() -> None:
    """A run-time tensor with -inf entries added before a Relu (an int8-capable pair) is not quantized; the note names it."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Less", ["x", "cut"], ["low"]),
        helper.make_node("Where", ["low", "minus_inf", "zero_f"], ["masked"]),
        helper.make_node("Add", ["h", "masked"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = [
        init("w1", rng.standard_normal((D, D)).astype(np.float32) * 0.3),
        init("w2", rng.standard_normal((D, D)).astype(np.float32) * 0.3),
        init("cut", np.array(-1.0, np.float32)),
        init("minus_inf", np.array(-np.inf, np.float32)),
        init("zero_f", np.array(0.0, np.float32)),
    ]
    model = make_model(nodes, [tensor_input("x", [2, S, D])], [tensor_input("y", [2, S, D])], inits, opset=17)
    result = quantize(model)
    out = result.model
    assert not {"masked", "a"} & quantized_tensors(out) and "h" in quantized_tensors(out)
    record = next(r for r in result.report.passes if r.name == "qdq")
    assert record.counts["masks_kept_float"] == 1
    assert any("1 tensor(s) hold inf/NaN" in n and "'masked'" in n for n in record.notes), record.notes
    check = feeds(model, seed=6)
    reference, got = run_model(model, check)["y"], run_model(out, check)["y"]
    assert np.isfinite(got).all() and cosine(reference, got) > 0.99
