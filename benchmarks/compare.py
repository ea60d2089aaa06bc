"""Side-by-side benchmark: onnxopt against onnxslim, onnx-simplifier, onnxoptimizer and onnxruntime's offline optimizer.

For each real model and tool: nodes and bytes of the saved result, optimize wall time
(median of --repeats runs, each a fresh child process timing load + optimize + save),
onnxruntime CPU latency at one thread (median of --latency-runs, all variants interleaved
round-robin), latency ratio against the original and the max abs difference of the outputs
against the original on the same seeded inputs. See benchmarks/README.md.

    python benchmarks/compare.py [--models magika,ppocr-det] [--passes default] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # models.real lives at the repository root; anchors.py beside this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

from anchors import TOOLS, TRANSFORMER_ONLY, run_tool, tool_version  # noqa: E402

from models.real import REAL_MODELS, RealModelError, fetch  # noqa: E402
from onnxopt.errors import OnnxoptError  # noqa: E402
from onnxopt.graph import iter_scopes  # noqa: E402
from onnxopt.ort import make_session  # noqa: E402
from onnxopt.verify import TOLERANCES, compare_arrays, generate_inputs  # noqa: E402


@dataclass(frozen=True)
class InputPlan:
    """How to feed a model: shapes for its dynamic dims and, for integer inputs, the value range."""

    shapes: dict[str, tuple[int, ...]]
    int_high: int | None = None  # integer inputs drawn from [0, int_high) instead of generate_inputs' [0, 10)
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # per input: integers drawn from [low, high)


# Benchmark-sized inputs (models.real's own shapes are smaller, sized for fast tests); a model
# not listed here runs with models.real's shapes. magika reads 2048 byte tokens (values 0-255,
# 256 = padding, see its config.min.json); PP-OCR: det a 320 px page tile, rec a 48 px text line.
INPUT_PLANS: dict[str, InputPlan] = {
    "magika": InputPlan({"bytes": (1, 2048)}, int_high=257),
    "ppocr_det": InputPlan({"x": (1, 3, 320, 320)}),
    "ppocr_rec": InputPlan({"x": (1, 3, 48, 320)}),
    "ppocr_cls": InputPlan({"x": (1, 3, 48, 192)}),
}


# Exports of benchmarks/export_transformers.py, by file-name prefix: the encoder setting
# (batch 8, sequence 128, token ids over BERT's vocabulary, no padding); others: their own shapes.
EXPORT_PLANS: dict[str, InputPlan] = {
    "minilm": InputPlan(
        {"input_ids": (8, 128), "attention_mask": (8, 128)}, int_ranges={"input_ids": (0, 30522), "attention_mask": (1, 2)}
    ),
}
TRANSFORMER_PREFIXES = ("minilm", "vit")  # models the transformer-only anchors are run on


def input_plan(model: str) -> InputPlan:
    """The benchmark's plan for ``model``, else the input shapes models.real registers for it."""
    if model in INPUT_PLANS:
        return INPUT_PLANS[model]
    if model in REAL_MODELS:
        return InputPlan(dict(getattr(REAL_MODELS[model], "input_shapes", {}) or {}))
    return next((plan for prefix, plan in EXPORT_PLANS.items() if model.startswith(prefix)), InputPlan({}))


def tools_for(model: str, tools: list[str]) -> list[str]:
    """The tools that apply to ``model`` (transformer-only anchors only on transformer exports)."""
    return [t for t in tools if t not in TRANSFORMER_ONLY or model.startswith(TRANSFORMER_PREFIXES)]


@dataclass
class Row:
    """One line of the table: one model optimized by one tool (or the original)."""

    model: str
    tool: str
    version: str = ""
    status: str = "ok"
    nodes: int | None = None
    bytes: int | None = None
    optimize_s: float | None = None
    optimize_runs_s: list[float] = field(default_factory=list)
    latency_ms: float | None = None
    latency_min_ms: float | None = None  # in --json only: the least noisy single run
    latency_ratio: float | None = None
    max_abs_diff: float | None = None
    ops: dict[str, int] = field(default_factory=dict)  # op histogram of the saved model, subgraphs included
    path: str | None = field(default=None, repr=False)


def count_nodes(model: onnx.ModelProto) -> int:
    """Nodes in the model, subgraphs included."""
    return sum(len(scope.graph.node) for scope in iter_scopes(model.graph))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes by op type (``domain::Op`` outside the standard domain), subgraphs included."""
    nodes = [n for scope in iter_scopes(model.graph) for n in scope.graph.node]
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in nodes)
    return dict(sorted(ops.items()))


def ops_gained(row: Row, original: Row) -> str:
    """The op types the row has more of than the original (what its fusions produced), as ``Op+n``."""
    gained = {op: n - original.ops.get(op, 0) for op, n in row.ops.items() if n > original.ops.get(op, 0)}
    return " ".join(f"{op}+{n}" for op, n in sorted(gained.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def make_feeds(model: onnx.ModelProto, plan: InputPlan) -> dict[str, np.ndarray]:
    """Seeded inputs from onnxopt.verify.generate_inputs with the plan's shapes and integer range."""
    feeds, _notes = generate_inputs(model, plan.shapes, seed=0)
    rng = np.random.default_rng(1)
    for name, value in feeds.items():
        if not np.issubdtype(value.dtype, np.integer):
            continue
        if name in plan.int_ranges:
            low, high = plan.int_ranges[name]
            feeds[name] = rng.integers(low, high, size=value.shape).astype(value.dtype)
        elif plan.int_high is not None:
            feeds[name] = rng.integers(0, plan.int_high, size=value.shape).astype(value.dtype)
    return feeds


