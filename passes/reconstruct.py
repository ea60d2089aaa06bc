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
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.calibration.capture import LAYER_OPS, layer_rows, output_rows, stream_values
from onnxopt.calibration.data import CalibrationData
from onnxopt.calibration.fidelity import FidelityProbe, run_batches
from onnxopt.errors import OnnxoptError, OptionError
from onnxopt.graph import GraphView, NameGenerator, is_standard, node_label
from onnxopt.passbase import Pass, PassContext, PassOptions, PassResult, Requirement, check_patterns, matches_pattern, option
from onnxopt.passes.noop_rules import get_attr
from onnxopt.passes.reconstruct_solve import LayerStats, column_errors, ridge_solve
from onnxopt.registry import register_pass

log = logging.getLogger("onnxopt")

PASS_NAME = "reconstruct"
SELECTIONS = ("changed", "all")
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16}
QUANT_TYPES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255)}
INT32_LIMIT = 2**31 - 1
QUANT_SPARSE_MIN = 0.1  # a quantized weight keeps its zeros when at least this fraction is zero
GRAM_BUDGET = 1 << 30  # bytes of normal equations accumulated in one calibration sweep
HOLD_OUT_EVERY = 4  # with this many batches or more, every 4th one validates the fits (not fitted on)
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


# ----------------------------------------------------------------------------- stored parameters


class Skip(Exception):
    """A layer that cannot be re-fitted: ``key`` names the count, the message says why (``key`` None: not a layer)."""

    def __init__(self, key: str | None, reason: str = "") -> None:
        super().__init__(reason)
        self.key = key


@dataclass
class Stored:
    """A constant tensor of the main graph: an initializer, or the value of a Constant node."""

    name: str
    array: np.ndarray
    constant_node: NodeProto | None = None

    def tensor(self, graph: GraphProto) -> TensorProto:
        """The TensorProto holding the value (inside the graph: writing to it changes the model)."""
        if self.constant_node is not None:
            return self.constant_node.attribute[0].t
        return next(t for t in graph.initializer if t.name == self.name)


@dataclass
class WaveLog:
    """What one wave of re-fits replaced: old tensor values, old node inputs, the initializer count before it."""

    initializers: int
    tensors: list[tuple[Stored, TensorProto, np.ndarray]] = field(default_factory=list)
    inputs: list[tuple[NodeProto, list[str]]] = field(default_factory=list)


@dataclass
class Writer:
    """Writes re-fitted parameters into the main graph, remembering what each wave replaced so it can be undone."""

    graph: GraphProto
    names: NameGenerator
    waves: list[WaveLog] = field(default_factory=list)

    def begin(self) -> None:
        """Start logging a new wave."""
        self.waves.append(WaveLog(len(self.graph.initializer)))

    def store(self, stored: Stored, array: np.ndarray) -> None:
        """Replace ``stored``'s value (same name) by ``array``."""
        target = stored.tensor(self.graph)
        old = TensorProto()
        old.CopyFrom(target)
        self.waves[-1].tensors.append((stored, old, stored.array))
        target.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), target.name))
        stored.array = np.array(array, copy=True)

    def add_input(self, node: NodeProto, index: int, array: np.ndarray, base: str) -> None:
        """Give ``node`` a new initializer ``array`` as input ``index``."""
        self.waves[-1].inputs.append((node, list(node.input)))
        name = self.names.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def undo(self) -> None:
        """Restore everything the last logged wave wrote."""
        log = self.waves.pop()
        for stored, old, array in reversed(log.tensors):
            stored.tensor(self.graph).CopyFrom(old)
            stored.array = array
        for node, inputs in reversed(log.inputs):
            del node.input[:]
            node.input.extend(inputs)
        del self.graph.initializer[log.initializers :]

    def forget(self) -> None:
        """Drop the logs (what was written stays)."""
        self.waves.clear()


