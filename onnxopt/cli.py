"""Command-line interface (click).

``onnxopt IN OUT [--passes ...]`` optimizes (the default command); ``onnxopt passes``,
``onnxopt verify A B`` and ``onnxopt inspect M`` are subcommands. Every user error is one
line on stderr with a non-zero exit; ``--debug`` shows tracebacks instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from onnxopt.errors import InvalidModelError, OnnxoptError, OptionError

log = logging.getLogger("onnxopt")


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, runs ``optimize``."""

    default_command = "optimize"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Insert ``optimize`` when the first argument is not a subcommand."""
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        elif not args:
            args = ["--help"]
        return super().parse_args(ctx, args)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING
    if verbose > 1:
        level = logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("onnxopt")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _console():
    from rich.console import Console

    width = None if sys.stderr.isatty() else 160  # piped: do not squeeze the table to 80 columns
    return Console(stderr=True, highlight=False, width=width)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"onnxopt: error: {message}", err=True)
    sys.exit(code)


def run_cli(func, debug: bool) -> None:
    """Run ``func`` turning every error into one line on stderr (tracebacks with --debug)."""
    try:
        func()
    except OnnxoptError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except (click.exceptions.Exit, click.ClickException, SystemExit):
        raise
    except Exception as exc:  # a bug: still one line unless debugging
        if debug:
            raise
        text = " ".join(str(exc).split())[:300]
        _fail(f"internal error ({type(exc).__name__}: {text}); rerun with --debug for the traceback", 70)


def _load_checked(path: str, *, validate: bool = True):
    from onnxopt.io import load
    from onnxopt.validate import validate_model

    model = load(path)
    if validate:
        try:
            warnings = validate_model(model)
        except InvalidModelError as exc:
            raise InvalidModelError(f"{path}: {exc}") from exc
        for warning in warnings:
            log.warning("%s: %s", path, warning)
    return model


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxopt")
def main() -> None:
    """Optimize ONNX models: onnxopt IN.onnx OUT.onnx [--passes ...].

    Subcommands: passes (list passes and options), verify (compare two models),
    inspect (statistics of a model), build (TensorRT engine from a model). Run 'onnxopt optimize --help' for all options.
    """


def _print_passes() -> None:
    from onnxopt.registry import PRESETS, all_passes

    out = []
    for name, cls in all_passes().items():
        out.append(f"{name}\n    {cls.summary()}")
        for opt, typ, default, text in cls.Options.describe():
            out.append(f"    - {opt}: {typ} = {default}" + (f"  ({text})" if text else ""))
        if cls.requires:
            out.append(f"    requires: {', '.join(sorted(r.value for r in cls.requires))}")
    out.append("\npresets:")
    for name, items in PRESETS.items():
        flat = [" -> ".join(["(" + ", ".join(i) + ")*" if isinstance(i, list) else i for i in items])]
        out.append(f"  {name}: {flat[0]}")
    click.echo("\n".join(out))


@main.command("passes")
def passes_command() -> None:
    """List every pass with its options and every preset."""
    run_cli(_print_passes, False)


def _list_passes_callback(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _print_passes()
        ctx.exit(0)


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


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


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
        steps, target=req.target, verify=mode, progress=_progress(req.quiet), opset=req.opset, calibration=calibration, teacher=teacher
    )
    if mode != "off":
        manager.verifier = Verifier.from_model(model, inputs=req.inputs_path, input_shapes=shapes)
    result = manager.run(model)
    save(result.model, req.output_path, external_data=req.external_data)
    report = result.report
    if req.report_path:
        _write_text(req.report_path, report.to_json())
    if not req.quiet:
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
        from rich.progress import Progress

        bar = Progress(console=_console(), transient=True)
        task = bar.add_task("calibration statistics", total=None)

        def update(done: int, total: int) -> None:
            if not bar.live.is_started:
                bar.start()
            bar.update(task, completed=done, total=total)
            if done >= total:
                bar.stop()

        data.progress = update
    return data


def _verification_line(data: dict) -> str:
    outputs = data.get("outputs", [])
    worst = max((o["max_abs"] for o in outputs), default=0.0)
    cos = min((o["cosine"] for o in outputs), default=1.0)
    verdict = "passed" if data.get("passed") else "FAILED"
    return f"verification {verdict} ({data.get('precision')}): max abs diff {worst:.3g}, min cosine {cos:.6f}"


def _write_text(path: str, text: str) -> None:
    from onnxopt.io import _write_atomic

    _write_atomic(Path(path), [text.encode()])


def _progress(quiet: bool):
    """A progress callback drawing on stderr when it is a terminal; None when piped."""
    if quiet or not sys.stderr.isatty():
        return None
    console = _console()
    status = console.status("optimizing")
    status.start()

    def update(name: str, done: int, total: int) -> None:
        if name:
            status.update(f"running {name}")
        elif done >= total:
            status.stop()

    return update


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


@main.command("verify")
@click.argument("original", metavar="A.onnx", type=click.Path(dir_okay=False))
@click.argument("candidate", metavar="[B.onnx]", type=click.Path(dir_okay=False), required=False)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxD...", help="Shape for a dynamic input, repeatable.")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="An .npz with the inputs.")
@click.option(
    "--precision", type=click.Choice(["fp32", "fp16", "int8", "pruned"]), default="fp32", show_default=True, help="Tolerance to apply."
)
@click.option(
    "--engine",
    "engine_path",
    type=click.Path(dir_okay=False),
    metavar="E.engine",
    help="Also run this TensorRT engine and compare it with A (needs a GPU).",
)
@click.option(
    "--backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto", show_default=True, help="Back end of --engine."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify_command(original, candidate, input_shapes, inputs_path, precision, engine_path, backend, as_json, debug) -> None:
    """Run A.onnx and B.onnx (and/or --engine E.engine) on the same inputs and compare their outputs with A's.

    Exit codes: 0 all outputs agree, 1 bad input (unreadable file, model that does not run),
    2 bad option or no CUDA device to run --engine on (nothing was verified), 3 outputs differ.
    """
    _setup_logging(0, False)

    def work() -> None:
        from onnxopt.verify import Verifier, parse_shape_overrides

        if candidate is None and engine_path is None:
            raise OptionError("give B.onnx, --engine E.engine, or both, to compare with A.onnx")
        shapes = parse_shape_overrides(input_shapes)
        a = _load_checked(original)
        b = _load_checked(candidate) if candidate else None
        with _engine_runner(engine_path, backend) as runner:
            verifier = Verifier.from_model(a, inputs=inputs_path, input_shapes=shapes, precision=precision)
            results = {}
            if b is not None:
                results["candidate"] = verifier.check(b)
            if runner is not None:
                results["engine"] = _check_engine(verifier, runner)
        _print_verifications(results, engine_path, as_json)
        if not all(r.passed for r in results.values()):
            sys.exit(3)

    run_cli(work, debug)


@contextlib.contextmanager
def _engine_runner(engine_path: str | None, backend: str):
    """An EngineRunner of ``engine_path`` (None without one); errors say "cannot verify the engine: ..." (no device: exit 2)."""
    if engine_path is None:
        yield None
        return
    from onnxopt.engine.runtime import EngineRunner

    try:
        runner = EngineRunner(engine_path, backend)
    except OnnxoptError as exc:
        raise type(exc)(f"cannot verify the engine: {exc}") from exc
    with runner:
        yield runner


def _check_engine(verifier, runner):  # noqa: ANN001, ANN202
    """Run the engine on the verifier's inputs and compare with the reference at the verifier's precision."""
    from onnxopt.verify import compare_outputs

    result = compare_outputs(verifier.reference, runner.run(verifier.feeds), verifier.precision)
    result.notes.extend(verifier.notes)
    return result


def _print_verifications(results: dict, engine_path: str | None, as_json: bool) -> None:
    """B's result as before (JSON unchanged without --engine); the engine's result labeled with its path."""
    if as_json:
        if "engine" not in results:
            data = results["candidate"].to_dict()
        elif "candidate" not in results:
            data = {**results["engine"].to_dict(), "engine": engine_path}
        else:
            data = {
                "passed": all(r.passed for r in results.values()),
                "candidate": results["candidate"].to_dict(),
                "engine": {**results["engine"].to_dict(), "path": engine_path},
            }
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    notes = next(iter(results.values())).notes
    for note in notes:
        click.echo(f"note: {note}", err=True)
    for kind, result in results.items():
        prefix = f"engine {engine_path}: " if kind == "engine" else ""
        for o in result.outputs:
            top1 = "" if o.top1 is None else f" top1={o.top1:.3f}"
            mark = "ok" if o.passed else f"FAIL ({o.reason})"
            click.echo(f"{prefix}{o.name}: max_abs={o.max_abs:.3g} max_rel={o.max_rel:.3g} cosine={o.cosine:.6f}{top1} {mark}")
        click.echo(prefix + result.summary())


@main.command("bench")
@click.argument("model_paths", metavar="MODEL.onnx [MORE.onnx ...]", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--engine", "engines", multiple=True, metavar="E.engine", help="A TensorRT engine to time too (needs a GPU); repeatable.")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs of each model.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs of each model first.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="onnxruntime execution provider.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxD...", help="Shape for a dynamic input, repeatable.")
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), help="An .npz with the inputs.")
@click.option(
    "--backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto", show_default=True, help="Back end of --engine."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench_command(model_paths, engines, runs, warmup, threads, provider, input_shapes, inputs_path, backend, as_json, debug) -> None:
    """Latency (median, p90, mean, min; ratio to the first model) of models in onnxruntime and of engines, same inputs.

    Runs are interleaved, one of each model per round. Without a CUDA device an --engine is
    reported as skipped, with the reason, and the exit is still 0. Exit codes: 0 done, 1 bad
    input (unreadable file, model that does not run), 2 bad option.
    """
    _setup_logging(0, False)

    def work() -> None:
        from onnxopt.bench import benchmark
        from onnxopt.verify import parse_shape_overrides

        shapes = parse_shape_overrides(input_shapes)
        models = {path: _load_checked(path) for path in model_paths}
        result = benchmark(
            models,
            engines=list(engines),
            runs=runs,
            warmup=warmup,
            threads=threads,
            provider=provider,
            inputs=inputs_path,
            input_shapes=shapes,
            backend=backend,
            progress=None if as_json else _bench_progress(),
        )
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
            return
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
        _print_bench_table(result)

    run_cli(work, debug)


def _print_bench_table(result) -> None:  # noqa: ANN001
    """One line per model/engine: median, p90, mean, min in ms and the median ratio; skipped engines say why."""
    width = max(len(e.name) for e in result.entries)
    click.echo(f"{'model':<{width}}  {'median ms':>10}  {'p90 ms':>10}  {'mean ms':>10}  {'min ms':>10}  {'ratio':>6}")
    for e in result.entries:
        if e.stats is None:
            continue
        s = e.stats
        ratio = "" if e.ratio is None else f"{e.ratio:.2f}x"
        click.echo(f"{e.name:<{width}}  {s.median_ms:>10.3f}  {s.p90_ms:>10.3f}  {s.mean_ms:>10.3f}  {s.min_ms:>10.3f}  {ratio:>6}")
    for e in result.entries:
        if e.skipped:
            click.echo(f"engine {e.name}: skipped: {e.skipped}")
    click.echo(f"{result.runs} runs after {result.warmup} warm-up, interleaved; onnxruntime {result.provider}, {result.threads} thread(s)")


def _bench_progress():  # noqa: ANN202
    """A rich bar on stderr while rounds run, when stderr is a terminal; None when piped."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import Progress

    bar = Progress(console=_console(), transient=True)
    task = bar.add_task("timing", total=None)

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)
        if done >= total:
            bar.stop()

    return update


