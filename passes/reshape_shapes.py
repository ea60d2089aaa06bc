"""Computed Reshape targets replaced by constants that shape inference proved."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TypeProto, numpy_helper

from onnxopt.graph import GraphScope, GraphView, is_standard, opset_version
from onnxopt.passbase import Pass, PassContext, PassResult, Requirement
from onnxopt.passes.shape_values import ShapeValues, reshape_target
from onnxopt.registry import register_pass


def _same_dim(a, b) -> bool:
    """Two dims proved equal by shape inference: equal static sizes or the same symbol."""
    if a.HasField("dim_value") and b.HasField("dim_value"):
        return a.dim_value == b.dim_value
    return a.HasField("dim_param") and b.HasField("dim_param") and bool(a.dim_param) and a.dim_param == b.dim_param


def _dims(type_proto: TypeProto | None):
    if type_proto is None or type_proto.WhichOneof("value") != "tensor_type" or not type_proto.tensor_type.HasField("shape"):
        return None
    return list(type_proto.tensor_type.shape.dim)


def constant_target(out_type: TypeProto | None, in_type: TypeProto | None = None, *, allowzero: bool = False) -> list[int] | None:
    """A constant Reshape target that yields ``out_type``'s shape, or None.

    Static dims are copied. Without ``allowzero``, a dim proved equal to the input's dim
    at the same position becomes 0 (Reshape copies it). At most one other unknown dim
    becomes -1 (inferred from the element count, which the original Reshape already
    matched). Zero-sized dims are refused: 0 means "copy" unless allowzero is set, and -1
    cannot be inferred next to a zero.
    """
    out_dims = _dims(out_type)
    if out_dims is None:
        return None
    in_dims = _dims(in_type) or []
    target: list[int] = []
    unknown = 0
    for index, dim in enumerate(out_dims):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            target.append(dim.dim_value)
        elif dim.HasField("dim_value") and dim.dim_value == 0:
            return None
        elif not allowzero and index < len(in_dims) and _same_dim(dim, in_dims[index]):
            target.append(0)
        else:
            unknown += 1
            target.append(-1)
    return target if unknown <= 1 else None


@register_pass
class ConstantReshapeShapes(Pass):
    """Replace a Reshape's computed target shape by a constant that shape inference proved.

    Exporters compute targets such as Concat(Shape(x)[0:1], [512, 256]) for a dynamic
    batch; when inference knows every output dim, or proves it equal to the input's dim at
    the same position (written 0), but at most one, the target becomes a constant (the
    unknown dim as -1) and the shape computation is left to dead-code elimination. Failing
    that, the target's symbolic value (:mod:`onnxopt.passes.shape_values`) decides: known
    entries stay, entries proved equal to the input's dim at the same position become 0, and
    one remaining entry becomes -1 when every other entry is a positive number.
    Pre: inferred types. Post: such Reshapes read a constant int64 target; outputs are
    unchanged. Skipped for IR < 4 (initializers would have to be inputs) and opset < 5
    (the target was an attribute).
    """

    name = "constant_reshape_shapes"
    requires = frozenset({Requirement.SHAPES})

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Match every Reshape with a computed target, then give each a constant target."""
        result = PassResult()
        if ctx.model.ir_version < 4 or (opset_version(ctx.model) or 1) < 5:
            return result
        view = ctx.view(scope.graph)
        matches: list[tuple[NodeProto, list[int]]] = []
        values: ShapeValues | None = None
        for node in view.nodes:
            if not self._candidate(node, view):
                continue
            target = self._match(node, ctx)
            if target is None:
                values = values or ShapeValues(view, ctx)
                target = reshape_target(node, values, ctx)
            if target is not None:
                matches.append((node, target))
        for node, target in matches:
            name = ctx.names.fresh(f"{node.output[0]}_target")
            scope.graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
            node.input[1] = name
            result.count("reshape_targets")
        return result

    @staticmethod
    def _candidate(node: NodeProto, view: GraphView) -> bool:
        """A standard Reshape whose target is computed (not an initializer or Constant)."""
        if node.op_type != "Reshape" or not is_standard(node) or len(node.input) < 2 or not node.input[1]:
            return False
        if view.is_constant(node.input[1]):
            return False
        producer = view.producer.get(node.input[1])
        return producer is None or producer.op_type != "Constant"

    @staticmethod
    def _match(node: NodeProto, ctx: PassContext) -> list[int] | None:
        allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
        return constant_target(ctx.types.get(node.output[0]), ctx.types.get(node.input[0]), allowzero=allowzero)
