"""Structured channel pruning side by side: ``prune_channels`` with uniform and sensitivity allocation (and ``reconstruct``).

    python benchmarks/prune.py [--models resnet50,ppocr_det] [--ratio 0.3] [--runs 30] [--options ,round_to=16] [--keep DIR]

Models: ResNet-50 (the torch==2.13.0 legacy export, /tmp/exports/resnet50-legacy.onnx, exported
with models/exports.py when absent; inputs: document pages at 224x224, ImageNet normalisation)
and PP-OCR det (models.real; inputs: models/calib_data.py pages at 320x320). Each variant
calibrates on 32 inputs and is evaluated on 16 others. Columns: FLOPs and parameters before ->
after, recounted with onnxopt.analysis on the written model (static input shapes); onnxruntime
CPU latency at 1 thread, the median of ``--runs`` interleaved runs, as a ratio to the unpruned
model timed in the same loop (det: a 640x640 page); fidelity: mean output cosine over the eval
inputs (det: also the probability-map IoU at 0.3, as benchmarks/quantize.py measures it).
The ``+reconstruct`` column runs only when a ``reconstruct`` pass is registered. Every variant
runs after ``--base`` (default: the ``default`` preset, as a user would), which is also timed
alone: its latency ratio shows what pruning adds over the unpruned optimized model.
"""

from __future__ import annotations

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

MODELS = ("resnet50", "ppocr_det")
CALIB, EVAL = 32, 16
RESNET_EXPORT = Path("/tmp/exports/resnet50-legacy.onnx")


def source(name: str, tmp: Path) -> Path:
    """The unpruned model file."""
    if name == "resnet50":
        if RESNET_EXPORT.exists():
            return RESNET_EXPORT
        from models.exports import export

        return export("resnet50-legacy", tmp, "bench")
    from models import real

    return real.fetch(name)


def inputs(name: str, n: int, seed: int, size: int | None = None) -> dict[str, np.ndarray]:
    """Realistic feeds: document pages (ImageNet-normalised for ResNet-50)."""
    from models.calib_data import document_images, ppocr_det_input, ppocr_inputs

    if name == "resnet50":
        side = size or 224
        return {"pixel_values": ppocr_det_input(document_images(n, (side, side), seed), imagenet=True)}
    side = size or 320
    return ppocr_inputs("ppocr_det", n, seed, size=(side, side))


def outputs(sess, feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    """All outputs of every sample, run one at a time."""
    count = len(next(iter(feeds.values())))
    return [sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(count)]


def fidelity(name: str, ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict[str, float]:
    """Mean cosine of all outputs per sample; det: probability-map IoU at 0.3."""
    cos = []
    for a, b in zip(ref, got):
        x = np.concatenate([o.ravel().astype(np.float64) for o in a])
        y = np.concatenate([o.ravel().astype(np.float64) for o in b])
        cos.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30)))
    out = {"cosine": round(float(np.mean(cos)), 5)}
    if name == "ppocr_det":
        inter = sum(float(np.logical_and(a[0] > 0.3, b[0] > 0.3).sum()) for a, b in zip(ref, got))
        union = sum(float(np.logical_or(a[0] > 0.3, b[0] > 0.3).sum()) for a, b in zip(ref, got))
        out["iou@0.3"] = round(inter / max(union, 1.0), 4)
    return out


def recount(model: onnx.ModelProto, shape_feeds: dict[str, np.ndarray]) -> tuple[int, int]:
    """(parameters, FLOPs) by onnxopt.analysis with the inputs fixed to the feeds' shapes (batch 1)."""
    from onnxopt.analysis import analyze
    from onnxopt.shapes import infer_types, light_copy

    light = light_copy(model)
    for value in light.graph.input:
        if value.name in shape_feeds:
            for dim, size in zip(value.type.tensor_type.shape.dim, (1, *shape_feeds[value.name].shape[1:])):
                dim.Clear()
                dim.dim_value = int(size)
    del light.graph.value_info[:]
    stats = analyze(model, infer_types(light), serialized_size=False)
    return stats.parameters, stats.flops


