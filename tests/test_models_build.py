"""models.build: the test-model builders are valid, runnable, deterministic and what they claim."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent
from onnx import numpy_helper

import onnxopt
from models import build
from onnxopt.verify import run_model


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("name", sorted(build.BUILDERS))
def test_builds_pass_full_check(name):
    model = build.BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == build.OPSET


@pytest.mark.parametrize("name", sorted(build.BUILDERS))
def test_builds_are_deterministic(name):
    first, second = build.BUILDERS[name](), build.BUILDERS[name]()
    assert build.serialize(first) == build.serialize(second)


def test_committed_example_equals_a_fresh_build():
    committed = build.EXAMPLE_PATH.read_bytes()
    assert committed == build.serialize(build.cnn_with_bn()), "regenerate it: python -m models.build --example"
    assert len(committed) < 200_000


def test_cnn_runs_and_classifies_finite_logits():
    model = build.cnn_with_bn()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    logits = run_model(model, {"input": x})["logits"]
    assert logits.shape == (1, 10) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits)) and np.ptp(logits) > 0


def test_cnn_carries_the_exporter_redundancies():
    model = build.cnn_with_bn()
    ops = Counter(n.op_type for n in model.graph.node)
    for op in ("Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"):
        assert ops[op] >= 1, op
    assert ops["Identity"] >= 2 and ops["Constant"] >= 1
    chain = [n.op_type for n in model.graph.node if n.op_type in ("Shape", "Gather", "Unsqueeze", "Concat", "Reshape")]
    assert chain == ["Shape", "Gather", "Unsqueeze", "Concat", "Reshape"]
    tensors = list(_weights(model).items())
    duplicates = [(a, b) for i, (a, x) in enumerate(tensors) for b, y in tensors[i + 1 :] if x.shape == y.shape and np.array_equal(x, y)]
    assert duplicates == [("block1.a.bn.weight", "block1.b.bn.weight")]


def _layer_norm(x: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def _linear(x: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    return x @ w[f"{prefix}.weight"] + w[f"{prefix}.bias"]


def _reference_block(x: np.ndarray, w: dict[str, np.ndarray], heads: int = 4) -> np.ndarray:
    """The encoder layer written directly in numpy (float64)."""
    batch, seq, width = x.shape
    head_dim = width // heads
    x = x.astype(np.float64)
    h = _layer_norm(x, w, "ln1")

    def split(t: np.ndarray) -> np.ndarray:
        return t.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = (split(_linear(h, w, f"attn.{p}")) for p in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, width)
    x = x + _linear(context, w, "attn.out")
    h = _linear(_layer_norm(x, w, "ln2"), w, "ffn.up")
    erf = np.vectorize(math.erf)(h / math.sqrt(2.0))
    return x + _linear(h * (1.0 + erf) * 0.5, w, "ffn.down")


@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 7, 32), (3, 16, 32)])
def test_transformer_matches_numpy_reference_at_any_batch_and_length(shape):
    model = build.transformer_block()
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y = run_model(model, {"x": x})["y"]
    assert y.shape == shape
    np.testing.assert_allclose(y, _reference_block(x, _weights(model)), rtol=1e-4, atol=1e-4)


def test_transformer_has_dynamic_dims_and_exporter_patterns():
    model = build.transformer_block()
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 32]
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["ReduceMean"] == 4 and ops["Pow"] == 2 and ops["Sqrt"] == 2 and ops["Erf"] == 1
    assert ops["Softmax"] == 1 and ops["MatMul"] == 8 and ops["Shape"] == 1 and ops["Constant"] >= 5


def test_main_writes_every_model(tmp_path, capsys):
    assert build.main([str(tmp_path)]) == 0
    for name, builder in build.BUILDERS.items():
        assert (tmp_path / f"{name}.onnx").read_bytes() == build.serialize(builder())
    assert str(tmp_path / "cnn_with_bn.onnx") in capsys.readouterr().out


def test_main_without_arguments_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        build.main([])
    assert info.value.code == 2


PASSES = "cleanup"


def test_cleanup_removes_the_cnn_redundancies():
    model = build.cnn_with_bn()
    result = onnxopt.optimize(model, PASSES, isolate=False)
    assert Counter(n.op_type for n in result.model.graph.node) == Counter(
        {"Conv": 4, "BatchNormalization": 4, "Relu": 4, "Add": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    )
    assert len(result.model.graph.initializer) < len(model.graph.initializer)
    assert_equivalent(model, result.model)


def test_cleanup_keeps_the_transformer_dynamic_and_equal():
    model = build.transformer_block()
    result = onnxopt.optimize(model, PASSES, isolate=False)
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["Constant"] == 0 and ops["Concat"] == 0, "the q/k/v head shapes become constant targets (0 copies batch and seq)"
    assert result.model.graph.input[0].type == model.graph.input[0].type
    for shape in ((1, 3, 32), (4, 11, 32)):
        assert_equivalent(model, result.model, input_shapes={"x": shape})
