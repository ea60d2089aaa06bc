"""``prune_channels``: structured pruning that removes whole channels and shrinks the real shapes.

The dependency analysis (:mod:`onnxopt.passes.channel_groups`) finds groups of tied output
channels; scores (:mod:`onnxopt.passes.channel_scoring`) rank a group's channels; the amount per
group comes from one global target (:mod:`onnxopt.passes.channel_allocation`); the rewrite
(:mod:`onnxopt.passes.channel_surgery`) slices every weight, per-channel constant, attribute and
shape constant involved. Optional similarity merging (:mod:`onnxopt.passes.channel_merge`) first
folds nearly parallel filters into their survivors.

Measured (benchmarks/prune.py, ratio=0.3): FLOPs fall by the ratio on ResNet-50 and PP-OCR det;
on ResNet-50 latency follows FLOPs, while on PP-OCR det the sensitivity scan puts the cut in the
two large head convolutions, which hold 46% of the FLOPs but 20% of the CPU time, so latency falls
less than FLOPs there (uniform allocation follows latency better but costs far more accuracy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from onnx import ModelProto, TypeProto

from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import node_label
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_choices, check_patterns, option
from onnxopt.passes.channel_allocation import (
    Limits,
    Saving,
    ScanRow,
    saving_of,
    sensitivity_keep,
    sensitivity_scan,
    top_mask,
    uniform_keep,
)
from onnxopt.passes.channel_groups import PRODUCER_OPS, ChannelAnalysis, ChannelGroup, analyze_channels
from onnxopt.passes.channel_latency import LatencyModel
from onnxopt.passes.channel_merge import fold_consumers, merge_groups
from onnxopt.passes.channel_scoring import activation_scores, bn_scores, norm_scores
from onnxopt.passes.channel_surgery import ConstantStore, CostModel, Keep, apply_pruning
from onnxopt.passes.noop_rules import dims_of
from onnxopt.registry import register_pass

log = logging.getLogger("onnxopt")

PASS_NAME = "prune_channels"
DEFAULT_LEVELS = ("0.125", "0.25", "0.375", "0.5", "0.625")
MAX_LAYER_NOTES = 200
MAX_BLOCKED_LISTED = 3


# ----------------------------------------------------------------------------- options


@dataclass
class PruneChannelsOptions(PassOptions):
    """Options of :class:`PruneChannels`."""

    ratio: float = option(
        0.3, "fraction of the prunable layers' FLOPs (or parameters, or estimated latency: see 'by') to remove, in [0, 1)"
    )
    by: Literal["flops", "params", "latency"] = option("flops", "what ratio counts: flops, params, or latency (a roofline estimate)")
    criterion: Literal["l1", "l2", "bn_gamma", "activation"] = option("l1", "channel score: l1, l2, bn_gamma or activation (calibration)")
    allocation: Literal["auto", "uniform", "sensitivity"] = option("auto", "per-group amounts: uniform, sensitivity (calibration), auto")
    levels: tuple[str, ...] = option(DEFAULT_LEVELS, "sensitivity scan: fractions of a group's channels removed, '|'-separated")
    round_to: int = option(8, "keep channel counts multiples of this in groups wider than it (1: off)")
    min_channels: int = option(8, "never keep fewer channels than this in a group")
    max_layer_ratio: float = option(0.75, "never remove more than this fraction of a group's channels")
    merge_similar: float = option(0.0, "merge filters whose cosine similarity is at least this (0: off; e.g. 0.98)")
    exclude: tuple[str, ...] = option((), "producer node or output names (exact or regex) whose groups stay, '|'-separated")
    ops: tuple[str, ...] = option(PRODUCER_OPS, "producer op types whose output channels may be pruned, '|'-separated")
    input_shapes: tuple[str, ...] = option((), "static input shapes for FLOPs of dynamic models: name=1x3x640x640, '|'-separated")
    scan_batches: int = option(2, "sensitivity scan: calibration batches per measurement")
    scan_batch_size: int = option(8, "sensitivity scan: samples per batch")
    max_scan_groups: int = option(256, "sensitivity scan: at most this many groups (the largest by saving); the others stay")

    def validate(self) -> None:
        """Check ranges, levels, shapes and patterns."""
        where = f"of pass '{PASS_NAME}'"
        if not 0.0 <= self.ratio < 1.0:
            raise OptionError(f"option 'ratio' {where} must be in [0, 1), not {self.ratio}")
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise OptionError(f"option 'max_layer_ratio' {where} must be in (0, 1), not {self.max_layer_ratio}")
        if not (self.merge_similar == 0.0 or 0.5 <= self.merge_similar <= 1.0):
            raise OptionError(f"option 'merge_similar' {where} must be 0 (off) or in [0.5, 1], not {self.merge_similar}")
        for name in ("round_to", "min_channels", "scan_batches", "scan_batch_size", "max_scan_groups"):
            if getattr(self, name) < 1:
                raise OptionError(f"option '{name}' {where} must be at least 1, not {getattr(self, name)}")
        self.level_values()
        self.shapes()
        check_choices(PASS_NAME, "ops", tuple(self.ops), PRODUCER_OPS, "op")
        check_patterns(PASS_NAME, "exclude", tuple(self.exclude))

    def level_values(self) -> list[float]:
        """The scan levels as sorted floats in (0, 1)."""
        values = []
        for raw in self.levels:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise OptionError(f"option 'levels' of pass '{PASS_NAME}': '{raw}' is not a number") from None
            if not 0.0 < value < 1.0:
                raise OptionError(f"option 'levels' of pass '{PASS_NAME}': {value} is not in (0, 1)")
            values.append(value)
        if not values:
            raise OptionError(f"option 'levels' of pass '{PASS_NAME}' needs at least one level")
        return sorted(set(values))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``input_shapes`` parsed: {input name: dims}."""
        parsed: dict[str, tuple[int, ...]] = {}
        for item in self.input_shapes:
            name, _, dims = str(item).rpartition("=")
            try:
                parsed[name] = tuple(int(d) for d in dims.lower().split("x"))
            except ValueError:
                name = ""
            if not name or any(d <= 0 for d in parsed.get(name, (0,))):
                raise OptionError(f"option 'input_shapes' of pass '{PASS_NAME}': '{item}' is not name=DxDx...")
        return parsed

    @property
    def limits(self) -> Limits:
        """The per-group bounds."""
        return Limits(self.round_to, self.min_channels, self.max_layer_ratio)


