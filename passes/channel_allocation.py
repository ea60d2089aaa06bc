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

A group under a grouped-conv constraint (``ChannelGroup.segments`` > 1) keeps a multiple of
``segments`` channels (:meth:`Limits.kept` rounds to ``lcm(round_to, segments)``), the best
``kept / segments`` of each segment (:func:`top_mask`).
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

    def kept(self, channels: int, fraction: float, segments: int = 1) -> int:
        """Channels kept when removing ``fraction`` of ``channels``, after the floors and the rounding.

        ``segments`` (a group's grouped-conv constraint, a divisor of ``channels``): the count is a
        multiple of it. The rounding step is ``lcm(round_to, segments)`` while ``channels`` exceeds
        that, else ``segments`` alone (with ``segments`` 1 that is today's rule: no rounding in
        groups no wider than ``round_to``).
        """
        floor = max(min(channels, self.min_channels), math.ceil(channels * (1.0 - self.max_layer_ratio) - 1e-9), 1)
        kept = max(channels - math.floor(fraction * channels + 0.5), floor)
        step = math.lcm(self.round_to, segments)
        if channels <= step:  # rounding to round_to would leave only all channels: the segments alone
            step = segments
        if step > 1:
            kept = max(step, math.floor(kept / step + 0.5) * step)  # nearest multiple, halves up
            if kept < floor:
                kept = math.ceil(floor / step) * step
        return min(kept, channels)

    def floor(self, channels: int, segments: int = 1) -> int:
        """The fewest channels a group may keep."""
        return self.kept(channels, 1.0, segments)

    def kept_in(self, group: ChannelGroup, fraction: float) -> int:
        """:meth:`kept` for a group (its channels and segments)."""
        return self.kept(group.channels, fraction, group.segments)


def top_mask(scores: np.ndarray, kept: int, segments: int = 1) -> np.ndarray:
    """Keep the ``kept`` highest-scoring channels (ties: the lower index); with ``segments``, ``kept / segments`` in each.

    ``segments`` equal contiguous segments of the channels (a group's grouped-conv constraint)
    each keep their own top ``kept // segments``; ``kept`` must be a multiple of ``segments``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if kept % segments or len(scores) % segments:
        raise ValueError(f"top_mask: {kept} of {len(scores)} channels do not split into {segments} equal segments")
    rows = scores.reshape(segments, -1)
    order = np.argsort(-rows, axis=1, kind="stable")[:, : kept // segments]
    mask = np.zeros(rows.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask.reshape(-1)


def group_mask(group: ChannelGroup, scores: dict[int, np.ndarray], kept: int) -> np.ndarray:
    """:func:`top_mask` of the group's scores under its segments."""
    return top_mask(scores[group.index], kept, group.segments)


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
        return {g.index: group_mask(g, scores, limits.kept_in(g, fraction)) for g in groups}

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
    by_index = {g.index: g for g in groups}
    kept = {g.index: limits.kept_in(g, low) for g in groups}
    steps = []
    for group in groups:
        further = limits.kept_in(group, high)
        if further < kept[group.index]:
            step = saving({group.index: group_mask(group, scores, further)})
            step -= saving({group.index: group_mask(group, scores, kept[group.index])})
            steps.append((step, group.index, further))
    current = {i: group_mask(by_index[i], scores, k) for i, k in kept.items()}
    for _, index, further in sorted(steps):
        if saving(current) >= target:
            break
        current[index] = group_mask(by_index[index], scores, further)
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
            kept = limits.kept_in(group, fraction)
            if kept >= group.channels or kept in seen:
                continue
            seen.add(kept)
            keep = {group.index: group_mask(group, scores, kept)}
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
        keep = {by_key[k].index: group_mask(by_key[k], scores, int(level.level)) for k, level in allocation.chosen.items()}
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
        allowed = {limits.kept_in(row.group, i / channels) for i in range(channels + 1)} | {channels}
        for kept in sorted((k for k in allowed if k > current), reverse=True):
            trial = dict(keep)
            if kept >= row.group.channels:
                trial.pop(index)
            else:
                trial[index] = group_mask(row.group, scores, kept)
            if saving(trial) >= target * (1 - 1e-9):
                keep = trial
                break
    return keep
