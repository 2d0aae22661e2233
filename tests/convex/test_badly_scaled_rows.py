"""The per-element path (``solver="Clarabel"``) on programs whose rows are badly scaled:
rows scaled uniformly (the KKT residual's per-row floors, the residual map's summation, the
doubt of an ill-conditioned polish), nearly parallel active rows (the polish's rank cut) and
pairs near a kink (:func:`convexddn.convex.kinks.pair_tolerances`).

References are independent of the layer: active-set enumeration on unit rows with the KKT
conditions checked, closed forms, and 50-digit arithmetic (mpmath).
"""
from __future__ import annotations

import itertools
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

F64 = torch.float64


def _hex(text: str) -> np.ndarray:
    return np.array([float.fromhex(t) for t in text.split()])


def _projection(G: np.ndarray, h: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(y, J, margin)``: the projection of ``x`` onto ``G y <= h``, its Jacobian and the
    smallest of the active multipliers and inactive slacks (unit rows), by active-set
    enumeration with the KKT conditions checked."""
    norms = np.linalg.norm(G, axis=1)
    Gn, hn = G / norms[:, None], h / norms
    for k in range(G.shape[0] + 1):
        for S in map(list, itertools.combinations(range(G.shape[0]), k)):
            A = Gn[S]
            lam = np.linalg.solve(A @ A.T, A @ x - hn[S]) if S else np.zeros(0)
            y = x - A.T @ lam
            if (lam >= 0).all() and (Gn @ y <= hn + 1e-12).all():
                J = np.eye(x.size) - (A.T @ np.linalg.solve(A @ A.T, A) if S else 0.0)
                slack = [hn[i] - Gn[i] @ y for i in range(G.shape[0]) if i not in S]
                return y, J, min([*lam, *slack], default=1.0)
    raise AssertionError("no active set satisfies the KKT conditions")


def test_polyhedron_with_rows_of_1e_8_is_exact_per_element():
    """G and h ~1e-8, four rows active in R^5: Clarabel's point violated those rows by 1e-5
    of their size and passed the residual check relative to the cone's unit rows (5.8e-12),
    "Solved": the projection came back 1.5e-5 off, its gradient 1.6e-5, with no warning."""
    G = _hex("""0x1.91bb5b7971afdp-27 -0x1.2765790d4b60ep-29 0x1.6fd2813a1543cp-27 -0x1.3e82e0159e369p-26
        -0x1.3495761da3e27p-25 -0x1.10e7273a61a45p-28 0x1.7343366c87c1cp-28 -0x1.24823f1885784p-28
        -0x1.98d3811fcb4d5p-27 0x1.560a5455a8fa3p-28 0x1.8760aea5fb758p-26 -0x1.4eff00ca7722dp-30
        -0x1.26002b71587fap-27 -0x1.565d4200ad913p-27 0x1.8e12ffa1226f6p-26 -0x1.0534c5e7f41e7p-31
        0x1.efce0f1b6adfcp-28 0x1.ee0c1fbea9551p-27 0x1.b43552f6e8b01p-27 -0x1.75596b62c4685p-27""").reshape(4, 5)
    h = _hex("0x1.5fef5d384ec27p-28 0x1.5efe47df2a6e7p-28 0x1.6dc3e07282407p-27 0x1.e9d62a267761ep-28")
    xv = _hex("0x1.a53fabbf32cf6p+0 0x1.302e8095e0b38p+0 0x1.3d37775201784p-1 -0x1.327587443dcb4p+0 "
              "0x1.4a70646243ccdp+0")
    ref, J, _ = _projection(G, h, xv)
    x, y = cp.Parameter(5), cp.Variable(5)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [G @ y <= h]), [x], [y],
                             solver="Clarabel")
    X = torch.tensor(xv, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning: the answer is exact)
        Y = layer(X)
        Y.sum().backward()
    np.testing.assert_allclose(Y.detach().numpy(), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(X.grad.numpy(), J.sum(0), rtol=0, atol=1e-10)


def test_lp_with_a_row_scaled_by_1e_6_keeps_its_vertex():
    """min −y0 − 2 y1 s.t. 1e-6 (y0 + y1) <= 1e-6 b, 0 <= y <= 1: for 1 < b < 2 the vertex is
    (b − 1, 1), dy0/db = 1. At b = 2 − 1e-6 the per-element path returned (1, 1), violating
    y0 + y1 <= b by 1e-6 (its whole row scale), and dy0/db = −5e-7, silently."""
    b, y = cp.Parameter(), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(-y[0] - 2 * y[1]), [1e-6 * (y[0] + y[1]) <= 1e-6 * b, y <= 1, y >= 0])
    layer = cddn.ConvexLayer(prob, [b], [y], solver="Clarabel")
    B = torch.tensor(2 - 1e-6, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y = layer(B)
        Y[0].backward()
    torch.testing.assert_close(Y.detach(), torch.tensor([1 - 1e-6, 1.0], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(B.grad, torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale", [1e-8, 1e-5, 1e4, 1e8])
def test_polyhedron_projection_is_exact_whatever_the_rows_scale(scale):
    """Random polyhedra G y <= h (4 rows in R^5) with G and h scaled by one number: the
    solution and the gradient are the unscaled problem's. Before, at 1e-8 a projection came
    back 8.8e-5 off silently, and 80 of 280 elements warned "not unique" with exact gradients
    (margins of 1e-2 and more), the kink test's tolerance being absolute; at 1e8 gradients
    were 2e-6 off (the derivative's condition grew with the scale: now such results are in
    doubt and the batched path re-solves them)."""
    n, m, batch = 5, 4, 12
    rng = np.random.default_rng(1)
    Gv, hv = rng.standard_normal((batch, m, n)), rng.uniform(0.05, 1, (batch, m))
    xv = 2 * rng.standard_normal((batch, n))
    g = rng.standard_normal((batch, n))
    x, G, h, y = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [G @ y <= h]), [x, G, h], [y],
                             solver="Clarabel")
    X = torch.tensor(xv, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Y = layer(X, torch.tensor(scale * Gv), torch.tensor(scale * hv))
        (gx,) = torch.autograd.grad((Y * torch.tensor(g)).sum(), X)
    refs = [_projection(Gv[i], hv[i], xv[i]) for i in range(batch)]
    assert min(r[2] for r in refs) > 1e-3  # (well inside the normal cones: no kink, no warning due)
    assert not [w for w in caught if issubclass(w.category, GradientWarning)], [str(w.message) for w in caught]
    np.testing.assert_allclose(Y.detach().numpy(), np.stack([r[0] for r in refs]), rtol=0, atol=1e-10)
    np.testing.assert_allclose(gx.numpy(), np.stack([g[i] @ refs[i][1] for i in range(batch)]), rtol=0, atol=1e-8)


def test_nearly_parallel_active_rows_give_the_gradient_not_a_warning():
    """a2 = a1 + 1e-6 e2, both active (multipliers 0.26 and 0.90). The residual map's
    derivative has a genuine singular value of 1.4e-13 there (the rows' angle, squared by the
    objective's block); cut at 1e-9 of the largest, the polish stalled at multipliers 0.58
    and 0.58 and the adjoint called the solution "not unique", its gradient (0.10, 0.55, 1.27)
    against (0.36, 0, 1.19). Reference: both rows active, in 50-digit arithmetic."""
    mp = pytest.importorskip("mpmath")
    G = _hex("0x1.0p+0 0x1.0p-1 -0x1.3333333333333p-2 0x1.0p+0 0x1.0000218def417p-1 -0x1.3333333333333p-2")
    G = G.reshape(2, 3)
    h = _hex("0x1.0p-1 0x1.00000a10fafa0p-1")
    xv = _hex("0x1.aabacef83ffdep+0 0x1.c216226acff76p-1 0x1.74441aa48c7e2p-3")
    mp.mp.dps = 50
    A, X50 = mp.matrix(G.tolist()), mp.matrix(xv.tolist())
    lam = mp.lu_solve(A * A.T, A * X50 - mp.matrix(h.tolist()))
    assert min(lam) > 0.2
    ref = np.array([float(v) for v in X50 - A.T * lam])
    J = mp.eye(3) - A.T * mp.inverse(A * A.T) * A
    grad = np.array([float(sum(J[i, j] for i in range(3))) for j in range(3)])
    x, y = cp.Parameter(3), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [G @ y <= h]), [x], [y],
                             solver="Clarabel")
    X = torch.tensor(xv, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        Y = layer(X)
        Y.sum().backward()
    # (the solution's own condition is 1e6: float64 data leave ~1e-10; the batched path that
    # re-solves it is 2.4e-7 off, a known limit of its polish)
    np.testing.assert_allclose(Y.detach().numpy(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(X.grad.numpy(), grad, rtol=0, atol=1e-8)


def test_ill_conditioned_polish_is_in_doubt_and_named_so():
    """A result polished to rounding along directions of condition above ILL_CONDITIONED is
    in doubt (the batched path re-solves it); unconfirmed, its warning says why, not that the
    polish stopped above rounding."""
    from convexddn.convex.cone import ILL_CONDITIONED
    from convexddn.convex.spread import in_doubt, warn_unconfirmed

    info = {"solved": [True, True], "residuals": [1e-16, 1e-16], "spreads": [1.0, 1.0],
            "conditions": [10 * ILL_CONDITIONED, 100.0]}
    assert in_doubt(info, 5)[0] == [0]
    with pytest.warns(cddn.errors.SolverWarning, match="condition reaches 1e"):
        warn_unconfirmed(([0, 1], (2,)), [0], info["residuals"], False, info["conditions"])


def test_box_projection_near_a_bound_does_not_warn():
    """clamp(x, 0, 1) at x = (1e-9, 0.5): no constraint active, Jacobian I. The kink test
    took any pair below 1e-9 of the solution's size as undecided, and the backward warned
    "not unique or not differentiable" although the slack, 1e-9, is exact to rounding."""
    x, y = cp.Parameter(2), cp.Variable(2)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [y >= 0, y <= 1]), [x], [y],
                             solver="Clarabel")
    X = torch.tensor([1e-9, 0.5], dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        Y = layer(X)
        Y.sum().backward()
    torch.testing.assert_close(Y.detach(), X.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(X.grad, torch.ones(2, dtype=F64), rtol=0, atol=1e-12)
