"""Low-rank factorizations of layer weights in numpy: truncated SVD, activation-aware SVD, Tucker-2, ranks.

Every layer is seen as a matrix product ``Y = X @ M`` with ``M`` of shape [K, N] (K input
features, N outputs; for a convolution K = Cin/groups * prod(kernel) per group, the im2col
view). A truncated factorization ``M ~ left @ right`` with ``left`` [K, r] and ``right`` [r, N]
replaces one product by two thin ones.

* Plain SVD: ``M = U S V^T``; ``left = U_r``, ``right = S_r V_r^T`` (the singular values are
  folded into the second factor). It minimises ``||M - left @ right||_F``.
* Activation-aware SVD: with the Gram matrix ``C = X^T X / rows`` of the layer's calibration
  inputs, damped to ``C + damp * mean(diag C) * I`` and factored as ``C = L L^T`` (Cholesky),
  ``L^T M = U S V^T`` and ``left = L^-T U_r``, ``right = S_r V_r^T``. Since
  ``||X (M - left @ right)||_F^2 = ||L^T M - U_r S_r V_r^T||_F^2`` (up to the damping), this is
  the rank-r product closest to the layer's outputs on the calibration data.
* Tucker-2 of a conv weight [Cout, Cin, *kernel]: ``W ~ core x_0 U_out x_1 U_in`` with
  orthonormal ``U_in`` [Cin, r_in], ``U_out`` [Cout, r_out] and a core [r_out, r_in, *kernel]
  (higher-order SVD start refined by alternating least squares), i.e. a 1x1 conv (Cin -> r_in),
  the k x k conv on the core (r_in -> r_out) and a 1x1 conv (r_out -> Cout).

Signs of singular vectors are fixed (the largest-magnitude entry of each left vector is
positive) so the same weight always gives the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxopt.errors import OnnxoptError

TUCKER_ITERATIONS = 8  # alternating least-squares sweeps after the higher-order SVD start
MAX_DAMP_TRIES = 6  # Cholesky retries, each with ten times the damping


def fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip singular vector pairs so that the largest-|.| entry of each column of ``u`` is positive."""
    if not u.size:
        return u, vt
    pivots = np.abs(u).argmax(axis=0)
    signs = np.sign(u[pivots, np.arange(u.shape[1])])
    signs[signs == 0] = 1.0
    return u * signs, vt * signs[:, None]


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``matrix = u @ diag(s) @ vt`` in float64 with fixed signs."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    u, vt = fix_signs(u, vt)
    return u, s, vt