# ----------------------------------------------------------------------------- shapes for FLOPs


def cost_types(model: ModelProto, types: dict[str, TypeProto], shapes: dict[str, tuple[int, ...]], calibration: Any) -> dict | None:
    """Types with every graph input static (from ``shapes``, a calibration sample, or batch 1); None when sizes are unknown."""
    from onnxopt.shapes import infer_types, light_copy

    initializers = {t.name for t in model.graph.initializer}
    fixed: dict[str, list[int]] = {}
    sample = None
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = dims_of(value.type)
        if dims is None:
            return None
        if all(d is not None and d > 0 for d in dims) and value.name not in shapes:
            continue
        if value.name in shapes:
            if len(shapes[value.name]) != len(dims):
                raise OptionError(f"option 'input_shapes' of pass '{PASS_NAME}': input '{value.name}' has rank {len(dims)}")
            fixed[value.name] = list(shapes[value.name])
        elif calibration is not None:
            sample = sample if sample is not None else calibration.first_batch(1)
            fixed[value.name] = [int(d) for d in np.shape(sample[value.name])]
        elif all(d is not None and d > 0 for d in dims[1:]):
            fixed[value.name] = [1, *dims[1:]]  # type: ignore[list-item]
        else:
            return None
    if not fixed:
        return types
    light = light_copy(model)
    for value in light.graph.input:
        if value.name in fixed:
            shape = value.type.tensor_type.shape
            for dim, size in zip(shape.dim, fixed[value.name]):
                dim.Clear()
                dim.dim_value = size
    del light.graph.value_info[:]
    return infer_types(light)


