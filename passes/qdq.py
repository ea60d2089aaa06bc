"""INT8 Q/DQ insertion with calibration: the ``qdq`` pass.

Statistics of the tensors the placement (:mod:`onnxopt.passes.qdq_placement`) chose are
collected over the run's calibration data in onnxruntime (bounded memory), turned into clipping
ranges by the chosen method, and written into the graph as QuantizeLinear/DequantizeLinear
pairs; weights become int8 initializers read through a DequantizeLinear (so the file shrinks
to about a quarter).

* ``trt`` / ``portable`` / ``ort-gpu``: symmetric int8 (zero point 0) everywhere; weights per-channel
  (Conv axis 0, ConvTranspose axis 1, MatMul/Gemm on the output-channel axis, honouring
  ``transB``); biases in float.
* ``ort-cpu``: uint8 asymmetric activations, int8 symmetric per-channel weights, and Conv/Gemm
  biases as int32 with scale = input scale x weight scale, the form onnxruntime's CPU QDQ
  transformer turns into QLinearConv / QGemm / QLinearMatMul; int8 is carried through Add/Mul/Concat/
  pools/Resize (QLinearAdd, QLinearMul, ...), a Relu/Clip after a quantized op is absorbed into the
  next Q (zero point 0), a Mul by a positive scalar constant is folded into the DequantizeLinear scale
  (exact), and the layers feeding graph outputs keep float activations with an int8 weight.
  ``reduce_range`` (default auto, :mod:`onnxopt.passes.qdq_saturation`) gives 7-bit weights to the layers whose
  uint8 x int8 products would saturate the int16 pair sums of onnxruntime's kernels on x86 CPUs without VNNI.

Before calibration, ``equalize`` (default on, :mod:`onnxopt.passes.qdq_equalize`) rescales Conv -> Conv
pairs so the tensor between them has even channel ranges (exact in float).

Fidelity repairs (:mod:`onnxopt.passes.qdq_sensitivity`): ``bias_correction`` (default on) shifts each
quantized layer's bias by its per-channel mean output error; ``sensitivity`` / ``keep_float`` /
``max_error`` rank the layers by the output error each adds alone and keep the worst ones float
(on ort-cpu with int8 weights, so the file stays small); ``float_share`` keeps float the layers
with the most error per multiply-accumulate, up to a share of the quantized layers' MACs.

Per-channel DequantizeLinear needs ai.onnx opset 13: an older model is upgraded with onnx's
version converter (checked on a calibration batch), or, when that fails, weights fall back to
per-tensor scales; a note says which.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.calibration import RANGE_METHODS, CalibrationData, TensorStats, collect_stats, compute_range
from onnxopt.cpu import int8_pairs_saturate, saturation_warning
from onnxopt.errors import OnnxoptError, OptionError, one_line
from onnxopt.graph import GraphView, NameGenerator, drop_unread_initializers, iter_scopes, opset_version
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_patterns, option
from onnxopt.passes.fusion_support import const_name
from onnxopt.passes.qdq_gather import quantize_gathers
from onnxopt.passes.qdq_placement import ANCHORS, MAX_QUANTIZED_MAGNITUDE, Plan, Planner, float_map, slow_int8_convs
from onnxopt.passes.qdq_rounding import GptqLayer, GptqRounding, eligible, gptq_rounding
from onnxopt.registry import register_pass

log = logging.getLogger("onnxopt")

PASS_NAME = "qdq"
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis (per-channel scales)
QDQ_OPSET = 10  # QuantizeLinear/DequantizeLinear exist from opset 10
EMBEDDING_MIN_SIZE = 65536  # Gather tables at least this large are stored as int8 (option embeddings)
METHODS = ("auto", *RANGE_METHODS)
# auto: mse on every target. On ort-cpu it beat percentile (99.99) on each real model here: PP-OCR det IoU 0.968 vs 0.955,
# magika top-1 0.992 vs 0.980 (256 files), cls cosine 0.9996 vs 0.9991 (exact arithmetic), rec top-1 within noise
AUTO_METHOD = "mse"
INT8_MAX = 127
REDUCED_MAX = 63  # reduce_range: 7-bit weights


@dataclass
class QdqOptions(PassOptions):
    """Options of :class:`QuantizeQDQ`."""

    method: str = option("auto", "auto (mse), minmax, percentile, entropy or mse")
    percentile: float = option(99.99, "percentile method: the share of values (in %) kept inside the range")
    per_channel: bool = option(True, "per-channel weight scales (per-tensor when false)")
    exclude: tuple[str, ...] = option((), "nodes kept in float: node names, op types or regexes matching a whole node name, '|'-separated")
    keep_outputs: bool = option(True, "keep the layers that feed graph outputs in float")
    batch_size: int = option(8, "calibration batch size")
    calib_batches: int = option(0, "use at most this many calibration batches (0: all)")
    concat_ratio: float = option(100.0, "a Concat whose inputs' ranges differ by more than this ratio stays float on its output path")
    bias_correction: bool = option(True, "shift biases by the per-channel mean error of each quantized layer's output (calibration data)")
    sensitivity: bool = option(False, "rank layers by the output error when quantized alone (notes: top 10)")
    keep_float: int = option(0, "keep the N most sensitive layers in float (runs the sensitivity ranking)")
    max_error: float = option(0.0, "keep the most sensitive layers float until the output error (1 - cosine) is below this (0: off)")
    float_share: float = option(
        0.0, "keep layers float by output error per multiply-accumulate, up to this share of the quantized layers' MACs (0: off)"
    )
    rounding: Literal["nearest", "gptq"] = option(
        "nearest", "weight rounding: nearest, or gptq (error-compensating, from layer input statistics)"
    )
    damp: float = option(0.01, "gptq: Hessian damping as a fraction of its mean diagonal")
    embeddings: bool = option(True, "ort-cpu/portable: store Gather tables of >= 65536 values as int8 (rows dequantized after lookup)")
    equalize: bool = option(True, "even out the channel ranges of Conv -> Conv tensors first (exact in float; see qdq_equalize)")
    reduce_range: Literal["auto", "true", "false"] = option(
        "auto",
        "7-bit weights (|w| <= 63): auto (ort-cpu; 8 bits elsewhere) for the layers whose uint8 x int8 products would "
        "saturate on the calibration data, true for every layer, false for none. onnxruntime's kernels on x86 CPUs without "
        "VNNI (AVX2, AVX-512 without VNNI) add pairs of products in int16, which saturates with 8-bit weights; VNNI and "
        "ARM CPUs are exact either way",
    )
    slow_convs: bool = option(
        False,
        "ort-cpu: also quantize the activations of the convolutions onnxruntime runs slower in int8 than in float "
        "(3x3 stems on RGB/grey input, depthwise convs over < 32 channels); by default they compute in float with int8 weights",
    )

    def validate(self) -> None:
        """Check the method, percentile, batch sizes and exclusion patterns."""

        where = f"pass '{PASS_NAME}'"
        if self.method not in METHODS:
            raise OptionError(f"option 'method' of {where} must be one of {', '.join(METHODS)}, not '{self.method}'")
        if not 50 < self.percentile <= 100:
            raise OptionError(f"option 'percentile' of {where} must be in (50, 100], not {self.percentile}")
        if self.batch_size <= 0:
            raise OptionError(f"option 'batch_size' of {where} must be positive, not {self.batch_size}")
        if self.calib_batches < 0:
            raise OptionError(f"option 'calib_batches' of {where} must not be negative, not {self.calib_batches}")
        if not self.concat_ratio > 1:
            raise OptionError(f"option 'concat_ratio' of {where} must be greater than 1, not {self.concat_ratio}")
        if self.keep_float < 0:
            raise OptionError(f"option 'keep_float' of {where} must not be negative, not {self.keep_float}")
        if self.rounding not in ("nearest", "gptq"):
            raise OptionError(f"option 'rounding' of {where} must be nearest or gptq, not '{self.rounding}'")
        if not 0 < self.damp < 10:
            raise OptionError(f"option 'damp' of {where} must be in (0, 10), not {self.damp}")
        if not 0 <= self.max_error < 1:
            raise OptionError(f"option 'max_error' of {where} must be in [0, 1), not {self.max_error}")
        if not 0 <= self.float_share < 1:
            raise OptionError(f"option 'float_share' of {where} must be in [0, 1), not {self.float_share}")
        check_patterns(PASS_NAME, "exclude", self.exclude)


class _Limited:
    """The first ``limit`` batches of a :class:`CalibrationData` (what ``calib_batches`` means)."""

    def __init__(self, data: CalibrationData, limit: int) -> None:
        self.data, self.limit = data, limit
        self.progress = data.progress

    def validate(self, model: ModelProto) -> None:
        self.data.validate(model)

    def num_batches(self, batch_size: int) -> int:
        return min(self.limit, self.data.num_batches(batch_size))

    def batches(self, batch_size: int = 8) -> Iterator[dict[str, np.ndarray]]:
        for index, feeds in enumerate(self.data.batches(batch_size)):
            if index >= self.limit:
                return
            yield feeds


@dataclass
class QParams:
    """Scale and zero point of one quantized tensor (per-tensor) or weight (per-channel: 1-D arrays)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None