def optimize_with_tools(model: str, src: Path, tools: list[str], workdir: Path, args: argparse.Namespace) -> list[Row]:
    """Run every tool --repeats times, rounds interleaved across tools; a failing tool stops at its first failure."""
    rows: dict[str, Row] = {}
    active: list[str] = []
    for tool in tools:
        version = tool_version(tool)
        rows[tool] = Row(model, tool, version or "", "ok" if version else "not installed")
        if version:
            active.append(tool)
    for _ in range(args.repeats):
        for tool in list(active):
            dst = workdir / f"{model}.{tool}.onnx"
            run = run_tool(tool, src, dst, passes=args.passes, timeout=args.timeout)
            if run.seconds is None:
                rows[tool].status, rows[tool].path = run.status, None  # a failed repeat disqualifies the earlier ones
                active.remove(tool)
                continue
            rows[tool].optimize_runs_s.append(run.seconds)
            rows[tool].path = str(dst)
    for tool in active:
        row = rows[tool]
        row.optimize_s = statistics.median(row.optimize_runs_s)
        row.bytes = os.path.getsize(row.path)
        try:
            saved = onnx.load(row.path)
            row.nodes, row.ops = count_nodes(saved), op_histogram(saved)
        except Exception as exc:  # an unreadable result is a row status, not a crash
            row.status, row.path = f"output unreadable: {_short(exc)}", None
    return [rows[tool] for tool in tools]