# ----------------------------------------------------------------------------- the outcome


@dataclass
class PruneOutcome:
    """What :func:`prune_channels` did: masks, the analysis, the scan, counts before/after, notes."""

    analysis: ChannelAnalysis | None = None
    keep: Keep = field(default_factory=dict)
    scan: list[ScanRow] = field(default_factory=list)
    allocation: str = ""
    merged: int = 0
    params: tuple[int, int] = (0, 0)
    flops: tuple[int | None, int | None] = (None, None)
    prunable: tuple[int, int | None] = (0, None)
    error: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def channels_removed(self) -> int:
        """Channels removed by pruning (merges excluded)."""
        return int(sum((~m).sum() for m in self.keep.values()))


def _blocked_notes(analysis: ChannelAnalysis) -> list[str]:
    reasons: dict[str, list[str]] = {}
    for group in analysis.groups:
        if not group.prunable:
            reasons.setdefault(group.reasons[0], []).append(group.name)
    if not reasons:
        return []
    parts = []
    for reason, names in sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        listed = ", ".join(f"'{n}'" for n in names[:MAX_BLOCKED_LISTED]) + (", ..." if len(names) > MAX_BLOCKED_LISTED else "")
        parts.append(f"{reason} ({len(names)}: {listed})")
    total = sum(len(v) for v in reasons.values())
    return [f"{PASS_NAME}: {total} of {len(analysis.groups)} channel group(s) kept whole: " + "; ".join(parts)]


def _scores(model: ModelProto, analysis: ChannelAnalysis, groups: list[ChannelGroup], criterion: str, calibration: Any, notes: list[str]):
    from onnxopt.graph import GraphView

    store = ConstantStore(model.graph)
    if criterion == "activation":
        return activation_scores(model, analysis, groups, calibration)
    scores: dict[int, np.ndarray] = {}
    fallback = 0
    view = GraphView.build(model.graph)
    for group in groups:
        score = bn_scores(analysis, store, view, group) if criterion == "bn_gamma" else None
        if criterion == "bn_gamma" and score is None:
            fallback += 1
        scores[group.index] = score if score is not None else norm_scores(analysis, store, group, 2 if criterion == "l2" else 1)
    if fallback:
        notes.append(f"{PASS_NAME}: criterion=bn_gamma: {fallback} group(s) without a BatchNormalization after every producer scored by l1")
    return scores


def _merge(model: ModelProto, analysis: ChannelAnalysis, options: PruneChannelsOptions, notes: list[str]) -> int:
    """Fold nearly parallel filters into their survivors and remove them; returns how many channels went."""
    store = ConstantStore(model.graph)
    groups = analysis.prunable()
    floors = {g.index: options.limits.floor(g.channels, g.segments) for g in groups}
    plans, skipped = merge_groups(model, analysis, store, groups, options.merge_similar, floors)
    for plan in plans:
        for name in sorted(fold_consumers(store, analysis, analysis.groups[plan.group], plan.pairs)):
            store.write(name, store[name])
    keep = {p.group: p.mask(analysis.groups[p.group].channels) for p in plans}
    apply_pruning(model, analysis, keep)
    merged = sum(len(p.pairs) for p in plans)
    detail = "; ".join(f"{reason} ({count})" for reason, count in sorted(skipped.items()))
    notes.append(
        f"{PASS_NAME}: merge_similar={options.merge_similar:g}: {merged} channel(s) merged in {len(plans)} group(s)"
        + (f"; not mergeable: {detail}" if detail else "")
    )
    return merged


