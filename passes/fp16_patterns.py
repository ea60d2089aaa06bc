"""Graph patterns the fp16 pass keeps in float32: shape arithmetic, normalization statistics, reduction extents.

Pure analyses of the original graph (through :class:`~onnxopt.passes.fp16_values.OriginalValues`);
nothing here writes to it.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto, TypeProto, numpy_helper

from onnxopt.graph import GraphView, is_standard
from onnxopt.passes.fp16_values import F16, F32, OriginalValues
from onnxopt.passes.noop_rules import get_attr

SMALL_ELEMENTS = 64  # float tensors up to this size that feed or come from shapes stay float32
# Ops that may sit between a squaring and the Sqrt of a variance computation.
_VARIANCE_OPS = frozenset(
    {
        "ReduceMean",
        "ReduceSum",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Max",
        "Min",
        "Clip",
        "Sqrt",
        "Reciprocal",
        "Reshape",
        "Expand",
        "Squeeze",
        "Unsqueeze",
        "Identity",
    }
)


def reduction_extent(node: NodeProto, values: OriginalValues) -> int | None:
    """How many elements one output element of a reduction sums, or None if not static."""
    dims = _dims(values.types, node.input[0])
    if dims is None:
        return None
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        tensor = values.constant_tensor(node.input[1])
        if tensor is None:
            return None
        axes = [int(a) for a in numpy_helper.to_array(tensor).reshape(-1)]
    if not axes:
        if get_attr(node, "noop_with_empty_axes", 0):
            return 1
        axes = list(range(len(dims)))
    extent = 1
    for axis in axes:  # type: ignore[union-attr]
        axis = int(axis) + (len(dims) if int(axis) < 0 else 0)
        if not 0 <= axis < len(dims) or dims[axis] is None:
            return None
        extent *= dims[axis]  # type: ignore[operator]
    return extent


def shape_tainted(values: OriginalValues) -> set[str]:
    """Small float32 values computed from shapes, or cast to integers (shape arithmetic)."""
    view, types = values.view, values.types
    tainted: set[str] = set()
    for node in view.nodes:  # forward from Shape/Size through small tensors
        if node.op_type in ("Shape", "Size") or any(i in tainted for i in node.input if i):
            tainted.update(o for o in node.output if o and _is_small(types, o))
    backward: set[str] = set()
    for node in view.nodes:
        if node.op_type == "Cast" and get_attr(node, "to") not in (F32, F16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
            if node.input and values.is_f32(node.input[0]) and _is_small(types, node.input[0]):
                backward.add(node.input[0])
    for node in reversed(view.nodes):
        if any(o in backward for o in node.output if o):
            backward.update(i for i in node.input if i and values.is_f32(i) and _is_small(types, i))
    return {name for name in tainted | backward if values.is_f32(name)}


def variance_nodes(values: OriginalValues) -> set[int]:
    """Ids of the nodes of unfused LayerNorm/RMSNorm statistics: a squaring that is reduced, up to the normalizing product.

    From each squaring whose value reaches a ReduceMean/ReduceSum (through layout ops only),
    everything reading it among :data:`_VARIANCE_OPS` is marked, through the Sqrt and a
    Reciprocal, up to and including the first Mul/Div after the Sqrt. The centering or mean
    that feeds a squaring is marked too, and so is the other square of ``E[x^2] - E[x]^2``.
    """
    view = values.view
    found: set[int] = set()
    squares = [node for node in view.nodes if is_standard(node) and _is_square(node, values)]
    for node in squares:
        starts = _reductions_after(view, node)
        if not starts:
            continue
        found.add(id(node))
        _mark_mean_feeding(view, node.input[0], found)
        stack: list[tuple[NodeProto, bool]] = [(reduce, False) for reduce in starts]
        seen = {id(node)} | {id(reduce) for reduce in starts}
        found.update(seen)
        while stack:
            current, rooted = stack.pop()
            for out in current.output:
                for reader in view.consumers.get(out, ()):
                    if id(reader) in seen or not is_standard(reader) or reader.op_type not in _VARIANCE_OPS:
                        continue
                    seen.add(id(reader))
                    found.add(id(reader))
                    if reader.op_type == "Sub":
                        for operand in reader.input:
                            square = view.producer.get(operand)
                            if square is not None and id(square) not in found and _is_square(square, values):
                                found.add(id(square))
                                _mark_mean_feeding(view, square.input[0], found)
                    if rooted and reader.op_type in ("Mul", "Div"):
                        continue  # the normalizing product: its output is back in range
                    stack.append((reader, rooted or reader.op_type == "Sqrt"))
    return found


def _reductions_after(view: GraphView, square: NodeProto) -> list[NodeProto]:
    """ReduceMean/ReduceSum nodes reading ``square``'s output directly or through layout ops."""
    found: list[NodeProto] = []
    stack = [square.output[0]]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for reader in view.consumers.get(name, ()):
            if not is_standard(reader):
                continue
            if reader.op_type in ("ReduceMean", "ReduceSum") and reader.input[0] == name:
                found.append(reader)
            elif reader.op_type in ("Reshape", "Identity", "Squeeze", "Unsqueeze", "Expand"):
                stack.append(reader.output[0])
    return found


def _is_square(node: NodeProto, values: OriginalValues) -> bool:
    """Whether ``node`` squares a float32 value: ``Mul(d, d)`` or ``Pow(d, 2)`` with a constant 2."""
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1] and values.is_f32(node.input[0]):
        return True
    if node.op_type == "Pow" and len(node.input) == 2 and values.is_f32(node.input[0]):
        tensor = values.constant_tensor(node.input[1])
        if tensor is not None:
            value = numpy_helper.to_array(tensor)
            return value.size == 1 and float(value.reshape(-1)[0]) == 2.0
    return False


def _mark_mean_feeding(view: GraphView, name: str, found: set[int]) -> None:
    """Mark the centering ``x - mean(x)`` (or the mean itself) that feeds a squaring."""
    producer = view.producer.get(name)
    if producer is None or not is_standard(producer):
        return
    if producer.op_type == "ReduceMean":
        found.add(id(producer))
    elif producer.op_type == "Sub" and len(producer.input) == 2:
        mean = view.producer.get(producer.input[1])
        if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == producer.input[0]:
            found.update((id(producer), id(mean)))
    elif producer.op_type in ("Mul", "Div"):
        for operand in producer.input:
            source = view.producer.get(operand)
            if source is not None and source.op_type in ("ReduceSum", "ReduceMean"):
                found.update((id(producer), id(source)))


def _is_small(types: dict[str, TypeProto], name: str) -> bool:
    dims = _dims(types, name)
    if dims is None or len(dims) > 1 or any(d is None for d in dims):
        return False
    return int(np.prod(dims, dtype=np.int64)) <= SMALL_ELEMENTS


def _dims(types: dict[str, TypeProto], name: str) -> list[int | None] | None:
    """The inferred dimensions of ``name`` (None for a symbolic one), or None when its shape is unknown."""
    tp = types.get(name)
    if tp is None or tp.WhichOneof("value") != "tensor_type" or not tp.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tp.tensor_type.shape.dim]
