"""The rewrite of ``lowrank``: the nodes and weights that replace one factorized layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, TypeProto, helper, numpy_helper

from onnxopt.graph import NameGenerator
from onnxopt.passes.fusion_support import replace_nodes
from onnxopt.passes.lowrank_layers import Choice, Layer
from onnxopt.passes.noop_rules import get_attr

log = logging.getLogger("onnxopt")


@dataclass
class Factorized:
    """The emitted weights of one layer (float64) and the energy they keep."""

    choice: Choice
    arrays: list[np.ndarray]
    energy: float


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
    g, first_pointwise = layer.groups, choice.inward  # SVD: k x k conv then 1x1; 1x1 first (one group): the other way
    out.nodes = [
        helper.make_node(
            "Conv", [node.input[0], weights[0]], [hidden[0]], name=node_names[0], **_conv_attrs(node, pointwise=first_pointwise, groups=g)
        ),
        helper.make_node(
            "Conv",
            [hidden[0], weights[1], *bias],
            [node.output[0]],
            name=node_names[1],
            **_conv_attrs(node, pointwise=not first_pointwise, groups=g),
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