def activation_params(lo: float, hi: float, *, symmetric: bool) -> QParams:
    """Per-tensor parameters for a clipping range: int8 zero point 0 (symmetric) or uint8 asymmetric."""
    if symmetric:
        t = max(abs(lo), abs(hi))
        scale = t / INT8_MAX if t > 0 else 1.0
        return QParams(np.array(scale, np.float32), np.array(0, np.int8))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return QParams(np.array(1.0, np.float32), np.array(0, np.uint8))
    scale = np.float32((hi - lo) / 255)
    zero = int(np.clip(round(-lo / float(scale)), 0, 255))
    return QParams(np.array(scale, np.float32), np.array(zero, np.uint8))


def weight_params(weight: np.ndarray, axis: int | None, qmax: int = INT8_MAX) -> QParams:
    """Symmetric int8 parameters of a weight, per channel along ``axis`` or per tensor (None); ``qmax`` 63: 7-bit."""
    w = np.abs(weight.astype(np.float32))
    if axis is None:
        absmax = np.array(w.max() if w.size else 0.0, np.float32)
    else:
        absmax = w.max(axis=tuple(i for i in range(w.ndim) if i != axis)) if w.size else np.zeros(weight.shape[axis], np.float32)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int8), axis)


def quantize_weight(weight: np.ndarray, params: QParams, qmax: int = INT8_MAX) -> np.ndarray:
    """int8 values of ``weight`` under ``params`` (round half to even, saturated to [-qmax, qmax])."""
    scale = params.scale
    if params.axis is not None:
        shape = [1] * weight.ndim
        shape[params.axis] = -1
        scale = scale.reshape(shape)
    return np.clip(np.rint(weight.astype(np.float32) / scale), -qmax, qmax).astype(np.int8)