def _scan_groups(groups: list[ChannelGroup], saving: Saving, options: PruneChannelsOptions, notes: list[str]) -> list[ChannelGroup]:
    """The groups the scan measures (the ``max_scan_groups`` that save most at the deepest level)."""
    if len(groups) <= options.max_scan_groups:
        return groups
    deepest = max(options.level_values())

    def potential(group: ChannelGroup) -> float:
        """What the group saves at the deepest level."""
        return saving({group.index: top_mask(np.zeros(group.channels), options.limits.kept_in(group, deepest), group.segments)})

    ranked = sorted(groups, key=lambda g: (-potential(g), g.index))[: options.max_scan_groups]
    chosen = {g.index for g in ranked}
    notes.append(
        f"{PASS_NAME}: {len(groups)} prunable groups; the scan measures the {options.max_scan_groups} largest, the rest stay whole"
    )
    return [g for g in groups if g.index in chosen]


def prune_channels(model: ModelProto, options: PruneChannelsOptions, calibration: Any = None, types: dict | None = None) -> PruneOutcome:
    """Prune ``model`` (main graph) in place as ``options`` say; see :class:`PruneChannels`."""
    from onnxopt.calibration.fidelity import FidelityProbe
    from onnxopt.shapes import infer_types

    outcome = PruneOutcome()
    notes = outcome.notes
    if options.criterion == "activation" and calibration is None:
        raise OptionError(f"option 'criterion' of pass '{PASS_NAME}': criterion=activation needs calibration data (give --calib)")
    if options.allocation == "sensitivity" and calibration is None:
        raise OptionError(f"option 'allocation' of pass '{PASS_NAME}': allocation=sensitivity needs calibration data (give --calib)")
    types = types if types is not None else infer_types(model)
    shapes = options.shapes()
    fixed = cost_types(model, types, shapes, calibration)
    if fixed is None and options.by != "params":
        raise OnnxoptError(
            f"{PASS_NAME}: by={options.by} needs static input sizes; give calibration data, input_shapes=name=1x3xHxW, or by=params"
        )
    probe = FidelityProbe.of(model, calibration, batches=options.scan_batches, batch_size=options.scan_batch_size) if calibration else None
    analysis = analyze_channels(model, types, producer_ops=options.ops, exclude=options.exclude)
    notes.extend(_blocked_notes(analysis))
    base = CostModel.of(model, analysis, fixed)
    outcome.prunable = base.prunable_layers()
    before = _total(model, analysis, base, fixed, options.by)
    target = options.ratio * _prunable_amount(model, analysis, base, fixed, options.by)
    if options.merge_similar and analysis.prunable():
        outcome.merged = _merge(model, analysis, options, notes)
        if outcome.merged:
            types = infer_types(model)
            fixed = cost_types(model, types, shapes, calibration)
            analysis = analyze_channels(model, types, producer_ops=options.ops, exclude=options.exclude)
            target -= before - _total(model, analysis, CostModel.of(model, analysis, fixed), fixed, options.by)
    outcome.analysis = analysis
    cost = CostModel.of(model, analysis, fixed)
    latency = _latency_model(model, analysis, fixed) if options.by == "latency" else None
    groups = analysis.prunable()
    if target > 0 and groups:
        saving = saving_of(cost, options.by, latency)
        outcome.keep = _allocate(model, analysis, groups, saving, target, options, calibration, probe, outcome)
        if latency is not None:
            notes.append(
                f"{PASS_NAME}: estimated latency (roofline) {1000 * before:.1f} ms -> {1000 * latency.seconds(outcome.keep):.1f} ms"
            )
        apply_pruning(model, analysis, outcome.keep)
    elif not groups:
        notes.append(f"{PASS_NAME}: no prunable channel group")
    elif options.ratio > 0:
        raise OnnxoptError(
            f"{PASS_NAME}: the {options.by} of the {len(groups)} prunable groups' layers count as zero (shapes unknown after "
            "an op shape inference cannot follow); give input_shapes=name=1x3xHxW or by=params"
        )
    if probe is not None and (outcome.keep or outcome.merged):
        outcome.error = probe.error(model)
    _recount(model, base, shapes, calibration, outcome)
    return outcome


