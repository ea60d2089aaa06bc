"""The layers the ``reconstruct`` pass re-fits: Conv/Gemm/MatMul as ``Y_g = X_g W_g + b_g``, and which are selected.

:func:`match_layer` sees a standard Conv/Gemm/MatMul with a constant weight as a :class:`Layer`
(weight and bias from :mod:`onnxopt.passes.reconstruct_params`); :func:`select_layers` picks the
student's layers that the ``layers``/``exclude`` options select and that the teacher computes too,
counting the others by reason in a :class:`Selection`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, NodeProto

from onnxopt.calibration.capture import LAYER_OPS
from onnxopt.graph import GraphView, is_standard, node_label
from onnxopt.passbase import matches_pattern
from onnxopt.passes.noop_rules import get_attr
from onnxopt.passes.reconstruct_params import BiasSlot, FloatParam, QuantParam, Skip, Writer, bias_slot, matmul_bias, stored, weight_param

SELECTIONS = ("changed", "all")
QUANT_SPARSE_MIN = 0.1  # a quantized weight keeps its zeros when at least this fraction is zero


# ----------------------------------------------------------------------------- layers


@dataclass
class Layer:
    """A Conv/Gemm/MatMul with a constant weight, seen as ``Y_g = X_g W_g + b_g`` per group."""

    node: NodeProto
    weight: FloatParam | QuantParam
    bias: BiasSlot
    groups: int
    alpha: float = 1.0  # Gemm: the effective weight is alpha * B
    trans: bool = False  # Gemm transB: B is stored [N, K]

    @property
    def label(self) -> str:
        """The node's name (or output) for messages."""
        return self.node.name or self.node.output[0]

    @property
    def input(self) -> str:
        """The activation the layer reads."""
        return self.node.input[0]

    @property
    def output(self) -> str:
        """The tensor the layer writes (matched by name in the teacher)."""
        return self.node.output[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored weight's shape."""
        return tuple(self.weight.source.array.shape)

    @property
    def has_bias(self) -> bool:
        """Whether a bias is fitted (a row of ones is appended to X)."""
        return self.bias.kind != "none"

    @property
    def k(self) -> int:
        """Inputs per group."""
        if self.node.op_type == "Conv":
            return int(np.prod(self.shape[1:]))
        return self.shape[1] if self.trans else self.shape[0]

    @property
    def n(self) -> int:
        """Outputs per group."""
        if self.node.op_type == "Conv":
            return self.shape[0] // self.groups
        return self.shape[0] if self.trans else self.shape[1]

    def describe(self) -> str:
        """``'name' (Conv 64x288)``: output channels by inputs per group."""
        return f"'{self.label}' ({self.node.op_type} {self.n * self.groups}x{self.k})"

    def canonical(self, stored_weight: np.ndarray) -> np.ndarray:
        """The stored layout as ``[G, K, N]`` (effective weight: Gemm's alpha included)."""
        if self.node.op_type == "Conv":
            return stored_weight.reshape(self.groups, self.n, self.k).transpose(0, 2, 1)
        return self.alpha * (stored_weight.T if self.trans else stored_weight)[None]

    def stored_layout(self, weights: np.ndarray) -> np.ndarray:
        """``[G, K, N]`` effective weights in the stored layout."""
        if self.node.op_type == "Conv":
            return weights.transpose(0, 2, 1).reshape(self.shape)
        w = weights[0] / self.alpha
        return w.T if self.trans else w

    def current(self) -> np.ndarray:
        """Current weights ``[G, K (+1), N]``, the bias (if fitted) as the last row."""
        w = self.canonical(self.weight.value())
        if not self.has_bias:
            return w
        return np.concatenate([w, self.bias.value().reshape(self.groups, 1, self.n)], axis=1)

    def encode(self, full: np.ndarray) -> np.ndarray:
        """What storing ``full`` keeps of it (dtype rounding, re-quantization), in the same form."""
        w = self.canonical(self.weight.encode(self.stored_layout(full[:, : self.k])))
        if not self.has_bias:
            return w
        b = self.bias.encode(full[:, self.k].reshape(-1)).reshape(self.groups, 1, self.n)
        return np.concatenate([w, b], axis=1)

    def write(self, writer: Writer, full: np.ndarray) -> None:
        """Store the weights and bias of ``full``."""
        self.weight.write(writer, self.stored_layout(full[:, : self.k]))
        if self.has_bias:
            self.bias.write(writer, full[:, self.k].reshape(-1))

    def support(self, keep_zeros: bool) -> np.ndarray | None:
        """The mask of entries allowed to be non-zero when the weight is sparse and zeros are kept, else None."""
        if not keep_zeros:
            return None
        w = self.canonical(self.weight.value())
        zeros = w == 0
        threshold = QUANT_SPARSE_MIN if isinstance(self.weight, QuantParam) else 0.0
        if not zeros.any() or zeros.mean() < threshold:
            return None
        mask = ~zeros
        if self.has_bias:
            mask = np.concatenate([mask, np.ones((self.groups, 1, self.n), bool)], axis=1)
        return mask


def match_layer(view: GraphView, node: NodeProto) -> Layer:
    """A standard Conv/Gemm/MatMul with a constant weight as a :class:`Layer`; Skip otherwise."""
    if not is_standard(node) or node.op_type not in LAYER_OPS or len(node.input) < 2 or not node.input[0]:
        raise Skip(None)
    if stored(view, node.input[0]) is not None:
        raise Skip(None)
    weight = weight_param(view, node.input[1], node)
    shape = weight.source.array.shape
    dtype = weight.out_dtype if isinstance(weight, QuantParam) else weight.source.array.dtype
    op = node.op_type
    if op == "Conv":
        groups = int(get_attr(node, "group", 1))  # type: ignore[call-overload]
        if len(shape) < 3 or groups <= 0 or shape[0] % groups:
            raise Skip("unsupported_weight", f"Conv weight of shape {list(shape)}")
        return Layer(node, weight, bias_slot(view, node, shape[0], dtype), groups)
    if len(shape) != 2:
        raise Skip("unsupported_weight", f"{op} weight of rank {len(shape)}")
    if op == "MatMul":
        return Layer(node, weight, matmul_bias(view, node, shape[1]), 1)
    alpha, beta = float(get_attr(node, "alpha", 1.0)), float(get_attr(node, "beta", 1.0))  # type: ignore[arg-type]
    trans = bool(get_attr(node, "transB", 0))
    if alpha == 0 or beta == 0:
        raise Skip("unsupported_weight", "Gemm with alpha=0 or beta=0")
    return Layer(node, weight, bias_slot(view, node, shape[0] if trans else shape[1], dtype, beta), 1, alpha, trans)


def same_layer(student: Layer, teacher_view: GraphView) -> bool:
    """Whether the teacher computes the student layer's output with the same op, weights and bias."""
    node = teacher_view.producer.get(student.output)
    if node is None or node.op_type != student.node.op_type:
        return False
    try:
        teacher = match_layer(teacher_view, node)
    except Skip:
        return False
    if teacher.groups != student.groups or teacher.bias.kind != student.bias.kind:
        return False
    a, b = student.current(), teacher.current()
    if a.shape != b.shape or not np.array_equal(a, b):
        return False
    if student.bias.kind == "add":
        return np.array_equal(student.bias.param.value(), teacher.bias.param.value())  # type: ignore[union-attr]
    return True


# ----------------------------------------------------------------------------- finding the layers


@dataclass
class Selection:
    """The layers to re-fit and what was left out, by reason."""

    layers: list[Layer] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, key: str, label: str) -> None:
        """Count a skipped layer under ``key``."""
        self.skipped[key] += 1
        self.examples.setdefault(key, []).append(label)


def _named(node: NodeProto, patterns: tuple[str, ...]) -> bool:
    return any(matches_pattern(name, patterns) for name in (node.name, node.output[0] if node.output else "") if name)


def select_layers(view: GraphView, teacher: ModelProto, wanted: tuple[str, ...], exclude: tuple[str, ...]) -> Selection:
    """Candidates of the student's main graph that ``wanted`` (changed, all, or patterns) selects, less ``exclude``, in graph order."""
    teacher_view = GraphView.build(teacher.graph)
    known = set(teacher_view.producer) | teacher_view.graph_inputs
    mode = wanted[0] if wanted[0] in SELECTIONS else "names"
    selection = Selection()
    for node in view.nodes:
        if node.op_type not in LAYER_OPS or (mode == "names" and not _named(node, wanted)) or _named(node, exclude):
            continue
        try:
            layer = match_layer(view, node)
        except Skip as exc:
            if exc.key is not None:
                selection.skip(exc.key, node_label(node))
            continue
        if layer.output not in known:
            selection.skip("missing_in_teacher", node_label(node))
        elif mode != "changed" or not same_layer(layer, teacher_view):
            selection.layers.append(layer)
    return selection