def weight_axis(node: NodeProto, weight: np.ndarray) -> int | None:
    """The output-channel axis of an anchor's weight (None when per-channel does not apply)."""
    if weight.ndim < 1:
        return None
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return 1 if group == 1 and weight.ndim >= 2 else None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight.ndim - 1 if weight.ndim >= 2 else None
    return None


@register_pass
class QuantizeQDQ(Pass):
    """Insert INT8 Q/DQ pairs from calibration statistics (TensorRT or onnxruntime-CPU placement).

    Run after the default preset (BatchNorm folded). Pre: calibration data for the model, float32
    activations; subgraphs (If/Loop/Scan bodies) are left in float. Post: quantizable layers read
    their activations through QuantizeLinear -> DequantizeLinear and their weights as int8 through
    DequantizeLinear; layers that feed graph outputs, excluded nodes, and the output path of a
    Concat joining very different ranges stay float. A model that already holds Q/DQ is left alone.
    """

    name = PASS_NAME
    lossy = True
    tolerance = "int8"
    Options = QdqOptions
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES})
    preserves_types = False
    recurse = False

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Plan, calibrate, then rewrite the main graph."""
        options: QdqOptions = self.options  # type: ignore[assignment]
        result = PassResult()
        graph = model.graph
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for n in graph.node):
            result.notes.append("qdq: the model is already quantized; left alone")
            return result
        if ctx.calibration is None:
            raise OnnxoptError("qdq: needs calibration data (give --calib PATH, or --calib random for testing)")
        target = ctx.target
        symmetric = target != "ort-cpu"
        method = options.method if options.method != "auto" else AUTO_METHOD
        per_channel = options.per_channel
        version = opset_version(model) or 1
        need = PER_CHANNEL_OPSET if (per_channel or not symmetric) else QDQ_OPSET
        if version < need:
            note = _upgrade(model, ctx, version)
            if note is None:
                result.notes.append(f"qdq: upgraded the model from opset {version} to {PER_CHANNEL_OPSET} (per-channel DequantizeLinear)")
                result.count(f"opset_{version}_to_{PER_CHANNEL_OPSET}")
                ctx.invalidate()
            elif version >= QDQ_OPSET:
                per_channel = False
                result.notes.append(f"qdq: opset {version} kept ({note}); weights use per-tensor scales")
            else:
                raise OnnxoptError(f"qdq: opset {version} has no QuantizeLinear and the upgrade failed ({note})")
        graph = model.graph  # the upgrade replaced the model's contents
        if any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):
            result.notes.append("qdq: If/Loop/Scan bodies are left in float")
        unprotected = options.reduce_range == "false" or (target == "portable" and options.reduce_range == "auto")
        if target in ("ort-cpu", "portable") and unprotected and int8_pairs_saturate():
            remedy = "reduce_range=auto or true" if target == "ort-cpu" else "reduce_range=true"
            result.warnings.append(saturation_warning(PASS_NAME, remedy))
        data: Any = ctx.calibration
        if options.calib_batches:
            data = _Limited(data, options.calib_batches)
        if options.equalize:
            from onnxopt.passes.qdq_equalize import equalize

            pairs = equalize(model, data, options.batch_size)
            if pairs:
                result.count("pairs_equalized", pairs)
                result.notes.append(f"qdq: equalized the channel ranges of {pairs} Conv -> Conv tensor(s) (float outputs unchanged)")
        float_model = model  # read only until the quantized model replaces it (a copy would cost the model's size again)
        view = GraphView.build(float_model.graph)
        is_float = float_map(view, ctx.types)
        slow = slow_int8_convs(view) if target == "ort-cpu" and not options.slow_convs else frozenset()
        planner = Planner(view, is_float, target=target, exclude=options.exclude, keep_outputs=options.keep_outputs, weight_only_nodes=slow)
        plan = planner.plan()
        if not plan.tensors and not plan.anchors and not plan.weight_only:
            tail = planner.float_tail()
            kept = sum(n.op_type in ANCHORS and n.output[0] in tail for n in view.nodes)
            why = f" ({kept} layer(s) feed graph outputs and stay float: keep_outputs=false quantizes them)" if kept else ""
            result.notes.append(f"qdq: no quantizable layer found{why}")
            return result
        wanted = list(dict.fromkeys(plan.tensors + [i for c in plan.concats for i in c.input if i in plan.readers or i in plan.tensors]))
        if options.bias_correction:
            wanted += [n.output[0] for n in plan.anchors + plan.weight_only if n.output[0] not in wanted]
        stats = collect_stats(float_model, wanted, data, batch_size=options.batch_size)
        blocked: set[str] = set(_range_guard(plan, stats, result))
        for name in _concat_guard(plan, stats, options.concat_ratio, result):
            blocked |= planner.downstream(name)
        builder = Builder(float_model, is_float, options, target, blocked, stats, data, method=method, per_channel=per_channel, slow=slow)
        builder.weight_bits = _weight_bits(builder, view, plan, result)
        if options.rounding == "gptq":
            builder.rounding = _gptq(float_model, view, plan, data, options, per_channel, builder.weight_bits, result)
        keep: frozenset[int] = frozenset()
        if options.sensitivity or options.keep_float or options.max_error or options.float_share:
            from onnxopt.passes.qdq_sensitivity import choose_float_layers

            keep = choose_float_layers(builder, result)
        built, final_plan, rewriter = builder.build(keep, result, weights=True)
        layer_outputs = {n.output[0] for n in final_plan.anchors + final_plan.weight_only}
        _note_slow(final_plan, {view.nodes[i].output[0] for i in slow}, result)
        constants = RewrittenConstants(rewriter.int32_biases, rewriter.uint8_constants)
        # a fresh copy holds only what the rewrite kept: deleting the float weights from ``built`` does not free the
        # memory protobuf allocated for them, nor does anything while a node of it (in the plan) is referenced
        quantized = ModelProto()
        quantized.CopyFrom(built)
        del built, final_plan, rewriter, view, planner, plan
        if options.bias_correction:
            from onnxopt.passes.qdq_sensitivity import correct_biases

            correct_biases(quantized, layer_outputs, constants, builder, result)
        del builder
        model.CopyFrom(quantized)
        del quantized
        ctx.invalidate()
        if target == "ort-cpu":
            _fuse_float_activations(model, ctx, result)
        if options.embeddings and target != "trt":
            quantize_gathers(model, EMBEDDING_MIN_SIZE, result)
        if getattr(ctx.calibration, "random", False):
            result.warnings.append("qdq: calibrated on random data: the scales are for testing only")
        result.notes.append(f"qdq: {method} calibration, {'int8 symmetric' if symmetric else 'uint8 asymmetric'} activations")
        return result


@dataclass(frozen=True)
class WeightBits:
    """The bound of each weight's integers: 63 (7 bits) for every weight (``every``) or those in ``reduced``, else 127."""

    every: bool = False
    reduced: frozenset[str] = frozenset()

    def qmax(self, weight: str) -> int:
        """The integer bound of weight ``weight``."""
        return REDUCED_MAX if self.every or weight in self.reduced else INT8_MAX


