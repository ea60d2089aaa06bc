"""FP16: weights and compute in float16, the model's input/output types kept, risky ops left in float32.

The pass works on the main graph in four steps, reading before it writes:

1. *Decide* for every node whether it computes in float16. A node is converted when it is a
   standard ONNX op that writes a float32 tensor whose type parameter allows float16 (read from
   the op's schema at the model's opset) and no rule keeps it in float32:

   * its op type is in the block list (:data:`~onnxopt.passes.fp16_decide.DEFAULT_KEEP_FP32`, extended with ``keep_fp32=``,
     shortened with ``allow_fp16=``), or its name matches ``keep_nodes=`` (names or regexes);
   * it is a reduction (ReduceSum/ReduceMean/ReduceL2/...) over more than ``max_reduce``
     elements, or over an extent that is not known statically;
   * it belongs to the variance part of an unfused LayerNorm/RMSNorm: a squaring (``Pow(d, 2)``
     or ``Mul(d, d)``) and everything after it up to the normalizing Div/Mul that follows the
     Sqrt (plus the mean and centering that feed the square);
   * it computes a small float tensor derived from a Shape/Size (shape arithmetic) or one that
     is cast to an integer type (float16 would round dimensions above 2048);
   * it reads, in a converted slot, a constant with a finite value beyond the float16 range
     (``overflow=keep``, the default; ``overflow=clamp`` clamps to +-65504 instead);
   * calibration data was given and one of its outputs or inputs reached ``calib_limit``;
   * it holds subgraphs (If/Loop/Scan stay float32 as a whole, bodies untouched: every
     outer value a body reads keeps its float32 type under its own name) or it is a custom
     or ``ai.onnx.ml`` op (opaque: float32 with Casts around);
   * it is a ScatterElements/ScatterND that accumulates (``reduction`` add/mul/max/min: the
     sum is precision-sensitive and onnxruntime's CPU EP has no float16 kernel for it);
   * onnx's own type inference of the node, fed the planned float16 inputs, disagrees with
     the planned output types (a type relation the schema's constraint lists do not show);
   * it is a Sigmoid/HardSigmoid writing a graph output (probabilities below 6e-5 are float16
     subnormals with few significant bits: a detector's probability map would lose them);
   * it is a QuantizeLinear/DequantizeLinear or reads a DequantizeLinear output (an INT8 layer
     of the ``qdq`` pass: after ``qdq`` the model is INT8 where quantized and float16 elsewhere,
     and TensorRT still sees the DQ -> layer patterns it fuses into INT8 kernels).

   Resize's ``roi``/``scales`` and GridSample's ``grid`` stay float32 even when the node converts.
2. *Place values*: every float32 value gets a home type (what its producer writes). Graph inputs
   stay float32; graph outputs and values read by subgraphs keep float32 under their own name
   (an fp16 producer writes a fresh name and one Cast restores the original). Initializers and
   Constant nodes read only by fp16 compute are converted in place; ones read by both kinds
   keep their float32 copy and get a second, float16 copy (no runtime Cast). Casts to float
   and ConstantOfShape are retyped when only fp16 compute reads them.
3. *Emit*: one Cast per value and direction, right before its first reader; a Cast(to=float)
   of a float16 value is bypassed for fp16 readers, so no fp16->fp32->fp16 chain is created.
4. *Clean up*: redundant Cast pairs (fp16->fp32->fp16) and no-op Casts that the pass created
   or found are removed, and value_info entries are retyped to float16 or dropped.

Step 1 lives in :mod:`~onnxopt.passes.fp16_decide` (graph patterns in
:mod:`~onnxopt.passes.fp16_patterns`), steps 2 and 3 in :mod:`~onnxopt.passes.fp16_emit`, step 4
in :mod:`~onnxopt.passes.fp16_cleanup`; :mod:`~onnxopt.passes.fp16_values` holds what they share.

The result keeps the model's input and output types, loads in onnxruntime (whose CPU EP runs
many fp16 ops through its own Casts, slowly) and is what a strongly typed TensorRT network
needs: every precision change is an explicit Cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import ModelProto

from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import GraphView
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, check_patterns, option
from onnxopt.passes.fp16_cleanup import clean_up
from onnxopt.passes.fp16_decide import Decider, DecisionRules, kept_summary
from onnxopt.passes.fp16_emit import Emitter, Placement
from onnxopt.passes.fp16_values import FP16_MAX, OriginalValues
from onnxopt.registry import register_pass

MIN_OPSET = 6  # Cast's 'to' is a string before opset 6


@register_pass
class FP16(Pass):
    """Convert weights and compute to float16, keeping I/O types and overflow-prone ops in float32.

    Options: ``keep_fp32=Op|Op`` adds op types to the float32 block list, ``allow_fp16=Op|Op``
    removes them, ``keep_nodes=name|regex`` keeps nodes by name, ``max_reduce`` bounds the extent
    of fp16 reductions, ``overflow=keep|clamp`` says what a constant beyond the fp16 range does,
    ``calib_limit`` is the calibrated |max| above which a tensor's producer stays float32.
    """

    name = "fp16"
    lossy = True
    tolerance = "fp16"
    preserves_types = False
    recurse = False

    @dataclass
    class Options(PassOptions):
        """Options of the fp16 pass."""

        keep_fp32: tuple[str, ...] = option((), "op types kept in float32 in addition to the default block list")
        allow_fp16: tuple[str, ...] = option((), "op types removed from the default float32 block list")
        keep_nodes: tuple[str, ...] = option((), "node names (or full-match regexes) kept in float32")
        max_reduce: int = option(1024, "largest reduction extent computed in fp16 (unknown extents stay float32)")
        overflow: Literal["keep", "clamp"] = option("keep", "constant beyond fp16 range: keep its reader float32, or clamp it")
        calib_limit: float = option(60000.0, "with calibration data: tensors whose |max| exceeds this keep float32 producers")

        def validate(self) -> None:
            """Reject unknown op types, bad regexes and non-positive limits."""
            for key in ("keep_fp32", "allow_fp16"):
                for op in getattr(self, key):
                    if not onnx.defs.has(op):
                        raise OptionError(f"option '{key}' of pass 'fp16': '{op}' is not an ONNX op type")
            check_patterns("fp16", "keep_nodes", self.keep_nodes)
            if self.max_reduce < 1:
                raise OptionError("option 'max_reduce' of pass 'fp16' must be at least 1")
            if not 0 < self.calib_limit <= FP16_MAX:
                raise OptionError(f"option 'calib_limit' of pass 'fp16' must be in (0, {FP16_MAX:g}]")

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Convert the main graph (subgraph holders stay float32 as a whole)."""
        options = self.options
        assert isinstance(options, FP16.Options)
        opset = _default_opset(model)
        if opset < MIN_OPSET:
            result = PassResult()
            if opset:  # no default-domain import at all: nothing standard to convert
                result.notes.append(
                    f"fp16: opset {opset} < {MIN_OPSET} (Cast's 'to' is a string there): model left in float32; upgrade_opset first"
                )
            return result
        return _convert(model, ctx, options, opset)


