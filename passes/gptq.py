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
    w = weight.astype(np.float64).copy()
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