def _weight_bits(builder: Builder, view: GraphView, plan: Plan, result: PassResult) -> WeightBits:
    """reduce_range: 7 bits everywhere (true), nowhere (false), or (auto, ort-cpu only) for the layers whose uint8 x int8
    products saturate an int16 pair sum on the calibration data (:mod:`onnxopt.passes.qdq_saturation`)."""
    choice = builder.options.reduce_range
    if choice == "true":
        return WeightBits(every=True)
    if choice == "false" or builder.target != "ort-cpu":
        return WeightBits()  # auto elsewhere: symmetric int8 activations, whose kernels this check does not model
    from onnxopt.passes.qdq_saturation import UInt8Layer, saturating_layers

    params = _tensor_params(plan, builder.stats, builder.method, builder.options.percentile, builder.symmetric, builder.inputs)
    layers, weight_of = [], {}
    for node in plan.anchors:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2 or node.input[0] not in params:
            continue
        weight = const_name(view, node.input[1])
        if weight is None or weight.dtype != np.float32 or weight.ndim < 2:
            continue
        axis = weight_axis(node, weight) if builder.per_channel else None
        x = params[node.input[0]]
        integers = quantize_weight(weight, weight_params(weight, axis), INT8_MAX)
        layers.append(UInt8Layer(node, integers, float(x.scale), int(x.zero_point)))
        weight_of[node.output[0]] = node.input[1]
    found = saturating_layers(builder.float_model, layers, builder.data, batch_size=builder.options.batch_size)
    reduced = frozenset(weight_of[name] for name in found)
    result.notes.append(f"qdq: reduce_range=auto: 7-bit weights for {len(reduced)} of {len(layers)} layers (int16 pair sums saturate)")
    result.count("weights_7bit", len(reduced))
    return WeightBits(reduced=reduced)


