"""Cone programs through diffcp (:mod:`convexddn.convex.diffcp_solve`): Clarabel's solution in SCS's row order."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from convexddn.convex.diffcp_solve import solve_cone_program
from convexddn.convex.per_element import SOLVER_DEFAULTS


def _svec(M: np.ndarray) -> np.ndarray:
    """SCS's vector of a symmetric matrix: its lower triangle column by column, off-diagonal times √2."""
    cols, rows = np.triu_indices(M.shape[0])  # (column, row) pairs of the lower triangle, by column
    return M[rows, cols] * np.where(rows == cols, 1.0, np.sqrt(2.0))


@pytest.mark.parametrize("sizes", [(5,), (2, 4), (4, 3, 6)])
def test_clarabel_duals_and_slacks_of_semidefinite_blocks_are_in_scs_order(sizes):
    """min Σ_k <C_k, X_k> s.t. tr X_k = 1, X_k ⪰ 0 (SCS's form: x = (svec X_k), zero rows for the
    traces, s = svec X_k on the PSD rows). Closed form, C_k with a simple smallest eigenvalue λ_k
    and eigenvector v_k: X_k = v_k v_kᵀ, the trace row's multiplier -λ_k and the PSD block's
    y_k = svec(C_k - λ_k I). diffcp 1.1.9 gave Clarabel's y and s back by the inverse of its row
    permutation where the permutation itself is needed: the same for n <= 3, not from n = 4 on
    (y and s off by O(1), x right)."""
    rng = np.random.default_rng(7)
    dims = [k * (k + 1) // 2 for k in sizes]
    n = sum(dims)
    trace_rows, c, y_want, s_want, y0_want = [], [], [], [], []
    start = 0
    for k, d in zip(sizes, dims):
        B = rng.standard_normal((k, k))
        C = B + B.T
        w, V = np.linalg.eigh(C)
        row = np.zeros(n)
        row[start:start + d] = _svec(np.eye(k))
        trace_rows.append(row)
        c.append(_svec(C))
        y0_want.append(-w[0])
        y_want.append(_svec(C - w[0] * np.eye(k)))
        s_want.append(_svec(np.outer(V[:, 0], V[:, 0])))
        start += d
    A = sp.csc_matrix(sp.vstack([sp.csr_matrix(np.array(trace_rows)), -sp.identity(n)]))
    b = np.concatenate([np.ones(len(sizes)), np.zeros(n)])
    cone_dict = {"z": len(sizes), "l": 0, "q": [], "s": list(sizes), "ep": 0}
    x, y, s, status = solve_cone_program("Clarabel", cone_dict, A, b, np.concatenate(c), SOLVER_DEFAULTS["Clarabel"])
    assert status == "Solved"
    np.testing.assert_allclose(x, np.concatenate(s_want), atol=1e-6)
    np.testing.assert_allclose(s, np.concatenate([np.zeros(len(sizes)), *s_want]), atol=1e-6)
    np.testing.assert_allclose(y, np.concatenate([y0_want, *y_want]), atol=1e-6)
    # The KKT conditions themselves: A x + s = b, Aᵀ y + c = 0.
    assert np.abs(A @ x + s - b).max() < 1e-8 and np.abs(A.T @ y + np.concatenate(c)).max() < 1e-8


@pytest.mark.parametrize("method", ["Clarabel", "SCS"])
def test_tiny_data_are_solved_in_their_own_unit(method):
    """min cᵀx s.t. lo <= x <= hi (SCS's form: x + s = hi, -x + s = -lo, s >= 0) with b and c
    ~1e-7 and 1e-9: the solvers' "1 +" floors made them absolute tolerances there, and
    Clarabel's box LP point came back 0.3 off in its own units. Solved with b and c scaled to
    their unit and scaled back: the vertex x = lo where c > 0, hi where c < 0, and the
    multipliers y = |c| on the active rows, each to a few ulps of its own size."""
    c0 = np.array([0.3, -0.2, 0.5, 0.1])
    lo0, hi0 = np.array([-1.0, 0.9, -1.0, -1.0]), np.ones(4)
    A = sp.csc_matrix(np.vstack([np.eye(4), -np.eye(4)]))
    for sb, sc in ((1e-7, 1e-9), (1e-9, 1e-7), (1.0, 1e-8)):
        x, y, s, status = solve_cone_program(method, {"l": 8}, A, np.concatenate([hi0, -lo0]) * sb, c0 * sc,
                                             dict(SOLVER_DEFAULTS[method]))
        assert status.lower().startswith("solved"), status
        np.testing.assert_allclose(x, np.where(c0 > 0, lo0, hi0) * sb, rtol=1e-6, atol=0)
        y_want = np.concatenate([np.maximum(-c0, 0), np.maximum(c0, 0)]) * sc
        np.testing.assert_allclose(y, y_want, rtol=0, atol=1e-6 * sc)
        np.testing.assert_allclose(A @ x + s, np.concatenate([hi0, -lo0]) * sb, rtol=0, atol=1e-6 * sb)
