"""FP16 side by side: onnxopt's `fp16` pass against onnxconverter-common's float16 conversion.

For each real model (and every .onnx in --exports): does the result load and run in onnxruntime,
output cosine against the float32 model on realistic inputs (rendered pages and text lines for
PP-OCR, docstring sentences for the MiniLM exports, random bytes for magika), file size ratio,
and onnxruntime CPU latency ratio (1 thread, median of --runs interleaved runs; the CPU EP runs
most float16 ops through its own Casts, so speed is not the point here: TensorRT is).

    python benchmarks/fp16.py [--exports /tmp/exports] [--runs 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # models/ lives at the repository root
    sys.path.insert(0, str(ROOT))

import onnxopt  # noqa: E402
from models.calib_data import minilm_inputs, ppocr_inputs  # noqa: E402
from models.real import REAL_MODELS, RealModelError, fetch  # noqa: E402


def feeds_for(name: str, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Realistic inputs: PP-OCR pages/lines, MiniLM sentences, magika bytes; generated ones otherwise."""
    if name.startswith("ppocr"):
        return ppocr_inputs(name, 2, seed=7)
    if name.startswith("minilm"):
        return minilm_inputs(8, 128, seed=7)
    if name == "magika":
        return {"bytes": np.random.default_rng(7).integers(0, 257, (2, 2048)).astype(np.int32)}
    from onnxopt.verify import generate_inputs

    return generate_inputs(model, {i.name: (1, 3, 224, 224) for i in model.graph.input}, seed=7)[0]


def session(path: str) -> ort.InferenceSession:
    """A one-thread CPU session, default optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The smallest cosine similarity over the outputs."""
    worst = 1.0
    for x, y in zip(a, b):
        x64, y64 = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        if not np.issubdtype(np.asarray(x).dtype, np.floating):
            worst = min(worst, float(np.mean(x64 == y64)))
            continue
        norm = np.linalg.norm(x64) * np.linalg.norm(y64)
        worst = min(worst, float(x64 @ y64 / norm) if norm else float(np.array_equal(x64, y64)))
    return worst


def convert_onnxopt(src: Path, dst: Path) -> None:
    """onnxopt: the default preset, then fp16."""
    onnxopt.save(onnxopt.optimize(str(src), "default,fp16").model, str(dst))


def convert_occ(src: Path, dst: Path) -> None:
    """onnxconverter-common: float16 with the model's input/output types kept."""
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


TOOLS = {"onnxopt fp16": convert_onnxopt, "onnxconverter-common": convert_occ}


def bench(name: str, src: Path, workdir: Path, runs: int) -> list[dict]:
    """Rows for one model: every tool's load/run status, cosine, size and latency ratios."""
    original = onnx.load(str(src))
    feeds = feeds_for(name, original)
    reference = session(str(src))
    expected = reference.run(None, feeds)
    rows, sessions = [], {"fp32": reference}
    for tool, convert in TOOLS.items():
        dst = workdir / f"{name}.{tool.split()[0]}.onnx"
        row = {"model": name, "tool": tool, "status": "ok"}
        try:
            convert(src, dst)
            sessions[tool] = session(str(dst))
            row["cosine"] = cosine(expected, sessions[tool].run(None, feeds))
            row["size_ratio"] = dst.stat().st_size / src.stat().st_size
        except Exception as exc:  # a failing tool is a row, not a crash
            row["status"] = " ".join(str(exc).split())[:120]
            sessions.pop(tool, None)
        rows.append(row)
    times: dict[str, list[float]] = {key: [] for key in sessions}
    order = list(sessions)
    for round_ in range(runs):
        shift = round_ % len(order)
        for key in order[shift:] + order[:shift]:
            start = time.perf_counter()
            sessions[key].run(None, feeds)
            times[key].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    for row in rows:
        if row["tool"] in times:
            row["latency_ratio"] = statistics.median(times[row["tool"]]) / base
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", type=Path, help="also every .onnx file in this folder")
    parser.add_argument("--runs", type=int, default=20, help="interleaved latency runs per variant")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    models: dict[str, Path] = {}
    for name in REAL_MODELS:
        try:
            models[name] = Path(fetch(name))
        except RealModelError as exc:
            print(f"{name}: unavailable ({exc})")
    if args.exports:
        models.update({p.stem: p for p in sorted(args.exports.glob("*.onnx"))})
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-fp16-") as tmp:
        for name, path in models.items():
            rows += bench(name, path, Path(tmp), args.runs)
            for row in rows[-len(TOOLS) :]:
                print(
                    f"{row['model']:22s} {row['tool']:22s} {row['status'][:60]:60s} "
                    f"cosine {row.get('cosine', float('nan')):.6f}  size {row.get('size_ratio', float('nan')):.3f}  "
                    f"latency {row.get('latency_ratio', float('nan')):.3f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
