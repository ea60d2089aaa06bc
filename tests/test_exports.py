"""Real exporter graphs: tiny transformers models exported by torch (legacy and dynamo), optimized, run in onnxruntime.

Needs the `export` extra (torch==2.13.0, transformers, onnxscript; CI installs it). The exports
are the architectures of models/exports.py at their tiny sizes; every result is compared with
the original in onnxruntime at two input sizes.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import assert_equivalent

import onnxopt
from models.exports import TEXT_LAYERS, TEXT_VARIANTS, VOCAB, export
from onnxopt.verify import run_model

pytestmark = pytest.mark.slow

VISION = ("vit-legacy", "vit-dynamo", "convnext-legacy", "convnext-dynamo", "resnet50-legacy", "mobilenetv2-dynamo")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """variant -> the tiny export's path (exported once per test module)."""
    pytest.importorskip("torch", reason="the export extra (torch==2.13.0) is not installed: pip install -e '.[export]'")
    pytest.importorskip("transformers", reason="the export extra (transformers) is not installed: pip install -e '.[export]'")
    pytest.importorskip("onnxscript", reason="the export extra (onnxscript, for the dynamo exporter) is not installed")
    folder = tmp_path_factory.mktemp("exports")
    return {variant: export(variant, folder, "tiny") for variant in (*TEXT_VARIANTS, *VISION)}


def text_feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids and a padding mask (every row keeps at least its first half)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1:, seq // 2 + 1 :] = 0
    return {"input_ids": rng.integers(0, VOCAB["tiny"], (batch, seq)).astype(np.int64), "attention_mask": mask}


def ops(model: onnx.ModelProto) -> Counter:
    """Op histogram, contrib ops as ``com.microsoft:Op``."""
    return Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_bert_exports(exports, variant, target):
    original = onnx.load(str(exports[variant]))
    result = onnxopt.optimize(original, "default", target=target)
    assert not [w for w in result.report.warnings if "rolled back" in w], result.report.warnings
    assert len(result.model.graph.node) < len(original.graph.node)
    counts = ops(result.model)
    assert counts["LayerNormalization"] == 2 * TEXT_LAYERS["tiny"] + 1
    if target == "ort-cpu":
        fused = counts["com.microsoft:Attention"] + counts["com.microsoft:MultiHeadAttention"]
        assert fused == TEXT_LAYERS["tiny"] and counts["Softmax"] == 0
        assert counts["Erf"] == 0 and counts["com.microsoft:Gelu"] + counts["com.microsoft:BiasGelu"] == TEXT_LAYERS["tiny"]
    else:
        assert not any(op.startswith("com.microsoft") for op in counts)
    for batch, seq, seed in ((2, 8, 0), (3, 13, 1)):
        assert_equivalent(original, result.model, text_feeds(batch, seq, seed))


@pytest.mark.parametrize("variant", VISION)
@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_vision_exports(exports, variant, target):
    original = onnx.load(str(exports[variant]))
    result = onnxopt.optimize(original, "default", target=target)
    assert not [w for w in result.report.warnings if "rolled back" in w], result.report.warnings
    assert len(result.model.graph.node) <= len(original.graph.node)
    counts = ops(result.model)
    assert counts["BatchNormalization"] == 0
    if variant.startswith("vit") and target == "ort-cpu":
        assert counts["Softmax"] == 0
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        assert_equivalent(original, result.model, {"pixel_values": rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)})


def test_exports_optimize_deterministically(exports):
    original = onnx.load(str(exports["dynamo-sdpa"]))
    first = onnxopt.optimize(original, "default", target="ort-cpu").model.SerializeToString(deterministic=True)
    assert onnxopt.optimize(original, "default", target="ort-cpu").model.SerializeToString(deterministic=True) == first


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_bert_exports_int8_dynamic(exports, variant, target):
    """Every projection becomes dynamic INT8; on ort-cpu attention fuses unpacked so its Q/K/V projections are INT8 too."""
    original = onnx.load(str(exports[variant]))
    result = onnxopt.optimize(original, "default,int8_dynamic:min_size=1", target=target)
    assert not [w for w in result.report.warnings if "rolled back" in w], result.report.warnings
    counts = ops(result.model)
    layers = TEXT_LAYERS["tiny"]
    weights = {t.name for t in result.model.graph.initializer}
    float_matmuls = [n.name for n in result.model.graph.node if n.op_type in ("MatMul", "Gemm") and weights & set(n.input)]
    assert not float_matmuls, float_matmuls
    if target == "ort-cpu":
        assert counts["com.microsoft:MultiHeadAttention"] == layers and counts["com.microsoft:Attention"] == 0
        assert counts["com.microsoft:DynamicQuantizeMatMul"] >= 6 * layers  # Q, K, V, output, two MLP
    else:
        assert counts["MatMulInteger"] >= 6 * layers and not any(op.startswith("com.microsoft") for op in counts)
    for batch, seq, seed in ((2, 8, 0), (3, 13, 1)):
        feeds = text_feeds(batch, seq, seed)
        ref, got = run_model(original, feeds), run_model(result.model, feeds)
        for name in ref:
            a, b = np.asarray(ref[name], np.float64).ravel(), np.asarray(got[name], np.float64).ravel()
            assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99, name