def latency_session(path: str) -> ort.InferenceSession:
    """The session a default user gets (ORT_ENABLE_ALL, CPU EP), pinned to one thread."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


def measure(rows: list[Row], feeds: dict[str, np.ndarray], args: argparse.Namespace) -> None:
    """Fill latency, latency ratio and max abs diff of every row that has a model file; rows[0] is the original."""
    sessions: dict[int, ort.InferenceSession] = {}
    try:
        reference = make_session(rows[0].path, optimize=False)
        names = [o.name for o in reference.get_outputs()]
        expected = dict(zip(names, reference.run(names, feeds)))
    except Exception as exc:
        rows[0].status = f"original does not run in onnxruntime: {_short(exc)}"
        return
    for index, row in enumerate(rows):
        if row.path is None:
            continue
        try:
            plain = make_session(row.path, optimize=False)  # the graph as written, for the accuracy check
            got = plain.run(names, feeds)
            sessions[index] = latency_session(row.path)
        except Exception as exc:  # a broken result is a row status, not a crash
            row.status = f"onnxruntime failed: {_short(exc)}"
            continue
        worst = 0.0
        for name, ref, out in zip(names, expected.values(), got):
            cmp = compare_arrays(name, ref, out, TOLERANCES["fp32"])
            worst = max(worst, cmp.max_abs)
            if not cmp.passed:
                row.status = f"output '{name}' differs: {cmp.reason or 'past fp32 tolerance'}"
        row.max_abs_diff = worst
    times: dict[int, list[float]] = {index: [] for index in sessions}
    for _ in range(args.warmup):
        for session in sessions.values():
            session.run(None, feeds)
    order = list(sessions)
    for round_ in range(args.latency_runs if order else 0):  # round-robin: machine noise hits every variant alike
        shift = round_ % len(order)  # rotate who goes first, so no variant always runs after the same one
        for index in order[shift:] + order[:shift]:
            start = time.perf_counter()
            sessions[index].run(None, feeds)
            times[index].append(time.perf_counter() - start)
    for index, samples in times.items():
        rows[index].latency_ms = statistics.median(samples) * 1000
        rows[index].latency_min_ms = min(samples) * 1000
    base = rows[0].latency_ms
    for row in rows:
        if base and row.latency_ms is not None:
            row.latency_ratio = row.latency_ms / base


def bench_model(model: str, tools: list[str], workdir: Path, args: argparse.Namespace, console: Console) -> list[Row]:
    """All rows of one model: the original first, then one per tool."""
    try:
        src = args.export_paths[model] if model in args.export_paths else Path(fetch(model))
        original = onnx.load(src)
    except (RealModelError, OSError, OnnxoptError) as exc:
        return [Row(model, "original", status=f"model unavailable: {_short(exc)}")]
    tools = tools_for(model, tools)
    console.print(f"[bold]{model}[/]: {src.name}, optimizing with {', '.join(tools)} ...")
    rows = [Row(model, "original", nodes=count_nodes(original), bytes=src.stat().st_size, ops=op_histogram(original), path=str(src))]
    rows += optimize_with_tools(model, src, tools, workdir, args)
    try:
        feeds = make_feeds(original, input_plan(model))
    except OnnxoptError as exc:
        rows[0].status = f"no inputs: {exc}"
        return rows
    variants = sum(r.path is not None for r in rows)
    console.print(f"[bold]{model}[/]: latency, {args.latency_runs} interleaved runs of {variants} variants ...")
    measure(rows, feeds, args)
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(rows: list[Row], console: Console) -> None:
    """The main table, then onnxopt's optimize time against onnxslim's and onnxsim's."""
    table = Table(title="onnxopt vs anchors (optimize: median wall s of load+optimize+save; latency: ORT CPU, 1 thread, median)")
    for name, justify in [
        ("model", "left"),
        ("tool", "left"),
        ("nodes", "right"),
        ("bytes", "right"),
        ("optimize s", "right"),
        ("latency ms", "right"),
        ("vs orig", "right"),
        ("max |diff|", "right"),
        ("status", "left"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    previous = None
    for row in rows:
        if previous is not None and row.model != previous:
            table.add_section()
        previous = row.model
        tool = f"{row.tool} {row.version}".strip()
        table.add_row(
            row.model,
            tool,
            _num(row.nodes, ","),
            _num(row.bytes, ","),
            _num(row.optimize_s, ".3f"),
            _num(row.latency_ms, ".2f"),
            _num(row.latency_ratio, ".3f"),
            _num(row.max_abs_diff, ".2g"),
            row.status,
        )
    console.print(table)
    fused = Table(title="op types each tool's output has more of than the original (what its fusions produced)")
    for name in ("model", "tool", "nodes", "ops gained"):
        fused.add_column(name, justify="right" if name == "nodes" else "left")
    for model in dict.fromkeys(r.model for r in rows):
        of_model = [r for r in rows if r.model == model]
        for row in of_model[1:]:
            if row.ops:
                fused.add_row(model, f"{row.tool} {row.version}".strip(), _num(row.nodes, ","), ops_gained(row, of_model[0]))
    console.print(fused)
    ratios = Table(title="onnxopt optimize time / anchor's (below 1: onnxopt is faster)")
    for name in ("model", "onnxopt s", "onnxslim s", "onnxsim s", "onnxopt/onnxslim", "onnxopt/onnxsim"):
        ratios.add_column(name, justify="left" if name == "model" else "right")
    for model in dict.fromkeys(r.model for r in rows):
        by_tool = {r.tool: r.optimize_s for r in rows if r.model == model}
        mine, slim, sim = by_tool.get("onnxopt"), by_tool.get("onnxslim"), by_tool.get("onnxsim")
        ratios.add_row(
            model,
            _num(mine, ".3f"),
            _num(slim, ".3f"),
            _num(sim, ".3f"),
            _num(mine / slim if mine and slim else None, ".2f"),
            _num(mine / sim if mine and sim else None, ".2f"),
        )
    console.print(ratios)


def machine() -> str:
    """CPU model and core count, for the record."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: all real models and every --exports model)")
    parser.add_argument("--exports", type=Path, help="also run on every .onnx file in this folder (benchmarks/export_transformers.py)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated tools (default: all)")
    parser.add_argument("--passes", default="default", help="onnxopt pass string (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="optimize runs per tool; the median is shown")
    parser.add_argument("--latency-runs", type=int, default=30, help="timed inference runs per variant (at least 30 recommended)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed inference runs per variant first")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one optimize run may take")
    parser.add_argument("--json", type=Path, help="also write the rows and settings here")
    parser.add_argument("--keep", type=Path, help="keep the optimized models in this folder")
    args = parser.parse_args(argv)
    if args.exports is not None and not args.exports.is_dir():
        parser.error(f"--exports {args.exports}: not a folder")
    args.export_paths = {p.stem: p for p in sorted(args.exports.glob("*.onnx"))} if args.exports else {}
    known = [*REAL_MODELS, *args.export_paths]
    requested = [m for m in args.models.split(",") if m] or known
    args.models = [m if m in known else m.replace("-", "_") for m in requested]
    args.tools = [t for t in args.tools.split(",") if t]
    for model in args.models:
        if model not in known:
            parser.error(f"unknown model '{model}' (known: {', '.join(known)})")
    for tool in args.tools:
        if tool not in TOOLS:
            parser.error(f"unknown tool '{tool}' (known: {', '.join(TOOLS)})")
    if args.repeats < 1 or args.latency_runs < 1 or args.warmup < 0 or args.timeout <= 0:
        parser.error("--repeats and --latency-runs must be >= 1, --warmup >= 0, --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the tables."""
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: do not squeeze the table
    started = dt.datetime.now().astimezone()
    header = f"{started:%Y-%m-%d %H:%M %Z}; {machine()}; onnxruntime {ort.__version__}; onnxopt --passes {args.passes}"
    console.print(header)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for model in args.models:
            rows += bench_model(model, args.tools, workdir, args, console)
    render(rows, console)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "export_paths"}
        records = [asdict(r) for r in rows]
        if not args.keep:  # the optimized files were temporary
            for record in records:
                record.pop("path")
        out = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "onnxruntime": ort.__version__}
        out |= {"settings": settings, "rows": records}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