# ----------------------------------------------------------------------------- helpers


def _convert(model: ModelProto, ctx: PassContext, options: FP16.Options, opset: int) -> PassResult:
    """Decide, place, emit, clean up; nothing is written when no node converts."""
    result = PassResult()
    values = OriginalValues(GraphView.build(model.graph), ctx.types)
    rules = DecisionRules(
        blocked=DecisionRules.blocked_ops(options.keep_fp32, options.allow_fp16),
        keep_nodes=options.keep_nodes,
        max_reduce=options.max_reduce,
        keep_out_of_range=options.overflow == "keep",
        calib_limit=options.calib_limit,
    )
    calibration = ctx.calibration
    measure = None if calibration is None else (lambda names: calibrated_absmax(model, names, calibration))
    plans = Decider(model, values, rules, opset, result).decide(measure)
    if not any(plan.convert for plan in plans.values()):
        unchanged = PassResult()
        note = kept_summary(values.view.nodes, plans)  # why nothing converts (a model whose compute sits in a Loop, say)
        if note:
            unchanged.notes.append(note)
        return unchanged
    placement = Placement(model.graph, values, plans)
    emitter = Emitter(model.graph, plans, placement, ctx.names, result, clamp=options.overflow == "clamp")
    emitter.emit()
    clean_up(model.graph, emitter.final_types(), result)
    note = kept_summary(values.view.nodes, plans)
    if note:
        result.notes.append(note)
    return result


def _default_opset(model: ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def calibrated_absmax(model: ModelProto, tensors: list[str], calibration: Any) -> dict[str, float]:
    """Largest finite |value| of each tensor over the calibration data (inf for one that held only inf/NaN).

    A :class:`onnxopt.calibration.CalibrationData` goes through ``collect_stats`` (batched,
    bounded memory); any other object with ``batches(batch_size)`` yielding input dicts is run
    here one batch at a time with the tensors as extra outputs, keeping running maxima.
    """
    from onnxopt.calibration import CalibrationData, collect_stats

    if isinstance(calibration, CalibrationData):
        stats = collect_stats(model, tensors, calibration).items()
        return {name: float(stat.absmax) if stat.count or not stat.nonfinite else math.inf for name, stat in stats}
    if not callable(getattr(calibration, "batches", None)):
        raise OnnxoptError(f"fp16: calibration data must have a batches(batch_size) method, not {type(calibration).__name__}")
    from onnxopt.verify import create_session

    probe = ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in known)
    session = create_session(probe)
    names = list(tensors)
    result = dict.fromkeys(names, 0.0)
    seen_finite: set[str] = set()
    seen_nonfinite: set[str] = set()
    for feeds in calibration.batches(1):
        for name, value in zip(names, session.run(names, dict(feeds))):
            values = np.asarray(value, dtype=np.float64)
            finite = values[np.isfinite(values)]
            if finite.size < values.size:
                seen_nonfinite.add(name)
            if finite.size:
                seen_finite.add(name)
                result[name] = max(result[name], float(np.abs(finite).max()))
    for name in seen_nonfinite - seen_finite:
        result[name] = math.inf
    return result
