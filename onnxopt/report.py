"""The run report: per-pass records, before/after statistics, verification, rendering."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from onnxopt.analysis import ModelStats


@dataclass
class PassRecord:
    """One execution of one pass."""

    name: str
    step: int
    iteration: int
    status: str  # "changed", "unchanged", "rolled back"
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    nodes: int = 0
    initializers: int = 0
    parameters: int = 0
    weight_bytes: int = 0
    flops: int = 0
    message: str = ""
    notes: list[str] = field(default_factory=list)  # what the pass said, notes then warnings (also in the run's lists, once)


@dataclass
class Report:
    """Everything a run did, for the table on the terminal and ``--report out.json``."""

    before: ModelStats | None = None
    after: ModelStats | None = None
    passes: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # informational, each once: what passes chose and why
    warnings: list[str] = field(default_factory=list)  # problems, each once: rollbacks, random calibration, unverified upgrades
    verification: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "seconds": round(self.seconds, 6),
            "before": self.before.to_dict() if self.before else None,
            "after": self.after.to_dict() if self.after else None,
            "passes": [asdict(r) for r in self.passes],
            "notes": self.notes,
            "warnings": self.warnings,
            "verification": self.verification,
        }

    def to_json(self) -> str:
        """The report as indented, key-sorted JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def changed_passes(self) -> list[PassRecord]:
        """Records of pass runs that changed the model (or were rolled back)."""
        return [r for r in self.passes if r.status != "unchanged"]


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def human_count(count: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(int(count))


def render(report: Report, console, *, verbose: bool = False) -> None:
    """Print the per-pass table and the before/after summary with rich."""
    from rich.table import Table

    table = Table(title="onnxopt passes", show_lines=False)
    for col in ("pass", "iter", "changes", "nodes", "inits", "params", "weights", "FLOPs", "time"):
        table.add_column(col, justify="left" if col in ("pass", "changes") else "right")
    if report.before:
        b = report.before
        table.add_row(
            "(input)",
            "",
            "",
            str(b.nodes),
            str(b.initializers),
            human_count(b.parameters),
            human_bytes(b.weight_bytes),
            human_count(b.flops),
            "",
        )
    for r in report.passes if verbose else report.changed_passes():
        changes = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items())) or r.status
        if r.status == "rolled back":
            changes = f"[red]rolled back: {r.message}[/red]"
        table.add_row(
            r.name,
            str(r.iteration),
            changes,
            str(r.nodes),
            str(r.initializers),
            human_count(r.parameters),
            human_bytes(r.weight_bytes),
            human_count(r.flops),
            f"{r.seconds * 1000:.0f} ms",
        )
    console.print(table)
    if report.before and report.after:
        b, a = report.before, report.after
        console.print(
            f"nodes {b.nodes} -> {a.nodes}, initializers {b.initializers} -> {a.initializers}, "
            f"size {human_bytes(b.bytes)} -> {human_bytes(a.bytes)}, total {report.seconds:.2f} s"
        )
        if verbose:
            ops = sorted(set(b.op_types) | set(a.op_types))
            hist = Table(title="op types")
            for col in ("op", "before", "after"):
                hist.add_column(col, justify="left" if col == "op" else "right")
            for op in ops:
                hist.add_row(op, str(b.op_types.get(op, 0)), str(a.op_types.get(op, 0)))
            console.print(hist)
