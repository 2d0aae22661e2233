"""The per-element path's sparse mode on badly scaled data: a QP (n = 150, 300 rows, 30
equalities) built from an exact KKT point with a weakly active row, its data scaled by
10^-3..10^3. Unequilibrated, the bordered LU read its derivative as singular (condition 4e10
and 1.2e13 in the data's units, 2e6 and 1.4e8 equilibrated); LSMR's inexact Newton steps left
the polish at residual 1e-12 but 8e-6 and 2.7e-4 off the solution, "solved", with no
condition to doubt it by, and the weak row's kink went unseen: a one-sided gradient, silently. The
modes "lsmr" and "lsqr" polish by those steps alone, and certified the same points until the solver's
own forward error at them (.iterative.solver_condition: 4.7e-2 of a generic direction) doubted them."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

n, m, p = 150, 300, 30


def _element(rng):
    """A QP's data and its exact solution x*: rows [:k] active, row k weakly active (slack and
    multiplier 0), the rest inactive; x* scaled by sx, the multipliers by sl."""
    A, G, x, nu = (rng.standard_normal(s) for s in ((p, n), (m, n), n, p))
    k = (n - p) // 2 - 1
    lam, slack = np.zeros(m), np.zeros(m)
    lam[:k] = rng.uniform(0.5, 1.5, k)
    slack[k + 1:] = rng.uniform(0.1, 1.0, m - k - 1)
    L = np.eye(n) + 0.1 * rng.standard_normal((n, n))
    q = -(L.T @ L @ x) - G.T @ lam - A.T @ nu
    return x, k, L, q, G, A, lam, slack, nu


@pytest.mark.parametrize("adjoint", ["sparse", "lsmr", "lsqr"])
def test_nondense_modes_polish_badly_scaled_qp_and_see_its_kink(adjoint):
    # (the scales of the fuzz's elements 0 and 2, which each mode certified 8e-6 and 2.7e-4 off)
    scales = [(17.0, 300.0), (520.0, 910.0)]
    rng = np.random.default_rng(21)
    data, xstar = {key: [] for key in ("L", "q", "G", "h", "A", "b")}, []
    for sx, sl in scales:
        x, k, L, q, G, A, lam, slack, nu = _element(rng)
        for key, val in (("L", L * np.sqrt(sl / sx)), ("q", q * sl), ("G", G), ("h", (G @ x + slack) * sx),
                         ("A", A), ("b", A @ x * sx)):
            data[key].append(val)
        xstar.append(x * sx)
    xv = cp.Variable(n)
    par = {key: cp.Parameter(np.shape(v[0]), name=key) for key, v in data.items()}
    prob = cp.Problem(cp.Minimize(par["q"] @ xv + 0.5 * cp.sum_squares(par["L"] @ xv)),
                      [par["G"] @ xv <= par["h"], par["A"] @ xv == par["b"]])
    layer = cddn.ConvexLayer(prob, list(par.values()), [xv], solver="Clarabel", adjoint=adjoint)
    ts = [torch.tensor(np.stack(v), requires_grad=True) for v in data.values()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(*ts)
    for b, xs in enumerate(xstar):  # (x*: the exact KKT point the data were built from)
        assert np.linalg.norm(out[b].detach().numpy() - xs) / (1 + np.linalg.norm(xs)) < 1e-9
    # The loss c·x has no derivative in h_k: h_k up, row k goes inactive and x stays (0); down, it is held
    # active (c·dx of the equality-constrained QP, nonzero for a generic c). Each element must be named.
    c = torch.tensor(np.random.default_rng(5).standard_normal((len(scales), n)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (out * c).sum().backward()
    named = {e[0] for w in caught if issubclass(w.category, GradientWarning) for e in w.message.elements}
    assert named == {0, 1}