def stored(view: GraphView, name: str) -> Stored | None:
    """The constant behind ``name`` (initializer not a graph input, or Constant with a 'value' tensor), or None."""
    if not name:
        return None
    if view.is_constant(name):
        tensor = view.initializers[name]
        return None if tensor.data_location == TensorProto.EXTERNAL else Stored(name, numpy_helper.to_array(tensor))
    node = view.producer.get(name)
    if node is not None and node.op_type == "Constant" and is_standard(node) and len(node.attribute) == 1:
        attr = node.attribute[0]
        if attr.name == "value" and attr.HasField("t") and attr.t.data_location != TensorProto.EXTERNAL:
            return Stored(name, numpy_helper.to_array(attr.t), node)
    return None


def private(view: GraphView, name: str, reader: NodeProto) -> bool:
    """Whether ``name`` is read once, by ``reader`` only, and is not a graph output."""
    readers = view.consumers.get(name, [])
    return name not in view.graph_outputs and len(readers) == 1 and readers[0] is reader


def _broadcast(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Per-tensor (size 1) or per-axis quantization parameters shaped to broadcast over a rank-``ndim`` weight."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


@dataclass
class FloatParam:
    """A float32/float16 constant written back in its own dtype."""

    source: Stored

    def value(self) -> np.ndarray:
        """The value in float64."""
        return self.source.array.astype(np.float64)

    def encode(self, array: np.ndarray) -> np.ndarray:
        """What storing ``array`` keeps of it (rounded to the dtype), in float64."""
        return array.astype(self.source.array.dtype).astype(np.float64)

    def write(self, writer: Writer, array: np.ndarray) -> None:
        """Store ``array`` in the constant's dtype."""
        writer.store(self.source, array.astype(self.source.array.dtype))


@dataclass
class QuantParam:
    """``DequantizeLinear(q, scale, zero_point, axis)`` of an integer constant; re-quantized with the same parameters."""

    source: Stored
    scale: np.ndarray  # broadcast to the weight's rank, float64
    zero: np.ndarray
    low: int
    high: int
    out_dtype: np.dtype  # what the DequantizeLinear writes (its scale's dtype)

    def value(self) -> np.ndarray:
        """The dequantized value in float64."""
        return (self.source.array.astype(np.float64) - self.zero) * self.scale

    def quantize(self, array: np.ndarray) -> np.ndarray:
        """Integers for ``array`` with the stored scale and zero point, clipped to the stored range."""
        safe = np.where(self.scale != 0, self.scale, 1.0)
        q = np.rint(array / safe) + self.zero
        return np.clip(np.where(self.scale != 0, q, self.zero), self.low, self.high).astype(self.source.array.dtype)

    def encode(self, array: np.ndarray) -> np.ndarray:
        """The dequantized value of the re-quantized ``array``."""
        return (self.quantize(array).astype(np.float64) - self.zero) * self.scale

    def write(self, writer: Writer, array: np.ndarray) -> None:
        """Store the re-quantized integers (same name, dtype, scale and zero point)."""
        writer.store(self.source, self.quantize(array))


def dequantized(view: GraphView, node: NodeProto, reader: NodeProto, types: dict[int, tuple[int, int]]) -> QuantParam:
    """The parameter behind a DequantizeLinear read only by ``reader``; Skip when its form is not handled."""
    if not is_standard(node) or get_attr(node, "block_size", 0):
        raise Skip("unsupported_weight", "blocked or non-standard DequantizeLinear")
    source = stored(view, node.input[0])
    scale = stored(view, node.input[1]) if len(node.input) > 1 else None
    zero = stored(view, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if source is None or scale is None or (len(node.input) > 2 and node.input[2] and zero is None):
        raise Skip("unsupported_weight", "DequantizeLinear of a non-constant")
    elem = _elem_type(source.array)
    if elem not in types:
        raise Skip("unsupported_weight", f"DequantizeLinear of {source.array.dtype}")
    if not (private(view, node.output[0], reader) and private(view, node.input[0], node)):
        raise Skip("shared_weight", "the quantized weight is shared")
    ndim = source.array.ndim
    axis = int(get_attr(node, "axis", 1)) % max(ndim, 1)  # type: ignore[call-overload]
    zeros = zero.array.astype(np.float64) if zero is not None else np.zeros(scale.array.shape)
    if scale.array.size not in (1, source.array.shape[axis] if ndim else 1) or zeros.size != scale.array.size:
        raise Skip("unsupported_weight", "DequantizeLinear scale does not match the weight")
    low, high = types[elem]
    if elem == TensorProto.INT8 and source.array.size and int(source.array.min()) > low:
        low = -high  # a symmetric [-127, 127] range stays symmetric
    scale64 = _broadcast(scale.array.astype(np.float64), axis, ndim)
    return QuantParam(source, scale64, _broadcast(zeros, axis, ndim), low, high, scale.array.dtype)


def _elem_type(array: np.ndarray) -> int:
    """The ONNX element type of ``array`` (0 when it has none)."""
    try:
        return helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, TypeError, ValueError):
        return 0


def weight_param(view: GraphView, name: str, reader: NodeProto) -> FloatParam | QuantParam:
    """The weight ``name`` a layer reads; Skip(None) when it is no constant (not a weighted layer)."""
    source = stored(view, name)
    if source is not None:
        if _elem_type(source.array) not in FLOAT_TYPES:
            raise Skip("unsupported_weight", f"{source.array.dtype} weight")
        if not private(view, name, reader):
            raise Skip("shared_weight", "the weight is shared or a graph output")
        return FloatParam(source)
    node = view.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        raise Skip(None)
    return dequantized(view, node, reader, QUANT_TYPES)


# ----------------------------------------------------------------------------- biases


@dataclass
class BiasSlot:
    """Where a layer's fitted bias goes.

    kinds: ``none`` (MatMul without a constant Add: no bias is fitted), ``new`` (Conv without B,
    Gemm without C: an initializer is added), ``float`` (a float constant: written in place when the
    layer alone reads it, else as a new initializer), ``int32`` (DequantizeLinear of an int32 constant,
    re-quantized with its scale), ``add`` (the constant of the Add after a MatMul: the fitted bias is
    added to it).
    """

    kind: str
    size: int
    reader: NodeProto | None = None
    index: int = 2
    param: FloatParam | QuantParam | None = None
    shared: bool = False
    scale: float = 1.0  # Gemm's beta: the effective bias is scale * stored
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))

    def value(self) -> np.ndarray:
        """The current bias [size] this layer adds (0 for none/new/add)."""
        if self.kind in ("none", "new", "add") or self.param is None:
            return np.zeros(self.size)
        return np.broadcast_to(self.param.value().reshape(-1) * self.scale, (self.size,)).copy()

    def _stored(self, bias: np.ndarray) -> np.ndarray:
        """The array to store for effective bias ``bias`` (before dtype rounding)."""
        if self.kind == "add":
            old = self.param.value()  # type: ignore[union-attr]
            return np.broadcast_to(old, _vector_shape(old.shape, self.size)) + bias.reshape(_vector_shape(old.shape, self.size))
        if self.kind == "new":
            return bias / self.scale
        old_shape = self.param.source.array.shape  # type: ignore[union-attr]
        return (bias / self.scale).reshape(_vector_shape(old_shape, self.size))

    def encode(self, bias: np.ndarray) -> np.ndarray:
        """The effective bias that storing ``bias`` gives (after rounding to the stored form)."""
        if self.kind == "none":
            return np.zeros(self.size)
        if self.kind == "new":
            return (bias / self.scale).astype(self.dtype).astype(np.float64) * self.scale
        kept = self.param.encode(self._stored(bias)).reshape(-1)  # type: ignore[union-attr]
        if self.kind == "add":
            return kept - np.broadcast_to(self.param.value().reshape(-1), (self.size,))  # type: ignore[union-attr]
        return kept * self.scale

    def write(self, writer: Writer, bias: np.ndarray) -> None:
        """Store the effective bias ``bias`` (a new initializer for ``new`` and for shared constants)."""
        if self.kind == "none":
            return
        if self.kind == "new" or (self.kind in ("float", "add") and self.shared):
            reader = self.reader
            base = f"{reader.name or reader.output[0]}_bias"  # type: ignore[union-attr]
            writer.add_input(reader, self.index, self._stored(bias).astype(self.dtype), base)  # type: ignore[arg-type]
        else:
            self.param.write(writer, self._stored(bias))  # type: ignore[union-attr]


