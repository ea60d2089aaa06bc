"""Dynamic INT8 for CPUs: int8 weights, activations quantized at run time (``int8_dynamic`` pass).

Each MatMul/Gemm with a constant 2-D float32 weight gets an int8 symmetric weight (per output
column, or per tensor) and quantizes its input per call to uint8 with the input's own range, so no
calibration data is needed and no clipping range can be wrong (what transformer encoders want:
their activations have per-sentence outliers). With ``rounding=gptq`` and calibration data the
int8 weights are rounded by GPTQ from each layer's input statistics (main-graph layers; the
scales stay the per-column maxima), which cuts the weight error of wide heads (a CTC classifier).
Two emissions:

* ``ort-cpu``: ``com.microsoft.DynamicQuantizeMatMul(A, Wq, w_scale[, bias])``, one kernel that
  quantizes A, multiplies in int8 and rescales; a following ``Add`` of a constant [N] bias is
  folded into it. A packed ``com.microsoft.Attention`` without ``attention_bias`` or past state
  becomes ``QAttention`` after a ``DynamicQuantizeLinear`` of its input.
* ``portable``: standard ops, ``DynamicQuantizeLinear(A) -> MatMulInteger -> Cast -> Mul(a_scale *
  w_scale) [-> Add bias]``, one DynamicQuantizeLinear per activation however many layers read it.

TensorRT has no dynamic quantization (use ``qdq``); ``ort-gpu`` has no DynamicQuantizeMatMul
kernel (use ``qdq`` or ``fp16``). Large Gather tables (word embeddings) are stored as int8 as in
``qdq:embeddings=true``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.cpu import int8_pairs_saturate, saturation_warning
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import GraphScope, GraphView, drop_unread_initializers, is_standard, opset_version, with_outer_constants
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_patterns, matches_pattern, option
from onnxopt.passes.contrib_ops import MS_DOMAIN, MS_VERSION
from onnxopt.passes.fusion_support import elem, gemm_bias_vector, import_domain, replace_nodes, unique
from onnxopt.passes.gptq import check_hessian_memory, hessian_groups, mean_hessian
from onnxopt.passes.noop_rules import NoMatch, constant_tensor, get_attr, require
from onnxopt.passes.qdq import INT8_MAX, weight_params
from onnxopt.passes.qdq import quantize_weight as quantize_weight_values
from onnxopt.passes.qdq_gather import quantize_gathers
from onnxopt.passes.qdq_rounding import gptq_columns, layer_hessians, layer_key
from onnxopt.registry import register_pass
from onnxopt.shapes import StaticType, register_standin

log = logging.getLogger("onnxopt")

PASS_NAME = "int8_dynamic"
TARGETS = ("ort-cpu", "portable")
MIN_OPSET = 11  # DynamicQuantizeLinear
EMBEDDING_MIN_SIZE = 65536
REDUCED_MAX = 63  # reduce_range: 7-bit weights
# QAttention takes these attributes of Attention; any other (qkv_hidden_sizes, rotary_embedding_dim) keeps it float
QATTENTION_ATTRS = frozenset({"num_heads", "unidirectional", "scale", "mask_filter_value", "do_rotary", "past_present_share_buffer"})


@dataclass
class DynamicOptions(PassOptions):
    """Options of :class:`DynamicInt8`."""

    exclude: tuple[str, ...] = option(
        (), "layers kept float: node or weight names, op types or regexes matching a whole name, '|'-separated"
    )
    min_size: int = option(4096, "weights with fewer values stay float")
    per_channel: bool = option(True, "one weight scale per output column (per tensor when false)")
    reduce_range: bool = option(False, "7-bit weights: avoids the int16 saturation of u8s8 kernels on CPUs without VNNI")
    attention: bool = option(True, "ort-cpu: Attention without attention_bias / past becomes QAttention")
    embeddings: bool = option(True, "store Gather tables of >= 65536 values as int8 (rows dequantized after lookup)")
    rounding: Literal["nearest", "gptq"] = option(
        "nearest", "weight rounding: nearest, or gptq (error-compensating, needs calibration data)"
    )
    damp: float = option(0.01, "gptq: Hessian damping as a fraction of its mean diagonal")
    batch_size: int = option(8, "gptq: calibration batch size")

    def validate(self) -> None:
        """Check min_size, damp, batch_size and the exclusion patterns."""
        where = f"pass '{PASS_NAME}'"
        if self.min_size < 1:
            raise OptionError(f"option 'min_size' of {where} must be positive, not {self.min_size}")
        if not self.damp > 0:
            raise OptionError(f"option 'damp' of {where} must be positive, not {self.damp}")
        if self.batch_size < 1:
            raise OptionError(f"option 'batch_size' of {where} must be positive, not {self.batch_size}")
        check_patterns(PASS_NAME, "exclude", self.exclude)


@dataclass
class Layer:
    """A MatMul or Gemm computing ``A @ W (+ bias)`` with W a constant [K, N] weight (stored transposed when ``trans``)."""

    node: NodeProto
    weight: str
    trans: bool
    bias: np.ndarray | None = None  # an [N] vector added after the product
    bias_add: NodeProto | None = None  # the Add folded in (its output is the layer's output)
    extra_add: str = ""  # Gemm's C when it is not a constant vector (added after, beta == 1)

    @property
    def output(self) -> str:
        """The tensor the rewrite must write."""
        return self.bias_add.output[0] if self.bias_add is not None else self.node.output[0]


@dataclass
class Quantized:
    """One int8 weight: values [K, N] and scales [N] (or one)."""

    values: np.ndarray
    scale: np.ndarray
    names: tuple[str, str] = ("", "")


@dataclass
class Found:
    """What one graph holds: the layers, the attention nodes to convert, and why others stay float."""

    layers: list[Layer] = field(default_factory=list)
    attention: list[NodeProto] = field(default_factory=list)
    kept: Counter = field(default_factory=Counter)


def _excluded(patterns: tuple[str, ...], node: NodeProto, weight: str) -> bool:
    return any(matches_pattern(name, patterns) for name in (node.name, node.op_type, weight) if name)


def quantize_weight(
    weight: np.ndarray, per_channel: bool, reduce_range: bool, hessian: np.ndarray | None = None, damp: float = 0.01
) -> Quantized:
    """Symmetric int8 of a [K, N] weight, one scale per column N (or per tensor): qdq's weight rounding, or GPTQ's
    integers for the same scales when the input Hessian [K, K] is given."""
    qmax = REDUCED_MAX if reduce_range else INT8_MAX
    params = weight_params(weight, 1 if per_channel else None, qmax)
    if hessian is None:
        return Quantized(quantize_weight_values(weight, params, qmax), params.scale)
    return Quantized(gptq_columns(weight, hessian, params.scale, damp, qmax, what=f"{PASS_NAME}: gptq"), params.scale)


def _bias_after(view: GraphView, node: NodeProto, n: int) -> tuple[NodeProto, np.ndarray] | None:
    """The sole ``Add`` of a constant float32 [N] vector after ``node``, when it can fold into the product."""
    out = node.output[0]
    readers = unique(view.consumers.get(out, []))
    if len(readers) != 1 or out in view.graph_outputs or readers[0].op_type != "Add" or not is_standard(readers[0]):
        return None
    add = readers[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    tensor = constant_tensor(view, other)
    if tensor is None or tensor.data_type != TensorProto.FLOAT or list(add.input).count(out) != 1:
        return None
    dims = list(tensor.dims)
    if not dims or dims[-1] != n or any(d != 1 for d in dims[:-1]) or len(dims) > 2:
        return None
    return add, numpy_helper.to_array(tensor).reshape(-1)


def _gemm_layer(view: GraphView, node: NodeProto, weight: str, n: int) -> Layer:
    """A Gemm as A @ W + bias: transA=0 and alpha=1; C a constant vector (scaled by beta) or added after (beta=1)."""
    require(get_attr(node, "transA", 0) == 0, "a Gemm with transA=1")
    require(float(get_attr(node, "alpha", 1.0)) == 1.0, "a Gemm with alpha != 1")  # type: ignore[arg-type]
    layer = Layer(node, weight, bool(get_attr(node, "transB", 0)))
    if len(node.input) < 3 or not node.input[2]:
        return layer
    beta = float(get_attr(node, "beta", 1.0))  # type: ignore[arg-type]
    bias = gemm_bias_vector(view, node.input[2], beta, n)
    if bias is not None and bias.dtype == np.float32:
        layer.bias = bias
        return layer
    require(beta == 1.0, "a Gemm with beta != 1 and a C that is not a constant vector")
    layer.extra_add = node.input[2]
    return layer


def match_layer(view: GraphView, ctx: PassContext, node: NodeProto, options: DynamicOptions) -> Layer:
    """``node`` as a quantizable layer, or NoMatch with the reason it stays float."""
    weight = node.input[1]
    tensor = constant_tensor(view, weight)
    require(tensor is not None, "its B is not a constant of this graph")
    require(tensor.data_type == TensorProto.FLOAT, "the weight is not float32")  # type: ignore[union-attr]
    require(len(tensor.dims) == 2, f"the weight has rank {len(tensor.dims)}, not 2")  # type: ignore[union-attr]
    require(int(np.prod(tensor.dims)) >= options.min_size, f"smaller than min_size={options.min_size}")  # type: ignore[union-attr]
    require(weight not in view.graph_outputs, "the weight is a graph output")
    require(node.input[0] != weight and node.input[0] not in view.initializers, "A is a constant (folding's job)")
    # A is float32 like B in a valid model; any rank (a 1-D A works in both kernels, as in numpy)
    require(not _excluded(options.exclude, node, weight), "excluded")
    n = int(tensor.dims[0] if node.op_type == "Gemm" and get_attr(node, "transB", 0) else tensor.dims[1])  # type: ignore[union-attr]
    layer = _gemm_layer(view, node, weight, n) if node.op_type == "Gemm" else Layer(node, weight, False)
    if layer.bias is None and not layer.extra_add and ctx.target == "ort-cpu":
        found = _bias_after(view, node, n)
        if found is not None:
            layer.bias_add, layer.bias = found
    return layer


def match_attention(view: GraphView, ctx: PassContext, node: NodeProto, options: DynamicOptions) -> None:
    """Whether a com.microsoft Attention can become QAttention (NoMatch with the reason otherwise)."""
    require(len(node.input) < 6 or not any(node.input[5:]), "it takes attention_bias or past_sequence_length")
    require(len(node.output) < 2 or not any(node.output[1:]), "it writes present state")
    require(not (len(node.input) > 4 and node.input[4]), "it takes past state")
    require(all(a.name in QATTENTION_ATTRS for a in node.attribute), "QAttention lacks one of its attributes")
    tensor = constant_tensor(view, node.input[1])
    require(
        tensor is not None and tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 2, "its weights are not a 2-D float32 constant"
    )
    require(len(unique(view.consumers.get(node.input[1], []))) == 1, "its weights are shared")
    require(elem(ctx, node.input[0]) == TensorProto.FLOAT, "its input is not known to be float32")
    require(not _excluded(options.exclude, node, node.input[1]), "excluded")


def find(view: GraphView, ctx: PassContext, options: DynamicOptions) -> Found:
    """Quantizable layers (every reader of a weight must qualify) and convertible attention nodes of one graph."""
    found = Found()
    by_weight: dict[str, list[NodeProto]] = {}
    for node in view.nodes:
        if node.op_type == "Attention" and node.domain == MS_DOMAIN and ctx.target == "ort-cpu" and options.attention:
            try:
                match_attention(view, ctx, node, options)
                found.attention.append(node)
            except NoMatch as exc:
                found.kept[f"Attention: {exc}"] += 1
        elif node.op_type in ("MatMul", "Gemm") and is_standard(node) and len(node.input) >= 2:
            if constant_tensor(view, node.input[1]) is not None:
                by_weight.setdefault(node.input[1], []).append(node)
    for weight, readers in by_weight.items():
        all_readers = unique(view.consumers.get(weight, []))
        layers = []
        try:
            require(len(all_readers) == len(unique(readers)), "the weight is also read by another op")
            for node in unique(readers):
                require(list(node.input).count(weight) == 1, "the weight is read twice by one node")
                layers.append(match_layer(view, ctx, node, options))
            require(len({layer.trans for layer in layers}) == 1, "read both as B and as B^T")
        except NoMatch as exc:
            log.debug("%s: weight '%s' kept: %s", PASS_NAME, weight, exc)
            found.kept[str(exc)] += 1
            continue
        found.layers += layers
    return found


class _Emitter:
    """Writes the rewrite of one graph: shared int8 weights, one DynamicQuantizeLinear per activation (portable)."""

    def __init__(self, view: GraphView, ctx: PassContext, options: DynamicOptions, rounded: dict[str, Quantized]) -> None:
        self.view, self.ctx, self.options, self.rounded = view, ctx, options, rounded  # rounded: gptq's weights
        self.initializers: list[TensorProto] = []
        self.weights: dict[str, Quantized] = {}
        self.quantized_inputs: dict[str, tuple[str, str, str]] = {}
        self.replaced: dict[int, list[NodeProto]] = {}

    def weight(self, name: str, trans: bool) -> Quantized:
        """The int8 weight [K, N] of ``name`` (quantized once, however many layers read it)."""
        if name not in self.weights:
            quant = self.rounded.get(name) or quantize_weight(
                _weight_matrix(self.view, name, trans), self.options.per_channel, self.options.reduce_range
            )
            fresh = self.ctx.names.fresh
            quant.names = (fresh(f"{name}_int8"), fresh(f"{name}_scale"))
            self.initializers += [
                numpy_helper.from_array(np.ascontiguousarray(quant.values), quant.names[0]),
                numpy_helper.from_array(quant.scale, quant.names[1]),
            ]
            self.weights[name] = quant
        return self.weights[name]

    def constant(self, array: np.ndarray, base: str) -> str:
        """A new initializer holding ``array``."""
        name = self.ctx.names.fresh(base)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def dynamic_quantize(self, tensor: str, before: list[NodeProto]) -> tuple[str, str, str]:
        """uint8 values, scale and zero point of ``tensor`` (one DynamicQuantizeLinear, appended to ``before`` when new)."""
        if tensor not in self.quantized_inputs:
            fresh = self.ctx.names.fresh
            outs = (fresh(f"{tensor}_quantized"), fresh(f"{tensor}_scale"), fresh(f"{tensor}_zero_point"))
            before.append(helper.make_node("DynamicQuantizeLinear", [tensor], list(outs), name=fresh(f"{tensor}_DynamicQuantizeLinear")))
            self.quantized_inputs[tensor] = outs
        return self.quantized_inputs[tensor]

    def layer(self, layer: Layer) -> None:
        """Replace one MatMul/Gemm (and its folded bias Add)."""
        quant = self.weight(layer.weight, layer.trans)
        node, fresh = layer.node, self.ctx.names.fresh
        target = fresh(f"{node.output[0]}_product") if layer.extra_add else layer.output
        nodes: list[NodeProto] = []
        if self.ctx.target == "ort-cpu":
            inputs = [node.input[0], quant.names[0], quant.names[1]]
            if layer.bias is not None:
                inputs += ["", self.constant(layer.bias.astype(np.float32), f"{node.output[0]}_bias")]
            nodes.append(
                helper.make_node(
                    "DynamicQuantizeMatMul", inputs, [target], name=node.name or fresh(f"{node.output[0]}_int8"), domain=MS_DOMAIN
                )
            )
        else:
            nodes += self._standard(layer, quant, target)
        if layer.extra_add:
            nodes.append(helper.make_node("Add", [target, layer.extra_add], [node.output[0]], name=fresh(f"{node.name}_bias")))
        self.replaced[id(node)] = self.replaced.get(id(node), []) + nodes
        if layer.bias_add is not None:
            self.replaced[id(layer.bias_add)] = []

    def _standard(self, layer: Layer, quant: Quantized, target: str) -> list[NodeProto]:
        """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(a_scale * w_scale) [-> Add bias], standard ops only."""
        node, fresh = layer.node, self.ctx.names.fresh
        before: list[NodeProto] = []
        q, s, z = self.dynamic_quantize(node.input[0], before)
        base = node.output[0]
        product, as_float, scale = fresh(f"{base}_int32"), fresh(f"{base}_int32_float"), fresh(f"{base}_rescale")
        scaled = fresh(f"{base}_scaled") if layer.bias is not None else target
        nodes = [
            *before,
            helper.make_node("MatMulInteger", [q, quant.names[0], z], [product], name=fresh(f"{node.name or base}_MatMulInteger")),
            helper.make_node("Cast", [product], [as_float], name=fresh(f"{base}_Cast"), to=TensorProto.FLOAT),
            helper.make_node("Mul", [s, quant.names[1]], [scale], name=fresh(f"{base}_scale_Mul")),
            helper.make_node("Mul", [as_float, scale], [scaled], name=fresh(f"{base}_Mul")),
        ]
        if layer.bias is not None:
            bias = self.constant(layer.bias.astype(np.float32), f"{base}_bias")
            nodes.append(helper.make_node("Add", [scaled, bias], [target], name=fresh(f"{base}_bias_Add")))
        return nodes

    def attention(self, node: NodeProto) -> None:
        """Attention -> DynamicQuantizeLinear + QAttention (per-column weight scales; bias zeros when absent)."""
        quant = self.weight(node.input[1], False)
        fresh = self.ctx.names.fresh
        before: list[NodeProto] = []
        q, s, z = self.dynamic_quantize(node.input[0], before)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if not bias:
            bias = self.constant(np.zeros(quant.values.shape[1], np.float32), f"{node.output[0]}_bias")
        mask = node.input[3] if len(node.input) > 3 else ""
        inputs = [q, quant.names[0], bias, s, quant.names[1], mask, z]
        new = helper.make_node("QAttention", inputs, [node.output[0]], name=node.name or fresh(f"{node.output[0]}_int8"), domain=MS_DOMAIN)
        new.attribute.extend(node.attribute)
        self.replaced[id(node)] = [*before, new]


def _orphaned_constants(view: GraphView, replaced: dict[int, list[NodeProto]]) -> set[str]:
    """Constants (weights, folded biases, Gemm's C) read only by the rewritten nodes and not by what replaces them."""
    new_inputs = {i for nodes in replaced.values() for n in nodes for i in n.input}
    names = set()
    for node in view.nodes:
        if id(node) not in replaced:
            continue
        for name in node.input:
            if not name or name in new_inputs or name in view.graph_outputs or constant_tensor(view, name) is None:
                continue
            if all(id(reader) in replaced for reader in view.consumers.get(name, [])):
                names.add(name)
    return names


def _drop_weights(scope: GraphScope, view: GraphView, names: set[str], replaced: dict[int, list[NodeProto]]) -> None:
    """Remove the float weights every reader of which was rewritten (initializers or Constant nodes)."""
    for name in names:
        producer = view.producer.get(name)
        if producer is not None and producer.op_type == "Constant":
            replaced[id(producer)] = []
    kept = [t for t in scope.graph.initializer if t.name not in names]
    if len(kept) != len(scope.graph.initializer):
        del scope.graph.initializer[:]
        scope.graph.initializer.extend(kept)


@register_pass
class DynamicInt8(Pass):
    """Dynamic INT8 MatMul/Gemm (and QAttention) for CPUs: int8 weights, inputs quantized per call; calibration only for GPTQ.

    Pre: ai.onnx opset >= 11, target ``ort-cpu``
    (DynamicQuantizeMatMul, QAttention) or ``portable`` (DynamicQuantizeLinear + MatMulInteger).
    Matched: every reader of a constant 2-D float32 weight with at least ``min_size`` values is a
    standard MatMul or Gemm (transA=0, alpha=1) reading it as B; a weight shared with another op,
    a graph-output weight or an excluded node stays float (counted in the notes by reason).
    Subgraphs are rewritten like the main graph. ``rounding=gptq`` (needs calibration data) rounds
    main-graph MatMul/Gemm weights by GPTQ (QAttention weights and subgraphs: nearest). Post: the
    float weights are gone; outputs differ by the INT8 error (judge with precision ``int8``);
    deterministic.
    """

    name = PASS_NAME
    lossy = True
    tolerance = "int8"
    Options = DynamicOptions
    requires = frozenset({Requirement.SHAPES})
    preserves_types = False

    def required(self) -> frozenset[Requirement]:
        """Shapes; calibration data too with ``rounding=gptq``."""
        gptq = self.options.rounding == "gptq"  # type: ignore[attr-defined]
        return self.requires | {Requirement.CALIBRATION} if gptq else self.requires

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Check the target and opset, then rewrite every graph, innermost first."""
        options: DynamicOptions = self.options  # type: ignore[assignment]
        result = PassResult()
        if ctx.target not in TARGETS:
            raise OnnxoptError(
                f"{PASS_NAME}: dynamic INT8 runs on CPUs (--target ort-cpu or portable), not {ctx.target}: "
                "use qdq (static INT8 with calibration)" + (" or fp16" if ctx.target == "ort-gpu" else "")
            )
        version = opset_version(model) or 1
        if version < MIN_OPSET:
            raise OnnxoptError(
                f"{PASS_NAME}: needs ai.onnx opset >= {MIN_OPSET} (DynamicQuantizeLinear), the model has {version}: add --opset {MIN_OPSET}"
            )
        if not options.reduce_range and int8_pairs_saturate():
            result.warnings.append(saturation_warning(PASS_NAME))
        kept: Counter = Counter()
        changed = False
        rounded = _gptq_weights(model, ctx, options, result) if options.rounding == "gptq" else {}
        captured: set[str] = set()  # weights of the enclosing graphs that a subgraph layer read (dropped below once unread)
        for scope in reversed(ctx.scopes()):
            local = ctx.view(scope.graph)
            view = with_outer_constants(local, scope)
            found = find(view, ctx, options)
            captured.update(
                name
                for x in found.layers
                for name in (x.weight, *x.node.input[2:])  # the weight and a Gemm's C
                if name not in local.initializers and name in view.initializers
            )
            kept.update(found.kept)
            if not found.layers and not found.attention:
                continue
            emit = _Emitter(view, ctx, options, rounded if scope.graph is model.graph else {})
            position = {id(node): index for index, node in enumerate(view.nodes)}
            work = [(position[id(x.node)], 0, x) for x in found.layers] + [(position[id(x)], 1, x) for x in found.attention]
            for _, kind, item in sorted(work, key=lambda w: w[0]):  # graph order: a shared DynamicQuantizeLinear goes first
                emit.layer(item) if kind == 0 else emit.attention(item)
            _drop_weights(scope, view, _orphaned_constants(view, emit.replaced), emit.replaced)
            scope.graph.initializer.extend(emit.initializers)
            replace_nodes(scope.graph, view.nodes, emit.replaced)
            result.count("layers_int8", len(found.layers))
            result.count("weights_int8", len(emit.weights) - len(found.attention))
            gptq = sum(name in emit.rounded for name in emit.weights)
            if gptq:
                result.count("weights_int8_gptq", gptq)
            if found.attention:
                result.count("qattention", len(found.attention))
            changed = True
        if changed:
            if ctx.target == "ort-cpu":
                import_domain(model, MS_DOMAIN, MS_VERSION)
            drop_unread_initializers(model, captured)
            ctx.invalidate()
        if options.embeddings:
            before = result.counts.get("embedding_tables_int8", 0)
            quantize_gathers(model, EMBEDDING_MIN_SIZE, result)
            if result.counts.get("embedding_tables_int8", 0) != before:
                ctx.invalidate()
        if kept:
            listed = "; ".join(f"{reason} ({count})" for reason, count in sorted(kept.items()))
            result.notes.append(f"{PASS_NAME}: {sum(kept.values())} layer(s) kept in float: {listed}")
        return result


def _gptq_weights(model: ModelProto, ctx: PassContext, options: DynamicOptions, result: PassResult) -> dict[str, Quantized]:
    """gptq: the int8 weights of the main graph, rounded with each weight's input Hessian (the mean over its layers).

    Weights go in :func:`onnxopt.passes.gptq.hessian_groups` (one calibration sweep per group of at most 1 GiB of
    float64 Hessians), so a large model never holds every Hessian at once.
    """
    if ctx.calibration is None:
        raise OnnxoptError(f"{PASS_NAME}: rounding=gptq needs calibration data (give --calib PATH)")
    view = ctx.view(model.graph)
    layers = find(view, ctx, options).layers
    by_weight: dict[str, list[Layer]] = {}
    for layer in layers:
        by_weight.setdefault(layer.weight, []).append(layer)
    if not by_weight:
        return {}
    shapes = {w: tuple(constant_tensor(view, w).dims) for w in by_weight}  # type: ignore[union-attr]
    rows = {w: shapes[w][1 if readers[0].trans else 0] for w, readers in by_weight.items()}  # K of the [K, N] weight
    costs = {w: 8 * k * k * len(by_weight[w]) for w, k in rows.items()}  # one Hessian per layer
    groups = hessian_groups(costs)
    out: dict[str, Quantized] = {}
    for group in groups:
        check_hessian_memory([costs[w] for w in group], PASS_NAME, model)
        request = [(layer.node, shapes[w]) for w in group for layer in by_weight[w]]
        per_layer = layer_hessians(model, request, ctx.calibration, batch_size=options.batch_size)
        for weight in group:
            parts = [per_layer[layer_key(layer.node)][0] for layer in by_weight[weight] if layer_key(layer.node) in per_layer]
            if parts:
                matrix = _weight_matrix(view, weight, by_weight[weight][0].trans)
                out[weight] = quantize_weight(matrix, options.per_channel, options.reduce_range, mean_hessian(parts), options.damp)
    nested = sum(1 for scope in ctx.scopes()[1:] for node in scope.graph.node if node.op_type in ("MatMul", "Gemm"))
    if nested:
        result.notes.append(f"{PASS_NAME}: rounding=gptq: layers inside subgraphs are rounded to nearest")
    sweeps = f" ({len(groups)} calibration sweeps)" if len(groups) > 1 else ""
    result.notes.append(f"{PASS_NAME}: gptq rounding of {len(out)} weight(s){sweeps}")
    return out


def _weight_matrix(view: GraphView, name: str, trans: bool) -> np.ndarray:
    """The float32 [K, N] weight ``name`` (transposed back when a Gemm reads it as B^T)."""
    array = numpy_helper.to_array(constant_tensor(view, name)).astype(np.float32)  # type: ignore[arg-type]
    return array.T if trans else array


# ----------------------------------------------------------------------------- shape stand-ins


def _dynamic_matmul_standin(node: NodeProto, static: StaticType) -> tuple[list[NodeProto], list] | None:
    """DynamicQuantizeMatMul: ``MatMul(A, P)`` with P a float [K, N] stand-in input (the int8 B's shape)."""
    b = static(node.input[1]) if len(node.input) > 1 else None
    if b is None or len(b[1]) != 2 or len(node.output) != 1:
        return None
    placeholder = f"{node.output[0]}__standin_weight"
    value = helper.make_tensor_value_info(placeholder, TensorProto.FLOAT, list(b[1]))
    return [helper.make_node("MatMul", [node.input[0], placeholder], [node.output[0]])], [value]


def _qattention_standin(node: NodeProto, static: StaticType) -> tuple[list[NodeProto], list] | None:
    """QAttention: a float [batch, seq, hidden] output, the hidden size a third of the packed weights' columns."""
    weights = static(node.input[1]) if len(node.input) > 1 else None
    source = node.input[0]
    if weights is None or len(weights[1]) != 2 or any(node.output[1:]):
        return None
    din, total = weights[1]
    out = node.output[0]
    placeholder = f"{out}__standin_weight"
    value = helper.make_tensor_value_info(placeholder, TensorProto.FLOAT, [din, total // 3])
    return [
        helper.make_node("Cast", [source], [f"{out}__standin_input"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", [f"{out}__standin_input", placeholder], [out]),
    ], [value]


register_standin(MS_DOMAIN, "DynamicQuantizeMatMul", _dynamic_matmul_standin)
register_standin(MS_DOMAIN, "QAttention", _qattention_standin)
