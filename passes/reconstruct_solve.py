"""The numerical core of the ``reconstruct`` pass: streamed Gram matrices and ridge least squares.

A layer computes ``Y_g = X_g @ W_g (+ b_g)`` for each group ``g`` (see
:func:`onnxopt.calibration.capture.layer_rows`). :class:`LayerStats` accumulates, over calibration
batches and in float64, ``X^T X``, ``X^T Y``, the row sums of ``X`` and ``Y`` and the column sums of
squares of ``Y``; memory is the matrices plus one chunk of rows. :func:`ridge_solve` turns them into
new weights (optionally only on each output column's non-zero support, so a sparsity pattern is
kept) and :func:`column_errors` gives each output column's squared error for any weights, from the
same sums and without another pass over the data.

Weights are handled as ``[groups, K (+1 bias row), N]`` arrays: the bias, when the layer has one,
is the last row, fitted against a column of ones that is never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_BYTES = 64 << 20  # float64 rows converted at a time while accumulating
SOLVE_BYTES = 256 << 20  # stacked sub-systems solved at a time for sparse columns


@dataclass
class LayerStats:
    """Streamed sums of a layer's input rows ``X [G, R, K]`` and target rows ``Y [G, R, N]`` (float64)."""

    xtx: np.ndarray  # [G, K, K]
    xsum: np.ndarray  # [G, K]
    xty: np.ndarray  # [G, K, N]
    ysum: np.ndarray  # [G, N]
    yty: np.ndarray  # [G, N]: sum of squares of each target column
    rows: int = 0

    @classmethod
    def zeros(cls, groups: int, k: int, n: int) -> LayerStats:
        """Empty sums for ``groups`` groups of ``k`` inputs and ``n`` outputs."""
        return cls(np.zeros((groups, k, k)), np.zeros((groups, k)), np.zeros((groups, k, n)), np.zeros((groups, n)), np.zeros((groups, n)))

    @staticmethod
    def nbytes(groups: int, k: int, n: int) -> int:
        """Memory the sums (and the assembled system) of such a layer take."""
        return 8 * groups * 2 * ((k + 1) * (k + 1) + (k + 1) * n + 2 * n)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Accumulate rows ``x [G, R, K]`` and matching targets ``y [G, R, N]``, a chunk of rows at a time."""
        groups, count, k = x.shape
        step = max(1, CHUNK_BYTES // (8 * groups * max(k + y.shape[2], 1)))
        for start in range(0, count, step):
            xc = np.asarray(x[:, start : start + step], dtype=np.float64)
            yc = np.asarray(y[:, start : start + step], dtype=np.float64)
            xt = xc.transpose(0, 2, 1)
            self.xtx += xt @ xc
            self.xty += xt @ yc
            self.xsum += xc.sum(axis=1)
            self.ysum += yc.sum(axis=1)
            self.yty += np.einsum("grn,grn->gn", yc, yc)
        self.rows += count

    def plus(self, other: LayerStats) -> LayerStats:
        """The sums of both sets of rows."""
        return LayerStats(
            self.xtx + other.xtx,
            self.xsum + other.xsum,
            self.xty + other.xty,
            self.ysum + other.ysum,
            self.yty + other.yty,
            self.rows + other.rows,
        )

    def system(self, bias: bool) -> tuple[np.ndarray, np.ndarray]:
        """The normal equations ``A [G, K', K']``, ``B [G, K', N]`` (``K' = K + 1`` with a bias row of ones)."""
        if not bias:
            return self.xtx, self.xty
        groups, k, _ = self.xtx.shape
        a = np.empty((groups, k + 1, k + 1))
        a[:, :k, :k] = self.xtx
        a[:, :k, k] = a[:, k, :k] = self.xsum
        a[:, k, k] = self.rows
        b = np.concatenate([self.xty, self.ysum[:, None, :]], axis=1)
        return a, b


def column_errors(a: np.ndarray, b: np.ndarray, yty: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Squared error ``||X w_j - y_j||^2`` of every output column ``[G, N]`` from the sums (clamped at 0)."""
    quadratic = np.einsum("gkn,gkn->gn", w, a @ w)
    cross = np.einsum("gkn,gkn->gn", w, b)
    return np.maximum(quadratic - 2.0 * cross + yty, 0.0)