def _vector_shape(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
    """``shape`` when it holds ``size`` elements, else the same rank (at least 1) with the last dim ``size``."""
    if int(np.prod(shape, dtype=np.int64)) == size and len(shape):
        return tuple(shape)
    return (1,) * max(len(shape) - 1, 0) + (size,)


def _row_vector(shape: tuple[int, ...], size: int) -> bool:
    """Whether a constant of ``shape`` broadcasts as one value per output column (or one for all)."""
    return all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, size))


def bias_slot(view: GraphView, node: NodeProto, size: int, dtype: np.dtype, beta: float = 1.0) -> BiasSlot:
    """The bias slot of a Conv (input B) or Gemm (input C); Skip for forms not handled."""
    name = node.input[2] if len(node.input) > 2 else ""
    if not name:
        return BiasSlot("new", size, node, scale=beta, dtype=dtype)
    source = stored(view, name)
    if source is not None:
        if _elem_type(source.array) not in FLOAT_TYPES or not _row_vector(source.array.shape, size):
            raise Skip("unsupported_bias", "the bias is not a float vector")
        shared = not private(view, name, node)
        return BiasSlot("float", size, node, param=FloatParam(source), shared=shared, scale=beta, dtype=source.array.dtype)
    dq = view.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        raise Skip("unsupported_bias", "the bias is not a constant")
    try:
        param = dequantized(view, dq, node, {TensorProto.INT32: (-INT32_LIMIT, INT32_LIMIT)})
    except Skip as exc:
        raise Skip("unsupported_bias", f"int32 bias: {exc}") from None
    if np.any(param.zero != 0) or not _row_vector(param.source.array.shape, size):
        raise Skip("unsupported_bias", "int32 bias with a zero point or of the wrong shape")
    return BiasSlot("int32", size, node, param=param, scale=beta, dtype=np.dtype(np.float32))


