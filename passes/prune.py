"""Magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights: unstructured, or N:M (2:4) sparsity.

Two modes:

* unstructured (``pattern=""``): the smallest-magnitude weights are set to zero, either
  ``sparsity`` of every layer (``scope=layer``) or one threshold over all eligible weights
  (``scope=global``) with a floor of ``min_density`` nonzeros per layer;
* N:M (``pattern="2:4"``): of every M consecutive weights along the layer's input-channel axis
  the N largest are kept; this is TensorRT's SPARSE_WEIGHTS layout (the axis is the one
  :func:`onnxopt.engine.build.sparse_weights` checks): Conv axis 1 of [Cout, Cin/g, k...],
  ConvTranspose axis 0 of [Cin, Cout/g, k...], MatMul axis -2 (K of [..., K, N]), Gemm axis 0 of
  B [K, N] (transB=0) or axis 1 of B [N, K] (transB=1).

Magnitude: single weights are ranked by |w| (L1 and L2 give the same order for single
elements, so ``criterion`` does not change the per-layer and N:M results). In global mode each
weight's score is |w| divided by its layer's mean |w| (``l1``: L1 norm / size) or by its RMS
(``l2``: L2 norm / sqrt(size)), so layers of different scales and sizes compete on equal terms.
Ties are broken by position (stable sorts), so the same model gives the same bytes.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from onnxopt.errors import OptionError
from onnxopt.graph import GraphScope, GraphView, is_standard, node_label, subgraphs
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, check_choices, check_patterns, matches_pattern, option
from onnxopt.passes.fusion_support import unique
from onnxopt.passes.layer_skip import LayerSkipped as Kept
from onnxopt.passes.layer_skip import require_layer as _require
from onnxopt.passes.noop_rules import get_attr
from onnxopt.registry import register_pass
from onnxopt.report import human_bytes

log = logging.getLogger("onnxopt")

PASS_NAME = "prune"
PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
WEIGHT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)
MAX_LAYER_NOTES = 20  # per-layer lines in the report; the rest are summarised
MAX_LISTED = 5  # layers named in one "left dense" note
GZIP_LEVEL = 6  # gzip's default level

# Counter keys of weights left dense, by reason (reported in counts without marking the model modified).
INELIGIBLE = "layers_ineligible"
EXCLUDED = "layers_excluded"
SMALL = "layers_small"
FIRST_LAST = "layers_first_last"
SHARED = "weights_shared_kept"
SUBGRAPH = "weights_read_in_subgraph"
DEQUANTIZED = "weights_dequantized"
OTHER = "weights_kept"


# ----------------------------------------------------------------------------- options


def parse_pattern(text: str) -> tuple[int, int] | None:
    """``"N:M"`` as (N, M) with 0 < N < M; ``""`` as None (unstructured); OptionError otherwise."""
    text = text.strip()
    if not text:
        return None
    parts = text.split(":")
    bad = OptionError(f"option 'pattern' of pass '{PASS_NAME}' must be N:M with integers 0 < N < M (e.g. 2:4), not '{text}'")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise bad
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise bad
    return n, m


@dataclass
class PruneOptions(PassOptions):
    """Options of :class:`Prune`."""

    sparsity: float = option(0.5, "unstructured: target fraction of zero weights, 0 <= sparsity < 1")
    criterion: Literal["l1", "l2"] = option("l1", "global scope: normalise |w| by the layer's mean |w| (l1) or RMS (l2)")
    scope: Literal["layer", "global"] = option("layer", "unstructured: sparsity per layer, or one threshold over all layers")
    min_density: float = option(0.05, "global scope: fraction of nonzeros every layer keeps at least")
    pattern: str = option("", "N:M (e.g. 2:4): keep N of every M weights along the input-channel axis; empty: unstructured")
    exclude: tuple[str, ...] = option((), "node or weight names (exact, or a regex matching all of it) kept dense, '|'-separated")
    ops: tuple[str, ...] = option(PRUNABLE_OPS, "op types to prune, '|'-separated (Conv, ConvTranspose, Gemm, MatMul)")
    min_size: int = option(1024, "weights with fewer elements stay dense")
    keep_first_last: bool = option(False, "keep the first and last prunable layers of the main graph dense")

    def validate(self) -> None:
        """Check ranges, the pattern, the op types and the exclusion patterns."""
        where = f"pass '{PASS_NAME}'"
        if not 0 <= self.sparsity < 1:
            raise OptionError(f"option 'sparsity' of {where} must be in [0, 1), not {self.sparsity}")
        if not 0 <= self.min_density <= 1:
            raise OptionError(f"option 'min_density' of {where} must be in [0, 1], not {self.min_density}")
        if self.min_size < 0:
            raise OptionError(f"option 'min_size' of {where} must not be negative, not {self.min_size}")
        if parse_pattern(self.pattern) is not None and self.scope == "global":
            raise OptionError(f"option 'scope' of {where}: global applies to unstructured pruning only, not to pattern={self.pattern}")
        if not self.ops:
            raise OptionError(f"option 'ops' of {where} names no op type")
        check_choices(PASS_NAME, "ops", self.ops, PRUNABLE_OPS, "op type")
        check_patterns(PASS_NAME, "exclude", self.exclude)

    @property
    def n_m(self) -> tuple[int, int] | None:
        """The N:M pattern, or None for unstructured pruning."""
        return parse_pattern(self.pattern)


# ----------------------------------------------------------------------------- numpy masks


def smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Mask of the ``count`` smallest of a flat array, ties broken by lower index (same as a stable sort, in O(n))."""
    mask = np.zeros(values.size, bool)
    if count <= 0:
        return mask
    if count >= values.size:
        mask[:] = True
        return mask
    threshold = np.partition(values, count - 1)[count - 1]
    below = values < threshold
    mask |= below
    ties = np.flatnonzero(values == threshold)[: count - int(np.count_nonzero(below))]
    mask[ties] = True
    return mask