class Builder:
    """Builds quantized copies of the float model from one set of statistics, with chosen anchors kept float.

    ``build(keep)`` plans the copy with the anchors at graph positions ``keep`` left float (the
    sensitivity search calls it once per layer), collects statistics of tensors the new plan adds,
    and rewrites it; the float model is never modified.
    """

    def __init__(
        self,
        float_model: ModelProto,
        is_float: dict[str, bool],
        options: QdqOptions,
        target: str,
        blocked: set[str],
        stats: dict[str, TensorStats],
        data: Any,
        *,
        method: str,
        per_channel: bool,
        slow: frozenset[int] = frozenset(),
    ) -> None:
        self.float_model, self.is_float, self.options, self.target = float_model, is_float, options, target
        self.blocked, self.stats, self.data, self.method, self.per_channel = blocked, stats, data, method, per_channel
        self.symmetric = target != "ort-cpu"
        self.inputs = frozenset(i.name for i in float_model.graph.input)
        self.rounding: GptqRounding | None = None  # rounding=gptq; shared by every build of the sensitivity search
        self.slow = slow  # ort-cpu: positions of the convs onnxruntime runs slower in int8 (float compute, int8 weights)
        self.weight_bits = WeightBits()  # reduce_range: which weights get 7 bits

    def planner(self, view: GraphView, keep: frozenset[int] = frozenset(), *, weights: bool = False) -> Planner:
        """The planner of ``view`` with the anchors at positions ``keep`` left float (``weights``: with int8 weights on ort-cpu)."""
        o = self.options
        keep = keep | self.slow
        hard, soft = (frozenset(), keep) if weights and not self.symmetric else (keep, frozenset())
        return Planner(
            view,
            self.is_float,
            target=self.target,
            exclude=o.exclude,
            keep_outputs=o.keep_outputs,
            float_nodes=hard,
            weight_only_nodes=soft,
        )

    def candidates(self) -> list[int]:
        """Graph positions of the layers the full plan quantizes (anchors and weight-only output layers)."""
        view = GraphView.build(self.float_model.graph)
        plan = self.planner(view).plan(self.blocked)
        ids = {id(n) for n in plan.layers}
        return [i for i, n in enumerate(view.nodes) if id(n) in ids]

    def ensure_stats(self, names: list[str]) -> None:
        """Collect statistics of float-model tensors not measured yet."""
        missing = [t for t in dict.fromkeys(names) if t not in self.stats]
        if missing:
            self.stats.update(collect_stats(self.float_model, missing, self.data, batch_size=self.options.batch_size))

    def build(self, keep: frozenset[int], result: PassResult | None = None, *, weights: bool = False) -> tuple[ModelProto, Plan, _Rewriter]:
        """A quantized copy with the anchors at positions ``keep`` in float (``weights``: int8 weights on ort-cpu); counts to ``result``."""
        model = ModelProto()
        model.CopyFrom(self.float_model)
        view = GraphView.build(model.graph)
        plan = self.planner(view, keep, weights=weights).plan(self.blocked)
        self.ensure_stats(plan.tensors)
        params = _tensor_params(plan, self.stats, self.method, self.options.percentile, self.symmetric, self.inputs)
        rewrite = _Rewriter(
            model,
            view,
            NameGenerator(model),
            plan,
            params,
            symmetric=self.symmetric,
            per_channel=self.per_channel,
            rounding=self.rounding,
            weight_bits=self.weight_bits,
        )
        rewrite.apply(result if result is not None else PassResult())
        return model, plan, rewrite


def _gptq(
    float_model: ModelProto,
    view: GraphView,
    plan: Plan,
    data: Any,
    options: QdqOptions,
    per_channel: bool,
    bits: WeightBits,
    result: PassResult,
) -> GptqRounding:
    """gptq: the GPTQ integers of every quantized layer's weight that GPTQ can round and only that layer reads."""
    layers = []
    for node in plan.anchors + plan.weight_only:
        name = node.input[1] if len(node.input) > 1 else ""
        weight = const_name(view, name) if name else None
        if weight is None or weight.dtype != np.float32 or not eligible(node, weight) or node.input[0] in view.initializers:
            continue
        if len(view.consumers.get(name, [])) != 1:
            continue
        axis = weight_axis(node, weight) if per_channel else None
        qmax = bits.qmax(name)
        layers.append(GptqLayer(node, tuple(weight.shape), (name, axis), weight_params(weight, axis, qmax).scale, qmax))
    if not layers:
        return GptqRounding()
    weight_of = functools.partial(const_name, view)
    rounding = gptq_rounding(float_model, layers, weight_of, data, batch_size=options.batch_size, damp=options.damp)
    sweeps = f" ({rounding.sweeps} calibration sweeps)" if rounding.sweeps > 1 else ""
    result.notes.append(f"qdq: gptq rounding of {len(rounding.rounded)} weights{sweeps}")
    return rounding


def _note_slow(plan: Plan, slow_outputs: set[str], result: PassResult) -> None:
    """Count and name the convolutions (by output) kept float because onnxruntime runs them slower in int8."""
    kept = [n for n in plan.weight_only if n.output[0] in slow_outputs]
    if kept:
        result.count("slow_convs_float", len(kept))
        shown = ", ".join(n.name or n.output[0] for n in kept[:3]) + (", ..." if len(kept) > 3 else "")
        result.notes.append(
            f"qdq: {len(kept)} convolution(s) that onnxruntime runs slower in int8 compute in float with int8 weights "
            f"({shown}; slow_convs=true quantizes them)"
        )


def _fuse_float_activations(model: ModelProto, ctx: PassContext, result: PassResult) -> None:
    """ort-cpu: fuse the Clip-form hard-swish / hard-sigmoid that fuse_activations left for this pass where they stayed
    float (four float ops cost more than one); a quantized one holds Q/DQ pairs, which stop the match, and onnxruntime
    runs it in uint8 (see fuse_activation.int8_clip_form)."""
    from onnxopt.passes.fuse_activation import FuseActivations

    read = {name for scope in iter_scopes(model.graph) for node in scope.graph.node for name in node.input}
    fused = FuseActivations(kinds=("hardswish", "hardsigmoid")).run(model, ctx)
    done = sum(fused.counts.values())
    if done:
        drop_unread_initializers(model, read)  # the fused ops' constants (fuse_activations leaves them to dead_code)
        ctx.invalidate()
        result.count("float_activations_fused", done)
        result.notes.append(f"qdq: fused {done} Clip-form hard-swish/hard-sigmoid(s) of layers left float")


