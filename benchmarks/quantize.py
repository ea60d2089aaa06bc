"""INT8 side by side: onnxopt's ``qdq`` pass and onnxruntime's quantize_static on the real models.

    python benchmarks/quantize.py [--models ppocr_det,ppocr_rec,ppocr_cls,magika,minilm] [--runs 30] [--passes ...]
                                  [--reduce-range]

Both tools calibrate on the same 32 realistic inputs (models/calib_data.py; magika: byte
features of Python standard library files) and are evaluated on 16 other ones (PP-OCR rec: 256
text lines, 10240 steps, since its per-step agreement moves by 0.0016 per step on 16 lines; cls 1024 lines and
magika 256 files, where one flip in 16 moves top-1 agreement by 0.06). ``--reduce-range`` gives every ``qdq`` and
``int8_dynamic`` of the pipelines ``reduce_range=true`` (7-bit weights, for x86 CPUs without VNNI, where
onnxruntime's uint8 x int8 kernels saturate with 8-bit ones); each row says whether this CPU is one
(``cpu_saturates_int8``). onnxruntime's
quantizer runs in a child process (it crashes on some models) in its fast CPU form: QDQ, uint8
activations, int8 per-channel weights, on the model upgraded to opset 13 (it needs that for
per-channel) and passed through its own ``quant_pre_process`` (without it, weights stored as
Constant nodes stay float and are quantized at run time, which is slower than FP32).
Latency: onnxruntime CPU, 1 thread, median of ``--runs`` interleaved runs of FP32, onnxopt and
onnxruntime. Fidelity: det probability-map IoU at 0.3, rec per-step top-1
agreement, cls / magika top-1 agreement, plus mean cosine of the outputs.

``minilm`` is the MiniLM-size BERT export (torch 2.13, random weights; ``--exports DIR`` holds
``minilm-dynamo-eager.onnx`` or it is exported there) on real sentences at 128 tokens; its anchor
is onnxruntime's per-channel dynamic INT8 (quantize_dynamic), its metric the cosine of the
mean-pooled sentence embeddings (mean and min over the evaluation sentences). Its passes are
``default,int8_dynamic:rounding=gptq`` (INT8 weights rounded by GPTQ on the calibration sentences,
inputs quantized per call: the fast CPU form for encoders), PP-OCR rec's
``default,int8_dynamic,qdq:rounding=gptq,float_share=0.9,qoperator`` (its attention MatMuls dynamic, its
convs static with GPTQ rounding, and float (int8 weights) the layers with the most error per MAC within
90% of the quantized MACs), the others' ``default,qdq,qoperator`` (``qoperator``: the Q/DQ groups stored as
onnxruntime's QLinear kernels, the same outputs in a smaller file); ``--passes`` sets one pipeline for every model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
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

from onnxopt.cpu import int8_pairs_saturate  # noqa: E402

MODELS = ("ppocr_det", "ppocr_rec", "ppocr_cls", "magika", "minilm")
EXPORTS = Path("/tmp/exports")
CALIB, EVAL = 32, 16
# per-step agreement of 40-step lines: near-tie steps flip with one-LSB changes anywhere in the network, so four sets of
# 64 lines differ by up to 0.004; 256 lines (10240 steps) tell 0.978 from 0.982
EVAL_SAMPLES = {"ppocr_rec": 256, "ppocr_cls": 1024, "magika": 256}
# every other model: default,qdq,qoperator. rec: its MatMuls dynamic (no clipping), its convs static with GPTQ rounding, and the
# layers with the most output error per MAC kept float (int8 weights, float compute) within 90% of the quantized layers'
# MACs (0.4: top-1 0.977, 0.8: 0.982, 0.9: 0.988 on 4 x 64 lines, all at about 0.58 of FP32 latency once qdq fuses the
# hard-swish of the float layers). minilm: GPTQ-rounded int8 weights (calibration sentences), inputs quantized per call.
# qoperator (stop 18) writes the Q/DQ groups as the QLinear kernels onnxruntime builds from them: same outputs, smaller files.
PASSES = {
    "minilm": "default,int8_dynamic:rounding=gptq",
    "ppocr_rec": "default,int8_dynamic,qdq:rounding=gptq,float_share=0.9,qoperator",
}
DEFAULT_PASSES = "default,qdq,qoperator"


def _cached(name: str) -> Path:
    if name == "minilm":
        path = EXPORTS / "minilm-dynamo-eager.onnx"
        if not path.exists():
            from models.exports import export

            EXPORTS.mkdir(parents=True, exist_ok=True)
            export("dynamo-eager", EXPORTS)
        return path
    folder = Path.home() / ".cache" / "onnxopt" / "models"
    found = sorted(folder.glob(f"{name}-*.onnx"))
    if not found:
        raise SystemExit(f"{name}: not in {folder}; run `python -m models.real fetch all`")
    return found[0]


def magika_inputs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Byte features (first and last 1024 bytes, padded with 256) of Python standard library files."""
    import os

    folder = Path(os.__file__).parent
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > 64 and "__pycache__" not in p.parts)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(files), size=n, replace=False)
    rows = []
    for index in picks:
        data = files[index].read_bytes()
        head, tail = data[:1024], data[-1024:]
        row = np.full(2048, 256, np.int32)
        row[: len(head)] = np.frombuffer(head, np.uint8)
        row[2048 - len(tail) :] = np.frombuffer(tail, np.uint8)
        rows.append(row)
    return {"bytes": np.stack(rows)}


