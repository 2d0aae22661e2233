"""convexddn.convex.min_norm: minimum-norm solutions with a rank decided in equilibrated units."""
from __future__ import annotations

import numpy as np
import pytest

from convexddn.convex.min_norm import min_norm_solve


def _badly_scaled(n: int, rank: int, spread: float, seed: int) -> np.ndarray:
    """diag(dr) · (rank-``rank`` matrix with singular values in [1, 2]) · diag(dc), row and
    column scales spread over ``spread`` (powers of two up to 2^±log2(spread))."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    V, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    core = U @ np.diag(rng.uniform(1.0, 2.0, rank)) @ V.T
    top = np.log2(spread)
    dr, dc = (np.exp2(np.round(rng.uniform(-top, top, n))) for _ in range(2))
    return dr[:, None] * core * dc[None, :]


def _rounding_bound(M: np.ndarray, rank: int) -> float:
    """eps · κ_k of M with its rows scaled to a largest entry of 1 (σ_1 / σ_rank, by numpy's SVD): the
    error, relative to the largest entry, that rounding M's entries alone puts into the minimum-norm
    solution (row scaling leaves it unchanged, column scaling does not)."""
    s = np.linalg.svd(M / np.abs(M).max(1)[:, None], compute_uv=False)
    return np.finfo(float).eps * s[0] / s[rank - 1]


@pytest.mark.parametrize("deficiency", [1, 2, 4])
@pytest.mark.parametrize("spread", [1.0, 2.0**10, 2.0**20])
def test_min_norm_solve_finds_the_rank_and_the_minimum_norm_solution(deficiency, spread):
    """A consistent system whose minimum-norm solution is known: r* = Mᵀw lies in M's row
    space, so it is the minimum-norm solution of M r = M r*. The rank is exact whatever
    the rows' and columns' units (a cut relative to M's largest singular value dropped
    directions of size 1 beside a 3e8 entry). The solution is accurate to eps · κ_k(D_r M)
    (:func:`_rounding_bound`; within 0.93 of it on 6,480 random systems, two BLAS kernels), what
    the data allow: at 2^20 (entries of M over 2^±40, r* over 12 decades) and deficiency 1 that
    is 1.3e-5, and the exact minimum-norm solution (mpmath, 60 digits) of the rounded M already lies
    1.3e-6 from r* (the 1e-6 asked before passed on Haswell's kernels only: 7e-7 there, 1.2e-5 on
    SkylakeX's; now 1.1e-6 and 2.5e-6)."""
    n = 12
    M = _badly_scaled(n, n - deficiency, spread, seed=deficiency)
    w = np.random.default_rng(7).standard_normal(n)
    want = M.T @ w
    r, rank = min_norm_solve(M, M @ want, 1e-9)
    assert rank == n - deficiency
    assert np.abs(r - want).max() <= 2 * _rounding_bound(M, rank) * np.abs(want).max()


@pytest.mark.parametrize("spread", [1.0, 2.0**20])
def test_min_norm_solve_is_accurate_to_the_rounding_bound_on_any_blas_kernel(spread):
    """90 random systems (12×12, deficiency 1, 2, 4): the error stays below twice eps · κ_k(D_r M)
    (at most 0.93 seen, on OpenBLAS's SkylakeX and Haswell kernels alike). Without refinement the
    projection onto M's row space cancelled (the particular solution is minimal in the equilibrated
    units, up to 1e9 above r) and the null basis inherited the conditioning of a random sketch: up to
    4e6 times the bound, and a different error on each kernel."""
    n, worst = 12, 0.0
    for seed in range(30):
        for deficiency in (1, 2, 4):
            M = _badly_scaled(n, n - deficiency, spread, seed=100 * seed + deficiency)
            want = M.T @ np.random.default_rng(seed).standard_normal(n)
            r, rank = min_norm_solve(M, M @ want, 1e-9)
            assert rank == n - deficiency
            worst = max(worst, np.abs(r - want).max() / (_rounding_bound(M, rank) * np.abs(want).max()))
    assert worst <= 2.0


def test_min_norm_solve_with_a_zero_row_and_column():
    M = _badly_scaled(6, 5, 2.0**8, seed=3)
    M[2, :] = 0.0
    M[:, 4] = 0.0
    want = M.T @ np.arange(1.0, 7.0)  # (its 5th entry is 0: the zero column is a null direction)
    r, rank = min_norm_solve(M, M @ want, 1e-9)
    assert rank == np.linalg.matrix_rank(M)  # (moderate spread: an SVD's count is reliable here)
    assert np.abs(r - want).max() <= 1e-10 * np.abs(want).max()
