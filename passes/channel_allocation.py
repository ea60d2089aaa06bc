"""How many channels each group keeps: one global target split uniformly or by a sensitivity scan.

The amount is a number of FLOPs (or parameters) to remove, recounted exactly for every candidate
with :class:`~onnxopt.passes.channel_surgery.CostModel` (or estimated seconds, with
:class:`~onnxopt.passes.channel_latency.LatencyModel`). ``uniform`` removes the same fraction
of every prunable group (the smallest fraction that reaches the target, found by bisection).
``sensitivity`` prunes each group alone at a few levels, measures the model's output error on
calibration batches and what each level saves, then lets
:func:`onnxopt.passes.compression_budget.allocate` spend the budget where it hurts least. Savings
of groups that share a layer are not additive (a conv between two pruned groups shrinks by the
product of both keep fractions), so the allocation's target is raised until the recount reaches it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from onnxopt.passes.channel_groups import ChannelAnalysis, ChannelGroup
from onnxopt.passes.channel_latency import LatencyModel
from onnxopt.passes.channel_surgery import CostModel, Keep, apply_pruning
from onnxopt.passes.compression_budget import Level, allocate

log = logging.getLogger("onnxopt")

BISECTION_STEPS = 40
TARGET_ROUNDS = 8  # allocation rounds raising the target to make up for non-additive savings


@dataclass(frozen=True)
class Limits:
    """Per-group bounds on what pruning may keep."""

    round_to: int = 8
    min_channels: int = 8
    max_layer_ratio: float = 0.75

    def kept(self, channels: int, fraction: float) -> int:
        """Channels kept when removing ``fraction`` of ``channels``, after the floors and the rounding."""
        floor = max(min(channels, self.min_channels), math.ceil(channels * (1.0 - self.max_layer_ratio) - 1e-9), 1)
        kept = max(channels - math.floor(fraction * channels + 0.5), floor)
        step = self.round_to
        if step > 1 and channels > step:
            kept = max(step, math.floor(kept / step + 0.5) * step)  # nearest multiple, halves up
            if kept < floor:
                kept = math.ceil(floor / step) * step
        return min(kept, channels)

    def floor(self, channels: int) -> int:
        """The fewest channels a group may keep."""
        return self.kept(channels, 1.0)


def top_mask(scores: np.ndarray, kept: int) -> np.ndarray:
    """Keep the ``kept`` highest-scoring channels (ties: the lower index)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    mask = np.zeros(len(scores), bool)
    mask[order[:kept]] = True
    return mask


Saving = Callable[[Keep], float]  # what pruning with these masks saves (parameters, FLOPs or estimated seconds)


def saving_of(cost: CostModel, by: str, latency: LatencyModel | None = None) -> Saving:
    """The saving function of ``by``: "params", "flops" (exact recounts) or "latency" (the roofline estimate)."""
    if by == "latency":
        if latency is None:
            raise ValueError("by=latency needs a LatencyModel")
        base = latency.seconds()
        return lambda keep: base - latency.seconds(keep)
    if by == "params":
        return lambda keep: float(cost.params - cost.count(keep)[0])
    return lambda keep: float((cost.flops or 0) - (cost.count(keep)[1] or 0))


def uniform_keep(
    groups: list[ChannelGroup], scores: dict[int, np.ndarray], saving: Saving, target: float, limits: Limits
) -> tuple[Keep, float]:
    """The smallest common fraction whose recount saves ``target``; returns the masks and that fraction."""

    def masks(fraction: float) -> Keep:
        """Every group at ``fraction``."""
        return {g.index: top_mask(scores[g.index], limits.kept(g.channels, fraction)) for g in groups}

    low, high = 0.0, 1.0
    if saving(masks(high)) < target:
        return masks(high), high
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if saving(masks(middle)) >= target:
            high = middle
        else:
            low = middle
    return _fill(groups, scores, saving, target, limits, low, high), high


