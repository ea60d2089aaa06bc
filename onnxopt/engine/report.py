"""The build report: what was built, with what, how long it took, and what was skipped and why."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TensorInfo:
    """An engine input or output: dtype, shape (-1 for dynamic) and, for inputs, the profile."""

    name: str
    dtype: str
    shape: list[int]
    profile: dict[str, list[int]] | None = None


@dataclass
class BuildReport:
    """Everything one build did; ``to_json`` is what ``--report`` writes."""

    backend: str
    backend_version: str
    parser_version: str = ""
    model: str = ""
    strongly_typed: bool = True
    parse_seconds: float = 0.0
    build_seconds: float = 0.0
    engine_bytes: int = 0
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    network: dict[str, Any] = field(default_factory=dict)
    sparsity: dict[str, Any] = field(default_factory=dict)
    timing_cache: dict[str, Any] = field(default_factory=dict)
    preflight: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    engine_layers: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _shape(dims: list[int]) -> str:
    return "x".join("?" if d < 0 else str(d) for d in dims) or "scalar"


def render(report: BuildReport, console) -> None:  # noqa: ANN001
    """Print the report as rich tables."""
    from rich.table import Table

    from onnxopt.report import human_bytes

    title = f"engine build: {report.backend} {report.backend_version}" + (
        f" (ONNX parser {report.parser_version})" if report.parser_version else ""
    )
    table = Table(title=title, show_header=False)
    table.add_column("what", justify="left")
    table.add_column("value", justify="left")
    table.add_row("model", report.model or "(in memory)")
    table.add_row("strongly typed", "yes" if report.strongly_typed else "no")
    table.add_row("parse / build", f"{report.parse_seconds:.2f} s / {report.build_seconds:.2f} s")
    table.add_row("engine", human_bytes(report.engine_bytes))
    if report.flags:
        table.add_row("builder flags", ", ".join(report.flags))
    opts = ", ".join(f"{k}={v}" for k, v in sorted(report.options.items()) if v is not None and v is not False and v not in ("", "none"))
    if opts:
        table.add_row("options", opts)
    net = report.network
    if net:
        compute = ", ".join(f"{k} {v}" for k, v in sorted(net.get("compute_layers", {}).items())) or "none"
        table.add_row(
            "network", f"{net.get('layers', 0)} layers; compute layers by input dtype: {compute}; Q/DQ layers {net.get('qdq_layers', 0)}"
        )
    if report.sparsity:
        table.add_row("2:4 sparsity", report.sparsity.get("summary", ""))
    if report.timing_cache:
        table.add_row("timing cache", report.timing_cache.get("summary", ""))
    if report.engine_layers:
        share = ", ".join(f"{k} {v:.0%}" for k, v in sorted(report.engine_layers.get("share", {}).items()))
        table.add_row("engine layers", f"{report.engine_layers.get('layers', 0)} layers; by precision: {share}")
    elif report.gpu.get("skipped"):
        table.add_row("engine inspector", f"skipped: {report.gpu['skipped']}")
    console.print(table)
    io = Table(title="engine inputs and outputs")
    for col in ("kind", "name", "dtype", "shape", "profile min / opt / max"):
        io.add_column(col, justify="left")
    for kind, values in (("input", report.inputs), ("output", report.outputs)):
        for v in values:
            prof = " / ".join(_shape(v.profile[k]) for k in ("min", "opt", "max")) if v.profile else ""
            io.add_row(kind, v.name, v.dtype, _shape(v.shape), prof)
    console.print(io)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
