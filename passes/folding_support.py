"""Helpers of constant folding: which ops may fold, output size estimates, and evaluation.

Size estimates come before any computation: an output's element count is either exact
(from inferred static shapes, or from the constant values that decide it, as for
ConstantOfShape/Expand/Tile/Range) or an upper bound for ops that cannot grow their
input. Evaluation runs onnxruntime on a small model made of the nodes to fold and their
constant inputs, with onnx's reference evaluator as the per-node fallback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, OperatorSetIdProto, TensorProto, helper, numpy_helper

from onnxopt.graph import subgraphs
from onnxopt.ort import import_onnxruntime, make_session
from onnxopt.shapes import static_shape

log = logging.getLogger("onnxopt")

# Ops never folded: nondeterministic, quantization boundaries (Q/DQ must stay on weights),
# Constant (lift_constants' job) and ops working on sequences/optionals.
NEVER_FOLD = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "Constant",
        "SplitToSequence",
        "ConcatFromSequence",
        "If",
        "Loop",
        "Scan",
    }
)
NEVER_FOLD_PREFIXES = ("Sequence", "Optional")

# Ops whose output has at most as many elements as their first input.
NOT_GROWING = frozenset(
    """
    Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Relu Sigmoid Tanh Erf Not IsNaN IsInf
    Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Softplus Softsign HardSigmoid LeakyRelu
    Elu Selu Celu Gelu HardSwish Mish ThresholdedRelu Clip Softmax LogSoftmax Hardmax BitwiseNot
    Cast CastLike Identity Transpose Reshape Squeeze Unsqueeze Flatten Slice CumSum EyeLike
    ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare ArgMax ArgMin
    """.split()
)

# Elementwise ops with multidirectional broadcasting: output shape = broadcast of inputs.
BROADCASTING = frozenset(
    """
    Add Sub Mul Div Pow Mod And Or Xor Equal Less Greater LessOrEqual GreaterOrEqual Max Min Sum
    Mean Where BitShift BitwiseAnd BitwiseOr BitwiseXor PRelu
    """.split()
)

# Ops whose output size follows from the values of constant inputs.
SIZE_FROM_VALUES = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})

MAX_RANK = 64  # bound on the length of a Shape output whose input rank is unknown
VALUE_LOAD_LIMIT = 4096  # largest initializer (elements) read to decide a size
REFERENCE_LIMIT = 1 << 20  # largest total input (elements) given to the slow reference evaluator


@dataclass
class ConstInfo:
    """What is known about a constant value before or after it is computed."""

    shape: tuple[int, ...] | None  # exact shape; None when only a bound on the count is known
    count: int  # element count (exact, or an upper bound when shape is None)
    elem: int | None
    value: np.ndarray | None = None
    tensor: TensorProto | None = None  # the initializer or Constant value, for original constants
    planned: bool = False  # output of a node planned in the current round, not computed yet

    @property
    def nbytes(self) -> int:
        """Bytes of the value (0 for element types without a fixed width)."""
        return self.count * (itemsize(self.elem) or 0)

    @classmethod
    def of(cls, array: np.ndarray) -> ConstInfo:
        """A computed value."""
        return cls(tuple(array.shape), int(array.size), tensor_elem(array), value=array)


def never_folds(node: NodeProto) -> bool:
    """Whether the op is excluded from folding whatever its inputs."""
    op = node.op_type
    return op in NEVER_FOLD or op.startswith(NEVER_FOLD_PREFIXES) or bool(subgraphs(node))


def itemsize(elem: int | None) -> int | None:
    """Bytes per element of a tensor element type; None for strings and unknown types."""
    if not elem or elem == TensorProto.STRING:
        return None
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize)
    except (KeyError, ValueError, TypeError):
        return None


def numel(shape: Sequence[int]) -> int:
    """Number of elements of a shape (1 for a scalar)."""
    return math.prod(int(d) for d in shape)


def type_dims(type_proto: onnx.TypeProto | None) -> list[int | None] | None:
    """The dims of a tensor type (None for each unknown dim), or None if the rank is unknown."""
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type":
        return None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tensor_type.shape.dim]


def shape_op_value(node: NodeProto, dims: list[int | None] | None) -> np.ndarray | None:
    """The value of a standard Shape/Size node from its input's dims, if every needed dim is known."""
    if dims is None:
        return None
    if node.op_type == "Size":
        return None if any(d is None for d in dims) else np.array(numel(dims), dtype=np.int64)  # type: ignore[arg-type]
    rank = len(dims)
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    needed = dims[start:end]
    if any(d is None for d in needed):
        return None
    return np.array(needed, dtype=np.int64)


