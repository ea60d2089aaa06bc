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
from onnx import ModelProto, NodeProto, TensorProto, TypeProto, helper, numpy_helper

from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import GraphView, NameGenerator, is_standard, node_label, opset_version
from onnxopt.passbase import (
    Pass,
    PassContext,
    PassOptions,
    PassResult,
    Requirement,
    check_choices,
    check_patterns,
    matches_pattern,
    option,
)
from onnxopt.passes.fusion_support import replace_nodes, unique
from onnxopt.passes.layer_skip import LayerSkipped as Skip
from onnxopt.passes.layer_skip import require_layer as _require
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
from onnxopt.passes.noop_rules import constant_tensor, get_attr
from onnxopt.registry import register_pass
from onnxopt.shapes import static_shape

log = logging.getLogger("onnxopt")

PASS_NAME = "lowrank"
LAYER_OPS = ("Conv", "Gemm", "MatMul")
WEIGHT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
DEFAULT_ENERGY = 0.95  # the rule when none of energy / rank / ratio is given
SCAN_KEEP = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8)  # kept cost fractions every layer is scored at in the ratio scan
CALIB_BATCH = 8
MAX_LAYER_NOTES = 20
MAX_LISTED = 5
GEMM_OPTIONAL_C_OPSET = 11  # Gemm's C is optional from opset 11
INWARD = "_in"  # method suffix: a k x k conv factorized 1x1 first (see Choice)

# count keys: what was done, and why layers were left alone (counted without marking the model modified)
FACTORIZED, PARAMS_REMOVED, FLOPS_REMOVED = "layers_factorized", "params_removed", "flops_removed"
EXCLUDED, SMALL, NO_SAVING, SHARED = "layers_excluded", "layers_small", "layers_no_saving", "weights_shared"
SUBGRAPH, DEPTHWISE, UNSUPPORTED = "layers_in_subgraph", "layers_depthwise", "layers_unsupported"


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


# ----------------------------------------------------------------------------- factorizations


@dataclass
class Factorized:
    """The emitted weights of one layer (float64) and the energy they keep."""

    choice: Choice
    arrays: list[np.ndarray]
    energy: float


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


# ----------------------------------------------------------------------------- rewriting


@dataclass
class Emission:
    """What one layer's rewrite adds: nodes replacing the original, new weights, new intermediates (name, type)."""

    nodes: list[NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    intermediates: list[tuple[str, TypeProto | None]] = field(default_factory=list)


def _with_dim(type_proto: TypeProto | None, axis: int, size: int) -> TypeProto | None:
    """A copy of a tensor type with one dim set to ``size`` (None when the rank is unknown)."""
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    copy = TypeProto()
    copy.CopyFrom(type_proto)
    dims = copy.tensor_type.shape.dim
    if not len(dims):
        return None
    dims[axis].Clear()
    dims[axis].dim_value = size
    return copy


def _conv_attrs(node: NodeProto, *, pointwise: bool, groups: int = 1) -> dict:
    """The conv's attributes for a factor: all of them (group replaced) or those of a 1x1 conv."""
    if pointwise:
        attrs: dict = {"group": groups} if groups > 1 else {}
        kernel = get_attr(node, "kernel_shape", None)
        if kernel is not None:
            attrs["kernel_shape"] = [1] * len(kernel)  # type: ignore[arg-type]
        return attrs
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
    if groups > 1:
        attrs["group"] = groups
    return attrs


def emit(layer: Layer, factorized: Factorized, names: NameGenerator, types: dict) -> Emission:
    """The nodes and weights replacing ``layer``: the last node writes the original output."""
    node = layer.node
    base = node.name or node.output[0]
    out = Emission()
    weights = []
    for index, array in enumerate(factorized.arrays):
        name = names.fresh(f"{layer.weight}_lr{index}")
        out.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array.astype(layer.dtype)), name))
        weights.append(name)
    hidden = [names.fresh(f"{node.output[0]}_lr{i}") for i in range(len(weights) - 1)]
    node_names = [names.fresh(f"{base}_lr{i}") for i in range(len(weights))]
    rank = factorized.choice.ranks
    if node.op_type == "Conv":
        _emit_conv(layer, factorized.choice, weights, hidden, node_names, out)
        if factorized.choice.inward:
            out.intermediates = [(hidden[0], _with_dim(types.get(node.input[0]), 1, rank[0]))]
        elif factorized.choice.method == "tucker2":
            out.intermediates = [
                (hidden[0], _with_dim(types.get(node.input[0]), 1, rank[0])),
                (hidden[1], _with_dim(types.get(node.output[0]), 1, rank[1])),
            ]
        else:
            out.intermediates = [(hidden[0], _with_dim(types.get(node.output[0]), 1, rank[0] * layer.groups))]
        return out
    trans_a = node.op_type == "Gemm" and int(get_attr(node, "transA", 0))  # type: ignore[call-overload]
    if trans_a:
        first = helper.make_node("Gemm", [node.input[0], weights[0]], [hidden[0]], name=node_names[0], transA=1)
    else:
        first = helper.make_node("MatMul", [node.input[0], weights[0]], [hidden[0]], name=node_names[0])
    second = NodeProto()
    second.CopyFrom(node)
    second.name = node_names[1]
    second.input[0], second.input[1] = hidden[0], weights[1]
    if trans_a:
        kept = [a for a in second.attribute if a.name != "transA"]
        del second.attribute[:]
        second.attribute.extend(kept)
    out.nodes = [first, second]
    out.intermediates = [(hidden[0], _with_dim(types.get(node.output[0]), -1, rank[0]))]
    return out