@main.command("inspect")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print statistics as JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect_command(model_path, as_json, debug) -> None:
    """Print a model's inputs, outputs, opsets and statistics (nodes, parameters, FLOPs, ops)."""
    _setup_logging(0, False)

    def work() -> None:
        from onnxopt.analysis import analyze
        from onnxopt.report import human_bytes, human_count
        from onnxopt.shapes import infer_types

        model = _load_checked(model_path)
        stats = analyze(model, infer_types(model))
        info = {
            "ir_version": model.ir_version,
            "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "inputs": [_describe_value(v) for v in _real_inputs(model)],
            "outputs": [_describe_value(v) for v in model.graph.output],
            "stats": stats.to_dict(),
        }
        if as_json:
            click.echo(json.dumps(info, indent=2, sort_keys=True))
            return
        click.echo(f"{model_path}: IR {info['ir_version']}, opsets {info['opsets']}, producer '{info['producer']}'")
        for kind in ("inputs", "outputs"):
            for v in info[kind]:
                click.echo(f"  {kind[:-1]} {v['name']}: {v['type']}")
        click.echo(
            f"  nodes {stats.nodes}, initializers {stats.initializers}, parameters {human_count(stats.parameters)}, "
            f"size {human_bytes(stats.bytes)}, FLOPs {human_count(stats.flops)}"
            + (f" ({stats.flops_unknown} nodes with unknown shapes)" if stats.flops_unknown else "")
        )
        click.echo("  ops: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.op_types.items(), key=lambda kv: (-kv[1], kv[0]))))

    run_cli(work, debug)


def _real_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _describe_value(value) -> dict:
    from onnx import helper

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "type": kind or "unknown"}
    tensor = value.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = str(tensor.elem_type)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim] if tensor.HasField("shape") else "?"
    return {"name": value.name, "type": f"{dtype}{dims}"}