def matmul_bias(view: GraphView, node: NodeProto, size: int) -> BiasSlot:
    """The Add of a constant [N] vector that is the only reader of a MatMul's output, or no bias."""
    out = node.output[0]
    readers = view.consumers.get(out, [])
    if out in view.graph_outputs or len(readers) != 1:
        return BiasSlot("none", size)
    add = readers[0]
    if add.op_type != "Add" or not is_standard(add) or len(add.input) != 2 or list(add.input).count(out) != 1:
        return BiasSlot("none", size)
    index = 1 if add.input[0] == out else 0
    source = stored(view, add.input[index])
    if source is None or _elem_type(source.array) not in FLOAT_TYPES or not _row_vector(source.array.shape, size):
        return BiasSlot("none", size)
    shared = not private(view, add.input[index], add)
    return BiasSlot("add", size, add, index, FloatParam(source), shared, dtype=source.array.dtype)


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


def select_layers(view: GraphView, teacher: ModelProto, options: ReconstructOptions) -> Selection:
    """Candidates of the student's main graph that the options select, in graph order."""
    teacher_view = GraphView.build(teacher.graph)
    known = set(teacher_view.producer) | teacher_view.graph_inputs
    mode = options.layers[0] if options.layers[0] in SELECTIONS else "names"
    selection = Selection()
    for node in view.nodes:
        if node.op_type not in LAYER_OPS or (mode == "names" and not _named(node, options.layers)) or _named(node, options.exclude):
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


def upstream(view: GraphView, layers: list[Layer]) -> list[int]:
    """For each layer, a bit mask of the layers its input depends on (bit i: ``layers[i]``)."""
    bits = {id(layer.node): 1 << i for i, layer in enumerate(layers)}
    deps: dict[str, int] = {}
    for node in view.nodes:
        mask = bits.get(id(node), 0)
        for name in view.all_inputs(node):
            mask |= deps.get(name, 0)
        for out in node.output:
            if out:
                deps[out] = mask
    return [deps.get(layer.input, 0) for layer in layers]


def waves(pending: list[int], deps: list[int], sequential: bool) -> list[int]:
    """The next layers to re-fit together: all pending (parallel) or those depending on no pending layer."""
    if not sequential:
        return list(pending)
    waiting = 0
    for i in pending:
        waiting |= 1 << i
    return [i for i in pending if not deps[i] & waiting]


