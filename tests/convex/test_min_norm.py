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


@pytest.mark.parametrize("deficiency", [1, 2, 4])
@pytest.mark.parametrize("spread, tol", [(1.0, 1e-10), (2.0**10, 1e-10), (2.0**20, 1e-6)])
def test_min_norm_solve_finds_the_rank_and_the_minimum_norm_solution(deficiency, spread, tol):
    """A consistent system whose minimum-norm solution is known: r* = Mᵀw lies in M's row
    space, so it is the minimum-norm solution of M r = M r*. The rank is exact whatever
    the rows' and columns' units (a cut relative to M's largest singular value dropped
    directions of size 1 beside a 3e8 entry). The solution's accuracy falls with the spread
    (entries of M over 2^±40 at 2^20: r* spans 12 decades). No solve can beat the rounding
    of M's entries, eps·κ_k(D_r M) (κ_k: the largest over the k-th singular value of M with
    its rows scaled to a largest entry of 1; the minimum norm is not invariant under column
    scaling): at 2^20 with deficiency 1 that is 1.3e-5, and the exact (mpmath) minimum-norm
    solution of the rounded M lies 1.3e-6 from r*; the 1e-6 this test once asked held on
    OpenBLAS's Haswell kernels (7e-7) and failed on its SkylakeX ones (1.2e-5)."""
    n = 12
    M = _badly_scaled(n, n - deficiency, spread, seed=deficiency)
    w = np.random.default_rng(7).standard_normal(n)
    want = M.T @ w
    r, rank, _ = min_norm_solve(M, M @ want, 1e-9)
    assert rank == n - deficiency
    sv = np.linalg.svd(M / np.abs(M).max(1, keepdims=True), compute_uv=False)
    bound = 2 * np.finfo(float).eps * sv[0] / sv[rank - 1]
    assert np.abs(r - want).max() <= max(tol, bound) * np.abs(want).max()


def test_min_norm_solve_with_a_zero_row_and_column():
    M = _badly_scaled(6, 5, 2.0**8, seed=3)
    M[2, :] = 0.0
    M[:, 4] = 0.0
    want = M.T @ np.arange(1.0, 7.0)  # (its 5th entry is 0: the zero column is a null direction)
    r, rank, _ = min_norm_solve(M, M @ want, 1e-9)
    assert rank == np.linalg.matrix_rank(M)  # (moderate spread: an SVD's count is reliable here)
    assert np.abs(r - want).max() <= 1e-10 * np.abs(want).max()


def test_min_norm_solve_reports_the_condition_of_the_directions_it_keeps():
    """The third result estimates the kept block's condition (LAPACK's 1-norm estimate of
    gelsy's triangular factor): what the per-element polish reads to put a result in doubt.
    Singular values 3 ... 0.1, 4e-13 and 7e-15: cut at 1e-9 the 4e-13 direction is dropped
    (condition 30), cut at 5e-14 it is kept (condition 3 / 4e-13 = 7.5e12, within the
    estimate's factor)."""
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    V, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    sv = np.array([3, 2, 1, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 4e-13, 7e-15])
    M = (U * sv) @ V.T
    rhs = M @ rng.standard_normal(12)
    _, rank, condition = min_norm_solve(M, rhs, 1e-9)
    assert rank == 10 and 30 / 10 <= condition <= 30 * 10
    _, rank, condition = min_norm_solve(M, rhs, 5e-14)
    assert rank == 11 and 7.5e12 / 10 <= condition <= 7.5e12 * 10
