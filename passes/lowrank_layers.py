"""The layers ``lowrank`` may factorize: matching, shapes, and the params/FLOPs of a factorization.

A :class:`Layer` holds a node's weight as per-group [K, N] matrices (``Y = X @ M``; a convolution
per group through its im2col view); :func:`layer_cost` counts params and FLOPs (2 per
multiply-add) of the layer or of a :class:`Choice` of factorization, as onnxopt.analysis does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, numpy_helper

from onnxopt.graph import GraphView, is_standard, node_label, opset_version
from onnxopt.passbase import (
    PassContext,
    matches_pattern,
)
from onnxopt.passes.fusion_support import unique
from onnxopt.passes.layer_skip import LayerSkipped as Skip
from onnxopt.passes.layer_skip import require_layer as _require
from onnxopt.passes.noop_rules import constant_tensor, get_attr
from onnxopt.shapes import static_shape

if TYPE_CHECKING:
    from onnxopt.passes.lowrank import LowRankOptions

log = logging.getLogger("onnxopt")

PASS_NAME = "lowrank"
WEIGHT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
GEMM_OPTIONAL_C_OPSET = 11  # Gemm's C is optional from opset 11
INWARD = "_in"  # method suffix: a k x k conv factorized 1x1 first (see Choice)

# count keys of the layers left alone (counted without marking the model modified)
EXCLUDED, SMALL, SHARED = "layers_excluded", "layers_small", "weights_shared"
SUBGRAPH, DEPTHWISE, UNSUPPORTED = "layers_in_subgraph", "layers_depthwise", "layers_unsupported"


# ----------------------------------------------------------------------------- layers and costs


@dataclass
class Layer:
    """One factorizable node: its weight as per-group [K, N] matrices and the sizes its FLOPs scale with.

    ``rows_out`` is the number of output rows (MatMul/Gemm) or batch * output positions (Conv);
    ``rows_in`` is batch * input positions (Conv); None where shapes are unknown.
    """

    node: NodeProto
    index: int
    weight: str
    tensor: TensorProto
    constant_node: NodeProto | None
    matrices: np.ndarray
    kernel: tuple[int, ...] = ()
    rows_out: int | None = None
    rows_in: int | None = None
    stride: int = 1

    @property
    def key(self) -> str:
        """A unique name for budgets and notes."""
        return f"{self.index}:{self.node.name or self.node.output[0]}"

    @property
    def groups(self) -> int:
        """Conv groups (1 for MatMul/Gemm)."""
        return int(self.matrices.shape[0])

    @property
    def k(self) -> int:
        """Input features per group."""
        return int(self.matrices.shape[1])

    @property
    def n(self) -> int:
        """Outputs per group."""
        return int(self.matrices.shape[2])

    @property
    def cin(self) -> int:
        """Input channels (Conv) or features."""
        return self.k * self.groups // max(1, math.prod(self.kernel))

    @property
    def cout(self) -> int:
        """Output channels or features."""
        return self.n * self.groups

    @property
    def dtype(self) -> type:
        """numpy type of the weight."""
        return WEIGHT_TYPES[self.tensor.data_type]

    @property
    def tucker_ok(self) -> bool:
        """A one-group conv with a kernel larger than 1x1."""
        return self.node.op_type == "Conv" and self.groups == 1 and math.prod(self.kernel) > 1

    @property
    def taps(self) -> int:
        """Kernel positions (1 for MatMul/Gemm)."""
        return max(1, math.prod(self.kernel))

    @property
    def description(self) -> str:
        """``MatMul 384x1536`` or ``Conv 64x64x3x3``."""
        return f"{self.node.op_type} {'x'.join(str(d) for d in self.tensor.dims)}"


@dataclass(frozen=True)
class Choice:
    """How one layer is factorized: ``svd``/``asvd`` with ``ranks = (r,)`` or ``tucker2`` with ``(r_in, r_out)``.

    ``svd_in``/``asvd_in`` (k x k one-group convs): the 1x1 conv (Cin -> r) comes first, then the
    k x k conv (r -> Cout); ``svd``/``asvd`` put the k x k conv (Cin -> r) first.
    """

    method: str
    ranks: tuple[int, ...]

    @property
    def inward(self) -> bool:
        """Whether the 1x1 conv comes first (``svd_in``/``asvd_in``)."""
        return self.method.endswith(INWARD)

    def describe(self) -> str:
        """``asvd rank 96``, ``asvd rank 40, 1x1 first`` or ``tucker2 ranks 32/48``."""
        if self.method == "tucker2":
            return f"tucker2 ranks {self.ranks[0]}/{self.ranks[1]}"
        if self.inward:
            return f"{self.method.removesuffix(INWARD)} rank {self.ranks[0]}, 1x1 first"
        return f"{self.method} rank {self.ranks[0]}"


@dataclass(frozen=True)
class Cost:
    """Weight parameters and FLOPs (None when shapes are unknown) of a layer or of its factorization."""

    params: int
    flops: int | None


def layer_cost(layer: Layer, choice: Choice | None = None, *, proxy: bool = False) -> Cost:
    """Parameters and FLOPs (2 per multiply-add, as :func:`onnxopt.analysis.node_flops`) of ``layer``, or of its factorization.

    ``proxy`` replaces unknown row counts by 1 output row (and ``stride`` input rows), which keeps
    ratios between costs right for MatMul/Gemm and SVD convs and close for Tucker-2.
    """
    rows_out, rows_in = layer.rows_out, layer.rows_in
    if proxy and rows_out is None:
        rows_out, rows_in = 1, layer.stride
    g, k, n = layer.groups, layer.k, layer.n
    if choice is None:
        params = g * k * n
        return Cost(params, None if rows_out is None else 2 * rows_out * params)
    if choice.method == "tucker2":
        r_in, r_out = choice.ranks
        taps = math.prod(layer.kernel)
        params = r_in * layer.cin + r_out * r_in * taps + layer.cout * r_out
        flops = None
        if rows_out is not None and rows_in is not None:
            flops = 2 * (rows_in * r_in * layer.cin + rows_out * (r_out * r_in * taps + layer.cout * r_out))
        return Cost(params, flops)
    if choice.inward:
        rank, taps = choice.ranks[0], layer.taps
        flops = None if rows_out is None or rows_in is None else 2 * rank * (rows_in * layer.cin + rows_out * taps * layer.cout)
        return Cost(rank * (layer.cin + taps * layer.cout), flops)
    params = g * choice.ranks[0] * (k + n)
    return Cost(params, None if rows_out is None else 2 * rows_out * params)


def full_rank(layer: Layer, method: str) -> int:
    """The largest rank of an SVD factorization (1x1 first: of the [Cin, Cout * taps] matrix)."""
    if method.endswith(INWARD):
        return min(layer.cin, layer.taps * layer.cout)
    return min(layer.k, layer.n)


def cost_value(cost: Cost, by: str) -> float:
    """The figure a ratio target counts."""
    return float(cost.params if by == "params" or cost.flops is None else cost.flops)


def saves_enough(layer: Layer, choice: Choice, min_saving: float) -> bool:
    """Whether the factorization's params and (proxy) FLOPs are at least ``min_saving`` below the layer's."""
    before, after = layer_cost(layer, proxy=True), layer_cost(layer, choice, proxy=True)
    keep = 1 - min_saving
    return after.params <= keep * before.params and (after.flops or 0) <= keep * (before.flops or 0)


# ----------------------------------------------------------------------------- matching


def weight_matrices(node: NodeProto, array: np.ndarray) -> np.ndarray:
    """The weight as per-group [K, N] matrices in float64 (``Y_g = X_g @ M_g``)."""
    w = np.asarray(array, dtype=np.float64)
    if node.op_type == "MatMul":
        return w[None]
    if node.op_type == "Gemm":
        return (w.T if int(get_attr(node, "transB", 0)) else w)[None]  # type: ignore[call-overload]
    groups = int(get_attr(node, "group", 1))  # type: ignore[call-overload]
    per_group = w.shape[0] // groups
    return np.stack([w[g * per_group : (g + 1) * per_group].reshape(per_group, -1).T for g in range(groups)])


def _numel(shape: tuple[int, ...] | None) -> int | None:
    return None if shape is None else math.prod(shape)


def _rows(node: NodeProto, types: dict, channels_out: int, channels_in: int) -> tuple[int | None, int | None]:
    """Output rows (and Conv input rows) from inferred static shapes."""
    out = _numel(static_shape(types.get(node.output[0])))
    if node.op_type != "Conv":
        return (None if out is None else out // channels_out), None
    inp = _numel(static_shape(types.get(node.input[0])))
    return (None if out is None else out // channels_out), (None if inp is None else inp // channels_in)


def match_layer(node: NodeProto, index: int, view: GraphView, model: ModelProto, options: LowRankOptions) -> Layer:
    """The node as a :class:`Layer` when its weight may be factorized; :class:`Skip` with the reason otherwise."""
    name = node.input[1]
    tensor = constant_tensor(view, name)
    _require(tensor is not None, UNSUPPORTED, "the weight is not a constant of the graph (or is an overridable graph input)")
    _require(name not in view.graph_outputs, UNSUPPORTED, "the weight is a graph output")
    _require(tensor.data_type in WEIGHT_TYPES, UNSUPPORTED, "the weight is not float or float16")  # type: ignore[union-attr]
    readers = unique(view.consumers.get(name, []))
    _require(len(readers) == 1 and list(node.input).count(name) == 1, SHARED, "the weight is read by several nodes or inputs")
    names = [n for n in (node.name, name) if n]
    _require(not any(matches_pattern(n, options.exclude) for n in names), EXCLUDED, "excluded by name")
    dims = tuple(int(d) for d in tensor.dims)  # type: ignore[union-attr]
    _require(math.prod(dims) >= options.min_size, SMALL, f"smaller than min_size={options.min_size}")
    kernel: tuple[int, ...] = ()
    stride = 1
    if node.op_type == "Conv":
        _require(len(dims) >= 3, UNSUPPORTED, f"a conv weight of rank {len(dims)}")
        groups = int(get_attr(node, "group", 1))  # type: ignore[call-overload]
        _require(groups >= 1 and dims[0] % groups == 0, UNSUPPORTED, "bad group attribute")
        _require(groups == 1 or dims[1] > 1, DEPTHWISE, "depthwise (one input channel per group)")
        kernel = dims[2:]
        stride = math.prod(int(s) for s in (get_attr(node, "strides", None) or [1]))  # type: ignore[union-attr]
    else:
        _require(len(dims) == 2, UNSUPPORTED, f"a weight of rank {len(dims)}")
        if node.op_type == "Gemm" and int(get_attr(node, "transA", 0)):  # type: ignore[call-overload]
            version = opset_version(model) or 1
            _require(version >= GEMM_OPTIONAL_C_OPSET, UNSUPPORTED, f"a Gemm with transA=1 at opset {version} < 11")
    matrices = weight_matrices(node, numpy_helper.to_array(tensor))  # type: ignore[arg-type]
    producer = view.producer.get(name)
    constant_node = producer if producer is not None and producer.op_type == "Constant" else None
    return Layer(node, index, name, tensor, constant_node, matrices, kernel, stride=stride)  # type: ignore[arg-type]


@dataclass
class Survey:
    """The candidate layers of the main graph and the layers left alone, as (kind, "label: reason")."""

    layers: list[Layer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def survey(model: ModelProto, view: GraphView, options: LowRankOptions, subgraph_layers: int) -> Survey:
    """Match every node of ``ops`` in the main graph; count those of subgraphs as skipped."""
    found = Survey()
    found.skipped.extend((SUBGRAPH, "a node inside an If/Loop/Scan body") for _ in range(subgraph_layers))
    for index, node in enumerate(view.nodes):
        if not is_standard(node) or node.op_type not in options.ops or len(node.input) < 2 or not node.input[1]:
            continue
        if constant_tensor(view, node.input[1]) is None and node.input[1] not in view.initializers:
            continue  # an activation times an activation (attention scores): not a weight
        try:
            found.layers.append(match_layer(node, index, view, model, options))
        except Skip as exc:
            log.debug("%s: %s left alone: %s", PASS_NAME, node_label(node), exc.reason)
            found.skipped.append((exc.kind, f"{node_label(node)}: {exc.reason}"))
    return found


def count_subgraph_layers(ctx: PassContext, options: LowRankOptions) -> int:
    """Nodes of ``ops`` inside If/Loop/Scan bodies (left alone)."""
    return sum(1 for scope in ctx.scopes()[1:] for node in scope.graph.node if is_standard(node) and node.op_type in options.ops)


def attach_rows(layers: list[Layer], types: dict) -> None:
    """Set each layer's row counts from inferred static shapes."""
    for layer in layers:
        layer.rows_out, layer.rows_in = _rows(layer.node, types, layer.cout, layer.cin)


def calibration_types(model: ModelProto, calibration) -> dict | None:
    """Types inferred with the graph inputs fixed to the first calibration sample's shapes (None if that fails)."""
    from onnxopt.shapes import infer_types

    try:
        batch = calibration.first_batch(1)
    except Exception:  # noqa: BLE001 - shapes are a nicety for the report and the flops budget
        return None
    copy = ModelProto()
    copy.CopyFrom(model)
    for value in copy.graph.input:
        array = batch.get(value.name)
        if array is None or value.type.WhichOneof("value") != "tensor_type":
            continue
        value.type.tensor_type.shape.Clear()
        for size in np.shape(array):
            value.type.tensor_type.shape.dim.add().dim_value = int(size)
    return infer_types(copy)
