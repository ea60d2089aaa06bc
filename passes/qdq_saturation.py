"""``reduce_range=auto`` for the ``qdq`` pass: 7-bit weights only for the layers whose products would saturate.

On x86 CPUs with AVX2 and no VNNI, onnxruntime's uint8 x int8 GEMM (QLinearConv, QLinearMatMul) adds each two
neighbouring products along K in int16 (``vpmaddubsw``) before it widens them, so a pair beyond 32767 in magnitude
saturates; 7-bit weights (|w| <= 63) never reach it (2 x 255 x 63 = 32130). Whether 8-bit weights do depends on the
activations: on such a CPU PP-OCR cls INT8 reaches cosine 0.993 with 8-bit weights and 0.9994 with 7-bit ones, while
magika never saturates and 7-bit weights only cut its top-1 agreement (0.992 -> 0.973). So each layer is checked on
the calibration data: its input rows quantized with the input's own scale and zero point, its weight rounded to 8
bits, and every pair of neighbouring products along K, in both orders onnxruntime may lay K out in for a convolution
(channel-major as ONNX stores it, and the kernel-position-major order of its NHWC kernels) and at both pair
alignments. A layer with a pair beyond the int16 range gets 7-bit weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto

from onnxopt.calibration.capture import layer_rows, stream_values
from onnxopt.passes.noop_rules import get_attr

INT16_MAX = 32767
ROWS_PER_BATCH = 512  # rows of a layer checked per calibration batch (a seeded random subset of a convolution's)
CHUNK_VALUES = 1 << 22  # int32 values of one pair-sum block (16 MiB)


@dataclass(frozen=True)
class UInt8Layer:
    """A layer onnxruntime runs as a uint8 x int8 GEMM: its node, int8 weight (as stored), and input scale and zero point."""

    node: NodeProto
    weight: np.ndarray
    scale: float
    zero_point: int


def saturating_layers(model: ModelProto, layers: Iterable[UInt8Layer], data: Any, *, batch_size: int) -> set[str]:
    """Output names of the layers whose neighbouring uint8 x int8 products exceed the int16 range on ``data``."""
    pending = {layer.node.output[0]: layer for layer in layers}
    found: set[str] = set()
    if not pending:
        return found
    rngs = {name: np.random.default_rng(zlib.crc32(name.encode())) for name in pending}  # a layer's rows: not others'
    inputs = list(dict.fromkeys(layer.node.input[0] for layer in pending.values()))
    for values in stream_values(model, inputs, data, batch_size=batch_size):
        for name, layer in list(pending.items()):
            if _saturates(layer, np.asarray(values[layer.node.input[0]]), rngs[name]):
                found.add(name)
                del pending[name]
        if not pending:
            break
    return found


def _saturates(layer: UInt8Layer, x: np.ndarray, rng: np.random.Generator) -> bool:
    """Whether a fixed random subset of this batch's rows of ``layer`` saturates (a convolution's rows one sample at a
    time, so a batch's im2col is never held whole)."""
    chunks = [x[i : i + 1] for i in range(len(x))] if layer.node.op_type == "Conv" else [x]
    keep = max(1, ROWS_PER_BATCH // len(chunks))
    weights = _weight_rows(layer)
    orders = _k_orders(layer, weights[0].shape[1])
    for chunk in chunks:
        rows = layer_rows(layer.node, chunk.astype(np.float32), layer.weight.shape)  # [groups, R, K]
        if rows.shape[1] > keep:
            rows = rows[:, np.sort(rng.choice(rows.shape[1], keep, replace=False))]
        a = np.clip(np.rint(rows / layer.scale) + layer.zero_point, 0, 255).astype(np.int32)
        for group, w in enumerate(weights):
            if any(_pairs_exceed(a[group][:, order], w[:, order]) for order in orders):
                return True
    return False


def _weight_rows(layer: UInt8Layer) -> list[np.ndarray]:
    """The weight as ``[groups] x [N, K]`` int32 rows, K in :func:`layer_rows`' column order."""
    w = layer.weight.astype(np.int32)
    if layer.node.op_type == "Conv":
        groups = int(get_attr(layer.node, "group", 1))  # type: ignore[arg-type]
        per_group = w.shape[0] // groups
        return [w[g * per_group : (g + 1) * per_group].reshape(per_group, -1) for g in range(groups)]
    trans_b = layer.node.op_type == "Gemm" and get_attr(layer.node, "transB", 0)
    return [w if trans_b else w.T]


def _k_orders(layer: UInt8Layer, k: int) -> list[np.ndarray]:
    """Column orders of the K = ``k`` columns to check: as stored, and for a convolution with a kernel larger than 1 also
    kernel-position-major (NHWC im2col)."""
    stored = np.arange(k)
    taps = int(np.prod(layer.weight.shape[2:])) if layer.node.op_type == "Conv" else 1
    return [stored] if taps == 1 else [stored, stored.reshape(-1, taps).T.reshape(-1)]


def _pairs_exceed(a: np.ndarray, w: np.ndarray) -> bool:
    """Whether some ``a[r, i] * w[n, i] + a[r, i + 1] * w[n, i + 1]`` leaves the int16 range ([R, K] x [N, K])."""
    k = a.shape[1]
    if k < 2:
        return False
    first, second = a[:, :-1], a[:, 1:]
    w_first, w_second = w[:, :-1], w[:, 1:]
    step = max(1, CHUNK_VALUES // max(1, a.shape[0] * w.shape[0]))
    for start in range(0, k - 1, step):
        end = min(k - 1, start + step)
        sums = first[:, None, start:end] * w_first[None, :, start:end] + second[:, None, start:end] * w_second[None, :, start:end]
        if int(np.abs(sums).max()) > INT16_MAX:
            return True
    return False
