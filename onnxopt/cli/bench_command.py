"""``onnxopt bench``: interleaved latency of models in onnxruntime and of TensorRT engines, on the same inputs."""

from __future__ import annotations

import json
import sys

import click

from onnxopt.cli.common import _load_checked, _progress_bar, _setup_logging, main, run_cli


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
    return _progress_bar("timing")