def _upgrade(model: ModelProto, ctx: PassContext, version: int) -> str | None:
    """Upgrade ``model`` in place to opset 13, checked on one calibration batch; a note on failure (model unchanged)."""
    from onnxopt.passes.opset import convert_opset
    from onnxopt.verify import compare_outputs, run_model

    try:
        converted = convert_opset(model, PER_CHANNEL_OPSET)
    except Exception as exc:  # the converter raises many types
        return "onnx's version converter failed: " + one_line(exc, 160)
    try:
        feeds = ctx.calibration.first_batch(1)
        check = compare_outputs(run_model(model, feeds), run_model(converted, feeds), "fp32")
    except Exception as exc:  # noqa: BLE001 - onnxruntime cannot run one of them
        return "the converted model could not be checked: " + one_line(exc, 160)
    if not check.passed:
        return "the converted model computes different outputs"
    model.CopyFrom(converted)
    return None


def _range_guard(plan: Plan, stats: dict[str, TensorStats], result: PassResult) -> list[str]:
    """Planned tensors that hold inf/NaN or values beyond MAX_QUANTIZED_MAGNITUDE in calibration (masks): left float, with a note."""
    blocked = [
        name for name in plan.tensors if name in stats and (stats[name].nonfinite > 0 or stats[name].absmax > MAX_QUANTIZED_MAGNITUDE)
    ]
    if blocked:
        shown = ", ".join(f"'{n}'" for n in blocked[:3]) + (", ..." if len(blocked) > 3 else "")
        limit = f"{MAX_QUANTIZED_MAGNITUDE:g}"
        result.notes.append(f"qdq: {len(blocked)} tensor(s) hold inf/NaN or values beyond {limit} ({shown}); left float")
        result.count("masks_kept_float", len(blocked))
    return blocked


def _concat_guard(plan: Plan, stats: dict[str, TensorStats], ratio: float, result: PassResult) -> list[str]:
    """Concat outputs whose inputs' absolute ranges differ by more than ``ratio`` (left float, with a note)."""
    blocked = []
    for node in plan.concats:
        ranges = [stats[i].absmax for i in node.input if i in stats]
        if len(ranges) < 2:
            continue
        low, high = min(ranges), max(ranges)
        if high > ratio * max(low, 1e-12):
            blocked.append(node.output[0])
            result.notes.append(
                f"qdq: Concat '{node.name or node.output[0]}' joins ranges {low:.3g} and {high:.3g} (ratio > {ratio:g}); "
                "its output path stays float"
            )
            result.count("concats_kept_float")
    return blocked


def _tensor_params(
    plan: Plan, stats: dict[str, TensorStats], method: str, percentile: float, symmetric: bool, inputs: frozenset[str] = frozenset()
) -> dict[str, QParams]:
    """Parameters of every planned tensor; members of one scale group share the union of their ranges (borrowers
    excepted: they take their group's range without widening it).

    Graph inputs take their observed range (minmax): preprocessed inputs are bounded, and the entropy
    method clips inputs whose mass sits at the range's end (white page pixels) far too tightly.
    """
    ranges: dict[str, tuple[float, float]] = {}
    for name in plan.tensors:
        if name in plan.borrowed:
            continue  # takes its group's range (a Concat input: the Concat output's)
        lo, hi = compute_range(stats[name], "minmax" if name in inputs else method, symmetric=symmetric, percentile=percentile)
        if name in plan.scaled:  # in the units of its root's scale group
            factor = plan.scaled[name][1]
            lo, hi = lo / factor, hi / factor
        group = plan.group_of(name)
        old = ranges.get(group)
        ranges[group] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    lent = set(ranges)
    for name in plan.tensors:  # a group of borrowers only (no lender among the planned tensors): their own union
        group = plan.group_of(name)
        if name in plan.borrowed and group not in lent:
            lo, hi = compute_range(stats[name], method, symmetric=symmetric, percentile=percentile)
            old = ranges.get(group)
            ranges[group] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    params = {name: activation_params(*ranges[plan.group_of(name)], symmetric=symmetric) for name in plan.tensors}
    for name, (root, factor) in plan.scaled.items():
        if name in params and root in params:  # the folded DequantizeLinear's parameters (see _Rewriter.apply)
            params[name] = scaled_params(params[root], factor)
    return params


def scaled_params(params: QParams, factor: float) -> QParams:
    """``params`` with the scale multiplied by ``factor`` in float32 (a Mul by a positive constant folded into a DQ)."""
    return QParams(np.array(np.float32(params.scale) * np.float32(factor), np.float32), params.zero_point)


