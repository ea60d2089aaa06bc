"""A roofline estimate of single-thread CPU latency, for ``prune_channels:by=latency``.

Every main-graph node costs ``FLOPs / PEAK_FLOPS + bytes / BANDWIDTH``: FLOPs as
:func:`onnxopt.analysis.node_flops` counts them for Conv/ConvTranspose/Gemm/MatMul and one per
output element for every other op; bytes are all its inputs and outputs (weights included).
Pruning scales every tensor of a group by the kept fraction of its channel axis, and every FLOP
op by the kept fraction of its weight, so the estimate of a pruned variant needs no rewrite.

It is an estimate, not a measurement: it ignores fusions and kernel efficiency, but unlike FLOPs
it sees that elementwise ops, pooling, Resize and Concat on wide activations cost time too (on
PP-OCR det they are about a third of onnxruntime's CPU time, while the two largest convolutions
hold 46% of the FLOPs and take 20% of the time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, TensorProto, TypeProto, helper

from onnxopt.analysis import FLOP_OPS, node_flops
from onnxopt.passes.channel_groups import ChannelAnalysis
from onnxopt.passes.channel_surgery import Keep, active, axis_size, constant_masks
from onnxopt.shapes import elem_type, static_shape

PEAK_FLOPS = 50e9  # FLOP/s one core sustains in convolutions (MLAS, fp32, AVX2/AVX-512)
BANDWIDTH = 10e9  # bytes/s one core streams through elementwise kernels


def _itemsize(data_type: int | None) -> int:
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(data_type or TensorProto.FLOAT)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4


@dataclass
class _Node:
    flops: float  # FLOPs of the unpruned node
    weight: str  # the constant its FLOPs are proportional to ("" for elementwise FLOPs, proportional to the output)
    output: str
    tensors: list[tuple[str, float]] = field(default_factory=list)  # (value or constant, bytes)


@dataclass
class LatencyModel:
    """Estimated seconds of the model and of pruned variants of it."""

    analysis: ChannelAnalysis
    nodes: list[_Node]
    dims: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: ModelProto, analysis: ChannelAnalysis, types: dict[str, TypeProto]) -> LatencyModel | None:
        """The estimate's terms for every node, or None when a tensor's shape is unknown."""
        constants = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                constants[node.output[0]] = node.attribute[0].t
        dims = {name: tuple(int(d) for d in t.dims) for name, t in constants.items()}
        terms: list[_Node] = []
        for node in model.graph.node:
            if node.op_type == "Constant" or not node.output:
                continue
            out = static_shape(types.get(node.output[0]))
            if node.op_type in FLOP_OPS:
                flops = node_flops(node, constants, types)
                if flops is None:
                    return None
                term = _Node(float(flops), node.input[1] if len(node.input) > 1 else "", node.output[0])
            else:
                term = _Node(float(np.prod(out)) if out is not None else 0.0, "", node.output[0])
            for name in (*node.input, *node.output):
                if not name:
                    continue
                if name in constants:
                    term.tensors.append((name, float(np.prod(dims[name])) * _itemsize(constants[name].data_type)))
                    continue
                shape = static_shape(types.get(name))
                if shape is None:
                    return None
                term.tensors.append((name, float(np.prod(shape)) * _itemsize(elem_type(types.get(name)))))
            terms.append(term)
        return cls(analysis, terms, dims)

    def _fractions(self, keep: Keep) -> dict[str, float]:
        """Kept fraction of every tensor and constant that pruning with ``keep`` shrinks."""
        keep = active(self.analysis, keep)
        fractions: dict[str, float] = {}
        for index in keep:
            for value in self.analysis.groups[index].values:
                if value not in fractions:
                    fractions[value] = float(self.analysis.value_mask(value, keep).mean())
        for target, axes in constant_masks(self.analysis, keep).items():
            if target.node is None:
                old = self.dims[target.constant]
                kept = np.prod([axis_size(axes[a]) if a in axes else d for a, d in enumerate(old)])
                fractions[target.constant] = float(kept) / float(np.prod(old))
        return fractions

    def seconds(self, keep: Keep | None = None) -> float:
        """Estimated seconds of the model pruned with ``keep`` (unpruned: None)."""
        fractions = self._fractions(keep) if keep else {}
        total = 0.0
        for term in self.nodes:
            scale = fractions.get(term.weight if term.weight else term.output, 1.0)
            moved = sum(size * fractions.get(name, 1.0) for name, size in term.tensors)
            total += term.flops * scale / PEAK_FLOPS + moved / BANDWIDTH
        return total

    def prunable_seconds(self) -> float:
        """Estimated seconds of the nodes whose tensors or weights a prunable group shrinks."""
        touched = {v for g in self.analysis.prunable() for v in g.values}
        touched |= {s.constant for g in self.analysis.prunable() for s in g.slices}
        total = 0.0
        for term in self.nodes:
            if any(name in touched for name, _ in term.tensors):
                total += term.flops / PEAK_FLOPS + sum(size for _, size in term.tensors) / BANDWIDTH
        return total
