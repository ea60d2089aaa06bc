"""What every subcommand shares: the ``main`` group, logging, the one-line error contract, loading, writing, progress."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from onnxopt.errors import InvalidModelError, OnnxoptError, one_line

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


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxopt")
def main() -> None:
    """Optimize ONNX models: onnxopt IN.onnx OUT.onnx [--passes ...].

    Subcommands: passes (list passes and options), verify (compare two models),
    inspect (statistics of a model), build (TensorRT engine from a model). Run 'onnxopt optimize --help' for all options.
    """


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
        text = one_line(exc, 300)
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


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


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


def _progress_bar(label: str):  # noqa: ANN202
    """A transient rich bar on stderr, labeled ``label``: an ``update(done, total)`` callback that starts it and stops it at the end."""
    from rich.progress import Progress

    bar = Progress(console=_console(), transient=True)
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total)
        if done >= total:
            bar.stop()

    return update