def magnitude_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask zeroing the ``round(sparsity * size)`` smallest |w| (ties: lower index first)."""
    flat = np.abs(weight.astype(np.float32)).ravel()
    return ~smallest(flat, int(round(sparsity * flat.size))).reshape(weight.shape)


def n_m_mask(weight: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Keep-mask holding the N largest |w| of every M consecutive weights along ``axis`` (its extent a multiple of M)."""
    moved = np.moveaxis(np.abs(weight.astype(np.float32)), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    order = np.argsort(groups, axis=-1, kind="stable")
    keep = np.ones(groups.shape, bool)
    np.put_along_axis(keep, order[..., : m - n], False, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def layer_scores(weight: np.ndarray, criterion: str) -> np.ndarray:
    """|w| divided by the layer's mean |w| (l1) or RMS (l2), flattened, as float32."""
    magnitude = np.abs(weight.astype(np.float32)).ravel()
    if criterion == "l2":
        scale = math.sqrt(float(np.mean(np.square(magnitude, dtype=np.float64)))) if magnitude.size else 0.0
    else:
        scale = float(np.mean(magnitude, dtype=np.float64)) if magnitude.size else 0.0
    return magnitude / np.float32(scale if scale > 0 and math.isfinite(scale) else 1.0)


def global_masks(weights: list[np.ndarray], sparsity: float, criterion: str, min_density: float) -> list[np.ndarray]:
    """Keep-masks zeroing ``round(sparsity * total)`` weights of lowest normalised score, each layer keeping ``min_density``.

    Each layer offers its ``size - ceil(min_density * size)`` lowest-scored weights; the lowest
    scores among all offers are zeroed (ties: earlier layer, then lower index), so no layer drops
    below its floor and the choice is the best one under the floors.
    """
    offers, scores = [], []
    for weight in weights:
        score = layer_scores(weight, criterion)
        cap = score.size - min(score.size, math.ceil(min_density * score.size - 1e-9))
        offer = np.flatnonzero(smallest(score, cap))
        offers.append(offer)
        scores.append(score[offer])
    zeros = int(round(sparsity * sum(w.size for w in weights)))
    chosen = smallest(np.concatenate(scores) if scores else np.empty(0, np.float32), zeros)
    masks, start = [], 0
    for weight, offer in zip(weights, offers):
        keep = np.ones(weight.size, bool)
        keep[offer[chosen[start : start + offer.size]]] = False
        start += offer.size
        masks.append(keep.reshape(weight.shape))
    return masks


# ----------------------------------------------------------------------------- matching


@dataclass
class Layer:
    """One prunable weight: its tensor (an initializer, or a Constant node's value) and the nodes reading it."""

    name: str
    tensor: TensorProto
    readers: list[NodeProto]
    axis: int  # input-channel axis, where N:M groups run
    constant_node: NodeProto | None = None
    graph_name: str = ""
    scope_index: int = 0  # position of its graph in the model's scopes

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.tensor.dims, dtype=np.int64))

    @property
    def label(self) -> str:
        """``'node' (Op) weight 'W' [dims]`` for notes."""
        shape = "x".join(str(d) for d in self.tensor.dims)
        where = f" in graph '{self.graph_name}'" if self.graph_name else ""
        return f"{node_label(self.readers[0])} weight '{self.name}' [{shape}]{where}"

    def array(self) -> np.ndarray:
        """The weight as numpy (its own dtype)."""
        return numpy_helper.to_array(self.tensor)

    def write(self, array: np.ndarray) -> None:
        """Replace the weight's data by ``array`` (same dtype and shape), keeping its name and doc string."""
        replacement = numpy_helper.from_array(array, self.tensor.name)
        replacement.doc_string = self.tensor.doc_string
        self.tensor.CopyFrom(replacement)