def _emit_conv(layer: Layer, choice: Choice, weights: list[str], hidden: list[str], node_names: list[str], out: Emission) -> None:
    node = layer.node
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    if choice.method == "tucker2":
        out.nodes = [
            helper.make_node("Conv", [node.input[0], weights[0]], [hidden[0]], name=node_names[0], **_conv_attrs(node, pointwise=True)),
            helper.make_node("Conv", [hidden[0], weights[1]], [hidden[1]], name=node_names[1], **_conv_attrs(node, pointwise=False)),
            helper.make_node(
                "Conv", [hidden[1], weights[2], *bias], [node.output[0]], name=node_names[2], **_conv_attrs(node, pointwise=True)
            ),
        ]
        return
    if choice.inward:
        out.nodes = [
            helper.make_node("Conv", [node.input[0], weights[0]], [hidden[0]], name=node_names[0], **_conv_attrs(node, pointwise=True)),
            helper.make_node(
                "Conv", [hidden[0], weights[1], *bias], [node.output[0]], name=node_names[1], **_conv_attrs(node, pointwise=False)
            ),
        ]
        return
    g = layer.groups
    out.nodes = [
        helper.make_node(
            "Conv", [node.input[0], weights[0]], [hidden[0]], name=node_names[0], **_conv_attrs(node, pointwise=False, groups=g)
        ),
        helper.make_node(
            "Conv", [hidden[0], weights[1], *bias], [node.output[0]], name=node_names[1], **_conv_attrs(node, pointwise=True, groups=g)
        ),
    ]


def apply_emissions(model: ModelProto, nodes: list[NodeProto], emissions: dict[int, Emission], layers: list[Layer], *, drop: bool) -> None:
    """Put every emission in place of its node in ``model``'s main graph; ``drop`` removes the old weights."""
    graph = model.graph
    replaced = {id(nodes[layer.index]): emissions[layer.index].nodes for layer in layers if layer.index in emissions}
    if drop:
        gone = {layer.weight for layer in layers if layer.index in emissions and layer.constant_node is None}
        for layer in layers:
            if layer.index in emissions and layer.constant_node is not None:
                replaced[id(layer.constant_node)] = []
        if gone:
            kept = [t for t in graph.initializer if t.name not in gone]
            del graph.initializer[:]
            graph.initializer.extend(kept)
    for layer in layers:
        if layer.index in emissions:
            graph.initializer.extend(emissions[layer.index].initializers)
    replace_nodes(graph, nodes, replaced)


def variant(model: ModelProto, layer: Layer, factorized: Factorized, types: dict) -> ModelProto:
    """A copy of ``model`` with only ``layer`` factorized (the old weight stays, unused), for the scan."""
    copy = ModelProto()
    copy.CopyFrom(model)
    emission = emit(layer, factorized, NameGenerator(model), types)
    nodes = list(copy.graph.node)
    replace_nodes(copy.graph, nodes, {id(nodes[layer.index]): emission.nodes})
    copy.graph.initializer.extend(emission.initializers)
    return copy


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
