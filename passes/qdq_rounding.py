"""Error-compensating (GPTQ) rounding of the ``qdq`` pass's int8 weights.

The Hessian ``X^T X / n`` of each Conv / Gemm / MatMul layer's input rows (im2col for
convolutions, per group) is measured on calibration data through the float model, with at most
``ROWS_PER_SAMPLE`` rows per sample kept (a fixed random subset) so wide early convolutions stay
cheap; the weight is then rounded by :func:`onnxopt.passes.gptq.gptq_round` with the pass's
per-channel (or per-tensor) scales kept as they are, so only the integers change. Every weight is
rounded once, before the builds (the sensitivity search rebuilds the model many times), and its
Hessian dropped once its group's weights are rounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto

from onnxopt.calibration.capture import gram_matrices
from onnxopt.passes.gptq import check_hessian_memory, gptq_round, hessian_groups

ROWS_PER_SAMPLE = 1024
INT8_MAX = 127
GPTQ_OPS = frozenset({"Conv", "Gemm", "MatMul"})


def _attr(node: NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def layer_key(node: NodeProto) -> str:
    """The key of a layer's Hessian: its first output's name (stable across copies of the model)."""
    return node.output[0]


def eligible(node: NodeProto, weight: np.ndarray) -> bool:
    """Whether GPTQ applies: a standard Conv, a 2-D Gemm weight, or a 2-D MatMul weight."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in GPTQ_OPS:
        return False
    if node.op_type == "Conv":
        return weight.ndim >= 3
    if node.op_type == "Gemm":
        return weight.ndim == 2 and not _attr(node, "transA", 0)
    return weight.ndim == 2


def layer_hessians(
    model: ModelProto, layers: Iterable[tuple[NodeProto, tuple[int, ...]]], data: Any, *, batch_size: int, limit: int | None = None
) -> dict[str, np.ndarray]:
    """``[groups, K, K]`` Hessians of each layer's input rows, keyed by :func:`layer_key`, streamed over ``data``."""
    request = {layer_key(node): (node, shape) for node, shape in layers}
    return gram_matrices(model, request, data, batch_size=batch_size, limit=limit, rows_per_sample=ROWS_PER_SAMPLE)


def gptq_int8(node: NodeProto, weight: np.ndarray, scale: np.ndarray, hessian: np.ndarray, damp: float, qmax: int = INT8_MAX) -> np.ndarray:
    """int8 values of ``weight`` (its own layout) rounded by GPTQ with the given per-output-channel or per-tensor ``scale``,
    within [-qmax, qmax]."""
    w = weight.astype(np.float64)
    if node.op_type == "Conv":
        groups = hessian.shape[0]
        per_group = w.shape[0] // groups
        out = np.empty(w.shape, np.int8)
        scales = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (w.shape[0],))  # per-tensor: one value for all
        for g in range(groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            kn = w[rows].reshape(per_group, -1).T
            out[rows] = gptq_columns(kn, hessian[g], scales[rows], damp, qmax).T.reshape(w[rows].shape)
        return out
    trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
    kn = w.T if trans_b else w
    q = gptq_columns(kn, hessian[0], scale, damp, qmax)  # per-column scales, or one per-tensor scale broadcast
    return q.T if trans_b else q


def gptq_columns(
    kn: np.ndarray, hessian: np.ndarray, column_scale: np.ndarray, damp: float, qmax: int = INT8_MAX, what: str = "qdq: gptq"
) -> np.ndarray:
    """GPTQ int8 integers of a [K, N] weight with fixed per-column scales [N] (or one), saturated to [-qmax, qmax]."""
    column_scale = np.broadcast_to(np.asarray(column_scale, np.float64).reshape(-1), (kn.shape[1],))

    def make_rounder(_start: int, _stop: int, _rows: np.ndarray):
        def rounder(_: int, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            q = np.clip(np.rint(row / column_scale), -qmax, qmax)
            return q, q * column_scale

        return rounder

    return gptq_round(kn, hessian, make_rounder, damp=damp, int_dtype=np.int8, what=what)


@dataclass(frozen=True)
class GptqLayer:
    """A layer whose weight GPTQ rounds: the node, its weight's shape, the rewriter's (weight name, axis) key and the fixed scale."""

    node: NodeProto
    shape: tuple[int, ...]
    key: tuple[str, int | None]
    scale: np.ndarray
    qmax: int = INT8_MAX  # the integers' bound (63 for 7-bit weights)


@dataclass
class GptqRounding:
    """GPTQ int8 values of the weights, by the rewriter's (weight name, axis) key, with the scales they were rounded for."""

    rounded: dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    sweeps: int = 0

    def integers(self, key: tuple[str, int | None], scale: np.ndarray) -> np.ndarray | None:
        """The GPTQ integers of the weight ``key`` under ``scale`` (None when it was not rounded for that scale)."""
        entry = self.rounded.get(key)
        if entry is None or not np.array_equal(entry[0], scale):
            return None
        return entry[1]


def hessian_bytes(node: NodeProto, weight_shape: tuple[int, ...]) -> int:
    """Bytes of a layer's float64 ``[groups, K, K]`` input Hessian."""
    if node.op_type == "Conv":
        groups = _attr(node, "group", 1)
        k = int(np.prod(weight_shape[1:]))
        return 8 * groups * k * k
    k = weight_shape[1] if node.op_type == "Gemm" and _attr(node, "transB", 0) else weight_shape[0]
    return 8 * k * k


def gptq_rounding(
    model: ModelProto, layers: list[GptqLayer], weight_of: Callable[[str], np.ndarray], data: Any, *, batch_size: int, damp: float
) -> GptqRounding:
    """Round every layer's weight (read by ``weight_of`` when its turn comes, so no more than one float copy is held)
    by GPTQ, measuring the Hessians in :func:`onnxopt.passes.gptq.hessian_groups` (one calibration sweep per group of
    at most 1 GiB), so no more than one group's Hessians are ever held."""
    rounding = GptqRounding()
    costs = {index: hessian_bytes(layer.node, layer.shape) for index, layer in enumerate(layers)}
    for members in hessian_groups(costs):
        check_hessian_memory([costs[i] for i in members], "qdq", model)
        hessians = layer_hessians(model, [(layers[i].node, layers[i].shape) for i in members], data, batch_size=batch_size)
        rounding.sweeps += 1
        for i in members:
            layer = layers[i]
            hessian = hessians.get(layer_key(layer.node))
            if hessian is not None:
                weight = weight_of(layer.key[0])
                rounding.rounded[layer.key] = (layer.scale, gptq_int8(layer.node, weight, layer.scale, hessian, damp, layer.qmax))
        del hessians
    return rounding
