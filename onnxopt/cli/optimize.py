"""``onnxopt IN OUT`` / ``onnxopt optimize``: the passes, verification, qdq shorthands, calibration data and ``--engine``."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from onnxopt.cli.common import (
    _console,
    _load_checked,
    _progress,
    _progress_bar,
    _same_file,
    _setup_logging,
    _write_text,
    log,
    main,
    run_cli,
)
from onnxopt.cli.info import _list_passes_callback
from onnxopt.errors import OnnxoptError, OptionError


@main.command("optimize")
@click.argument("input_path", metavar="IN.onnx", type=click.Path(dir_okay=False), required=True)
@click.argument("output_path", metavar="OUT.onnx", type=click.Path(dir_okay=False), required=True)
@click.option(
    "--passes",
    "-p",
    default="default",
    show_default=True,
    help="Comma-separated passes/presets, e.g. cleanup,fold_constants:max_bytes=4096.",
)
@click.option(
    "--target",
    type=click.Choice(["portable", "trt", "ort-cpu", "ort-gpu"]),
    default="portable",
    show_default=True,
    help="Back end the passes optimize for.",
)
@click.option(
    "--opset", type=click.IntRange(1), default=None, help="Upgrade to this ai.onnx opset first (onnx's version converter, verified)."
)
@click.option("--verify", "verify", is_flag=True, help="Compare outputs with the original in onnxruntime; fail past the tolerance.")
@click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME:DxD...", help="Shape for a dynamic input (verification), repeatable."
)
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="An .npz with inputs for verification.")
@click.option(
    "--calib",
    "calib",
    metavar="PATH|random",
    help="Calibration data for passes that need it: an .npz, a folder of .npy/.npz files or images, or 'random' (testing only).",
)
@click.option(
    "--calib-preprocess",
    metavar="SPEC",
    help="Image preprocessing, e.g. resize=224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225,scale=1/255,layout=NCHW,color=RGB.",
)
@click.option("--calib-limit", type=click.IntRange(1), default=None, help="Use at most this many calibration samples.")
@click.option(
    "--max-error",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="qdq: keep the most sensitive layers float until the output error (1 - cosine) is below this; the ranking is reported.",
)
@click.option("--keep-float", type=click.IntRange(0), default=None, help="qdq: keep the N most sensitive layers float.")
@click.option(
    "--teacher",
    "teacher_path",
    type=click.Path(dir_okay=False),
    help="Reference model for reconstruct (default: the model before the first lossy pass).",
)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the run report as JSON.")
@click.option("--external-data/--no-external-data", default=None, help="Store weights in OUT.onnx.data (default: only when over 2 GB).")
@click.option(
    "--engine",
    "engine_path",
    type=click.Path(dir_okay=False),
    help="Also build a TensorRT engine from OUT.onnx into this file (back end auto; --input-shape fixes dynamic dims).",
)
@click.option(
    "--list-passes", is_flag=True, expose_value=False, is_eager=True, callback=_list_passes_callback, help="List passes and exit."
)
@click.option("-v", "--verbose", count=True, help="More output (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--debug", is_flag=True, help="Verify after every pass (naming the first that diverges) and show tracebacks.")
def optimize_command(**options) -> None:
    """Optimize IN.onnx into OUT.onnx (the input file is never modified)."""
    request = OptimizeRequest(**options)
    _setup_logging(request.verbose, request.quiet)
    run_cli(lambda: _optimize(request), request.debug)


@dataclass(frozen=True)
class OptimizeRequest:
    """The options of one ``onnxopt IN OUT`` run, as click parsed them."""

    input_path: str
    output_path: str
    passes: str
    target: str
    opset: int | None
    verify: bool
    input_shapes: tuple[str, ...]
    inputs_path: str | None
    calib: str | None
    calib_preprocess: str | None
    calib_limit: int | None
    max_error: float | None
    keep_float: int | None
    teacher_path: str | None
    report_path: str | None
    external_data: bool | None
    engine_path: str | None
    verbose: int
    quiet: bool
    debug: bool


def _optimize(req: OptimizeRequest) -> None:
    """Load, optimize, save and report one model."""
    from onnxopt.io import save
    from onnxopt.manager import PassManager
    from onnxopt.pipeline import build_pipeline
    from onnxopt.verify import Verifier, parse_shape_overrides

    if _same_file(req.input_path, req.output_path) or os.path.abspath(req.input_path) == os.path.abspath(req.output_path):
        raise OnnxoptError("OUT.onnx is the input file; the input is never overwritten, choose another path")
    if req.output_path and _same_file(f"{req.input_path}.data", f"{req.output_path}.data"):
        raise OnnxoptError("the output's data file would overwrite the input's; choose another path")
    steps = build_pipeline(req.passes)  # reject bad pass strings before loading anything
    _apply_qdq_flags(req, steps)
    shapes = parse_shape_overrides(req.input_shapes)
    model = _load_checked(req.input_path)
    calibration = _calibration(req, model, shapes)
    teacher = _load_checked(req.teacher_path) if req.teacher_path else None
    mode = "each" if req.debug else ("end" if req.verify else "off")
    manager = PassManager(
        steps,
        target=req.target,
        verify=mode,
        progress=_progress(req.quiet),
        opset=req.opset,
        calibration=calibration,
        teacher=teacher,
        isolate=not req.debug,  # --debug: a failing pass stops the run with its traceback instead of being rolled back
    )
    if mode != "off":
        manager.verifier = Verifier.from_model(model, inputs=req.inputs_path, input_shapes=shapes)
    result = manager.run(model)
    save(result.model, req.output_path, external_data=req.external_data)
    report = result.report
    if req.report_path:
        _write_text(req.report_path, report.to_json())
    if req.quiet:  # a pass that failed and was rolled back did not do what was asked: said even with -q
        for record in report.passes:
            if record.status == "rolled back":
                click.echo(f"warning: pass '{record.name}' failed and was rolled back ({record.message})", err=True)
    else:
        from onnxopt.report import render

        render(report, _console(), verbose=req.verbose > 0)
        if report.verification:
            click.echo(_verification_line(report.verification), err=True)
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        for warning in report.warnings:
            log.warning("%s", warning)
    if req.engine_path:
        _build_after_optimize(req, result.model, shapes)


def _apply_qdq_flags(req: OptimizeRequest, steps: list) -> None:
    """``--max-error`` / ``--keep-float``: shorthands for the qdq pass's options (an error without a qdq pass)."""
    from onnxopt.pipeline import set_pass_options

    values = {k: v for k, v in (("max_error", req.max_error), ("keep_float", req.keep_float)) if v is not None}
    if values and not set_pass_options(steps, "qdq", **values):
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in values)
        raise OptionError(f"{flags} set options of the qdq pass, which is not in --passes")


