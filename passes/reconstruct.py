"""Teacher-guided layer-wise re-fitting: the ``reconstruct`` pass.

After a lossy pass (pruning, low-rank factorization, INT8), each compressed Conv/Gemm/MatMul is
re-fitted so that, on calibration data, its output in the compressed model (the student) matches
the same tensor in the original model (the teacher): the layer's inputs are taken from the
student, its targets from the teacher, and new weights and bias come from ridge-regularised least
squares (:mod:`onnxopt.passes.reconstruct_solve`), streamed over batches with bounded memory.

Layers correspond by output tensor name (compression passes keep the original name on the last
node of what they rewrite). Weights are float constants (initializers or Constant nodes) or
``DequantizeLinear`` of an int8/uint8 constant; a re-fitted quantized weight is re-quantized with
its own scale, zero point and axis, and an int32 bias (onnxruntime-CPU form) is re-derived.

This module holds the options, the per-layer fit and the pass; where weights and biases live and
how they are written back is in :mod:`onnxopt.passes.reconstruct_params`, the layer model and the
selection in :mod:`onnxopt.passes.reconstruct_layers`, the wave order and calibration sweeps in
:mod:`onnxopt.passes.reconstruct_sweeps`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from onnx import ModelProto

from onnxopt.calibration.capture import LAYER_OPS
from onnxopt.calibration.data import CalibrationData
from onnxopt.calibration.fidelity import FidelityProbe, run_batches
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import GraphView
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_patterns, option
from onnxopt.passes.reconstruct_layers import SELECTIONS, Layer, Selection, select_layers
from onnxopt.passes.reconstruct_params import Writer
from onnxopt.passes.reconstruct_solve import LayerStats, column_errors, ridge_solve
from onnxopt.passes.reconstruct_sweeps import HOLD_OUT_EVERY, Sums, chunks, collect, upstream, waves
from onnxopt.registry import register_pass

log = logging.getLogger("onnxopt")

PASS_NAME = "reconstruct"
IMPROVE_TOL = 1e-7  # a column is re-fitted when its error drops by more than this fraction of its energy
GUARD_TOL = 1e-6  # a wave is undone when the model's output 1-cos to the teacher grows by more than this fraction
GUARD_FLOOR = 1e-6  # ... and by more than this much (saturated outputs, e.g. confident softmax, make tiny 1-cos noisy)
PROBE_BATCHES = 2  # held-out calibration batches the model-level check runs on
NOTE_LINES = 20


# ----------------------------------------------------------------------------- options


@dataclass
class ReconstructOptions(PassOptions):
    """Options of :class:`Reconstruct`."""

    layers: tuple[str, ...] = option(
        ("changed",), "changed (weights differ from the teacher), all, or '|'-separated node/output names or regexes"
    )
    exclude: tuple[str, ...] = option((), "node or output names (exact or regex) never re-fitted, '|'-separated")
    ridge: float = option(1e-3, "ridge strength as a fraction of the mean diagonal of X^T X (> 0)")
    anchor: Literal["current", "zero"] = option("current", "ridge pulls the weights towards their current values or towards zero")
    samples: int = option(0, "calibration samples used (0: all)")
    batch_size: int = option(8, "calibration batch size")
    order: Literal["sequential", "parallel"] = option("sequential", "sequential: inputs after earlier re-fits (waves); parallel: one sweep")
    keep_zeros: bool = option(True, "keep the zeros of sparse weights (unstructured or N:M pruned) exactly zero")
    min_rows: float = option(
        1.0, "skip a layer with fewer calibration rows (samples x output positions) than this many per unknown of an output"
    )
    guard: Literal["final", "wave", "off"] = option(
        "final",
        "model-level check on held-out calibration batches: undo everything if the outputs got worse (final), each wave that "
        "worsens them (wave: for partial selections), or off",
    )

    def validate(self) -> None:
        """Check the layer selection, patterns, ridge, counts and choices."""
        where = f"pass '{PASS_NAME}'"
        self.layers = _split(self.layers)
        self.exclude = _split(self.exclude)
        if not self.layers:
            raise OptionError(f"option 'layers' of {where} is empty (changed, all, or names)")
        if any(item in SELECTIONS for item in self.layers) and len(self.layers) > 1:
            raise OptionError(f"option 'layers' of {where}: 'changed' and 'all' cannot be combined with other entries")
        if not (math.isfinite(self.min_rows) and self.min_rows >= 0):
            raise OptionError(f"option 'min_rows' of {where} must be a number >= 0, not {self.min_rows}")
        if not (math.isfinite(self.ridge) and self.ridge > 0):
            raise OptionError(f"option 'ridge' of {where} must be a positive number, not {self.ridge}")
        if self.samples < 0:
            raise OptionError(f"option 'samples' of {where} must not be negative, not {self.samples}")
        if self.batch_size <= 0:
            raise OptionError(f"option 'batch_size' of {where} must be positive, not {self.batch_size}")
        choices_of = {"order": ("sequential", "parallel"), "anchor": ("current", "zero"), "guard": ("final", "wave", "off")}
        for name, choices in choices_of.items():
            value = getattr(self, name)
            if value not in choices:
                raise OptionError(f"option '{name}' of {where} must be one of {', '.join(choices)}, not '{value}'")
        if self.layers[0] not in SELECTIONS:
            check_patterns(PASS_NAME, "layers", self.layers)
        check_patterns(PASS_NAME, "exclude", self.exclude)


def _split(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """A '|'-separated string (from Python) or a tuple, as a tuple of non-empty entries."""
    items = value.split("|") if isinstance(value, str) else value
    return tuple(item.strip() for item in items if item and item.strip())


# ----------------------------------------------------------------------------- fitting


@dataclass
class Outcome:
    """The re-fit of one layer: relative errors on the calibration rows before and after."""

    layer: Layer
    before: float
    after: float
    columns: int  # output columns whose weights changed
    reverted: bool = False  # undone with its wave: the model's output got further from the teacher's

    @property
    def improved(self) -> bool:
        """Whether any column was re-fitted (and kept)."""
        return self.columns > 0 and not self.reverted


class Fitter:
    """One layer's ridge solves and error evaluations (current weights, zero pattern, encoding)."""

    def __init__(self, layer: Layer, options: ReconstructOptions) -> None:
        self.layer, self.options = layer, options
        self.old = layer.current()
        self.mask = layer.support(options.keep_zeros)

    def solve(self, stats: LayerStats) -> np.ndarray:
        """Encoded weights ``[G, K (+1), N]`` fitted to ``stats``."""
        a, b = stats.system(self.layer.has_bias)
        anchor = self.options.anchor == "current"
        w = ridge_solve(a, b, self.old, self.options.ridge, k=self.layer.k, anchor=anchor, mask=self.mask)
        w = self.layer.encode(w)
        return w if self.mask is None else np.where(self.mask, w, 0.0)

    def gains(self, stats: LayerStats, new: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per column on ``stats``' rows: squared errors of the current and of ``new`` weights, and whether ``new`` is better."""
        a, b = stats.system(self.layer.has_bias)
        old_errors, new_errors = column_errors(a, b, stats.yty, self.old), column_errors(a, b, stats.yty, new)
        return old_errors, new_errors, new_errors < old_errors - IMPROVE_TOL * np.maximum(stats.yty, np.finfo(np.float64).tiny)


def refit(layer: Layer, sums: Sums, options: ReconstructOptions, writer: Writer) -> Outcome:
    """Solve for new weights, keep per output column whichever of old and new fits better, write them.

    With held-out rows (every 4th batch) the weights are fitted on the other rows, and a column
    must improve on the held-out rows as well as on all rows. When zeros are kept, columns whose
    weights are all zero (pruned filters) stay as they are, bias included.
    """
    fitter = Fitter(layer, options)
    total = sums.total()
    new = fitter.solve(sums.fit if sums.held_out is not None else total)
    err_old, err_new, better = fitter.gains(total, new)
    if sums.held_out is not None:
        better &= fitter.gains(sums.held_out, new)[2]
    if fitter.mask is not None:
        better &= fitter.mask[:, : layer.k].any(axis=1)
    if better.any():
        layer.write(writer, np.where(better[:, None, :], new, fitter.old))
    energy = max(float(total.yty.sum()), np.finfo(np.float64).tiny)
    kept = np.where(better, err_new, err_old)
    return Outcome(layer, float(err_old.sum()) / energy, float(kept.sum()) / energy, int(better.sum()))


# ----------------------------------------------------------------------------- the pass


@register_pass
class Reconstruct(Pass):
    """Re-fit compressed Conv/Gemm/MatMul layers to the teacher's outputs by ridge least squares on calibration data.

    Pre: calibration data and a teacher (the model before the run's first lossy pass, or the one
    given). Candidates: standard Conv/Gemm/MatMul nodes of the main graph whose weight is a float
    constant or ``DequantizeLinear`` of an int8/uint8 constant read by that node alone, and whose
    output tensor also exists in the teacher (others are counted as skipped, with a note; layers in
    subgraphs are left alone). ``layers=changed`` takes those whose weights or bias differ from the
    teacher's layer writing the same tensor (or whose producer there is another op); ``all`` every
    candidate; or names/regexes. Each layer's inputs come from the student, its targets from the
    teacher; ``X^T X`` and ``X^T Y`` are accumulated in float64 and the ridge system
    ``(X^T X + lam I) W = X^T Y + lam W0`` (``anchor=current``; ``zero`` drops ``lam W0``) is solved
    per group (grouped and depthwise Conv), with a bias column (Conv B added when absent, Gemm C,
    or the constant of an Add that alone reads a MatMul's output; a MatMul without one is fitted
    without bias, adding no node). Gemm's transB/alpha/beta are honoured (the stored B is W/alpha,
    C is b/beta). Sparse weights keep their zeros (each column solved on its support; all-zero
    columns, i.e. pruned filters, keep their bias too), quantized weights are re-quantized with
    their own scale/zero point/axis, int32 biases re-derived with their scale.

    Guards: a layer with fewer calibration rows (samples x output positions) than ``min_rows``
    times its unknowns per output column is skipped and noted (its fit would only reproduce the
    calibration rows); with 4 or more calibration batches every 4th is held out; weights are fitted on the
    others and an output column keeps its old weights unless the new ones are better on the held-out
    rows and on all rows. ``order=sequential`` (default) takes each layer's inputs after the re-fits
    of the layers it depends on (one sweep per wave of independent layers); ``parallel`` does one
    sweep. ``guard=final`` (default) undoes everything when the model's output 1-cos to the teacher
    on (up to 2) held-out batches got worse; ``wave`` undoes each wave that worsens it (better when
    only some of the damaged layers are selected); ``off`` keeps every layer-wise improvement.

    Post: graph inputs, outputs and nodes unchanged (a Conv/Gemm may gain a bias input, a shared bias
    is replaced by a private one); the same model, teacher, data and options give the same bytes.
    """

    name = PASS_NAME
    lossy = True
    Options = ReconstructOptions
    requires = frozenset({Requirement.CALIBRATION, Requirement.TEACHER})
    preserves_types = False
    recurse = False

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Select the layers, re-fit them wave by wave, and report errors and counts."""
        options: ReconstructOptions = self.options  # type: ignore[assignment]
        if ctx.teacher is None:
            raise OnnxoptError(f"pass '{PASS_NAME}' needs a teacher model (run it through the PassManager, or give teacher=)")
        if not isinstance(ctx.calibration, CalibrationData):
            raise OnnxoptError(f"pass '{PASS_NAME}' needs calibration data (give --calib, or calibration= in Python)")
        ctx.calibration.validate(model)
        result = PassResult()
        nested = sum(n.op_type in LAYER_OPS for scope in ctx.scopes()[1:] for n in scope.graph.node)
        if nested:
            result.notes.append(f"{PASS_NAME}: {nested} Conv/Gemm/MatMul node(s) inside subgraphs left alone")
        view = GraphView.build(model.graph)
        selection = select_layers(view, ctx.teacher, options.layers, options.exclude)
        outcomes: list[Outcome] = []
        if selection.layers:
            probe = held_out_probe(ctx.teacher, ctx.calibration, options)
            before = _probe_error(probe, model)
            outcomes = self._refit_all(model, ctx, view, selection, options, probe, before)
            if any(o.improved for o in outcomes):
                result.notes.append(_fidelity_note(before, _probe_error(probe, model), len(probe.feeds)))
        elif options.layers == ("changed",) and not selection.skipped:
            result.notes.append(f"{PASS_NAME}: no layer differs from the teacher; nothing to re-fit")
        _report(result, outcomes, selection)
        return result

    def _refit_all(
        self,
        model: ModelProto,
        ctx: PassContext,
        view: GraphView,
        selection: Selection,
        options: ReconstructOptions,
        probe: FidelityProbe,
        error: float | None,
    ) -> list[Outcome]:
        """Re-fit the selected layers wave by wave, checking the model's outputs as ``guard`` says."""
        layers = selection.layers
        deps = upstream(view, layers)
        pending = list(range(len(layers)))
        writer = Writer(model.graph, ctx.names)
        outcomes: list[Outcome] = []
        sweep = 0
        while pending:
            ready = waves(pending, deps, options.order == "sequential")
            for part in chunks(ready, layers):
                sweep += 1
                log.info("%s: sweep %d: %d layer(s), %d still pending", PASS_NAME, sweep, len(part), len(pending) - len(part))
                writer.begin()
                part_layers = [layers[i] for i in part]
                stats = collect(model, ctx.teacher, part_layers, ctx.calibration, options.batch_size, options.samples)  # type: ignore[arg-type]
                wave = []
                for position, i in enumerate(part):
                    if position not in stats:
                        selection.skip("shape_mismatch", layers[i].describe())
                        continue
                    unknowns, rows = layers[i].k + 1, stats[position].total().rows
                    if rows < options.min_rows * unknowns:
                        selection.skip("too_few_rows", f"{layers[i].describe()}: {rows} rows for {unknowns} unknowns")
                        continue
                    wave.append(refit(layers[i], stats[position], options, writer))
                outcomes.extend(wave)
                if options.guard == "wave" and error is not None and any(o.improved for o in wave):
                    now = _probe_error(probe, model)
                    if _worse(now, error):
                        _undo(writer, wave)
                        continue
                    error = now
                if options.guard != "final":
                    writer.forget()
            done = set(ready)
            pending = [i for i in pending if i not in done]
        if options.guard == "final" and error is not None and any(o.improved for o in outcomes):
            now = _probe_error(probe, model)
            if _worse(now, error):
                while writer.waves:
                    writer.undo()
                for outcome in outcomes:
                    outcome.reverted = outcome.columns > 0
        return outcomes


def _worse(now: float | None, before: float) -> bool:
    """Whether the output 1-cos ``now`` is meaningfully above ``before`` (or cannot be measured)."""
    return now is None or now > before * (1 + GUARD_TOL) + GUARD_FLOOR


def _undo(writer: Writer, wave: list[Outcome]) -> None:
    """Undo the last logged wave and mark its re-fitted layers."""
    writer.undo()
    for outcome in wave:
        outcome.reverted = outcome.columns > 0


def held_out_probe(teacher: ModelProto, data: CalibrationData, options: ReconstructOptions) -> FidelityProbe:
    """The teacher's outputs on up to :data:`PROBE_BATCHES` held-out calibration batches (the first ones when none is held out)."""
    total = data.num_batches(options.batch_size)
    if options.samples:
        total = min(total, math.ceil(options.samples / options.batch_size))
    wanted = [i for i in range(total) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1] if total >= HOLD_OUT_EVERY else list(range(total))
    wanted = set(wanted[:PROBE_BATCHES])
    feeds = [batch for index, batch in zip(range(total), data.batches(options.batch_size)) if index in wanted]
    return FidelityProbe(feeds, run_batches(teacher, feeds))


def _probe_error(probe: FidelityProbe, model: ModelProto) -> float | None:
    """The probe's 1-cos of ``model`` to the teacher, or None when their outputs cannot be compared."""
    try:
        return probe.error(model)
    except ValueError:
        return None


def _fidelity_note(before: float | None, after: float | None, batches: int) -> str:
    if before is None or after is None:
        return f"{PASS_NAME}: the student's outputs cannot be compared with the teacher's (different sizes)"
    return f"{PASS_NAME}: output 1-cos to the teacher {before:.4g} -> {after:.4g} (on {batches} held-out calibration batch(es))"


SKIP_TEXT = {
    "missing_in_teacher": "output tensor not in the teacher",
    "shape_mismatch": "teacher tensor of another shape",
    "shared_weight": "weight shared by several nodes",
    "unsupported_weight": "weight form not handled",
    "unsupported_bias": "bias form not handled",
    "too_few_rows": "too few calibration rows for a reliable fit (min_rows; give more --calib samples)",
}


def _report(result: PassResult, outcomes: list[Outcome], selection: Selection) -> None:
    """Per-layer notes (largest gains first), a summary, skip notes and counts."""
    refitted = [o for o in outcomes if o.improved]
    reverted = [o for o in outcomes if o.reverted]
    kept = len(outcomes) - len(refitted) - len(reverted)
    for o in sorted(refitted, key=lambda o: o.after - o.before)[:NOTE_LINES]:
        result.notes.append(f"{PASS_NAME}: {o.layer.describe()}: rel. error {o.before:.3g} -> {o.after:.3g}")
    if outcomes:
        before = float(np.mean([o.before for o in refitted])) if refitted else 0.0
        after = float(np.mean([o.after for o in refitted])) if refitted else 0.0
        result.notes.append(
            f"{PASS_NAME}: {len(refitted)} layer(s) re-fitted (mean rel. error {before:.3g} -> {after:.3g}), {kept} kept "
            f"(not improved), {len(reverted)} undone (the model's outputs got further from the teacher's)"
        )
    for key, count in sorted(selection.skipped.items()):
        shown = ", ".join(selection.examples[key][:3]) + (", ..." if count > 3 else "")
        result.notes.append(f"{PASS_NAME}: {count} layer(s) skipped: {SKIP_TEXT.get(key, key)} ({shown})")
    result.count("layers_refit", len(refitted))
    result.count("layers_kept", kept)
    result.count("layers_reverted", len(reverted))
    for key, count in sorted(selection.skipped.items()):
        result.count(f"layers_skipped_{key}", count)
    result.modified = bool(refitted)