def _fill(groups, scores, saving: Saving, target: float, limits: Limits, low: float, high: float) -> Keep:
    """From the counts at ``low`` (short of the target), move groups one by one to their counts at ``high``.

    Rounding makes the saving a step function of the fraction: the jump from ``low`` to ``high``
    may move many groups at once and overshoot. Taking the smallest steps first stops within one
    group's step of the target.
    """
    kept = {g.index: limits.kept(g.channels, low) for g in groups}
    steps = []
    for group in groups:
        further = limits.kept(group.channels, high)
        if further < kept[group.index]:
            step = saving({group.index: top_mask(scores[group.index], further)})
            step -= saving({group.index: top_mask(scores[group.index], kept[group.index])})
            steps.append((step, group.index, further))
    current = {i: top_mask(scores[i], k) for i, k in kept.items()}
    for _, index, further in sorted(steps):
        if saving(current) >= target:
            break
        current[index] = top_mask(scores[index], further)
    return current


@dataclass
class ScanRow:
    """One group's sensitivity: (fraction, kept channels, output error, saved) per measured level."""

    group: ChannelGroup
    points: list[tuple[float, int, float, float]]

    def line(self) -> str:
        """One report line."""
        cells = ", ".join(f"{fraction:g}->{kept}: {error:.3g}" for fraction, kept, error, _ in self.points)
        return f"'{self.group.name}' ({self.group.channels} ch): {cells or 'no level below its floor'}"


def sensitivity_scan(
    model: ModelProto,
    analysis: ChannelAnalysis,
    groups: list[ChannelGroup],
    scores: dict[int, np.ndarray],
    error: Callable[[ModelProto], float],
    saving: Saving,
    levels: list[float],
    limits: Limits,
    progress: Callable[[int, int], None] | None = None,
) -> list[ScanRow]:
    """Prune each group alone at each level (distinct kept counts only) and measure the output error."""
    rows: list[ScanRow] = []
    for done, group in enumerate(groups, start=1):
        points: list[tuple[float, int, float, float]] = []
        seen: set[int] = set()
        for fraction in levels:
            kept = limits.kept(group.channels, fraction)
            if kept >= group.channels or kept in seen:
                continue
            seen.add(kept)
            keep = {group.index: top_mask(scores[group.index], kept)}
            variant = ModelProto()
            variant.CopyFrom(model)
            apply_pruning(variant, analysis, keep)
            points.append((fraction, kept, float(error(variant)), saving(keep)))
        rows.append(ScanRow(group, points))
        log.info("prune_channels: scan %d/%d %s", done, len(groups), rows[-1].line())
        if progress is not None:
            progress(done, len(groups))
    return rows


def sensitivity_keep(
    rows: list[ScanRow], scores: dict[int, np.ndarray], saving: Saving, target: float, limits: Limits
) -> tuple[Keep, bool]:
    """Masks from :func:`allocate` over the scan, its target raised until the recount reaches ``target``; and whether it did."""
    curves = {str(r.group.index): [Level(str(r.group.index), float(kept), saved, err) for _, kept, err, saved in r.points] for r in rows}
    by_key = {str(r.group.index): r.group for r in rows}
    goal = target
    best: Keep = {}
    reached = False
    for _ in range(TARGET_ROUNDS):
        allocation = allocate(curves, goal)
        keep = {by_key[k].index: top_mask(scores[by_key[k].index], int(level.level)) for k, level in allocation.chosen.items()}
        saved = saving(keep)
        best = keep
        if saved >= target * (1 - 1e-9):
            reached = True
            break
        if not allocation.reached or saved <= 0:
            break
        goal *= target / saved * 1.02
    if reached:
        best = _trim(best, rows, scores, saving, target, limits)
    return best, reached


def _trim(keep: Keep, rows: list[ScanRow], scores: dict[int, np.ndarray], saving: Saving, target: float, limits: Limits) -> Keep:
    """Give groups back channels while the recount still reaches ``target``.

    The allocation moves in whole scan levels along convex hulls, so it overshoots the target by up
    to one level of one group; any count between (one the limits allow) removes less, and removing
    fewer of the lowest-scored channels costs no more error, to first order.
    """
    keep = dict(keep)
    for row in sorted(rows, key=lambda r: r.group.index, reverse=True):
        index = row.group.index
        if index not in keep:
            continue
        current = int(keep[index].sum())
        channels = row.group.channels
        allowed = {limits.kept(channels, i / channels) for i in range(channels + 1)} | {channels}
        for kept in sorted((k for k in allowed if k > current), reverse=True):
            trial = dict(keep)
            if kept >= row.group.channels:
                trial.pop(index)
            else:
                trial[index] = top_mask(scores[index], kept)
            if saving(trial) >= target * (1 - 1e-9):
                keep = trial
                break
    return keep
