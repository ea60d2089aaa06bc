"""Run one optimizer (onnxopt or an anchor) on one model, in a child process, and time it.

Child side (``python benchmarks/anchors.py TOOL SRC DST [--passes P]``): imports the tool,
then times load + optimize + save with ``time.perf_counter`` and prints one JSON line
``{"seconds": ...}``. Imports and interpreter start-up are outside the timer, for every
tool alike.

Parent side (:func:`run_tool`): starts that child with a timeout, so a tool that crashes
(onnxoptimizer can segfault), hangs or raises becomes a status string, never a crash of
the benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# Tool name -> (import name, distribution name) of what it needs installed.
TOOLS: dict[str, tuple[str, str]] = {
    "onnxopt": ("onnxopt", "onnxopt"),
    "onnxopt-ort": ("onnxopt", "onnxopt"),  # the same pipeline with --target ort-cpu (contrib-op fusions)
    "onnxslim": ("onnxslim", "onnxslim"),
    "onnxsim": ("onnxsim", "onnxsim"),
    "onnxoptimizer": ("onnxoptimizer", "onnxoptimizer"),
    "ort-offline": ("onnxruntime", "onnxruntime"),
    "ort-transformers": ("onnxruntime.transformers", "onnxruntime"),  # onnxruntime's BERT fusion optimizer
}
# Tools that only make sense on transformer encoders (benchmarks/compare.py skips them elsewhere).
TRANSFORMER_ONLY = frozenset({"ort-transformers"})


@dataclass
class ToolRun:
    """Outcome of one child run: seconds on success, else a short status."""

    seconds: float | None
    status: str = "ok"


def tool_version(tool: str) -> str | None:
    """Installed version of the tool's distribution, or None when it is not installed."""
    module, dist = TOOLS[tool]
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def run_tool(tool: str, src: Path, dst: Path, *, passes: str, timeout: float) -> ToolRun:
    """Run ``tool`` on ``src`` writing ``dst`` in a fresh child process; never raises for tool failures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), tool, str(src), str(dst), "--passes", passes]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ToolRun(None, f"timed out after {timeout:g} s")
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        return ToolRun(None, f"crashed ({sig})")
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        return ToolRun(None, f"error: {last[:160]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return ToolRun(float(json.loads(line)["seconds"]))
            except (ValueError, KeyError, TypeError):
                break
    return ToolRun(None, "error: no timing printed")


# ---------------------------------------------------------------- child side


def _prepare_onnxopt(passes: str, target: str = "portable") -> Callable[[str, str], None]:
    import onnxopt

    onnxopt.all_passes()  # load the pass registry outside the timer, like the other tools' imports

    def go(src: str, dst: str) -> None:
        result = onnxopt.optimize(src, passes=passes, target=target)
        onnxopt.save(result.model, dst)

    return go


def _prepare_onnxopt_ort(passes: str) -> Callable[[str, str], None]:
    return _prepare_onnxopt(passes, target="ort-cpu")


def _prepare_onnxslim(passes: str) -> Callable[[str, str], None]:
    import onnx
    import onnxslim

    def go(src: str, dst: str) -> None:
        onnx.save(onnxslim.slim(onnx.load(src)), dst)

    return go


def _prepare_onnxsim(passes: str) -> Callable[[str, str], None]:
    import onnx
    import onnxsim

    def go(src: str, dst: str) -> None:
        model, ok = onnxsim.simplify(onnx.load(src))
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
        onnx.save(model, dst)

    return go


def _prepare_onnxoptimizer(passes: str) -> Callable[[str, str], None]:
    import onnx
    import onnxoptimizer

    def go(src: str, dst: str) -> None:
        onnx.save(onnxoptimizer.optimize(onnx.load(src)), dst)

    return go


def _prepare_ort_offline(passes: str) -> Callable[[str, str], None]:
    import onnxruntime as ort

    def go(src: str, dst: str) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = dst
        ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])

    return go


def _prepare_ort_transformers(passes: str) -> Callable[[str, str], None]:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    def go(src: str, dst: str) -> None:
        # model_type bert with head count and hidden size detected from the graph; graph fusions only
        # (opt_level 0: onnxruntime's own session optimizations are applied at load time anyway)
        optimized = optimize_model(src, model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        onnx.save(optimized.model, dst)

    return go


_PREPARE: dict[str, Callable[[str], Callable[[str, str], None]]] = {
    "onnxopt": _prepare_onnxopt,
    "onnxopt-ort": _prepare_onnxopt_ort,
    "onnxslim": _prepare_onnxslim,
    "onnxsim": _prepare_onnxsim,
    "onnxoptimizer": _prepare_onnxoptimizer,
    "ort-offline": _prepare_ort_offline,
    "ort-transformers": _prepare_ort_transformers,
}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: time one tool on one model and print ``{"seconds": ...}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=sorted(_PREPARE))
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--passes", default="default", help="onnxopt pass string (ignored by the anchors)")
    args = parser.parse_args(argv)
    go = _PREPARE[args.tool](args.passes)
    start = time.perf_counter()
    go(args.src, args.dst)
    seconds = time.perf_counter() - start
    if not Path(args.dst).is_file():
        print(f"{args.tool} wrote no output file", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