def _latency_model(model: ModelProto, analysis: ChannelAnalysis, fixed: dict | None) -> LatencyModel:
    estimate = LatencyModel.of(model, analysis, fixed) if fixed is not None else None
    if estimate is None:
        raise OnnxoptError(f"{PASS_NAME}: by=latency needs the static shape of every tensor; give input_shapes or calibration data")
    return estimate


def _total(model: ModelProto, analysis: ChannelAnalysis, cost: CostModel, fixed: dict | None, by: str) -> float:
    """The whole model's parameters, FLOPs or estimated seconds."""
    if by == "latency":
        return _latency_model(model, analysis, fixed).seconds()
    return float(cost.params if by == "params" else (cost.flops or 0))


def _prunable_amount(model: ModelProto, analysis: ChannelAnalysis, cost: CostModel, fixed: dict | None, by: str) -> float:
    """What ``ratio`` is a fraction of: the prunable layers' parameters, FLOPs or estimated seconds."""
    if by == "latency":
        return _latency_model(model, analysis, fixed).prunable_seconds()
    params, flops = cost.prunable_layers()
    return float(params if by == "params" else (flops or 0))


def _allocate(model, analysis, groups, saving: Saving, target, options, calibration, probe, outcome) -> Keep:
    """Per-group keep masks reaching ``target`` (uniform or from the sensitivity scan)."""
    notes = outcome.notes
    scores = _scores(model, analysis, groups, options.criterion, calibration, notes)
    mode = options.allocation
    if mode == "auto":
        mode = "sensitivity" if calibration is not None else "uniform"
        if calibration is None:
            notes.append(f"{PASS_NAME}: no calibration data: uniform allocation (give --calib for a sensitivity scan)")
    outcome.allocation = mode
    if mode == "uniform":
        keep, fraction = uniform_keep(groups, scores, saving, target, options.limits)
        notes.append(f"{PASS_NAME}: uniform allocation: {fraction:.3f} of every group's channels removed (before rounding)")
        return keep
    scanned = _scan_groups(groups, saving, options, notes)
    levels = options.level_values()
    log.info("%s: sensitivity scan of %d group(s) at %d level(s)", PASS_NAME, len(scanned), len(levels))
    outcome.scan = sensitivity_scan(
        model, analysis, scanned, scores, probe.error, saving, levels, options.limits, getattr(calibration, "progress", None)
    )
    notes.append(f"{PASS_NAME}: sensitivity scan, output error (1 - cosine) per level 'fraction->kept: error':")
    notes.extend(f"{PASS_NAME}: scan {row.line()}" for row in outcome.scan)
    keep, reached = sensitivity_keep(outcome.scan, scores, saving, target, options.limits)
    if not reached:
        notes.append(f"{PASS_NAME}: the scan's levels cannot reach ratio={options.ratio:g}: pruned as far as they go (add deeper levels)")
    return keep