def _build_after_optimize(req: OptimizeRequest, model, shapes: dict) -> None:  # noqa: ANN001
    """``--engine``: build OUT.onnx's engine with the default options; --input-shape values become fixed profiles."""
    from onnxopt.engine import build_engine
    from onnxopt.engine.report import render as render_build

    result = build_engine(model, shapes=shapes, shapes_hint="--input-shape (fixed shapes; use onnxopt build --shapes for ranges)")
    result.report.model = req.output_path
    result.save(req.engine_path)
    if req.report_path:
        data = json.loads(Path(req.report_path).read_text())
        data["engine"] = result.report.to_dict()
        _write_text(req.report_path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    if not req.quiet:
        render_build(result.report, _console())
        click.echo(f"engine written to {req.engine_path}", err=True)


def _calibration(req: OptimizeRequest, model, shapes):  # noqa: ANN001, ANN202
    """The run's calibration data (None without --calib), its notes printed (random data: a warning), a bar while statistics run."""
    if req.calib is None:
        if req.calib_preprocess or req.calib_limit:
            raise OnnxoptError("--calib-preprocess and --calib-limit need --calib")
        return None
    from onnxopt.calibration import CalibrationData

    data = CalibrationData.resolve(req.calib, model, preprocess=req.calib_preprocess, limit=req.calib_limit, input_shapes=shapes)
    from onnxopt.calibration.data import RANDOM_WARNING

    for note in data.notes:
        if note == RANDOM_WARNING:
            log.warning("%s", note)
        elif not req.quiet:
            click.echo(f"note: {note}", err=True)
    if not req.quiet and sys.stderr.isatty():
        data.progress = _progress_bar("calibration statistics")
    return data


def _verification_line(data: dict) -> str:
    outputs = data.get("outputs", [])
    worst = max((o["max_abs"] for o in outputs), default=0.0)
    cos = min((o["cosine"] for o in outputs), default=1.0)
    verdict = "passed" if data.get("passed") else "FAILED"
    return f"verification {verdict} ({data.get('precision')}): max abs diff {worst:.3g}, min cosine {cos:.6f}"