@dataclass
class RewrittenConstants:
    """The biases and constants a rewrite stored in integers, by name (what bias correction shifts; no graph references).

    ``int32_biases``: layer output -> (float bias, scale, int32 initializer); ``uint8_constants``: DQ output ->
    (float value, q, scale, zero-point initializers).
    """

    int32_biases: dict[str, tuple[np.ndarray, np.ndarray, str]]
    uint8_constants: dict[str, tuple[np.ndarray, str, str, str]]


class _Rewriter:
    """Writes a plan into the graph: Q/DQ pairs after tensors, int8 weights, int32 biases (ort-cpu)."""

    def __init__(
        self,
        model: ModelProto,
        view: GraphView,
        names: NameGenerator,
        plan: Plan,
        params: dict[str, QParams],
        *,
        symmetric: bool,
        per_channel: bool,
        rounding: GptqRounding | None = None,
        weight_bits: WeightBits | None = None,
    ):
        self.model, self.view, self.names, self.plan, self.params = model, view, names, plan, params
        self.symmetric, self.per_channel, self.rounding = symmetric, per_channel, rounding
        self.weight_bits = weight_bits or WeightBits()
        self.inits: list[TensorProto] = []
        self.front: list[NodeProto] = []
        self.replaced: set[str] = set()
        self.by_dq: dict[str, QParams] = {}  # DQ output of an activation -> its parameters
        self.int32_biases: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}  # anchor output -> (float bias, scale, int32 initializer)
        self.uint8_constants: dict[str, tuple[np.ndarray, str, str, str]] = {}  # DQ output -> (float value, q, scale, zero initializers)

    def _init(self, base: str, array: np.ndarray) -> str:
        name = self.names.fresh(base)
        self.inits.append(numpy_helper.from_array(np.array(array, copy=True, order="C"), name))
        return name

    def _dq(self, source: str, params: QParams, base: str, nodes: list[NodeProto]) -> str:
        scale = self._init(f"{base}_scale", params.scale)
        inputs = [source, scale]
        if params.zero_point.dtype != np.int32:  # int32 (bias): the zero point is 0 and optional; omitted to save space
            inputs.append(self._init(f"{base}_zero_point", params.zero_point))
        out = self.names.fresh(f"{base}_dq")
        kwargs = {"axis": params.axis} if params.axis is not None else {}
        nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=self.names.fresh(f"{base}_DequantizeLinear"), **kwargs))
        return out

    def _cast_mul(self, source: str, params: QParams, base: str, rank: int) -> str:
        """``Cast(q) * scale``: the DequantizeLinear of a symmetric int8 weight in a form onnxruntime folds at load.

        onnxruntime never constant-folds a DequantizeLinear (its QDQ fusions need them), so a float
        layer reading one gets a weight computed on every run, without the pre-packing and NCHWc
        layouts of constant weights. Cast and Mul of constants are folded into a float weight when
        the session loads, while the file keeps the int8 values.
        """
        cast = self.names.fresh(f"{base}_float")
        self.front.append(helper.make_node("Cast", [source], [cast], name=self.names.fresh(f"{base}_Cast"), to=TensorProto.FLOAT))
        scale = np.asarray(params.scale, np.float32)
        if params.axis is not None:
            shape = [1] * rank
            shape[params.axis] = scale.size
            scale = scale.reshape(shape)
        out = self.names.fresh(f"{base}_dq")
        self.front.append(helper.make_node("Mul", [cast, self._init(f"{base}_scale", scale)], [out], name=self.names.fresh(f"{base}_Mul")))
        return out

    def apply(self, result: PassResult) -> None:
        graph, view, plan = self.model.graph, self.view, self.plan
        after: dict[str, list[NodeProto]] = {}
        rename: dict[str, str] = {}
        q_names: dict[str, str] = {}
        for name in plan.tensors:
            params = self.params[name]
            scale = self._init(f"{name}_scale", params.scale)
            zero = self._init(f"{name}_zero_point", params.zero_point)
            q_out = self.names.fresh(f"{name}_q")
            dq_out = self.names.fresh(f"{name}_dq")
            pair = [
                helper.make_node("QuantizeLinear", [name, scale, zero], [q_out], name=self.names.fresh(f"{name}_QuantizeLinear")),
                helper.make_node("DequantizeLinear", [q_out, scale, zero], [dq_out], name=self.names.fresh(f"{name}_DequantizeLinear")),
            ]
            if not any(id(r) not in plan.removed for r in view.consumers.get(name, [])):
                pair = pair[:1]  # read only through folded Muls: the Q alone
            producer = view.producer.get(name)
            if producer is None:
                self.front.extend(pair)
            else:
                after.setdefault(name, []).extend(pair)
            rename[name] = dq_out
            q_names[name] = q_out
            self.by_dq[dq_out] = params
            result.count("qdq_pairs")
        readers = {name: plan.readers.get(name, set()) for name in plan.tensors}
        all_readers = not self.symmetric  # ort-cpu: every reader goes through the DQ (so the producer feeds only the Q)
        weights: dict[tuple[str, int | None], tuple[str, QParams]] = {}
        for node in view.nodes:
            for index, name in enumerate(node.input):
                if name in rename and ((all_readers and name not in plan.float_path) or id(node) in readers[name]):
                    node.input[index] = rename[name]
        folded: dict[int, NodeProto | None] = {}
        for node in view.nodes:
            if id(node) in plan.removed:
                self.replaced.update(i for i in node.input if i in view.initializers)  # its factor, unused once folded
                readers = [r for r in view.consumers.get(node.output[0], []) if id(r) not in plan.removed]
                if not readers and node.output[0] not in view.graph_outputs:
                    folded[id(node)] = None  # only read by another folded Mul
                    continue
                root, factor = plan.folded[node.output[0]]
                scaled = scaled_params(self.params[root], factor)
                base = node.output[0]
                scale = self._init(f"{base}_scale", scaled.scale)
                zero = self._init(f"{base}_zero_point", scaled.zero_point)
                name = self.names.fresh(f"{base}_DequantizeLinear")
                folded[id(node)] = helper.make_node("DequantizeLinear", [q_names[root], scale, zero], [base], name=name)
                self.by_dq[base] = scaled
                result.count("muls_folded_into_scale")
        for node in plan.anchors:
            self._weight(node, weights, result)
        for node in plan.weight_only:
            self._weight(node, weights, result, bias=False, folded=True)
        if not self.symmetric:
            self._constants(result)
        nodes: list[NodeProto] = list(self.front)
        for node in view.nodes:
            if id(node) in folded:
                if folded[id(node)] is not None:
                    nodes.append(folded[id(node)])  # type: ignore[arg-type]
            else:
                nodes.append(node)
            for out in node.output:
                nodes.extend(after.get(out, ()))
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(self.inits)
        self._drop_unused()

    def _weight(self, node: NodeProto, cache: dict, result: PassResult, *, bias: bool = True, folded: bool = False) -> None:
        """Store a layer's weight as int8: read through a DequantizeLinear, or (``folded``) through Cast and Mul."""
        name = node.input[1]
        weight = const_name(self.view, name)
        if weight is None or weight.dtype != np.float32:
            return
        axis = weight_axis(node, weight) if self.per_channel else None
        key = (name, axis)
        if (key, folded) not in cache:
            params = weight_params(weight, axis, self.weight_bits.qmax(name))
            q_name = self._init(f"{name}_quantized", self._integers(weight, params, key))
            if folded:
                out = self._cast_mul(q_name, params, name, weight.ndim)
            else:
                out = self._dq(q_name, params, name, self.front)
            cache[key, folded] = (out, params)
            self.replaced.add(name)
            result.count("weights_int8")
        dq_out, params = cache[key, folded]
        node.input[1] = dq_out
        if bias and not self.symmetric:
            self._bias(node, params, result)

    def _integers(self, weight: np.ndarray, params: QParams, key: tuple[str, int | None]) -> np.ndarray:
        """int8 values of a weight: GPTQ-rounded when it was (for these scales), else rounded to nearest."""
        q = self.rounding.integers(key, params.scale) if self.rounding else None
        return q if q is not None else quantize_weight(weight, params, self.weight_bits.qmax(key[0]))

    def _bias(self, node: NodeProto, wparams: QParams, result: PassResult) -> None:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            return
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if (
                attrs.get("alpha", None) is not None
                and attrs["alpha"].f != 1.0
                or attrs.get("beta", None) is not None
                and attrs["beta"].f != 1.0
            ):
                return
        act = self.by_dq.get(node.input[0])
        bias = const_name(self.view, node.input[2])
        if act is None or bias is None or bias.dtype != np.float32 or bias.ndim != 1:
            return
        scale = (np.float32(act.scale) * wparams.scale).astype(np.float32)
        if scale.ndim and scale.shape[0] != bias.shape[0]:
            return
        safe = np.where(scale > 0, scale, 1.0)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            ratio = np.nan_to_num(bias.astype(np.float64) / safe.astype(np.float64), posinf=2**31 - 1, neginf=-(2**31) + 1)
        q = np.clip(np.rint(ratio), -(2**31) + 1, 2**31 - 1).astype(np.int32)
        params = QParams(scale, np.zeros(scale.shape, np.int32), 0 if scale.ndim else None)
        base = node.input[2]
        q_name = self._init(f"{base}_quantized", q)
        node.input[2] = self._dq(q_name, params, base, self.front)
        self.int32_biases[node.output[0]] = (bias.astype(np.float32), scale, q_name)
        self.replaced.add(base)
        result.count("biases_int32")

    def _constants(self, result: PassResult) -> None:
        for name, readers in self.plan.constants.items():
            value = const_name(self.view, name)
            if value is None or value.dtype != np.float32:
                continue
            params = activation_params(
                float(value.min()) if value.size else 0.0, float(value.max()) if value.size else 0.0, symmetric=False
            )
            q = np.clip(np.rint(value / params.scale) + params.zero_point.astype(np.int32), 0, 255).astype(np.uint8)
            q_name = self._init(f"{name}_quantized", q)
            dq_out = self._dq(q_name, params, name, self.front)
            self.uint8_constants[dq_out] = (value.astype(np.float32), q_name, self.front[-1].input[1], self.front[-1].input[2])
            for reader in readers:
                for index, inp in enumerate(reader.input):
                    if inp == name:
                        reader.input[index] = dq_out
            self.replaced.add(name)
            result.count("constants_uint8")

    def _drop_unused(self) -> None:
        drop_unread_initializers(self.model, self.replaced)
