"""Low-rank factorization: plain SVD vs activation-aware SVD vs ASVD + reconstruction, on MiniLM, ResNet-50 and PP-OCR det.

    python benchmarks/lowrank.py [--models minilm,resnet50,ppocr_det] [--runs 30] [--base default]

* minilm: the MiniLM-size BERT export (/tmp/exports/minilm-dynamo-eager.onnx, exported with
  models/exports.py when missing; seeded random weights), its 12 MLP MatMuls (384x1536, 1536x384)
  factorized to half their parameters (``ratio=0.5,by=params``, per-layer ranks from the scan).
  Calibration: 64 real sentences (models/calib_data.py), evaluation: 32 other ones, 128 tokens.
  Fidelity: cosine of the sentence embedding (last hidden state mean-pooled over the attention
  mask) and of each MLP layer's own output.
* resnet50 (/tmp/exports/resnet50-legacy.onnx, seeded random weights) and ppocr_det (the real
  rapidocr model): convolutions at ``ratio=0.5`` of their FLOPs; calibration on 16 document
  pages, evaluation on 8 (resnet50, 224x224, ImageNet normalisation) or 16 (det, 320x320).
  Fidelity: output cosine; det also the probability-map IoU at 0.3 (as benchmarks/quantize.py).
  ``ratio`` counts only the layers the pass may factorize (depthwise and small convs are not), so
  where ratio=0.5 leaves more than 52% of all conv FLOPs, an ``asvd@2x`` variant asks for the
  ratio that halves all conv FLOPs.

Variants: ``svd`` (plain SVD, scan on the same data), ``asvd`` (the default: activation-aware SVD)
and ``asvd+reconstruct`` (the asvd model re-fitted by the ``reconstruct`` pass; reported as
missing when that pass is not registered). Every variant runs after ``--base`` (default: the
``default`` preset, as users run it), which is also timed alone and is the teacher of reconstruct.

Latency: onnxruntime CPU, 1 thread, full graph optimizations, batch 1, median of ``--runs``
interleaved runs of every variant, as a ratio to the original in the same run. Counts: the
pass's claims and an onnxopt.analysis recount (params; conv FLOPs at the evaluation shape).
Each row is one JSON line; bars that are not met are printed as such.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # threaded LAPACK is 5-15x slower on small hosts (see the pass report)

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import latency, session  # noqa: E402  (benchmarks/timing.py)

MODELS = ("minilm", "resnet50", "ppocr_det")
MINILM = Path("/tmp/exports/minilm-dynamo-eager.onnx")
RESNET = Path("/tmp/exports/resnet50-legacy.onnx")
BASE = "default"  # --base: passes before lowrank (the teacher of reconstruct is the model after them)
MLP_SIZE = 384 * 1536  # min_size that selects exactly the MLP MatMuls of MiniLM


# ----------------------------------------------------------------------------- shared measurement


def run_all(sess, feeds: dict[str, np.ndarray], names: list[str] | None = None, batch: int = 8) -> dict[str, np.ndarray]:
    """Outputs of ``sess`` on every sample of ``feeds``, run ``batch`` samples at a time and concatenated."""
    count = len(next(iter(feeds.values())))
    outputs = names or [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    for start in range(0, count, batch):
        got = sess.run(outputs, {k: v[start : start + batch] for k, v in feeds.items()})
        for name, value in zip(outputs, got):
            parts[name].append(value)
    return {n: np.concatenate(v) for n, v in parts.items()}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample cosine of two batches."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def flops_by_op(model: onnx.ModelProto, feeds: dict[str, np.ndarray], ops: tuple[str, ...]) -> int:
    """FLOPs of the main graph's ``ops`` nodes (onnxopt.analysis.node_flops) with the inputs fixed to one sample's shapes."""
    from onnxopt.analysis import node_flops
    from onnxopt.shapes import infer_types

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        if value.name in feeds:
            value.type.tensor_type.shape.Clear()
            for size in (1, *feeds[value.name].shape[1:]):
                value.type.tensor_type.shape.dim.add().dim_value = int(size)
    types = infer_types(copy)
    inits = {t.name: t for t in copy.graph.initializer}
    for node in copy.graph.node:  # Constant-node weights (PP-OCR) count like initializers
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits[node.output[0]] = node.attribute[0].t
    total = 0
    for node in copy.graph.node:
        if node.op_type in ops:
            flops = node_flops(node, inits, types)
            if flops is None:
                raise SystemExit(f"flops unknown for {node.name}")
            total += flops
    return total


def optimize(model: onnx.ModelProto, passes: str, calib: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict, list[str], float]:
    """Run ``passes``; the model, lowrank's counts, its notes and the seconds taken."""
    import onnxopt
    from onnxopt.calibration import CalibrationData

    start = time.perf_counter()
    passes = f"{BASE},{passes}" if BASE else passes
    result = onnxopt.optimize(model, passes, calibration=CalibrationData.from_arrays(calib, model=model), isolate=False)
    seconds = time.perf_counter() - start
    record = next(r for r in result.report.passes if r.name == "lowrank")
    return result.model, dict(record.counts), list(record.notes), seconds