def _attr_int(node: NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def shape_from_values(node: NodeProto, shapes: list[tuple[int, ...] | None], values: list[np.ndarray | None]) -> tuple[int, ...] | None:
    """Output shape of ConstantOfShape/Expand/Tile/Range from input values (and shapes); None if unknown."""
    op = node.op_type
    try:
        if op == "ConstantOfShape" and values and values[0] is not None:
            return tuple(int(d) for d in values[0].reshape(-1))
        if op == "Expand" and len(values) == 2 and shapes[0] is not None and values[1] is not None:
            return tuple(np.broadcast_shapes(shapes[0], tuple(int(d) for d in values[1].reshape(-1))))
        if op == "Tile" and len(values) == 2 and shapes[0] is not None and values[1] is not None:
            repeats = [int(r) for r in values[1].reshape(-1)]
            if len(repeats) != len(shapes[0]) or min(repeats, default=0) < 0:
                return None
            return tuple(d * r for d, r in zip(shapes[0], repeats))
        if op == "Range" and len(values) == 3 and all(v is not None and v.size == 1 for v in values):
            start, limit, delta = (float(v.reshape(-1)[0]) for v in values)  # type: ignore[union-attr]
            if delta == 0 or not all(math.isfinite(x) for x in (start, limit, delta)):
                return None
            return (max(int(math.ceil((limit - start) / delta)), 0),)
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def element_bound(node: NodeProto, shapes: list[tuple[int, ...] | None], counts: list[int]) -> int | None:
    """An upper bound on each output's element count from the inputs' shapes and counts; None if unknown."""
    op = node.op_type
    if not counts:
        return None
    if op == "Shape":
        return len(shapes[0]) if shapes[0] is not None else MAX_RANK
    if op == "Size":
        return 1
    if op in NOT_GROWING:
        return counts[0]
    if op == "Concat":
        return sum(counts)
    if op == "GatherElements" and len(counts) == 2:
        return counts[1]
    if op == "Gather" and len(counts) == 2 and shapes[0]:
        axis = _attr_int(node, "axis", 0)
        data = shapes[0]
        if not -len(data) <= axis < len(data):
            return None
        dim = data[axis]
        return 0 if dim == 0 else counts[1] * (counts[0] // dim)
    if op in BROADCASTING and all(s is not None for s in shapes):
        try:
            return numel(np.broadcast_shapes(*shapes))  # type: ignore[arg-type]
        except ValueError:
            return None
    return None


def output_elem_guess(node: NodeProto, input_elems: list[int | None]) -> int | None:
    """The element type an output most likely has when inference did not say."""
    op = node.op_type
    if op in ("Shape", "Size", "ArgMax", "ArgMin"):
        return TensorProto.INT64
    if op == "Cast":
        return _attr_int(node, "to", 0) or None
    if op == "ConstantOfShape":
        for attr in node.attribute:
            if attr.name == "value":
                return attr.t.data_type
        return TensorProto.FLOAT
    if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"):
        return TensorProto.BOOL
    return input_elems[0] if input_elems else None


def infer_node_shapes(
    node: NodeProto,
    inputs: Sequence[tuple[str, tuple[int, ...], int | None, np.ndarray | None]],
    opsets: Sequence[OperatorSetIdProto],
) -> dict[str, tuple[int, ...]]:
    """Static output shapes of one node by onnx inference, given (name, shape, elem, small value) per input.

    Inputs with a value become initializers (so data propagation sees them), the others
    typed graph inputs. Outputs whose shape stays unknown are left out.
    """
    graph = onnx.GraphProto(name="infer")
    graph.node.append(node)
    for name, shape, elem, value in inputs:
        if value is not None:
            graph.initializer.append(numpy_helper.from_array(value, name))
        else:
            graph.input.append(helper.make_tensor_value_info(name, elem or TensorProto.UNDEFINED, list(shape)))
    graph.output.extend(helper.make_empty_tensor_value_info(o) for o in node.output if o)
    model = helper.make_model(graph, opset_imports=list(opsets))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises many types; an unknown shape is the answer
        log.debug("fold_constants: cannot infer the output shape of %s: %s", node.op_type, exc)
        return {}
    found = {}
    for value in list(inferred.graph.output) + list(inferred.graph.value_info):
        shape = static_shape(value.type)
        if shape is not None:
            found[value.name] = shape
    return found


def build_model(
    nodes: Sequence[NodeProto],
    initializers: Sequence[TensorProto],
    outputs: Sequence[str],
    opsets: Sequence[OperatorSetIdProto],
    ir_version: int,
) -> ModelProto:
    """A model computing ``outputs`` from ``nodes`` whose inputs are all ``initializers``."""
    graph = onnx.GraphProto(name="fold")
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    model = helper.make_model(graph, opset_imports=list(opsets))
    model.ir_version = min(max(ir_version, 4), onnx.IR_VERSION)
    return model


def run_onnxruntime(model: ModelProto, outputs: Sequence[str]) -> list[np.ndarray]:
    """Evaluate ``model`` in a single-threaded onnxruntime session without graph optimizations."""
    session = make_session(model.SerializeToString(), log_level=4)
    quiet = import_onnxruntime().RunOptions()
    quiet.log_severity_level = 4  # a failure is expected and handled: do not print it
    return [np.asarray(v) for v in session.run(list(outputs), {}, quiet)]


def run_reference(model: ModelProto, outputs: Sequence[str]) -> list[np.ndarray]:
    """Evaluate ``model`` with onnx's reference evaluator (slow; used per node as a fallback)."""
    from onnx.reference import ReferenceEvaluator

    values = ReferenceEvaluator(model).run(list(outputs), {})
    return [np.asarray(v) for v in values]


def tensor_elem(array: np.ndarray) -> int | None:
    """The ONNX element type of a numpy array, or None for object/unsupported dtypes."""
    if array.dtype.kind in "OUSV":
        return None
    try:
        return helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, ValueError, TypeError):
        return None
