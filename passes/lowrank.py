"""Low-rank factorization of MatMul, Gemm and Conv weights: SVD, activation-aware SVD, Tucker-2.

A layer whose constant weight is seen as a [K, N] matrix (``Y = X @ M``; a convolution per group
through its im2col view, K = Cin/groups * prod(kernel)) is replaced by two thin products of rank
r, where that saves at least ``min_saving`` of its parameters and FLOPs:

* MatMul: ``MatMul(X, L[K, r])`` then ``MatMul(., R[r, N])``; Gemm: the first product is a
  MatMul (a Gemm when transA=1), the second is the original Gemm reading R as B (transB, alpha,
  beta and the bias C kept), so the bias is added once.
* Conv (SVD): a conv with the original kernel, pads, strides, dilations and groups writing r
  channels per group (no bias), then a 1x1 conv (r -> Cout/groups per group) with the bias.
  Depthwise convolutions cannot save anything and are left alone.
* Conv (SVD, 1x1 first; k x k one-group convs, offered by the ratio scan beside the above): a 1x1
  conv (Cin -> r, no bias) at the input's resolution, then the k x k conv (r -> Cout) with the
  original attributes and the bias: the SVD of the weight as a [Cin, Cout * k * k] matrix
  (activation-aware: weighted by the input pixels' Gram matrix). It costs r * (Cin + Cout * k * k)
  per position instead of r * (Cin * k * k + Cout), so it wins where Cin > Cout.
* Conv (Tucker-2, k x k, one group): 1x1 conv (Cin -> r_in), the k x k conv on the core
  (r_in -> r_out, original attributes), 1x1 conv (r_out -> Cout) with the bias.

Ranks come from one of three rules: ``energy`` (keep that share of the squared singular values;
for Tucker-2 of each mode's), ``rank`` (a fraction of min(K, N); Tucker-2: of Cin and Cout), or
``ratio``: remove that fraction of the candidate layers' FLOPs (or parameters, ``by``) in total,
split into per-layer ranks by a sensitivity scan (each layer alone at a few kept fractions,
scored by the model's output error on calibration data, then
:func:`onnxopt.passes.compression_budget.allocate`). The last node of each factorization writes
the original output name, so a later ``reconstruct`` can fit it to the teacher.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper

from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import GraphView, node_label
from onnxopt.passbase import (
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    Requirement,
    check_choices,
    check_patterns,
    option,
)
from onnxopt.passes.lowrank_emit import Factorized, apply_emissions, emit, variant
from onnxopt.passes.lowrank_factor import (
    Spectrum,
    Tucker2,
    channel_gram,
    energy_rank,
    inward_conv_weights,
    inward_matrix,
    matrix_spectrum,
    mode_singular_values,
    round_down,
    round_up,
    tucker2,
)
from onnxopt.passes.lowrank_layers import (
    INWARD,
    Choice,
    Layer,
    attach_rows,
    calibration_types,
    cost_value,
    count_subgraph_layers,
    full_rank,
    layer_cost,
    saves_enough,
    survey,
)
from onnxopt.passes.noop_rules import get_attr
from onnxopt.registry import register_pass

log = logging.getLogger("onnxopt")

PASS_NAME = "lowrank"
LAYER_OPS = ("Conv", "Gemm", "MatMul")
DEFAULT_ENERGY = 0.95  # the rule when none of energy / rank / ratio is given
SCAN_KEEP = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8)  # kept cost fractions every layer is scored at in the ratio scan
CALIB_BATCH = 8
MAX_LAYER_NOTES = 20
MAX_LISTED = 5

# count keys: what was done, and why layers were left alone (counted without marking the model modified)
FACTORIZED, PARAMS_REMOVED, FLOPS_REMOVED = "layers_factorized", "params_removed", "flops_removed"
NO_SAVING = "layers_no_saving"


# ----------------------------------------------------------------------------- options


@dataclass
class LowRankOptions(PassOptions):
    """Options of :class:`LowRank`."""

    method: Literal["auto", "svd", "asvd", "tucker2"] = option(
        "auto",
        "auto: SVD of every layer, activation-aware when calibration data is given (see data_aware); svd: plain SVD; "
        "asvd: activation-aware SVD (needs calibration data); "
        "tucker2: Tucker-2 for k x k convs, SVD for the rest",
    )
    data_aware: bool = option(True, "auto/tucker2: use activation-aware SVD when calibration data is given")
    energy: float = option(0.0, f"keep this share of each layer's squared singular values (default {DEFAULT_ENERGY} when no rule is given)")
    rank: float = option(0.0, "rank as a fraction of min(K, N) (Tucker-2: of Cin and of Cout), in (0, 1]")
    ratio: float = option(0.0, "remove this fraction of the candidate layers' FLOPs (or params, see by), ranks from a sensitivity scan")
    by: Literal["flops", "params"] = option("flops", "ratio: the cost the target counts")
    min_saving: float = option(0.2, "factorize only where params and FLOPs drop by at least this fraction (negative: allow growth)")
    ops: tuple[str, ...] = option(LAYER_OPS, "op types to factorize, '|'-separated (Conv, Gemm, MatMul)")
    exclude: tuple[str, ...] = option((), "node or weight names (exact, or a regex matching all of it) left alone, '|'-separated")
    min_size: int = option(4096, "weights with fewer elements are left alone")
    round_rank: int = option(8, "round ranks to multiples of this (up for energy/rank; down for ratio budgets, from 4 multiples); 1: exact")
    damp: float = option(0.01, "activation-aware SVD: Gram matrix damping as a fraction of its mean diagonal")
    calib_batches: int = option(8, "calibration batches (of 8 samples) for the activation statistics")
    scan_samples: int = option(8, "ratio: calibration samples each scan variant is scored on (in batches of up to 8)")

    def validate(self) -> None:
        """Check the rule (at most one of energy / rank / ratio), ranges, op types and patterns."""
        where = f"pass '{PASS_NAME}'"
        given = [name for name in ("energy", "rank", "ratio") if getattr(self, name)]
        if len(given) > 1:
            raise OptionError(f"{where}: give only one of energy, rank and ratio (got {' and '.join(given)})")
        if self.energy and not 0 < self.energy <= 1:
            raise OptionError(f"option 'energy' of {where} must be in (0, 1], not {self.energy}")
        if self.rank and not 0 < self.rank <= 1:
            raise OptionError(f"option 'rank' of {where} must be in (0, 1], not {self.rank}")
        if self.ratio and not 0 < self.ratio < 1:
            raise OptionError(f"option 'ratio' of {where} must be in (0, 1), not {self.ratio}")
        if not -1 <= self.min_saving < 1:
            raise OptionError(f"option 'min_saving' of {where} must be in [-1, 1), not {self.min_saving}")
        if self.round_rank < 1:
            raise OptionError(f"option 'round_rank' of {where} must be at least 1, not {self.round_rank}")
        if self.min_size < 0:
            raise OptionError(f"option 'min_size' of {where} must not be negative, not {self.min_size}")
        if not 0 < self.damp < 10:
            raise OptionError(f"option 'damp' of {where} must be in (0, 10), not {self.damp}")
        for name in ("calib_batches", "scan_samples"):
            if getattr(self, name) < 1:
                raise OptionError(f"option '{name}' of {where} must be at least 1, not {getattr(self, name)}")
        if not self.ops:
            raise OptionError(f"option 'ops' of {where} names no op type")
        check_choices(PASS_NAME, "ops", self.ops, LAYER_OPS, "op type")
        check_patterns(PASS_NAME, "exclude", self.exclude)

    @property
    def rule(self) -> str:
        """energy, rank or ratio."""
        return "ratio" if self.ratio else "rank" if self.rank else "energy"

    @property
    def energy_target(self) -> float:
        """The energy to keep under the energy rule."""
        return self.energy or DEFAULT_ENERGY


# ----------------------------------------------------------------------------- factorizations


class Factorizer:
    """The spectra of one layer (plain and activation-aware), computed once, and its factorizations."""

    def __init__(self, layer: Layer, gram: np.ndarray | None, damp: float) -> None:
        self.layer = layer
        self.gram = gram
        self.damp = damp
        self._spectra: dict[str, list[Spectrum]] = {}
        self._tucker: dict[tuple[int, ...], Tucker2] = {}
        self._modes: tuple[np.ndarray, np.ndarray] | None = None

    def spectra(self, method: str) -> list[Spectrum]:
        """One :class:`Spectrum` per group (``asvd``: weighted by the group's input Gram matrix)."""
        if method not in self._spectra:
            aware = method.removesuffix(INWARD) == "asvd"
            if aware and self.gram is None:
                raise OnnxoptError(f"{PASS_NAME}: no activation statistics for {node_label(self.layer.node)}")
            if method.endswith(INWARD):  # one group; the Gram of input pixels, from the im2col one
                gram = channel_gram(self.gram[0], self.layer.taps) if aware else None  # type: ignore[index]
                self._spectra[method] = [matrix_spectrum(inward_matrix(self.conv_weight()), gram, self.damp)]
            else:
                grams = self.gram if aware else [None] * self.layer.groups
                self._spectra[method] = [matrix_spectrum(m, g, self.damp) for m, g in zip(self.layer.matrices, grams)]  # type: ignore[arg-type]
        return self._spectra[method]

    def mode_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Singular values of the output- and input-channel unfoldings (Tucker-2 energy ranks)."""
        if self._modes is None:
            self._modes = mode_singular_values(self.conv_weight())
        return self._modes

    def conv_weight(self) -> np.ndarray:
        """The one-group conv weight [Cout, Cin, *kernel] in float64."""
        layer = self.layer
        return layer.matrices[0].T.reshape(layer.cout, layer.cin, *layer.kernel)

    def factorize(self, choice: Choice) -> Factorized:
        """The weights the rewrite emits, in node order, and the energy kept."""
        layer = self.layer
        if choice.method == "tucker2":
            if choice.ranks not in self._tucker:
                self._tucker[choice.ranks] = tucker2(self.conv_weight(), *choice.ranks)
            t = self._tucker[choice.ranks]
            taps = (1,) * len(layer.kernel)
            return Factorized(choice, [t.first.reshape(*t.first.shape, *taps), t.core, t.last.reshape(*t.last.shape, *taps)], t.energy)
        rank = choice.ranks[0]
        spectra = self.spectra(choice.method)
        pairs = [s.factors(rank) for s in spectra]
        squares = [float(np.sum(np.square(s.s))) for s in spectra]
        energy = sum(s.energy(rank) * q for s, q in zip(spectra, squares)) / max(sum(squares), 1e-300)
        if choice.inward:
            return Factorized(choice, inward_conv_weights(*pairs[0], layer.cout, layer.kernel), float(energy))
        return Factorized(choice, self._svd_arrays(pairs), float(energy))

    def _svd_arrays(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """The two weights of an SVD factorization, shaped for the layer's op."""
        layer = self.layer
        if layer.node.op_type != "Conv":
            left, right = pairs[0]
            trans = layer.node.op_type == "Gemm" and int(get_attr(layer.node, "transB", 0))  # type: ignore[call-overload]
            return [left, right.T if trans else right]
        per_group_in = layer.cin // layer.groups
        taps = (1,) * len(layer.kernel)
        first = np.concatenate([left.T.reshape(-1, per_group_in, *layer.kernel) for left, _ in pairs])
        second = np.concatenate([right.T.reshape(right.shape[1], right.shape[0], *taps) for _, right in pairs])
        return [first, second]


def layer_method(layer: Layer, options: LowRankOptions, data_aware: bool) -> str:
    """The factorization of ``layer``: Tucker-2 where asked for and possible, else (activation-aware) SVD."""
    if options.method in ("svd", "asvd"):
        return options.method
    if options.method == "tucker2" and layer.tucker_ok:
        return "tucker2"
    return "asvd" if data_aware else "svd"


def rule_choice(factorizer: Factorizer, method: str, options: LowRankOptions) -> Choice:
    """The ranks the energy or rank rule gives (rounded up to ``round_rank``)."""
    layer, step = factorizer.layer, options.round_rank
    if method == "tucker2":
        if options.rank:
            r_in, r_out = math.ceil(options.rank * layer.cin), math.ceil(options.rank * layer.cout)
        else:
            s_out, s_in = factorizer.mode_values()
            r_in, r_out = energy_rank(s_in, options.energy_target), energy_rank(s_out, options.energy_target)
        return Choice(method, (round_up(r_in, step, layer.cin), round_up(r_out, step, layer.cout)))
    full = min(layer.k, layer.n)
    if options.rank:
        rank = math.ceil(options.rank * full)
    else:
        rank = max(s.rank_for_energy(options.energy_target) for s in factorizer.spectra(method))
    return Choice(method, (round_up(rank, step, full),))


def budget_choice(layer: Layer, method: str, keep: float, by: str, step: int) -> Choice:
    """The largest ranks whose cost is at most ``keep`` of the layer's (rounded down to ``step`` from 4 * ``step`` up)."""
    budget = keep * cost_value(layer_cost(layer, proxy=True), by)
    if method != "tucker2":
        full = full_rank(layer, method)
        per_rank = cost_value(layer_cost(layer, Choice(method, (1,)), proxy=True), by)
        return Choice(method, (round_down(int(budget // per_rank), step, full),))
    outs = np.arange(1, layer.cout + 1)
    ins = np.maximum(1, np.rint(outs * layer.cin / layer.cout).astype(int))
    costs = [cost_value(layer_cost(layer, Choice(method, (int(i), int(o))), proxy=True), by) for i, o in zip(ins, outs)]
    fits = [index for index, c in enumerate(costs) if c <= budget]
    best = fits[-1] if fits else 0
    return Choice(method, (round_down(int(ins[best]), step, layer.cin), round_down(int(outs[best]), step, layer.cout)))


# ----------------------------------------------------------------------------- calibration


def _geometry(node: NodeProto, tensor: TensorProto) -> tuple:
    """What decides a layer's im2col rows: op, weight shape and the attributes that shape the rows."""
    keys = ("kernel_shape", "pads", "strides", "dilations", "auto_pad", "group", "transA")
    attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute if a.name in keys))
    return node.op_type, tuple(tensor.dims), attrs


def collect_grams(model: ModelProto, layers: list[Layer], calibration, options: LowRankOptions) -> dict[int, np.ndarray]:
    """The input Gram matrices ``[groups, K, K]`` of ``layers`` (by layer index), in one sweep over calibration batches.

    Layers reading one tensor with the same geometry share one matrix.
    """
    from onnxopt.calibration.capture import gram_matrices

    keys: dict[int, str] = {}
    request: dict[str, tuple[NodeProto, list[int]]] = {}
    for layer in layers:
        geometry = _geometry(layer.node, layer.tensor)
        key = keys[layer.index] = f"{layer.node.input[0]}|{geometry}"
        request.setdefault(key, (layer.node, list(geometry[1])))
    found = gram_matrices(model, request, calibration, batch_size=CALIB_BATCH, limit=options.calib_batches)
    return {index: found[key] for index, key in keys.items()}


# ----------------------------------------------------------------------------- the pass


@dataclass
class Plan:
    """The chosen factorization of each layer (by index) and notes on how it was chosen."""

    chosen: dict[int, Factorized] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@register_pass
class LowRank(Pass):
    """Low-rank factorization of MatMul/Gemm/Conv weights (SVD, activation-aware SVD, Tucker-2) where it saves params and FLOPs.

    Pre: types (for FLOPs). Matched in the main graph: a standard MatMul (2-D weight), Gemm or
    Conv of ``ops`` whose input 1 is a float/float16 constant (initializer that is not a graph
    input, or a Constant node; not a graph output) with at least ``min_size`` elements, read by
    that node only, its name and its weight's not matching ``exclude``. Left alone and counted:
    shared weights, depthwise convs, layers in If/Loop/Scan bodies, excluded and small ones, and
    layers whose factorization would not save ``min_saving`` of both params and FLOPs.

    Rules (at most one): ``energy`` (default 0.95), ``rank`` (fraction of min(K, N)), or ``ratio``
    (global target split by a sensitivity scan on calibration data; without data every layer
    gets the same kept fraction). Activation-aware SVD (``asvd``, or ``auto`` with calibration
    data) weights the factorization by the Gram matrix of the layer's calibration inputs (Conv:
    im2col rows), minimising the layer's output error on that data; its energy is that of
    ``L^T W``. In the ratio scan, a k x k one-group conv is scored both ways, k x k conv first
    and 1x1 conv first ("1x1 first" in its note), and the allocation takes whichever saves more
    for less error (on PP-OCR det at half its conv FLOPs it took 1x1 first for every 3x3 conv:
    cosine 0.965 -> 0.982). Tucker-2 (``method=tucker2``: k x k one-group convs; SVD for the
    rest) is data-free; ``auto`` does not use it: in ratio scans offering both per layer, activation-aware
    SVD won every 3x3 conv of ResNet-50 and PP-OCR det at 320x320 at equal FLOPs. fp16 weights
    stay fp16.

    Post: the last node of each factorization writes the original output (its name is
    ``<node>_lr1``, or ``_lr2`` for Tucker-2); surviving values keep their types and the new
    intermediates' types are added. Notes give each layer's rank, energy kept, params and FLOPs
    before and after (up to 20 lines, then a summary); counts ``layers_factorized``,
    ``params_removed``, ``flops_removed``. Outputs change by the truncation error (lossy). The
    same model, data and options give the same bytes.
    """

    name = PASS_NAME
    Options = LowRankOptions
    requires = frozenset({Requirement.SHAPES})
    lossy = True
    tolerance = "pruned"
    preserves_types = True

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Survey the main graph, choose ranks, rewrite the chosen layers and report."""
        options: LowRankOptions = self.options  # type: ignore[assignment]
        result = PassResult()
        if options.method == "asvd" and ctx.calibration is None:
            raise OnnxoptError(f"pass '{PASS_NAME}': method=asvd needs calibration data; give --calib (or calibration= in Python)")
        view = ctx.view(model.graph)
        found = survey(model, view, options, count_subgraph_layers(ctx, options))
        plan = Plan(skipped=list(found.skipped))
        if found.layers:
            self._plan(model, ctx, found.layers, options, plan)
        for kind, _ in plan.skipped:
            result.counts[kind] += 1  # layers left alone are counted without marking the model modified
        result.notes.extend(plan.notes)
        if plan.chosen:
            self._rewrite(model, ctx, view, found.layers, plan, result)
        self._note_skipped(plan.skipped, result)
        return result

    def _plan(self, model: ModelProto, ctx: PassContext, layers: list[Layer], options: LowRankOptions, plan: Plan) -> None:
        data = ctx.calibration
        data_aware = options.method == "asvd" or (options.method in ("auto", "tucker2") and options.data_aware and data is not None)
        if data is None and options.data_aware and options.method in ("auto", "tucker2"):
            plan.notes.append(f"{PASS_NAME}: no calibration data: plain SVD (give --calib for activation-aware SVD)")
        attach_rows(layers, ctx.types)
        if any(layer.rows_out is None for layer in layers) and data is not None:
            fixed = calibration_types(model, data)
            if fixed is not None:
                attach_rows(layers, fixed)
                plan.notes.append(f"{PASS_NAME}: FLOPs counted at the shape of one calibration sample (the model's shapes are dynamic)")
        methods = {layer.index: layer_method(layer, options, data_aware) for layer in layers}
        wants_gram = [layer for layer in layers if methods[layer.index] == "asvd"]
        grams = collect_grams(model, wants_gram, data, options) if wants_gram else {}
        factorizers = {layer.index: Factorizer(layer, grams.get(layer.index), options.damp) for layer in layers}
        if options.rule == "ratio":
            choices = self._budget(model, ctx, layers, methods, factorizers, options, plan)
        else:
            choices = {layer.index: rule_choice(factorizers[layer.index], methods[layer.index], options) for layer in layers}
        for layer in layers:
            choice = choices.get(layer.index)
            if choice is None:
                continue
            if not saves_enough(layer, choice, options.min_saving):
                before = layer_cost(layer, proxy=True).params
                after = layer_cost(layer, choice, proxy=True).params
                plan.skipped.append((NO_SAVING, f"{node_label(layer.node)}: {choice.describe()} would keep {after}/{before} params"))
                continue
            plan.chosen[layer.index] = factorizers[layer.index].factorize(choice)

    def _budget(
        self,
        model: ModelProto,
        ctx: PassContext,
        layers: list[Layer],
        methods: dict[int, str],
        factorizers: dict[int, Factorizer],
        options: LowRankOptions,
        plan: Plan,
    ) -> dict[int, Choice]:
        """Per-layer choices meeting the ratio target: by a sensitivity scan with data, uniformly without."""
        from onnxopt.passes.compression_budget import Level, allocate

        total = sum(cost_value(layer_cost(layer, proxy=True), options.by) for layer in layers)
        target = options.ratio * total
        if ctx.calibration is None:
            keep = 1 - options.ratio
            plan.notes.append(
                f"{PASS_NAME}: ratio={options.ratio} without calibration data: every layer keeps {keep:.2f} of its {options.by}"
            )
            return {layer.index: budget_choice(layer, methods[layer.index], keep, options.by, options.round_rank) for layer in layers}
        from onnxopt.calibration.fidelity import FidelityProbe

        size = min(options.scan_samples, CALIB_BATCH)
        probe = FidelityProbe.of(model, ctx.calibration, batches=math.ceil(options.scan_samples / size), batch_size=size)
        curves: dict[str, list[Level]] = {}
        offered: dict[str, list[Choice]] = {}
        for layer in layers:
            full = cost_value(layer_cost(layer, proxy=True), options.by)
            seen: set[Choice] = set()
            points, choices = [], []
            method = methods[layer.index]
            orientations = [method, method + INWARD] if method in ("svd", "asvd") and layer.tucker_ok else [method]
            for keep, method in ((k, m) for m in orientations for k in SCAN_KEEP):
                choice = budget_choice(layer, method, keep, options.by, options.round_rank)
                if choice in seen or not saves_enough(layer, choice, options.min_saving):
                    continue
                seen.add(choice)
                error = probe.error(variant(model, layer, factorizers[layer.index].factorize(choice), ctx.types))
                saved = full - cost_value(layer_cost(layer, choice, proxy=True), options.by)
                points.append(Level(layer.key, float(len(choices)), saved, error))
                choices.append(choice)
            curves[layer.key], offered[layer.key] = points, choices
        allocation = allocate(curves, target)
        scored = sum(len(p) for p in curves.values())
        plan.notes.append(
            f"{PASS_NAME}: sensitivity scan: {len(layers)} layer(s), {scored} variant(s) scored on {len(probe.feeds)} batch(es); "
            f"target {options.ratio:.0%} of {options.by} ({target:.4g}), allocated {allocation.saved:.4g}"
            + ("" if allocation.reached else " (target not reached: every layer at its strongest level)")
        )
        by_key = {layer.key: layer for layer in layers}
        chosen = {}
        for key, level in allocation.chosen.items():
            chosen[by_key[key].index] = offered[key][int(level.level)]
            log.info("%s: scan %s -> %s (error %.4g)", PASS_NAME, key, chosen[by_key[key].index].describe(), level.error)
        return chosen

    def _rewrite(self, model: ModelProto, ctx: PassContext, view: GraphView, layers: list[Layer], plan: Plan, result: PassResult) -> None:
        types = ctx.types
        by_index = {layer.index: layer for layer in layers}
        emissions = {index: emit(by_index[index], f, ctx.names, types) for index, f in plan.chosen.items()}
        apply_emissions(model, view.nodes, emissions, layers, drop=True)
        for emission in emissions.values():
            for name, type_proto in emission.intermediates:
                if type_proto is not None:
                    types[name] = type_proto
        self._report([(layer, plan.chosen[layer.index]) for layer in layers if layer.index in plan.chosen], result)

    def _report(self, done: list[tuple[Layer, Factorized]], result: PassResult) -> None:
        totals = [0, 0, 0, 0]
        flops_known = True
        for position, (layer, factorized) in enumerate(done):
            before, after = layer_cost(layer), layer_cost(layer, factorized.choice)
            result.count(FACTORIZED)
            result.count(PARAMS_REMOVED, before.params - after.params)
            totals[0] += before.params
            totals[1] += after.params
            if before.flops is not None and after.flops is not None:
                result.count(FLOPS_REMOVED, before.flops - after.flops)
                totals[2] += before.flops
                totals[3] += after.flops
            else:
                flops_known = False
            if position < MAX_LAYER_NOTES:
                flops = (
                    f"{before.flops} -> {after.flops}"
                    if before.flops is not None and after.flops is not None
                    else "unknown (dynamic shapes)"
                )
                result.notes.append(
                    f"{PASS_NAME}: {node_label(layer.node)} ({layer.description}): {factorized.choice.describe()}, "
                    f"energy {factorized.energy:.3f}, params {before.params} -> {after.params}, FLOPs {flops}"
                )
        if len(done) > MAX_LAYER_NOTES:
            result.notes.append(f"{PASS_NAME}: ... and {len(done) - MAX_LAYER_NOTES} more layer(s)")
        flops = f"FLOPs {totals[2]} -> {totals[3]} ({_percent(totals[2], totals[3])})" if totals[2] else "FLOPs unknown"
        partial = "" if flops_known or not totals[2] else " (layers of known shape only)"
        result.notes.append(
            f"{PASS_NAME}: {len(done)} layer(s) factorized: params {totals[0]} -> {totals[1]} "
            f"({_percent(totals[0], totals[1])}), {flops}{partial}"
        )

    def _note_skipped(self, skipped: list[tuple[str, str]], result: PassResult) -> None:
        """One note per reason kind: how many layers were left alone and the first few."""
        by_kind: dict[str, list[str]] = {}
        for kind, text in skipped:
            by_kind.setdefault(kind, []).append(text)
        for kind in sorted(by_kind):
            items = list(dict.fromkeys(by_kind[kind]))
            listed = "; ".join(items[:MAX_LISTED]) + (f"; ... {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
            result.notes.append(f"{PASS_NAME}: {len(by_kind[kind])} layer(s) left alone ({kind}): {listed}")


def _percent(before: int, after: int) -> str:
    return f"-{100 * (before - after) / before:.1f}%" if before else "n/a"
