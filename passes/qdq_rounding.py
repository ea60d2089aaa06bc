"""Error-compensating (GPTQ) rounding of the ``qdq`` pass's int8 weights.

The Hessian ``X^T X / n`` of each Conv / Gemm / MatMul layer's input rows (im2col for
convolutions, per group) is measured on calibration data through the float model, with at most
``ROWS_PER_SAMPLE`` rows per sample kept (a fixed random subset) so wide early convolutions stay
cheap; the weight is then rounded by :func:`onnxopt.passes.gptq.gptq_round` with the pass's
per-channel (or per-tensor) scales kept as they are, so only the integers change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto

from onnxopt.calibration.capture import gram_matrices
from onnxopt.passes.gptq import gptq_round

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


def gptq_int8(node: NodeProto, weight: np.ndarray, scale: np.ndarray, hessian: np.ndarray, damp: float) -> np.ndarray:
    """int8 values of ``weight`` (its own layout) rounded by GPTQ with the given per-output-channel or per-tensor ``scale``."""
    w = weight.astype(np.float64)
    if node.op_type == "Conv":
        groups = hessian.shape[0]
        per_group = w.shape[0] // groups
        out = np.empty(w.shape, np.int8)
        scales = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (w.shape[0],))  # per-tensor: one value for all
        for g in range(groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            kn = w[rows].reshape(per_group, -1).T
            out[rows] = gptq_columns(kn, hessian[g], scales[rows], damp).T.reshape(w[rows].shape)
        return out
    trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
    kn = w.T if trans_b else w
    q = gptq_columns(kn, hessian[0], scale, damp)  # per-column scales, or one per-tensor scale broadcast
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


@dataclass
class GptqRounding:
    """The layers' Hessians (by :func:`layer_key`) and the damping; integers are computed once per (weight, axis)."""

    hessians: dict[str, np.ndarray]
    damp: float
    cache: dict[tuple[str, int | None], np.ndarray] = field(default_factory=dict)

    def integers(self, node: NodeProto, weight: np.ndarray, scale: np.ndarray, key: tuple[str, int | None]):
        """GPTQ int8 values of ``weight`` read by ``node`` (None when the layer has no Hessian)."""
        hessian = self.hessians.get(layer_key(node))
        if hessian is None:
            return None
        if key not in self.cache:
            self.cache[key] = gptq_int8(node, weight, scale, hessian, self.damp)
        return self.cache[key]
