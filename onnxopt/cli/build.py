"""``onnxopt build``: a strongly typed TensorRT / TensorRT-RTX engine from a model, or only the parser's pre-flight (--check)."""

from __future__ import annotations

import json
import os

import click

from onnxopt.cli.common import _console, _load_checked, _same_file, _setup_logging, _write_text, main, run_cli
from onnxopt.errors import OnnxoptError


@main.command("build")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), help="Engine file to write (required unless --check).")
@click.option(
    "--backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto", show_default=True, help="TensorRT back end."
)
@click.option(
    "--shapes",
    "shapes",
    multiple=True,
    metavar="NAME:MIN/OPT/MAX",
    help="Optimization profile of a dynamic input, each shape DxDxD (one shape: fixed); repeatable.",
)
@click.option("--workspace", metavar="SIZE", help="Workspace memory limit, e.g. 512M or 2G.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimization level (0-5).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file: loaded, merged and saved (full TensorRT).")
@click.option(
    "--sparsity",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="2:4 sparse weights (auto: on when Conv/MatMul/Gemm weights are 2:4 sparse).",
)
@click.option(
    "--hardware-compat",
    type=click.Choice(["none", "ampere+", "same-cc"]),
    default="none",
    show_default=True,
    help="Hardware compatibility level (full TensorRT).",
)
@click.option("--version-compatible", is_flag=True, help="Version-compatible engine (full TensorRT).")
@click.option("--check", is_flag=True, help="Pre-flight only: parse and list what the parser rejects; build nothing.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the build report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def build_command(model_path, output_path, backend, shapes, workspace, opt_level, timing_cache, sparsity, hardware_compat, **rest) -> None:
    """Build a strongly typed TensorRT / TensorRT-RTX engine from MODEL.onnx (precision comes from the graph)."""
    _setup_logging(0, rest["quiet"])

    def work() -> None:
        from onnxopt.engine import build_engine, preflight
        from onnxopt.engine.report import render as render_build

        if rest["check"]:
            report = preflight(_load_checked(model_path), backend=backend)
            for finding in report.findings:
                click.echo(f"{finding.level}: {finding.line()}", err=True)
            if rest["report_path"]:
                _write_text(rest["report_path"], json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
            if not report.ok:
                from onnxopt.engine import PreflightError

                raise PreflightError(report)
            click.echo(f"{model_path}: the ONNX parser of {report.backend} accepts the model", err=True)
            return
        if not output_path:
            raise OnnxoptError("give the engine file with -o MODEL.engine (or --check to only parse)")
        if _same_file(model_path, output_path) or os.path.abspath(model_path) == os.path.abspath(output_path):
            raise OnnxoptError("the engine file is the input model; choose another path")
        result = build_engine(
            _load_checked(model_path),
            backend=backend,
            workspace=workspace,
            opt_level=opt_level,
            shapes=list(shapes),
            timing_cache=timing_cache,
            sparsity=sparsity,
            hardware_compat=hardware_compat,
            version_compatible=rest["version_compatible"],
        )
        result.report.model = model_path
        result.save(output_path)
        if rest["report_path"]:
            _write_text(rest["report_path"], result.report.to_json())
        if not rest["quiet"]:
            render_build(result.report, _console())
            click.echo(f"engine written to {output_path}", err=True)

    run_cli(work, rest["debug"])
