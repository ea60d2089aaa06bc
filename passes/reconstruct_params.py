"""Where a re-fitted layer's weight and bias live, and how to write them back (float or quantized).

Parameters of the ``reconstruct`` pass (:mod:`onnxopt.passes.reconstruct`) are constants of the
main graph (:class:`Stored`: initializers or Constant nodes). A weight is a float constant
(:class:`FloatParam`), or ``DequantizeLinear`` of an int8/uint8 constant or ``Mul(Cast(q), scale)``
(qdq's float layers on ort-cpu), both :class:`QuantParam`, re-quantized with their own scale, zero
point and axis; :class:`BiasSlot` says where a fitted bias goes (Conv B, Gemm C, an int32
DequantizeLinear bias, the constant of an Add after a MatMul, or a new initializer).
:class:`Writer` writes values back and can undo a wave of writes. Forms that are not handled
raise :class:`Skip`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

from onnxopt.graph import GraphView, NameGenerator, is_standard
from onnxopt.passes.noop_rules import get_attr

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16}
QUANT_TYPES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255)}
INT32_LIMIT = 2**31 - 1


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
        target.CopyFrom(numpy_helper.from_array(np.asarray(array, order="C"), target.name))
        stored.array = np.array(array, copy=True)

    def add_input(self, node: NodeProto, index: int, array: np.ndarray, base: str) -> None:
        """Give ``node`` a new initializer ``array`` as input ``index``."""
        self.waves[-1].inputs.append((node, list(node.input)))
        name = self.names.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def undo(self) -> None:
        """Restore everything the last logged wave wrote."""
        last = self.waves.pop()
        for stored, old, array in reversed(last.tensors):
            stored.tensor(self.graph).CopyFrom(old)
            stored.array = array
        for node, inputs in reversed(last.inputs):
            del node.input[:]
            node.input.extend(inputs)
        del self.graph.initializer[last.initializers :]

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


def cast_scaled(view: GraphView, node: NodeProto, reader: NodeProto) -> QuantParam:
    """The parameter behind ``Mul(Cast(q), scale)`` read only by ``reader`` (qdq's float-layer weight on ort-cpu); Skip otherwise."""
    cast = view.producer.get(node.input[0]) if len(node.input) == 2 else None
    if cast is None or cast.op_type != "Cast" or not is_standard(cast) or not is_standard(node):
        raise Skip(None)
    source, scale = stored(view, cast.input[0]), stored(view, node.input[1])
    if source is None or scale is None or _elem_type(source.array) not in QUANT_TYPES or _elem_type(scale.array) not in FLOAT_TYPES:
        raise Skip(None)
    if get_attr(cast, "to", 0) != _elem_type(scale.array) or scale.array.ndim > source.array.ndim:
        raise Skip("unsupported_weight", "Cast x scale of a different type")
    if not (private(view, node.output[0], reader) and private(view, cast.output[0], node) and private(view, cast.input[0], cast)):
        raise Skip("shared_weight", "the quantized weight is shared")
    padded = scale.array.reshape((1,) * (source.array.ndim - scale.array.ndim) + scale.array.shape)
    if any(d not in (1, w) for d, w in zip(padded.shape, source.array.shape)) or sum(d > 1 for d in padded.shape) > 1:
        raise Skip("unsupported_weight", "Cast x scale is not per tensor or per channel")
    low, high = QUANT_TYPES[_elem_type(source.array)]
    if _elem_type(source.array) == TensorProto.INT8 and source.array.size and int(source.array.min()) > low:
        low = -high  # a symmetric [-127, 127] range stays symmetric
    return QuantParam(source, padded.astype(np.float64), np.zeros(padded.shape), low, high, scale.array.dtype)


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
    if node is not None and node.op_type == "Mul":
        return cast_scaled(view, node, reader)
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
