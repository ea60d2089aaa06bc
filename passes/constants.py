"""Constant nodes lifted to initializers."""

from __future__ import annotations

from onnx import NodeProto, TensorProto, helper

from onnxopt.graph import GraphScope
from onnxopt.passbase import Pass, PassContext, PassResult
from onnxopt.registry import register_pass


def constant_value(node: NodeProto) -> TensorProto | None:
    """The tensor a standard Constant node produces, or None for forms not handled here."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value" and attr.HasField("t"):
        tensor = TensorProto()
        tensor.CopyFrom(attr.t)
        return tensor
    scalar = {"value_float": (TensorProto.FLOAT, "f"), "value_int": (TensorProto.INT64, "i")}
    lists = {"value_floats": (TensorProto.FLOAT, "floats"), "value_ints": (TensorProto.INT64, "ints")}
    if attr.name in scalar:
        dtype, field = scalar[attr.name]
        return helper.make_tensor("", dtype, [], [getattr(attr, field)])
    if attr.name in lists:
        dtype, field = lists[attr.name]
        values = list(getattr(attr, field))
        return helper.make_tensor("", dtype, [len(values)], values)
    return None


@register_pass
class LiftConstants(Pass):
    """Turn Constant nodes into initializers (in the graph where the Constant lives).

    Pre: none. Post: no standard Constant node with a dense value remains, except those
    whose output is a graph output (an output must stay produced by a node).
    Sparse and string-list constants are left as they are, and so are models with IR
    version < 4, where an initializer must also be a (user-overridable) graph input.
    """

    name = "lift_constants"

    def run_graph(self, scope: GraphScope, ctx: PassContext) -> PassResult:
        """Replace each liftable Constant node by an initializer of the same name."""
        if ctx.model.ir_version < 4:
            return PassResult()  # IR < 4 requires every initializer to be a graph input
        graph = scope.graph
        view = ctx.view(graph)
        lifted: list[TensorProto] = []
        keep: list[NodeProto] = []
        for node in view.nodes:
            tensor = constant_value(node) if node.output and node.output[0] not in view.graph_outputs else None
            if tensor is None:
                keep.append(node)
                continue
            tensor.name = node.output[0]
            lifted.append(tensor)
        result = PassResult()
        if lifted:
            del graph.node[:]
            graph.node.extend(keep)
            graph.initializer.extend(lifted)
            result.count("constants_lifted", len(lifted))
        return result