def chunks(indices: list[int], layers: list[Layer]) -> list[list[int]]:
    """``indices`` split so that one sweep's normal equations fit :data:`GRAM_BUDGET`."""
    out: list[list[int]] = [[]]
    used = 0
    for i in indices:
        size = LayerStats.nbytes(layers[i].groups, layers[i].k, layers[i].n)
        if out[-1] and used + size > GRAM_BUDGET:
            out.append([])
            used = 0
        out[-1].append(i)
        used += size
    return out


# ----------------------------------------------------------------------------- statistics and solving


def accumulate(layer: Layer, x: np.ndarray, y: np.ndarray, stats: LayerStats) -> bool:
    """Add one batch of student inputs ``x`` and teacher outputs ``y``; False when the shapes do not correspond."""
    node, groups = layer.node, layer.groups
    if layer.node.op_type == "Conv":
        if x.ndim != len(layer.shape) or y.ndim != x.ndim or x.shape[0] != y.shape[0]:
            return False
        parts = [(x[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]  # im2col one sample at a time
    else:
        parts = [(x, y)]
    for xs, ys in parts:
        rows = layer_rows(node, xs, layer.shape)
        channels = ys.shape[1] if node.op_type == "Conv" else (ys.shape[-1] if ys.ndim else 0)
        if rows.shape[2] != layer.k or channels != layer.n * groups or ys.size != rows.shape[1] * channels:
            return False
        targets = output_rows(node, ys, groups)
        if targets.shape != (groups, rows.shape[1], layer.n):
            return False
        stats.add(rows, targets)
    return True


@dataclass
class Sums:
    """A layer's normal equations from one sweep: fitting rows and, with enough batches, held-out rows."""

    fit: LayerStats
    held_out: LayerStats | None = None

    def total(self) -> LayerStats:
        """The sums over all calibration rows."""
        return self.fit if self.held_out is None else self.fit.plus(self.held_out)


def _empty_sums(layer: Layer, validate: bool) -> Sums:
    zeros = LayerStats.zeros
    return Sums(zeros(layer.groups, layer.k, layer.n), zeros(layer.groups, layer.k, layer.n) if validate else None)


def collect(
    student: ModelProto, teacher: ModelProto, layers: list[Layer], data: CalibrationData, options: ReconstructOptions
) -> dict[int, Sums]:
    """One calibration sweep: normal equations of ``layers`` (keyed by position); layers whose shapes do not match are left out.

    With at least :data:`HOLD_OUT_EVERY` batches, every ``HOLD_OUT_EVERY``-th batch is summed apart to validate the fits.
    """
    limit = math.ceil(options.samples / options.batch_size) if options.samples else None
    data.validate(student)
    batches = data.num_batches(options.batch_size) if limit is None else min(limit, data.num_batches(options.batch_size))
    validate = batches >= HOLD_OUT_EVERY
    inputs = list(dict.fromkeys(layer.input for layer in layers))
    outputs = list(dict.fromkeys(layer.output for layer in layers))
    sums = {i: _empty_sums(layer, validate) for i, layer in enumerate(layers)}
    live = set(sums)
    kwargs = {"batch_size": options.batch_size, "limit": limit}
    streams = zip(stream_values(student, inputs, data, **kwargs), stream_values(teacher, outputs, data, **kwargs))
    for index, (xs, ys) in enumerate(streams):
        held = validate and index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
        for i in sorted(live):
            target = sums[i].held_out if held else sums[i].fit
            if not accumulate(layers[i], np.asarray(xs[layers[i].input]), np.asarray(ys[layers[i].output]), target):  # type: ignore[arg-type]
                live.discard(i)
    return {i: sums[i] for i in sorted(live) if sums[i].fit.rows}


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

    Guards: with 4 or more calibration batches every 4th is held out; weights are fitted on the
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
        selection = select_layers(view, ctx.teacher, options)
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
                stats = collect(model, ctx.teacher, [layers[i] for i in part], ctx.calibration, options)  # type: ignore[arg-type]
                wave = []
                for position, i in enumerate(part):
                    if position not in stats:
                        selection.skip("shape_mismatch", layers[i].describe())
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