def _recount(model: ModelProto, base: CostModel, shapes, calibration, outcome: PruneOutcome) -> None:
    """Parameters and FLOPs after the rewrite, recounted with :func:`onnxopt.analysis.analyze`; per-layer notes."""
    from onnxopt.analysis import analyze
    from onnxopt.shapes import infer_types

    types = cost_types(model, infer_types(model), shapes, calibration)
    after = analyze(model, types, serialized_size=False)
    outcome.params = (base.params, after.parameters)
    outcome.flops = (base.flops, after.flops if types is not None and not after.flops_unknown else None)
    notes = outcome.notes
    pieces = [f"params {base.params} -> {after.parameters} ({_percent(base.params, after.parameters)})"]
    before_flops, after_flops = outcome.flops
    if before_flops is not None and after_flops is not None:
        pieces.insert(0, f"FLOPs {before_flops} -> {after_flops} ({_percent(before_flops, after_flops)})")
        if outcome.prunable[1]:
            pieces.append(f"{(before_flops - after_flops) / outcome.prunable[1]:.1%} of the prunable layers' FLOPs removed")
    notes.append(f"{PASS_NAME}: recounted: " + ", ".join(pieces))
    analysis = outcome.analysis
    if analysis is None or not outcome.keep:
        return
    lines = []
    for index, mask in sorted(outcome.keep.items()):
        group = analysis.groups[index]
        for space in group.spaces:
            node = analysis.nodes[analysis.spaces[space].node]
            lines.append(f"{PASS_NAME}: {node_label(node)}: {group.channels} -> {int(mask.sum())} channels")
    notes.extend(lines[:MAX_LAYER_NOTES])
    if len(lines) > MAX_LAYER_NOTES:
        notes.append(f"{PASS_NAME}: ... and {len(lines) - MAX_LAYER_NOTES} more pruned layers")


def _percent(before: int, after: int) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


# ----------------------------------------------------------------------------- the pass


@register_pass
class PruneChannels(Pass):
    """Structured pruning: remove whole output channels of Conv/ConvTranspose/Gemm/MatMul and shrink every reader.

    Pre: types inferred. The dependency analysis follows each producer's output channels through
    BatchNormalization, activations, elementwise ops (per-channel constants are sliced, residual
    Adds tie groups), depthwise convs, pooling, Pad/Resize, Concat/Split, Squeeze/Unsqueeze and a
    Flatten/Reshape into Gemm/MatMul; grouped convs (1 < group < channels) are pruned too, with the
    same number of channels kept in each of their groups (``group`` stays); anything else that
    reads a group with a channel meaning (graph outputs, Shape, Transpose, a grouped conv reading a
    Concat/Split or one channel per group, unknown ops or domains, subgraphs) keeps the group whole
    (a note says why). Only the main graph is pruned; weights must be float/float16
    constants used by one node.

    ``ratio`` is the fraction of the prunable layers' FLOPs (``by=params``: parameters;
    ``by=latency``: a roofline estimate of their single-thread CPU time, see
    :mod:`onnxopt.passes.channel_latency`) to remove; FLOPs and parameters are recounted exactly
    for every candidate.
    Channels are ranked by ``criterion`` (l1, l2, bn_gamma, activation); the amount per group is
    ``uniform`` or from a ``sensitivity`` scan on calibration data (each group pruned alone at
    ``levels``, output error measured, the budget spent where it hurts least; the scan is in the
    notes); ``auto`` picks sensitivity when calibration data is given. ``round_to``,
    ``min_channels`` and ``max_layer_ratio`` bound each group; ``merge_similar`` first folds
    nearly parallel filters into their survivors. Dynamic models need calibration data or
    ``input_shapes`` to count FLOPs.

    Post: shapes shrink, graph inputs and outputs keep their names and shapes, the notes give the
    recounted parameters and FLOPs and every pruned layer's channels. Lossy; deterministic.
    """

    name = PASS_NAME
    Options = PruneChannelsOptions
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False
    recurse = False
    lossy = True
    tolerance = "pruned"

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Prune the main graph and report what changed."""
        options: PruneChannelsOptions = self.options  # type: ignore[assignment]
        result = PassResult()
        if options.ratio == 0 and not options.merge_similar:
            result.notes.append(f"{PASS_NAME}: ratio=0 and merge_similar=0: nothing to do")
            return result
        outcome = prune_channels(model, options, ctx.calibration, ctx.types)
        result.notes.extend(outcome.notes)
        result.count("channels_removed", outcome.channels_removed)
        result.count("channels_merged", outcome.merged)
        result.count("groups_pruned", sum(1 for mask in outcome.keep.values() if not np.all(mask)))
        if result.modified:
            ctx.invalidate()
        return result