def has_reconstruct() -> bool:
    """Whether the ``reconstruct`` pass is registered."""
    from onnxopt.registry import all_passes

    return "reconstruct" in all_passes()


def reconstruct(student: onnx.ModelProto, teacher: onnx.ModelProto, calib: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, float]:
    """``reconstruct`` on an already factorized model with the original as teacher; the model and the seconds taken."""
    import onnxopt
    from onnxopt.calibration import CalibrationData

    start = time.perf_counter()
    data = CalibrationData.from_arrays(calib, model=student)
    result = onnxopt.optimize(student, "reconstruct", calibration=data, teacher=teacher, isolate=False)
    return result.model, time.perf_counter() - start


def params(model: onnx.ModelProto) -> int:
    """Parameters by onnxopt.analysis (initializers and Constant nodes)."""
    from onnxopt.analysis import analyze

    return analyze(model, serialized_size=False).parameters


# ----------------------------------------------------------------------------- MiniLM


def minilm_model() -> onnx.ModelProto:
    """The MiniLM export (exported to a temporary folder when /tmp/exports has none)."""
    if MINILM.is_file():
        return onnx.load(str(MINILM))
    from models.exports import export_text

    return onnx.load(str(export_text("dynamo-eager", Path(tempfile.mkdtemp()))))