def inputs(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """Realistic feeds for one model."""
    from models.calib_data import minilm_inputs, ppocr_inputs

    if name == "minilm":
        return minilm_inputs(n, seq_len=128, seed=seed)
    return magika_inputs(n, seed) if name == "magika" else ppocr_inputs(name, n, seed)


def _distinct_dim_names(model: onnx.ModelProto) -> None:
    """Give repeated dynamic dim names of the inputs distinct names (ppocr_cls names both H and W '?', which
    onnxopt's calibration check reads as one dim; see the report)."""
    for value in model.graph.input:
        for index, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param == "?":
                dim.dim_param = f"{value.name}_dim{index}"


def ort_child(src: str, dst: str, calib: str) -> None:
    """Child side: onnxruntime's quantize_static (QDQ, uint8 activations, per-channel int8 weights), or quantize_dynamic for minilm."""
    from onnx.version_converter import convert_version
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if "minilm" in Path(src).name:
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
        return
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(src)
    version = next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    if version < 13:
        model = convert_version(model, 13)
    upgraded = dst + ".src.onnx"
    onnx.save(model, upgraded)
    try:  # onnxruntime's recommended preprocessing (its optimizer turns Constant weights into initializers)
        quant_pre_process(upgraded, upgraded, skip_symbolic_shape=True)
    except Exception as exc:  # noqa: BLE001 - quantize the upgraded model as it is
        print(f"quant_pre_process failed: {str(exc)[:150]}", file=sys.stderr)
    arrays = dict(np.load(calib))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            count = len(next(iter(arrays.values())))
            self.items = iter([{k: v[i : i + 1] for k, v in arrays.items()} for i in range(count)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(
        upgraded,
        dst,
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )


def run_ort_quantizer(src: Path, dst: Path, calib: dict[str, np.ndarray], tmp: Path) -> str:
    """Run :func:`ort_child` in a child process; 'ok' or a short failure."""
    npz = tmp / "calib.npz"
    np.savez(npz, **calib)
    proc = subprocess.run(
        [sys.executable, __file__, "--ort-child", str(src), str(dst), str(npz)], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
        return f"failed (exit {proc.returncode}: {lines[-1][:150] if lines else 'no message'})"
    return "ok"


def outputs(sess, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of every sample, run one at a time."""
    count = len(next(iter(feeds.values())))
    result = []
    for i in range(count):
        result.append(sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0])
    return result


def _embedding_cosines(ref: list[np.ndarray], got: list[np.ndarray], masks: np.ndarray) -> list[float]:
    """Cosine of mean-pooled (over real tokens) sentence embeddings, per sentence."""
    out = []
    for a, b, mask in zip(ref, got, masks):
        weights = mask.astype(np.float64)[None, :, None]
        ea, eb = (a * weights).sum(1).ravel() / weights.sum(), (b * weights).sum(1).ravel() / weights.sum()
        out.append(float(np.dot(ea, eb) / (np.linalg.norm(ea) * np.linalg.norm(eb) + 1e-12)))
    return out


def fidelity(name: str, ref: list[np.ndarray], got: list[np.ndarray], feeds: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """The task metric of one model (and mean cosine) between FP32 and INT8 outputs."""
    if name == "minilm" and feeds is not None:
        cos = _embedding_cosines(ref, got, feeds["attention_mask"])
        return {"cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos))}
    cos = [float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)) for a, b in zip(ref, got)]
    out = {"cosine": float(np.mean(cos))}
    if name == "ppocr_det":
        inter = sum(float(np.logical_and(a > 0.3, b > 0.3).sum()) for a, b in zip(ref, got))
        union = sum(float(np.logical_or(a > 0.3, b > 0.3).sum()) for a, b in zip(ref, got))
        out["iou@0.3"] = inter / max(union, 1.0)
    else:
        agree = [np.mean(a.argmax(-1) == b.argmax(-1)) for a, b in zip(ref, got)]
        out["top1"] = float(np.mean(agree))
    return out


def with_reduce_range(passes: str) -> str:
    """``passes`` with ``reduce_range=true`` on each qdq and int8_dynamic (``qdq:a=1,b=2``: options follow the name)."""
    out = []
    for item in passes.split(","):
        if item.split(":", 1)[0] in ("qdq", "int8_dynamic"):
            item += ",reduce_range=true" if ":" in item else ":reduce_range=true"
        out.append(item)
    return ",".join(out)


def bench(name: str, runs: int, passes: str, out_dir: Path) -> dict:
    """One model: quantize with both tools, then measure latency, size and fidelity."""
    import onnxopt
    from onnxopt.calibration import CalibrationData

    src = _cached(name)
    calib = inputs(name, CALIB, seed=1)
    evals = inputs(name, EVAL_SAMPLES.get(name, EVAL), seed=2)
    row: dict = {"model": name, "cpu_saturates_int8": int8_pairs_saturate()}
    paths = {"fp32": src}
    mine = out_dir / f"{name}.onnxopt.onnx"
    start = time.perf_counter()
    try:
        model = onnx.load(str(src))
        _distinct_dim_names(model)
        result = onnxopt.optimize(model, passes, target="ort-cpu", calibration=CalibrationData.from_arrays(calib, model=model))
        onnx.save(result.model, str(mine))
        row["onnxopt"] = "ok"
        row["onnxopt_passes"] = passes
        row["onnxopt_notes"] = (result.report.warnings + result.report.notes)[:20]
        paths["onnxopt"] = mine
    except Exception as exc:  # noqa: BLE001 - the benchmark reports failures
        row["onnxopt"] = f"failed ({type(exc).__name__}: {str(exc)[:150]})"
    row["onnxopt_seconds"] = round(time.perf_counter() - start, 1)
    theirs = out_dir / f"{name}.ort.onnx"
    start = time.perf_counter()
    row["ort"] = run_ort_quantizer(src, theirs, calib, out_dir)
    row["ort_seconds"] = round(time.perf_counter() - start, 1)
    if row["ort"] == "ok":
        paths["ort"] = theirs
    runnable = {}
    reference = None
    for key, path in paths.items():
        try:
            got = outputs(session(path), evals)
        except Exception as exc:  # noqa: BLE001
            row[key] = f"does not run ({str(exc)[:120]})"
            continue
        runnable[key] = path
        if key == "fp32":
            reference = got
        elif reference is not None:
            row[f"{key}_fidelity"] = fidelity(name, reference, got, evals)
            row[f"{key}_size_ratio"] = round(path.stat().st_size / src.stat().st_size, 3)
    times = latency(runnable, evals, runs)
    for key in runnable:
        if key != "fp32":
            row[f"{key}_latency_ratio"] = round(times[key] / times["fp32"], 3)
    row["fp32_ms"] = round(times["fp32"] * 1000, 2)
    return row


def main() -> None:
    """Command line: see the module docstring."""
    global EXPORTS  # noqa: PLW0603 - the export folder is a module setting
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--passes", default="", help="one pipeline for every model (default: per model, see above)")
    parser.add_argument("--exports", default=str(EXPORTS), help="folder of the torch exports (minilm)")
    parser.add_argument("--keep", default="", help="folder to keep the quantized models in")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit weights: reduce_range=true on every qdq / int8_dynamic")
    parser.add_argument("--ort-child", nargs=3, metavar=("SRC", "DST", "CALIB"))
    args = parser.parse_args()
    EXPORTS = Path(args.exports)
    if args.ort_child:
        ort_child(*args.ort_child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.keep) if args.keep else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            passes = args.passes or PASSES.get(name, DEFAULT_PASSES)
            if args.reduce_range:
                passes = with_reduce_range(passes)
            print(json.dumps(bench(name, args.runs, passes, out_dir)), flush=True)


if __name__ == "__main__":
    main()