def energy_rank(singular: np.ndarray, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the total sum of squares (at least 1)."""
    squares = np.square(np.asarray(singular, dtype=np.float64))
    total = float(squares.sum())
    if total <= 0 or not singular.size:
        return 1
    kept = np.cumsum(squares) / total
    return int(min(singular.size, np.searchsorted(kept, energy - 1e-12) + 1))


def kept_energy(singular: np.ndarray, rank: int) -> float:
    """Fraction of the sum of squared singular values the first ``rank`` keep."""
    squares = np.square(np.asarray(singular, dtype=np.float64))
    total = float(squares.sum())
    return float(squares[:rank].sum() / total) if total > 0 else 1.0


def round_up(rank: int, multiple: int, full: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, at most ``full`` and at least 1."""
    if multiple > 1:
        rank = math.ceil(rank / multiple) * multiple
    return max(1, min(full, rank))


def round_down(rank: int, multiple: int, full: int) -> int:
    """``rank`` (clipped to [1, full]) rounded down to a multiple of ``multiple`` once it is at least 4 multiples.

    Smaller ranks stay exact: rounding them down would drop a large share of the budget.
    """
    rank = max(1, min(full, rank))
    if multiple > 1 and rank >= 4 * multiple:
        rank = rank // multiple * multiple
    return rank


def whitening_factor(gram: np.ndarray, damp: float) -> np.ndarray:
    """Lower Cholesky factor ``L`` of ``gram + damp * mean(diag) * I`` (features never seen get unit weight).

    The damping grows tenfold (a few times) if the matrix is still not positive definite.
    """
    c = np.array(gram, dtype=np.float64, copy=True)
    c = (c + c.T) / 2
    diag = np.diag(c)
    scale = float(np.mean(diag)) if diag.size else 0.0
    if not np.isfinite(scale) or scale <= 0:
        return np.eye(c.shape[0])
    dead = diag <= 0
    if dead.any():
        c[dead, :] = 0.0
        c[:, dead] = 0.0
        c[dead, dead] = scale
    eps = max(damp, 1e-8)
    for _ in range(MAX_DAMP_TRIES):
        try:
            return np.linalg.cholesky(c + eps * scale * np.eye(c.shape[0]))
        except np.linalg.LinAlgError:
            eps *= 10
    raise OnnxoptError("lowrank: the activation Gram matrix is not positive definite even with strong damping")


@dataclass
class Spectrum:
    """The SVD of a [K, N] weight (plain) or of ``L^T`` times it (activation-aware, ``lower`` = L)."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    lower: np.ndarray | None = None

    @property
    def full_rank(self) -> int:
        """The number of singular values (min(K, N))."""
        return int(self.s.size)

    def energy(self, rank: int) -> float:
        """Fraction of the (weighted) energy the first ``rank`` singular values keep."""
        return kept_energy(self.s, rank)

    def rank_for_energy(self, energy: float) -> int:
        """The smallest rank keeping ``energy``."""
        return energy_rank(self.s, energy)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``left`` [K, rank] and ``right`` [rank, N] in float64 with ``left @ right`` the rank-``rank`` approximation."""
        u = self.u[:, :rank]
        right = self.s[:rank, None] * self.vt[:rank]
        if self.lower is None:
            return u, right
        return np.linalg.solve(self.lower.T, u), right


def matrix_spectrum(matrix: np.ndarray, gram: np.ndarray | None = None, damp: float = 0.01) -> Spectrum:
    """The :class:`Spectrum` of a [K, N] weight; activation-aware when the [K, K] input ``gram`` is given."""
    if gram is None:
        return Spectrum(*svd(matrix))
    lower = whitening_factor(gram, damp)
    u, s, vt = svd(lower.T @ np.asarray(matrix, dtype=np.float64))
    return Spectrum(u, s, vt, lower)


# ----------------------------------------------------------------------------- Tucker-2


@dataclass
class Tucker2:
    """``W ~ core x_0 last x_1 first^T``: ``first`` [r_in, Cin], ``core`` [r_out, r_in, *kernel], ``last`` [Cout, r_out]."""

    first: np.ndarray
    core: np.ndarray
    last: np.ndarray
    energy: float

    def reconstruct(self) -> np.ndarray:
        """The approximated weight [Cout, Cin, *kernel]."""
        inner = np.tensordot(self.last, self.core, axes=(1, 0))  # [Cout, r_in, *k]
        return np.moveaxis(np.tensordot(inner, self.first, axes=(1, 0)), -1, 1)


def unfold(weight: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding: axis ``mode`` first, the rest flattened."""
    return np.moveaxis(weight, mode, 0).reshape(weight.shape[mode], -1)


def leading_vectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    """The ``rank`` leading left singular vectors of ``matrix`` (fixed signs)."""
    u, _, _ = svd(matrix)
    return u[:, :rank]


def mode_singular_values(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of the output-channel (mode 0) and input-channel (mode 1) unfoldings of a conv weight."""
    w = np.asarray(weight, dtype=np.float64)
    return np.linalg.svd(unfold(w, 0), compute_uv=False), np.linalg.svd(unfold(w, 1), compute_uv=False)


def project(weight: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    """The core ``W x_0 u_out^T x_1 u_in^T`` [r_out, r_in, *kernel]."""
    core = np.tensordot(u_out.T, weight, axes=(1, 0))  # [r_out, Cin, *k]
    return np.moveaxis(np.tensordot(u_in.T, core, axes=(1, 1)), 0, 1)


def tucker2(weight: np.ndarray, r_in: int, r_out: int, iterations: int = TUCKER_ITERATIONS) -> Tucker2:
    """Tucker-2 of a conv weight [Cout, Cin, *kernel] at ranks (``r_in``, ``r_out``): HOSVD start, then HOOI sweeps."""
    w = np.asarray(weight, dtype=np.float64)
    u_out = leading_vectors(unfold(w, 0), r_out)
    u_in = leading_vectors(unfold(w, 1), r_in)
    for _ in range(iterations):
        partial = np.tensordot(u_out.T, w, axes=(1, 0))  # [r_out, Cin, *k]
        u_in = leading_vectors(unfold(partial, 1), r_in)
        partial = np.moveaxis(np.tensordot(u_in.T, w, axes=(1, 1)), 0, 1)  # [Cout, r_in, *k]
        u_out = leading_vectors(unfold(partial, 0), r_out)
    core = project(w, u_out, u_in)
    total = float(np.sum(np.square(w)))
    energy = float(np.sum(np.square(core)) / total) if total > 0 else 1.0
    return Tucker2(np.ascontiguousarray(u_in.T), core, u_out, min(1.0, energy))


# ----------------------------------------------------------------------------- 1x1 first


def inward_matrix(weight: np.ndarray) -> np.ndarray:
    """A one-group conv weight [Cout, Cin, *kernel] as the [Cin, Cout * taps] matrix of ``Conv_kxk(r -> Cout) . Conv_1x1(Cin -> r)``.

    ``M[c, o * taps + t] = W[o, c, t]``: a rank-r ``L @ R`` is the 1x1 conv ``L^T`` followed by
    the k x k conv ``R`` reshaped to [Cout, r, *kernel].
    """
    cout, cin = weight.shape[:2]
    return np.asarray(weight, dtype=np.float64).reshape(cout, cin, -1).transpose(1, 0, 2).reshape(cin, -1)


def inward_conv_weights(left: np.ndarray, right: np.ndarray, cout: int, kernel: tuple[int, ...]) -> list[np.ndarray]:
    """The 1x1 weight [r, Cin, 1, ...] and the k x k weight [Cout, r, *kernel] of a rank-r ``left @ right`` of :func:`inward_matrix`."""
    rank = left.shape[1]
    first = left.T.reshape(rank, left.shape[0], *((1,) * len(kernel)))
    second = right.reshape(rank, cout, *kernel).transpose(1, 0, *range(2, 2 + len(kernel)))
    return [first, second]


def channel_gram(gram: np.ndarray, taps: int) -> np.ndarray:
    """The [Cin, Cin] Gram matrix of input pixels, the mean of the im2col Gram's per-tap diagonal blocks.

    ``gram`` is [Cin * taps, Cin * taps] in im2col column order (channel-major, then tap).
    """
    size = gram.shape[0] // taps
    blocks = np.asarray(gram, dtype=np.float64).reshape(size, taps, size, taps)
    return np.einsum("atbt->ab", blocks) / taps
