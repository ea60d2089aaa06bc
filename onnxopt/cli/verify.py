"""``onnxopt verify``: compare B.onnx and/or a TensorRT engine with A.onnx on the same inputs."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from onnxopt.cli.common import _load_checked, _setup_logging, main, run_cli
from onnxopt.errors import OnnxoptError, OptionError


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
