"""The limit system's tests of a batched solution (:mod:`convexddn.convex.uniqueness`).

Redundant equality rows: with ``E[3] = comb @ E[:3]`` and ``f`` consistent, moving ``f[3]``
alone makes the program infeasible on both sides (checked with Clarabel below), so no
derivative in ``E`` or ``f`` exists, whatever the solution's uniqueness.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning


def _redundant(kind: str, seed: int):
    n, p = 3, 4
    E, f, c, y = cp.Parameter((p, n)), cp.Parameter(p), cp.Parameter(n), cp.Variable(n)
    obj = cp.sum_squares(y) + c @ y if kind == "qp" else c @ y
    prob = cp.Problem(cp.Minimize(obj), [E @ y == f] + ([y >= -10] if kind == "lp" else []))
    rng = np.random.default_rng(seed)
    U, S, Vt = np.linalg.svd(rng.standard_normal((n, n)))
    S[-1] = S[0] / 3000
    E3 = U @ np.diag(S) @ Vt
    Et = np.vstack([E3, rng.standard_normal(n) @ E3])
    y0 = rng.standard_normal(n)
    values = [Et, Et @ y0, rng.standard_normal(n)]
    return prob, (E, f, c, y), values, torch.tensor(rng.standard_normal(n))


def _warned(layer, values, weights, requires):
    ts = [torch.tensor(v, requires_grad=r) for v, r in zip(values, requires)]
    out = layer(*ts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (out * weights).sum().backward()
    return [w for w in caught if issubclass(w.category, GradientWarning)]


@pytest.mark.parametrize("kind, seed", [("qp", 1), ("qp", 3), ("lp", 4)])
def test_redundant_equality_rows_moved_apart_are_warned(kind, seed):
    """The batched backward gave a gradient in f without a warning (29 of 96 such QP
    elements, 36 LP): the probe's blow-up (~1/δ) was relative to a right-hand side whose
    stationarity part dAᵀz was 1e3 times larger (gain 7e5 < PROBE_GAIN), and the limit
    test checks the primal solution only. solver='Clarabel' and forward mode warn."""
    prob, (E, f, c, y), values, weights = _redundant(kind, seed)
    for shift in (1e-3, -1e-3):  # moving f[3] alone: infeasible on both sides
        E.value, f.value, c.value = values[0], values[1] + np.array([0, 0, 0, shift]), values[2]
        prob.solve(solver="CLARABEL")
        assert prob.status in ("infeasible", "infeasible_inaccurate")
    layer = cddn.ConvexLayer(prob, parameters=[E, f, c], variables=[y])
    assert _warned(layer, values, weights, (True, True, True))
    assert layer.last_solve.solvers == ["batched"]


@pytest.mark.parametrize("kind, seed", [("qp", 1), ("qp", 2), ("lp", 4)])
def test_redundant_equality_rows_not_moved_are_not_warned(kind, seed):
    """Only c requires a gradient: the rows do not move, and the derivative in c exists.
    (The backward's probe moved all parameters, those without a gradient too: ("qp", 2)
    was warned about.)"""
    prob, (E, f, c, y), values, weights = _redundant(kind, seed)
    layer = cddn.ConvexLayer(prob, parameters=[E, f, c], variables=[y])
    assert not _warned(layer, values, weights, (False, False, True))
    assert layer.last_solve.solvers == ["batched"]


@pytest.mark.parametrize("d", [1e-6, 1e-7])
def test_nearly_parallel_equality_rows_at_a_unique_vertex_have_their_gradient(d):
    """min cᵀx s.t. Ex = f, x >= 0 with rows 0 and 1 of E d apart and a unique vertex
    (basis 0, 1, 2): d sum(x)/df = E_B⁻ᵀ 1, 1.2e6 and 1.2e7. The limit test formed CᵀC, whose
    eigenvalue d² it read as a null direction ("not unique", gradient zeroed); at 1e-7 the
    probe's least-norm amplification 4.4e7, a conditioning, was read as rows moved apart."""
    n, p = 6, 3
    E, f, c, x = cp.Parameter((p, n)), cp.Parameter(p), cp.Parameter(n), cp.Variable(n)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(c @ x), [E @ x == f, x >= 0]), [E, f, c], [x])
    rng = np.random.default_rng(3)
    Et = rng.standard_normal((p, n))
    Et[1] = Et[0] + d * rng.standard_normal(n)
    xs = np.array([1.0, 2.0, 1.5, 0, 0, 0])
    ct = Et.T @ rng.standard_normal(p) + np.array([0, 0, 0, 1.0, 1.0, 1.0])  # (dual feasible, strictly)
    exact = np.linalg.solve(Et[:, :3].T, np.ones(3))
    F = torch.tensor(Et @ xs, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(torch.tensor(Et), F, torch.tensor(ct))
        (g,) = torch.autograd.grad(out.sum(), F)
    assert layer.last_solve.solvers == ["batched"]
    assert not [w for w in caught if issubclass(w.category, GradientWarning)]
    torch.testing.assert_close(g, torch.tensor(exact), rtol=1e-6, atol=0)
