"""The per-element path's kink test in the non-dense adjoint modes compares the gradient on
both sides of a weakly active row (convexddn.convex.cone.ResidualMap._either_side), as the
dense mode does: a weak row in a block of the program that the loss does not read leaves
the gradient defined (no warning), one in the block it reads is warned. One-sided
derivatives from cvxpy + Clarabel, polished on the active rows, by extrapolated differences."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

N, M, N1, B = 6, 12, 3, 2


def _program():
    """Two independent QP blocks in one program; rows 0-5 bound block 1 (row 0 weakly active:
    slack 0, multiplier 0; row 1 active), rows 6-11 block 2 (row 6 active)."""
    rng = np.random.default_rng(1)
    L = np.zeros((N, N))
    L[:N1, :N1] = np.eye(N1) + 0.2 * rng.standard_normal((N1, N1))
    L[N1:, N1:] = np.eye(N - N1) + 0.2 * rng.standard_normal((N - N1, N - N1))
    P = L.T @ L
    els = []
    for _ in range(B):
        G = np.zeros((M, N))
        G[:6, :N1] = rng.standard_normal((6, N1))
        G[6:, N1:] = rng.standard_normal((6, N - N1))
        x = rng.standard_normal(N)
        lam = np.zeros(M)
        lam[1] = lam[6] = 1.0
        slack = rng.uniform(0.5, 1.0, M)
        slack[[0, 1, 6]] = 0.0
        els.append((-(P @ x) - G.T @ lam, G, G @ x + slack, x))
    xv = cp.Variable(N)
    params = [cp.Parameter(N), cp.Parameter((M, N)), cp.Parameter(M)]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ xv) + params[0] @ xv), [params[1] @ xv <= params[2]])
    dirs = [[rng.standard_normal(v.shape) for v in e[:3]] for e in els]
    return prob, params, xv, P, els, dirs, rng


def _exact(prob, params, xv, P, q, G, h):
    for p, v in zip(params, (q, G, h)):
        p.value = v
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13, tol_ktratio=1e-11)
    J = np.flatnonzero(prob.constraints[0].dual_value > h - G @ xv.value)
    K = np.block([[P, G[J].T], [G[J], np.zeros((J.size, J.size))]])
    return np.linalg.solve(K, np.concatenate([-q, h[J]]))[:N]


@pytest.fixture(scope="module")
def case():
    prob, params, xv, P, els, dirs, rng = _program()
    sides = []
    for e, d in zip(els, dirs):
        one = []
        for sign in (1.0, -1.0):
            D = [(_exact(prob, params, xv, P, *(v + sign * t * dv for v, dv in zip(e[:3], d))) - e[3]) / t
                 for t in (1e-5, 2e-5)]
            one.append(2 * D[0] - D[1])  # (Richardson: the O(t) term gone)
        sides.append(one)
    c = rng.standard_normal((B, N))
    return prob, params, xv, els, dirs, sides, c


@pytest.mark.parametrize("adjoint", ["sparse", "lsmr", "lsqr"])
def test_weak_row_outside_what_the_loss_reads_is_not_warned(case, adjoint):
    prob, params, xv, els, dirs, sides, c = case
    layer = cddn.ConvexLayer(prob, params, [xv], solver="Clarabel", adjoint=adjoint)
    data = [torch.tensor(np.stack([e[i] for e in els]), requires_grad=True) for i in range(3)]
    out = layer(*data)
    assert layer.last_solve.solved.all()
    for reads_block_1 in (False, True):
        C = c if reads_block_1 else c * np.r_[np.zeros(N1), np.ones(N - N1)]
        for t in data:
            t.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (out * torch.tensor(C)).sum().backward(retain_graph=True)
        named = {e[0] for w in caught if issubclass(w.category, GradientWarning) for e in w.message.elements}
        for b in range(B):
            right, left = C[b] @ sides[b][0], -(C[b] @ sides[b][1])  # (the left derivative along +d)
            exists = abs(right - left) <= 1e-6 * max(1.0, abs(right))
            assert exists != reads_block_1, (b, right, left)  # (the case is what it says)
            assert (b in named) == reads_block_1, (adjoint, b, reads_block_1)
            if exists:
                got = sum(float((t.grad[b].numpy() * d).sum()) for t, d in zip(data, dirs[b]))
                assert got == pytest.approx(right, rel=1e-6, abs=1e-7)
