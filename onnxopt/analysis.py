"""Model statistics: nodes, initializers, parameters, bytes, FLOPs, op histogram."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from onnx import ModelProto, TypeProto, helper

from onnxopt.graph import iter_scopes
from onnxopt.shapes import static_shape

FLOP_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass
class ModelStats:
    """Size and cost figures of a model (all graphs; FLOPs of the main graph where shapes are known)."""

    nodes: int = 0
    initializers: int = 0
    parameters: int = 0
    bytes: int = 0
    weight_bytes: int = 0
    flops: int = 0
    flops_unknown: int = 0
    op_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dictionary."""
        return asdict(self)


def _numel(dims) -> int:
    count = 1
    for d in dims:
        count *= int(d)
    return count


def node_flops(node, initializers: dict, types: dict[str, TypeProto]) -> int | None:
    """Multiply-accumulate based FLOPs (2 per MAC) of Conv, ConvTranspose, Gemm, MatMul.

    Returns 0 for other ops and None where the shapes needed are unknown.
    """
    op = node.op_type
    if op not in FLOP_OPS or node.domain not in ("", "ai.onnx"):
        return 0

    def shape(name: str):
        if name in initializers:
            return tuple(initializers[name].dims)
        return static_shape(types.get(name))

    out = static_shape(types.get(node.output[0])) if node.output else None
    weight = shape(node.input[1]) if len(node.input) > 1 else None
    if out is None or weight is None:
        return None
    if op == "Conv":
        # each output element: C_in/groups * prod(kernel) MACs == prod(weight.shape[1:])
        return 2 * _numel(out) * _numel(weight[1:])
    if op == "ConvTranspose":
        inp = shape(node.input[0])
        if inp is None:
            return None
        return 2 * _numel(inp) * _numel(weight[1:])
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        k = weight[1] if trans_b else weight[0]
        return 2 * _numel(out) * int(k)
    a = shape(node.input[0])
    if a is None or not a:
        return None
    return 2 * _numel(out) * int(a[-1])


def _tensor_bytes(tensor) -> int:
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 1
    return _numel(tensor.dims) * itemsize


def analyze(model: ModelProto, types: dict[str, TypeProto] | None = None, *, serialized_size: bool = True) -> ModelStats:
    """Compute :class:`ModelStats`; pass ``types`` (from inference) to get FLOPs.

    ``bytes`` is the exact serialized size, or the tensor payload size when the model is over
    2 GB or ``serialized_size=False`` (the exact size costs a serialization);
    ``weight_bytes`` (initializer payloads from their dims and types) is always computed.
    """
    from onnxopt.io import payload_bytes
    from onnxopt.io import serialized_size as exact_size

    size = exact_size(model) if serialized_size else None
    stats = ModelStats(bytes=size if size is not None else payload_bytes(model))
    histogram: Counter = Counter()
    for scope in iter_scopes(model.graph):
        graph = scope.graph
        stats.nodes += len(graph.node)
        stats.initializers += len(graph.initializer)
        stats.parameters += sum(_numel(t.dims) for t in graph.initializer)
        stats.weight_bytes += sum(_tensor_bytes(t) for t in graph.initializer)
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            histogram[key] += 1
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        stats.parameters += _numel(attr.t.dims)
    if types is not None:
        initializers = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type not in FLOP_OPS:
                continue
            flops = node_flops(node, initializers, types)
            if flops is None:
                stats.flops_unknown += 1
            else:
                stats.flops += flops
    stats.op_types = dict(sorted(histogram.items()))
    return stats