def input_channel_axis(node: NodeProto, rank: int) -> int:
    """The (non-negative) input-channel axis of a Conv/ConvTranspose/MatMul/Gemm weight of ``rank``."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "MatMul":
        return rank - 2
    return 1 if int(get_attr(node, "transB", 0)) else 0  # type: ignore[call-overload]


def n_m_ineligible(node: NodeProto, dims: list[int], m: int) -> str | None:
    """Why TensorRT cannot run ``node``'s weight (of ``dims``) as N:M sparse, or None when it can."""
    if len(dims) < 2:
        return f"rank {len(dims)} weight"
    axis = input_channel_axis(node, len(dims))
    extent = dims[axis]
    group = int(get_attr(node, "group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1  # type: ignore[call-overload]
    per_group = extent if node.op_type == "Conv" else extent // max(group, 1)
    if group > 1 and per_group == 1:
        return "depthwise"
    if group > 1 and per_group < m:
        return f"grouped with {per_group} input channels per group (< {m})"
    if per_group % m or extent % m:
        return f"input channels {per_group}{' per group' if group > 1 else ''} not a multiple of {m}"
    return None


def weight_tensor(view: GraphView, name: str) -> tuple[TensorProto, NodeProto | None] | None:
    """The live TensorProto of a constant weight (an initializer, or a Constant's ``value``) and its Constant node, or None."""
    if view.is_constant(name):
        return view.initializers[name], None
    producer = view.producer.get(name)
    if producer is not None and producer.op_type == "Constant" and is_standard(producer):
        attr = producer.attribute[0] if len(producer.attribute) == 1 else None
        if attr is not None and attr.name == "value" and attr.HasField("t"):
            return attr.t, producer
    return None


def match_layer(name: str, view: GraphView, options: PruneOptions, dense: set[str], graph_name: str) -> Layer:
    """The weight ``name`` as a :class:`Layer` when every reader lets it be pruned; :class:`Kept` with the reason otherwise."""
    found = weight_tensor(view, name)
    _require(name not in view.graph_inputs, OTHER, "an initializer that is also a graph input (can be overridden)")
    _require(found is not None, OTHER, "not a constant with a dense value")
    tensor, constant_node = found  # type: ignore[misc]
    _require(tensor.data_location != TensorProto.EXTERNAL, OTHER, "external data not loaded")
    _require(name not in view.graph_outputs, OTHER, "the weight is a graph output")
    _require(tensor.data_type in WEIGHT_TYPES, OTHER, "not float or float16")
    readers = unique(view.consumers.get(name, []))
    _require(not any(subgraphs(r) for r in readers), SUBGRAPH, "also read inside a subgraph")
    wanted = [r for r in readers if is_standard(r) and r.op_type in options.ops and list(r.input).count(name) == 1 and r.input[1] == name]
    if not wanted:
        raise Kept(EXCLUDED, f"op type not in ops={'|'.join(options.ops)}")
    _require(len(wanted) == len(readers), SHARED, "shared with a node that is not pruned (another op, or another input)")
    names = [name] + [r.name for r in readers if r.name]
    _require(not any(matches_pattern(n, options.exclude) for n in names), EXCLUDED, "excluded by name")
    _require(name not in dense, FIRST_LAST, "first or last prunable layer (keep_first_last)")
    dims = list(tensor.dims)
    _require(int(np.prod(dims, dtype=np.int64)) >= options.min_size, SMALL, f"smaller than min_size={options.min_size}")
    axes = {input_channel_axis(r, len(dims)) for r in readers}
    pattern = options.n_m
    if pattern is not None:
        _require(len(axes) == 1, SHARED, "shared by nodes whose input-channel axes differ")
        for reader in readers:
            reason = n_m_ineligible(reader, dims, pattern[1])
            _require(reason is None, INELIGIBLE, str(reason))
    return Layer(name, tensor, readers, min(axes), constant_node, graph_name)


def first_last_weights(view: GraphView, options: PruneOptions) -> set[str]:
    """Weight names of the first and last nodes of ``view`` whose op is pruned and whose weight is a float constant."""
    names = []
    for node in view.nodes:
        if is_standard(node) and node.op_type in options.ops and len(node.input) > 1:
            found = weight_tensor(view, node.input[1])
            if found is not None and found[0].data_type in WEIGHT_TYPES:
                names.append(node.input[1])
    return {names[0], names[-1]} if names else set()


def find_layers(view: GraphView, options: PruneOptions, dense: set[str], graph_name: str) -> tuple[list[Layer], list[tuple[str, str]]]:
    """Prunable layers of one graph in order of their first reader, and (kind, "label: reason") of weights left dense."""
    seen: set[str] = set()
    layers: list[Layer] = []
    kept: list[tuple[str, str]] = []
    for node in view.nodes:
        if not is_standard(node) or node.op_type not in PRUNABLE_OPS or len(node.input) < 2 or not node.input[1]:
            continue
        name = node.input[1]
        if name in seen:
            continue
        seen.add(name)
        producer = view.producer.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            kept.append((DEQUANTIZED, f"{node_label(node)} weight '{name}': read through a DequantizeLinear"))
            continue
        if name not in view.initializers and (producer is None or producer.op_type != "Constant"):
            continue  # an activation, or a value of an enclosing graph (its own graph sees the subgraph read)
        try:
            layers.append(match_layer(name, view, options, dense, graph_name))
        except Kept as exc:
            log.debug("%s: weight '%s' of %s left dense: %s", PASS_NAME, name, node_label(node), exc.reason)
            kept.append((exc.kind, f"{node_label(node)} weight '{name}': {exc.reason}"))
    return layers, kept


# ----------------------------------------------------------------------------- report helpers


def gzip_size(tensor: TensorProto) -> int:
    """Bytes of the serialized tensor after zlib (gzip's deflate) at gzip's default level."""
    return len(zlib.compress(tensor.SerializeToString(), GZIP_LEVEL))


def gzip_sizes(tensors: list[TensorProto]) -> list[int]:
    """:func:`gzip_size` of every tensor, compressed in threads (zlib releases the GIL)."""
    workers = min(len(tensors), os.cpu_count() or 1)
    if workers <= 1:
        return [gzip_size(t) for t in tensors]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(gzip_size, tensors))


def other_weights(scopes: list[GraphScope], layers: list[Layer]) -> list[TensorProto]:
    """Every initializer of every graph that is not one of ``layers``."""
    own = {(layer.scope_index, layer.name) for layer in layers if layer.constant_node is None}
    return [t for index, scope in enumerate(scopes) for t in scope.graph.initializer if (index, t.name) not in own]


@dataclass
class Outcome:
    """What pruning did to one layer: its zeros before and after."""

    layer: Layer
    zeros_before: int
    zeros_after: int


@dataclass
class Plan:
    """The layers of every graph and the weights left dense, by count key."""

    layers: list[Layer] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- the pass


@register_pass
class Prune(Pass):
    """Magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights: unstructured (per layer or global) or N:M such as 2:4.

    Pre: none. Matched: a float or float16 constant weight (an initializer that is not a graph
    input, or a Constant node; not a graph output) read as input 1 (W, or Gemm's B) by standard
    nodes whose op types are in ``ops``, with at least ``min_size`` elements and no name (weight
    or reader) matching ``exclude``. Left dense and counted: a weight read through a
    DequantizeLinear (``weights_dequantized``), one shared with any other reader (another op, a
    different input, or a node whose subgraph reads it: ``weights_shared_kept`` /
    ``weights_read_in_subgraph``), excluded ones (``layers_excluded``), small ones
    (``layers_small``) and, for N:M, layers TensorRT cannot run sparse (``layers_ineligible``:
    input-channel extent not a multiple of M, depthwise, grouped with fewer than M channels per
    group, rank < 2). Weights of If/Loop/Scan bodies are pruned in their own graph; an outer
    weight read inside a body is treated as shared and left dense. ``keep_first_last`` keeps the
    first and last prunable layers of the main graph (in node order) dense; it is off by default
    because N:M already skips the usual 3-channel stem and post-training pruning is meant to be
    judged (and fine-tuned) by the user.

    Unstructured: ``scope=layer`` zeroes ``round(sparsity * size)`` smallest |w| of each layer;
    ``scope=global`` zeroes ``round(sparsity * total)`` weights of lowest |w| / (layer mean |w|
    for l1, layer RMS for l2) over all layers, every layer keeping ``min_density`` of its
    weights. N:M keeps the N largest |w| of every M consecutive weights along the input-channel
    axis (TensorRT SPARSE_WEIGHTS; ``sparsity``, ``scope`` and ``min_density`` do not apply).

    Post: names, dtypes and shapes are unchanged (types preserved); outputs differ by the
    pruning error (judge with a metric). Notes give each layer's sparsity (up to 20 lines), the
    total, and the gzip size of the model's weights before and after. The same model and options
    give the same bytes.
    """

    name = PASS_NAME
    lossy = True
    tolerance = "pruned"
    Options = PruneOptions

    def run(self, model: ModelProto, ctx: PassContext) -> PassResult:
        """Find the layers of every graph, compute the masks, write the pruned weights and report."""
        options: PruneOptions = self.options  # type: ignore[assignment]
        result = PassResult()
        scopes = ctx.scopes()
        plan = self._plan(scopes, ctx, options)
        for kind, _ in plan.kept:
            result.counts[kind] += 1  # kept weights are counted without marking the model modified
        if not plan.layers:
            self._note_kept(plan.kept, result)
            return result
        layer_sizes = gzip_sizes([layer.tensor for layer in plan.layers])
        before = sum(gzip_sizes(other_weights(scopes, plan.layers))) + sum(layer_sizes)
        outcomes = self._apply(plan.layers, options, result)
        changed = [(o.layer.tensor, size) for o, size in zip(outcomes, layer_sizes) if o.zeros_after > o.zeros_before]
        after = before + sum(new - old for (_, old), new in zip(changed, gzip_sizes([t for t, _ in changed])))
        self._report(outcomes, before, after, options, result)
        self._note_kept(plan.kept, result)
        return result

    def _plan(self, scopes: list[GraphScope], ctx: PassContext, options: PruneOptions) -> Plan:
        plan = Plan()
        dense = first_last_weights(ctx.view(scopes[0].graph), options) if options.keep_first_last else set()
        for index, scope in enumerate(scopes):
            view = ctx.view(scope.graph)
            layers, kept = find_layers(view, options, dense if index == 0 else set(), _graph_name(scope.graph) if index else "")
            for layer in layers:
                layer.scope_index = index
            plan.layers.extend(layers)
            plan.kept.extend(kept)
        return plan

    def _apply(self, layers: list[Layer], options: PruneOptions, result: PassResult) -> list[Outcome]:
        """Compute every layer's keep-mask, write the changed weights, and return what each layer became."""
        arrays = [layer.array() for layer in layers]
        pattern = options.n_m
        if pattern is not None:
            masks = [n_m_mask(a, layer.axis, *pattern) for a, layer in zip(arrays, layers)]
        elif options.scope == "global":
            masks = global_masks(arrays, options.sparsity, options.criterion, options.min_density)
        else:
            masks = [magnitude_mask(a, options.sparsity) for a in arrays]
        outcomes = []
        for layer, array, keep in zip(layers, arrays, masks):
            pruned = np.where(keep, array, np.zeros((), array.dtype)).astype(array.dtype)
            outcome = Outcome(layer, int(array.size - np.count_nonzero(array)), int(pruned.size - np.count_nonzero(pruned)))
            if outcome.zeros_after > outcome.zeros_before:
                layer.write(pruned)
                result.count("layers_pruned")
                result.count("weights_zeroed", outcome.zeros_after - outcome.zeros_before)
            outcomes.append(outcome)
        return outcomes

    def _report(self, outcomes: list[Outcome], before: int, after: int, options: PruneOptions, result: PassResult) -> None:
        how = f"{options.pattern} along the input-channel axis" if options.n_m else f"{options.scope} scope, {options.criterion}"
        for outcome in outcomes[:MAX_LAYER_NOTES]:
            size = outcome.layer.size
            result.notes.append(
                f"{PASS_NAME}: {outcome.layer.label}: {outcome.zeros_after}/{size} zero ({100 * outcome.zeros_after / max(size, 1):.1f}%)"
            )
        if len(outcomes) > MAX_LAYER_NOTES:
            result.notes.append(f"{PASS_NAME}: ... and {len(outcomes) - MAX_LAYER_NOTES} more layer(s)")
        zeros = sum(o.zeros_after for o in outcomes)
        total = sum(o.layer.size for o in outcomes)
        newly = sum(o.zeros_after - o.zeros_before for o in outcomes)
        result.notes.append(
            f"{PASS_NAME}: {len(outcomes)} layer(s) ({how}): {zeros}/{total} weights zero ({100 * zeros / max(total, 1):.1f}%), "
            f"{newly} newly zeroed"
        )
        result.notes.append(f"{PASS_NAME}: gzip size of weights {human_bytes(before)} -> {human_bytes(after)}")

    def _note_kept(self, kept: list[tuple[str, str]], result: PassResult) -> None:
        """One note per reason kind: how many weights were left dense and the first few of them."""
        by_kind: dict[str, list[str]] = {}
        for kind, text in kept:
            by_kind.setdefault(kind, []).append(text)
        for kind in sorted(by_kind):
            items = by_kind[kind]
            listed = "; ".join(items[:MAX_LISTED]) + (f"; ... {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
            result.notes.append(f"{PASS_NAME}: {len(items)} weight(s) left dense ({kind}): {listed}")


def _graph_name(graph: GraphProto) -> str:
    return graph.name or "<subgraph>"
