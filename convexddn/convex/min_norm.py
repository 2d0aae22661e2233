"""Minimum-norm solutions of a dense, rank-deficient system, with a rank that does not
depend on the units of its rows and columns (the per-element path's derivative systems).

The residual map's derivative ``M`` (:mod:`.cone`) is singular at every solution and holds
the program's data: a bound of 3e8 beside unit entries put its largest singular value at
3e8, and a rank cut relative to it (1e-9 · 3e8 = 0.3) dropped directions of size 1: the
gradient of a projection onto a ball of radius 3e8 came back 0.63 off, with no warning.
Here the rank is decided on the equilibrated matrix :math:`S = D_r M D_c` (row and column
scales, powers of two), and the solution is the minimum-norm one *in the caller's units*:

.. math::

    M r = h:\\quad r_p = D_c\\, S^+ D_r h, \\qquad r = r_p - Q Q^T r_p,

:math:`Q` an orthonormal basis of :math:`\\mathcal N(M) = D_c \\mathcal N(S)` (the
minimum-norm solution of :math:`S`'s system is one solution of ``M``'s; another differs by
a null vector, which the adjoint formula does not cancel). The null vectors come from the
same factorisation: for random ``W``, :math:`W - S^+ S W` spans :math:`\\mathcal N(S)`.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg.lapack import dtrcon, get_lapack_funcs

__all__ = ["PASSES", "equilibrate", "min_norm_solve", "pow2_scale"]

PASSES = 4  # Ruiz passes on |M| (a scale spread of 1e8 is balanced to ~2 in four)
_GELSY, _GELSY_LWORK = get_lapack_funcs(("gelsy", "gelsy_lwork"), (np.zeros((1, 1)),))  # (float64)


def equilibrate(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column scales (powers of two, exact) that bring ``|mat|``'s row and column maxima near 1."""
    rows, cols = np.ones(mat.shape[0]), np.ones(mat.shape[1])
    a = np.abs(mat)
    for _ in range(PASSES):
        scaled = a * rows[:, None] * cols[None, :]
        rows, cols = rows * pow2_scale(scaled.max(1)), cols * pow2_scale(scaled.max(0))
    return rows, cols


def pow2_scale(maxima: np.ndarray) -> np.ndarray:
    """A Ruiz pass's factors for rows (or columns) of largest entries ``maxima``: the power of
    two nearest 1/√maximum (exact), 1 where a row is empty."""
    return np.exp2(np.round(-0.5 * np.log2(np.where(maxima > 0, maxima, 1.0))))


def _gelsy(S: np.ndarray, B: np.ndarray, rtol: float) -> tuple[np.ndarray, int, float]:
    """``scipy.linalg.lstsq(S, B, cond=rtol, lapack_driver="gelsy")``'s solution and rank, and
    the condition (1-norm, LAPACK's estimate) of the directions kept: ``gelsy`` factorises
    ``S P = Q [T 0; 0 0] Z`` with ``T`` (rank × rank) triangular, whose singular values are
    those kept, so ``trcon`` of ``T`` costs O(rank²) beside the O(N³) factorisation."""
    lwork, info = _GELSY_LWORK(S.shape[0], S.shape[1], B.shape[1], rtol)
    if info != 0:  # (as scipy's lstsq: no workspace size, no solve)
        raise ValueError(f"gelsy workspace query failed (info {info})")
    fact, sol, _, rank, info = _GELSY(S, B, np.zeros(S.shape[1], dtype=np.int32), rtol, int(lwork))
    if info != 0:
        raise ValueError(f"gelsy failed (info {info})")
    rcond = dtrcon(np.triu(fact[:rank, :rank]))[0] if rank else 1.0
    return sol[:S.shape[1]], int(rank), 1.0 / rcond if rcond > 0 else float("inf")


def min_norm_solve(mat: np.ndarray, rhs: np.ndarray, rtol: float, seed: int = 0) -> tuple[np.ndarray, int, float]:
    """``(r, rank, condition)``: the minimum-norm solution of ``mat r = rhs`` (``(N, N)``, ``(N,)``, or
    ``(N, k)`` for ``k`` right-hand sides at one factorisation's cost;
    least squares in the equilibrated rows' norm where inconsistent) after dropping the directions of the
    equilibrated matrix that LAPACK's rank-revealing QR (``gelsy``, condition estimate
    ``1 / rtol``) finds negligible; ``rank`` counts the others, ``condition`` estimates the
    equilibrated matrix's condition along them (how far rounding in ``rhs`` is amplified)."""
    rows, cols = equilibrate(mat)
    S = mat * rows[:, None] * cols[None, :]
    W = np.random.default_rng(seed).standard_normal((S.shape[1], 1))
    B = rhs.reshape(rhs.shape[0], -1)
    k = B.shape[1]
    sol, rank, condition = _gelsy(S, np.column_stack([rows[:, None] * B, S @ W]), rtol)
    null = S.shape[1] - rank
    if null > 1:  # (one random column spans a null space of dimension 1 only)
        W = np.random.default_rng(seed).standard_normal((S.shape[1], null))
        basis = W - scipy.linalg.lstsq(S, S @ W, cond=rtol, lapack_driver="gelsy", check_finite=False)[0]
    else:
        basis = W - sol[:, k:]
    r = cols[:, None] * sol[:, :k]
    if null:
        Q = np.linalg.qr(cols[:, None] * basis)[0]
        r = r - Q @ (Q.T @ r)
    return r.reshape(rhs.shape), rank, condition