def ridge_weights(a: np.ndarray, k: int, ridge: float) -> np.ndarray:
    """The per-group ridge strength: ``ridge`` times the mean of the first ``k`` diagonal entries of ``A``."""
    diagonal = np.einsum("gkk->gk", a[:, :k, :k]).mean(axis=1) if k else np.zeros(a.shape[0])
    return ridge * np.where(diagonal > 0, diagonal, 1.0)


def ridge_solve(
    a: np.ndarray,
    b: np.ndarray,
    current: np.ndarray,
    ridge: float,
    *,
    k: int,
    anchor: bool,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Solve ``(A + lam I_k) W = B (+ lam W0)`` per group; the bias row (index ``k``, if any) is not damped.

    ``lam`` is ``ridge * mean(diag(X^T X))``. With ``anchor`` the penalty is ``lam ||W - W0||^2`` towards
    the ``current`` weights (directions the calibration data does not excite keep their old values),
    otherwise ``lam ||W||^2``. With ``mask [G, K', N]`` each column is solved on its own support (the
    other entries stay exactly zero).
    """
    lam = ridge_weights(a, k, ridge)
    damped = np.array(a, copy=True)
    index = np.arange(k)
    damped[:, index, index] += lam[:, None]
    rhs = np.array(b, copy=True)
    if anchor:
        rhs[:, :k] += lam[:, None, None] * current[:, :k]
    if mask is None:
        return _solve(damped, rhs)
    return np.stack([solve_on_support(damped[g], rhs[g], mask[g]) for g in range(a.shape[0])])


def solve_on_support(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Solve ``a[S_j, S_j] w = b[S_j, j]`` for every column ``j`` on its support ``S_j = mask[:, j]``.

    Columns that share a support pattern are solved together (one factorisation, many right-hand
    sides); the remaining ones are stacked by support size and solved in batches.
    """
    k, n = b.shape
    out = np.zeros((k, n))
    patterns, inverse, counts = np.unique(mask.T, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    singles: list[int] = []
    for index, pattern in enumerate(patterns):
        columns = np.flatnonzero(inverse == index)
        rows = np.flatnonzero(pattern)
        if not rows.size:
            continue
        if counts[index] > 1 or rows.size == k:
            out[np.ix_(rows, columns)] = _solve(a[np.ix_(rows, rows)][None], b[np.ix_(rows, columns)][None])[0]
        else:
            singles.extend(columns.tolist())
    if singles:
        _solve_singles(a, b, mask, np.asarray(singles), out)
    return out


def _solve_singles(a: np.ndarray, b: np.ndarray, mask: np.ndarray, columns: np.ndarray, out: np.ndarray) -> None:
    """Columns with distinct supports: batched solves of the gathered sub-systems, grouped by support size."""
    sizes = mask[:, columns].sum(axis=0)
    for size in np.unique(sizes):
        same = columns[sizes == size]
        per_batch = max(1, SOLVE_BYTES // (8 * int(size) * int(size)))
        for start in range(0, same.size, per_batch):
            chunk = same[start : start + per_batch]
            rows = np.nonzero(mask[:, chunk].T)[1].reshape(chunk.size, int(size))  # sorted support of each column
            sub_a = a[rows[:, :, None], rows[:, None, :]]
            sub_b = b[rows, chunk[:, None]][..., None]
            out[rows, chunk[:, None]] = _solve(sub_a, sub_b)[..., 0]


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched ``solve(a, b)``; a singular system falls back to least squares, one matrix at a time."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.stack([np.linalg.lstsq(a[i], b[i], rcond=None)[0] for i in range(a.shape[0])])