def variants(ratio: float, extra: str, base: str = "default") -> dict[str, str]:
    """Pass strings per column, each after ``base`` (also a column alone); '+reconstruct' only when the pass is registered."""
    from onnxopt.registry import all_passes

    spec = f"{base}," * bool(base) + f"prune_channels:ratio={ratio}{extra}"
    out = {base: base} if base else {}
    out.update({"uniform": f"{spec},allocation=uniform", "sensitivity": f"{spec},allocation=sensitivity"})
    if "reconstruct" in all_passes():
        out["sensitivity+reconstruct"] = f"{spec},allocation=sensitivity,reconstruct"
    else:
        print("# +reconstruct column skipped: no 'reconstruct' pass is registered", flush=True)
    return out


def bench(name: str, args, tmp: Path, out_dir: Path) -> dict:
    """One model: every variant pruned, recounted, timed and scored against the unpruned model."""
    import onnxopt
    from onnxopt.calibration import CalibrationData

    src = source(name, tmp)
    original = onnx.load(str(src))
    calib, evals = inputs(name, CALIB, seed=1), inputs(name, EVAL, seed=2)
    timing = inputs(name, 1, seed=3, size=640) if name == "ppocr_det" else evals
    row: dict = {"model": name, "ratio": args.ratio}
    params, flops = recount(original, calib)
    row["before"] = {"params": params, "flops": flops}
    paths = {"fp32": src}
    extra = f",scan_batch_size={args.scan_batch_size}{args.options}"
    for key, passes in variants(args.ratio, extra, args.base).items():
        start = time.perf_counter()
        try:
            data = CalibrationData.from_arrays(calib, model=original)
            result = onnxopt.optimize(original, passes, calibration=data)
        except Exception as exc:  # noqa: BLE001 - the benchmark reports failures
            row[key] = f"failed ({type(exc).__name__}: {str(exc)[:200]})"
            continue
        rolled = [f"{r.name}: {r.message}" for r in result.report.passes if r.status == "rolled back"]
        path = out_dir / f"{name}.{key}.onnx"
        onnx.save(result.model, str(path))
        p, f = recount(result.model, calib)
        notes = [n for r in result.report.passes for n in r.notes]
        row[key] = {
            "seconds": round(time.perf_counter() - start, 1),
            "params": p,
            "flops": f,
            "flops_removed": round(1 - f / flops, 4),
            "params_removed": round(1 - p / params, 4),
            "claimed": next((n for n in notes if "recounted" in n), ""),
            "rolled_back": rolled,
        }
        paths[key] = path
        if args.verbose:
            print("\n".join(f"# {name} {key}: {n}" for n in notes), flush=True)
    reference = outputs(session(src), evals)
    for key, path in paths.items():
        if key != "fp32":
            row[key]["fidelity"] = fidelity(name, reference, outputs(session(path), evals))
    times = latency(paths, timing, args.runs)
    row["fp32_ms"] = round(times["fp32"] * 1000, 2)
    for key in paths:
        if key != "fp32":
            row[key]["latency_ratio"] = round(times[key] / times["fp32"], 3)
    return row


def table(rows: list[dict]) -> str:
    """A plain-text summary table."""
    lines = [f"{'model':<10} {'variant':<24} {'FLOPs -%':>8} {'params -%':>9} {'latency':>8} {'cosine':>8} {'IoU@0.3':>8}"]
    for row in rows:
        for key, cell in row.items():
            if not isinstance(cell, dict) or "flops" not in cell or key == "before":
                continue
            fid = cell.get("fidelity", {})
            nan = float("nan")
            lines.append(
                f"{row['model']:<10} {key:<24} {100 * cell['flops_removed']:>8.1f} {100 * cell['params_removed']:>9.1f} "
                f"{cell.get('latency_ratio', nan):>8.3f} {fid.get('cosine', nan):>8.4f} {fid.get('iou@0.3', nan):>8.4f}"
            )
    return "\n".join(lines)


def main() -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--scan-batch-size", type=int, default=4, help="samples per sensitivity-scan batch (2 batches)")
    parser.add_argument("--options", default="", help="more prune_channels options, e.g. ',round_to=16'")
    parser.add_argument("--base", default="default", help="passes run before pruning, also timed alone ('': prune the file as shipped)")
    parser.add_argument("--keep", default="", help="folder to keep the pruned models in")
    parser.add_argument("--verbose", action="store_true", help="print the pass notes (the scan, per-layer channels)")
    args = parser.parse_args()
    if args.runs < 30:
        print("# note: fewer than 30 timing runs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            row = bench(name, args, Path(tmp), out_dir)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
