"""GPTQ: error-compensating rounding of a linear layer's weight from its input statistics (closed form, numpy).

A weight ``W`` [K, N] (K input features, N outputs) is rounded one input feature (row) at a time;
the rounding error of each row, weighted by the Cholesky factor of the damped inverse Hessian
``H = X^T X / n`` of the layer's inputs, is pushed onto the rows not yet rounded, so
``||X W - X Q||`` is minimised greedily (Frantar et al., 2022). Updates inside a block of rows are
applied row by row and to the remaining rows once per block (the lazy batch update), so a
[4608, 512] convolution weight takes a fraction of a second.

The caller decides how a row is rounded: ``make_rounder(start, stop, block)`` returns a function
``(row_index, row) -> (integers, dequantized)`` for the rows of one block, which lets block-wise
schemes (weight-only int4) take each block's scale from the weights as updated so far and
per-channel int8 keep fixed scales.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import numpy as np
from onnx import ModelProto

from onnxopt.errors import OnnxoptError

Rounder = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]
Key = TypeVar("Key", bound=Hashable)


def inverse_factor(hessian: np.ndarray, damp: float, what: str = "gptq") -> np.ndarray:
    """Upper Cholesky factor ``U`` of the damped inverse Hessian (``H^-1 = U^T U``); unseen features get identity rows."""
    h = np.array(hessian, dtype=np.float64, copy=True)
    k = h.shape[0]
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * max(float(np.mean(np.diag(h))), 1e-12)
    try:
        inverse = np.linalg.inv(h)
        del h  # each [K, K] float64 matrix can be gigabytes: hold at most two at a time
        return np.linalg.cholesky(inverse).T
    except np.linalg.LinAlgError as exc:
        raise OnnxoptError(f"{what}: the damped Hessian is not positive definite ({exc}); raise 'damp'") from None


def gptq_round(
    weight: np.ndarray,
    hessian: np.ndarray,
    make_rounder: Callable[[int, int, np.ndarray], Rounder],
    *,
    block: int = 128,
    damp: float = 0.01,
    int_dtype: type = np.int16,
    what: str = "gptq",
) -> np.ndarray:
    """The integers of ``weight`` [K, N] rounded by GPTQ in blocks of ``block`` rows (see the module docstring)."""
    w = weight.astype(np.float64, copy=True)  # one float64 copy (astype then copy() made two)
    k, n = w.shape
    upper = inverse_factor(hessian, damp, what)
    q = np.empty((k, n), int_dtype)
    for start in range(0, k, block):
        stop = min(k, start + block)
        rounder = make_rounder(start, stop, w[start:stop])
        errors = np.empty((stop - start, n))
        for i in range(start, stop):
            q[i], deq = rounder(i, w[i])
            error = (w[i] - deq) / upper[i, i]
            if i + 1 < stop:
                w[i + 1 : stop] -= np.outer(upper[i, i + 1 : stop], error)
            errors[i - start] = error
        if stop < k:
            w[stop:] -= upper[start:stop, stop:].T @ errors
    return q


HESSIAN_BYTES = 1 << 30  # float64 Hessians held at once by a calibrated rounding (one calibration sweep per group)


def mean_hessian(parts: list[np.ndarray]) -> np.ndarray:
    """The mean of the Hessians of a weight's readers: the one matrix itself, or a sum built in place (no stacked copy)."""
    if len(parts) == 1:
        return parts[0]
    total = np.array(parts[0], dtype=np.float64, copy=True)
    for part in parts[1:]:
        total += part
    total /= len(parts)
    return total


def available_memory() -> int | None:
    """Bytes that can be allocated without swapping (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_hessian_memory(costs: list[int], what: str, model: ModelProto) -> None:
    """A one-line error, before any work, when a group of Hessians (``costs``: bytes each) cannot fit in memory.

    Measuring holds each running sum, one batch's matrix and onnxruntime's copy of the weights; rounding the
    largest holds its damped copy and inverse as well, so the estimate is ``2 * sum + 2 * max`` plus the model's
    weights. Past the available memory the process would be killed by the kernel halfway, with nothing said.
    """
    if not costs:
        return
    from onnxopt.io import payload_bytes

    need, have = 2 * sum(costs) + 2 * max(costs) + payload_bytes(model), available_memory()
    if have is not None and need > have:
        k = int(round((max(costs) / 8) ** 0.5))
        raise OnnxoptError(
            f"{what}: rounding=gptq needs about {need / 2**30:.1f} GiB for its Hessians (the largest at least {k} x {k} "
            f"float64) but {have / 2**30:.1f} GiB of memory are available; use rounding=nearest or a machine with more memory"
        )


def hessian_groups(costs: dict[Key, int], budget: int | None = None) -> list[list[Key]]:
    """The keys of ``costs`` in order, in groups whose Hessians (``costs[key]`` bytes each, ``8 * K * K`` for one
    float64 [K, K]) fit in ``budget`` bytes (default :data:`HESSIAN_BYTES`); a larger one goes alone."""
    limit = HESSIAN_BYTES if budget is None else budget
    groups: list[list[Key]] = []
    used = limit
    for key, cost in costs.items():
        if not groups or used + cost > limit:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += cost
    return groups