def mlp_outputs(model: onnx.ModelProto) -> list[str]:
    """Outputs of the MLP MatMuls (weights of MLP_SIZE elements)."""
    inits = {t.name: t for t in model.graph.initializer}
    weights = {name for name, t in inits.items() if int(np.prod(t.dims)) == MLP_SIZE}
    return [n.output[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs ``names``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return copy


def embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the last hidden state over the attended tokens."""
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1)


def build(model: onnx.ModelProto, calib: dict[str, np.ndarray], specs: dict[str, str], more=None) -> dict[str, tuple]:
    """Variant name -> (model, lowrank counts, notes, seconds) for every pass string in ``specs``.

    Each ``asvd*`` variant is followed by ``reconstruct`` (original as teacher) as ``<name>+reconstruct``
    when that pass is registered; ``more(name, model)`` may return further specs to run.
    """
    import onnxopt

    built: dict[str, tuple] = {}
    teacher = model
    if BASE:  # the unfactorized model after the base passes: timed alone, and the teacher of reconstruct
        teacher = onnxopt.optimize(model, BASE, isolate=False).model
        built[BASE] = (teacher, {}, [], 0.0)
    queue = dict(specs)
    while queue:
        name = next(iter(queue))
        out, counts, notes, seconds = optimize(model, queue.pop(name), calib)
        built[name] = (out, counts, notes, seconds)
        if name.startswith("asvd") and has_reconstruct():
            refit, extra = reconstruct(out, teacher, calib)
            built[f"{name}+reconstruct"] = (refit, counts, notes, seconds + extra)
        if more is not None:
            queue.update(more(name, out, notes))
    return built


def scan_note(notes: list[str]) -> str:
    """The sensitivity-scan note."""
    return next((n for n in notes if "sensitivity scan" in n), "")


def add_latency(row: dict, models: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], runs: int) -> None:
    """Latency ratio of every variant to the original (interleaved runs)."""
    times = latency(models, feeds, runs)
    for name in models:
        if name != "original":
            row[name]["latency_ratio"] = round(times[name] / times["original"], 3)
    row["original_ms"] = round(times["original"] * 1000, 2)
    if not has_reconstruct():
        row["asvd+reconstruct"] = "missing: the reconstruct pass is not registered"


def bench_minilm(runs: int) -> dict:
    """MLP MatMuls at half their parameters: svd, asvd, asvd + reconstruct."""
    from models.calib_data import sentences, token_ids

    model = minilm_model()
    texts = sentences(96, seed=0)
    calib, evals = token_ids(texts[:64]), token_ids(texts[64:])
    layers = mlp_outputs(model)
    rule = f"ratio=0.5,by=params,min_size={MLP_SIZE}"
    built = build(model, calib, {"svd": f"lowrank:method=svd,{rule}", "asvd": f"lowrank:method=asvd,{rule}"})
    reference = run_all(session(with_outputs(model, layers)), evals)
    ref_embed = embeddings(reference["last_hidden_state"], evals["attention_mask"])
    row: dict = {"model": "minilm", "mlp_layers": len(layers), "params": params(model), "mlp_params": len(layers) * MLP_SIZE}
    for name, (out, counts, notes, seconds) in built.items():
        got = run_all(session(with_outputs(out, layers)), evals)
        embed = cosines(ref_embed, embeddings(got["last_hidden_state"], evals["attention_mask"]))
        layer_cos = [float(np.mean(cosines(reference[n], got[n]))) for n in layers]
        row[name] = {
            "embedding_cosine_mean": round(float(embed.mean()), 5),
            "embedding_cosine_min": round(float(embed.min()), 5),
            "output_cosine_mean": round(float(np.mean(cosines(reference["last_hidden_state"], got["last_hidden_state"]))), 5),
            "mlp_layer_cosine_mean": round(float(np.mean(layer_cos)), 4),
            "mlp_layer_cosine_min": round(float(np.min(layer_cos)), 4),
            "mlp_params_kept": round(1 - counts.get("params_removed", 0) / row["mlp_params"], 4),
            "params_removed_claimed": counts.get("params_removed", 0),
            "params_removed_recount": row["params"] - params(out),
            "seconds": round(seconds, 1),
            "scan": scan_note(notes),
        }
    add_latency(row, {"original": model, **{k: v[0] for k, v in built.items()}}, evals, runs)
    best = row["asvd+reconstruct"] if "asvd+reconstruct" in built else row["asvd"]
    row["bar_cosine_0.98"] = "met" if best["embedding_cosine_mean"] >= 0.98 else "NOT met"
    row["bar_latency_drops"] = "met" if best["latency_ratio"] < 1 else "NOT met"
    return row


# ----------------------------------------------------------------------------- conv models


def det_iou(ref: np.ndarray, got: np.ndarray, threshold: float = 0.3) -> float:
    """Probability-map IoU over all samples at ``threshold``."""
    inter = float(np.logical_and(ref > threshold, got > threshold).sum())
    union = float(np.logical_or(ref > threshold, got > threshold).sum())
    return inter / max(union, 1.0)


def conv_inputs(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """Document pages as the model's input."""
    from models.calib_data import document_images, ppocr_det_input

    if name == "resnet50":
        return {"pixel_values": ppocr_det_input(document_images(n, (224, 224), seed), imagenet=True)}
    return {"x": ppocr_det_input(document_images(n, (320, 320), seed))}


def conv_model(name: str) -> onnx.ModelProto:
    """ResNet-50 export or the cached PP-OCR det model."""
    if name == "resnet50":
        if not RESNET.is_file():
            raise SystemExit(f"{RESNET} is missing: python benchmarks/export_transformers.py")
        return onnx.load(str(RESNET))
    from models.real import fetch

    return onnx.load(str(fetch("ppocr_det")))


def whole_model_ratio(notes: list[str], conv_flops: int) -> float:
    """The ratio of the factorizable layers' FLOPs that halves all conv FLOPs (from the scan note's target), at most 0.9."""
    scan = next(n for n in notes if "sensitivity scan" in n)
    target = float(scan.split("of flops (")[1].split(")")[0])  # 0.5 of the candidates' FLOPs
    return min(0.9, 0.5 * conv_flops / (2 * target))


def bench_conv(name: str, runs: int) -> dict:
    """Convolutions at half their factorizable FLOPs (and at half of all conv FLOPs): svd, asvd, asvd + reconstruct."""
    model = conv_model(name)
    calib = conv_inputs(name, 16, seed=1)
    evals = conv_inputs(name, 8 if name == "resnet50" else 16, seed=2)
    conv_flops = flops_by_op(model, evals, ("Conv",))
    base = "lowrank:ratio=0.5,ops=Conv,calib_batches=2"

    def whole_model(variant: str, out: onnx.ModelProto, notes: list[str]) -> dict[str, str]:
        if variant != "asvd" or flops_by_op(out, evals, ("Conv",)) <= 0.52 * conv_flops:
            return {}
        return {"asvd@2x": base.replace("ratio=0.5", f"ratio={whole_model_ratio(notes, conv_flops):.3f}")}

    built = build(model, calib, {"svd": "lowrank:method=svd,ratio=0.5,ops=Conv", "asvd": base}, whole_model)
    row: dict = {"model": name, "conv_flops": conv_flops, "params": params(model)}
    reference = run_all(session(model), evals)
    first = next(iter(reference))
    for variant, (out, counts, notes, seconds) in built.items():
        got = run_all(session(out), evals)
        kept = flops_by_op(out, evals, ("Conv",))
        entry = {
            "cosine_mean": round(float(np.mean([np.mean(cosines(reference[k], got[k])) for k in reference])), 5),
            "layers_factorized": counts.get("layers_factorized", 0),
            "conv_flops_kept": round(kept / conv_flops, 4),
            "flops_removed_claimed": counts.get("flops_removed", 0),
            "flops_removed_recount": conv_flops - kept,
            "params_removed_claimed": counts.get("params_removed", 0),
            "params_removed_recount": row["params"] - params(out),
            "seconds": round(seconds, 1),
            "scan": scan_note(notes),
        }
        if name == "ppocr_det":
            entry["iou@0.3"] = round(det_iou(reference[first], got[first]), 4)
        row[variant] = entry
    add_latency(row, {"original": model, **{k: v[0] for k, v in built.items()}}, evals, runs)
    at_half = row.get("asvd@2x", row["asvd"])  # the variant with half the model's conv FLOPs
    row["bar_latency_0.7"] = f"{'met' if at_half['latency_ratio'] <= 0.7 else 'NOT met'} (conv FLOPs kept {at_half['conv_flops_kept']})"
    return row


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--base", default="default", help="passes run before lowrank, also timed alone ('': the file as shipped)")
    args = parser.parse_args()
    global BASE  # noqa: PLW0603 - a module setting, as EXPORTS in quantize.py
    BASE = args.base
    for name in args.models.split(","):
        row = bench_minilm(args.runs) if name == "minilm" else bench_conv(name, args.runs)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
