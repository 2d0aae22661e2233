"""A weakly active inequality of a QP at n = 100 with 200 rows (slack 0 and multiplier 0 at the
solution): the derivative in its h_i does not exist (one-sided: 0 as h_i grows, the active set's
as it shrinks), and the batched backward must say so with a ``GradientWarning``.

The QPs are built from an exact KKT point x*: rows 1..30 active with multipliers in [0.5, 1.5],
the rest inactive, row 0 at ``h_0 = G_0 x*`` with multiplier 0. The one-sided derivatives are
the closed forms (0; the equality-constrained QP's with row 0 added) and, independently, finite
differences of cvxpy + Clarabel solves on either side. Before: the forward found the row at its
kink, but the derivative system took it at its inactive limit (its multiplier's part 0 by
construction), so the test of whether the derivative reaches the kink read 0, and the one-sided
gradient 0 came back silently (seed 0, element 1). Now the other side (the row held active) is solved
for and compared on what the gradient reads (kink_reach._other_side). Controls: the same row clearly inactive
(slack 1e-3 of its terms) or clearly active (multiplier 1) is not warned about, and its gradient
matches central finite differences.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

N, M, ACTIVE = 100, 200, 30
_CLARABEL = dict(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10)


def _data(seed: int, batch: int, row0: str, n: int = N):
    """``(L, q, G, h)`` stacked over ``batch`` (``n`` variables, ``2n`` rows); row 0 ``"weak"`` (slack 0,
    multiplier 0), ``"inactive"`` (slack 1e-3 of |G_0||x*|), ``"near"`` (slack 1e-7 of it) or ``"active"``
    (multiplier 1)."""
    rng = np.random.default_rng(seed)
    out, m = [], 2 * n
    for _ in range(batch):
        L = np.eye(n) + 0.1 * rng.standard_normal((n, n))
        G = rng.standard_normal((m, n))
        x = rng.standard_normal(n)
        lam, slack = np.zeros(m), np.zeros(m)
        lam[1:1 + ACTIVE] = rng.uniform(0.5, 1.5, ACTIVE)
        slack[1 + ACTIVE:] = rng.uniform(0.1, 1.0, m - 1 - ACTIVE)
        if row0 in ("inactive", "near"):
            slack[0] = (1e-3 if row0 == "inactive" else 1e-7) * np.abs(G[0]) @ np.abs(x)
        elif row0 == "active":
            lam[0] = 1.0
        out.append((L, -(L.T @ (L @ x)) - G.T @ lam, G, G @ x + slack))
    return [np.stack(v) for v in zip(*out)]


def _problem(n: int = N):
    L, q, G, h, x = (cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((2 * n, n)), cp.Parameter(2 * n),
                     cp.Variable(n))
    return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + q @ x), [G @ x <= h]), [L, q, G, h], x


def _clarabel(L, q, G, h) -> np.ndarray:
    """The QP solved by Clarabel as a QP (its P native, not CVXPY's cone form of ‖Lx‖²)."""
    x = cp.Variable(q.size)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(L.T @ L)) + q @ x), [G @ x <= h])
    prob.solve(**_CLARABEL)
    assert prob.status == "optimal"
    return x.value


def _layer_grads(seed: int, batch: int, row0: str, n: int = N, solver: str = "auto"):
    prob, params, x = _problem(n)
    layer = cddn.ConvexLayer(prob, params, [x], solver=solver)
    data = _data(seed, batch, row0, n)
    ts = [torch.tensor(v, requires_grad=True) for v in data]
    w = torch.tensor(np.random.default_rng(100 + seed).standard_normal((batch, n)))
    out = layer(*ts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (out * w).sum().backward()
    assert layer.last_solve.solvers == (["batched"] if solver == "auto" else [solver]) * batch
    named = {e[0] for c in caught if issubclass(c.category, GradientWarning) for e in c.message.elements}
    return data, w.numpy(), ts, named


def test_weakly_active_row_at_n100_is_warned():
    data, w, ts, named = _layer_grads(0, 3, "weak")
    # (the solution is affine in h_0 on each side, the active sets kept for steps below 0.1:
    # differences between two points on one side are exact to the solver's accuracy, ~1e-7 in w·x
    # where row 0 is inactive by t: an interior point's multiplier there)
    t = 1e-2
    for b in range(3):
        values = [v[b] for v in data]
        # (each side's difference between two points on it: Clarabel's point at the kink itself is
        # an interior point's, off along the undecided row)
        f = {}
        for k in (-2, -1, 1, 2):
            h = values[3].copy()
            h[0] += k * t
            f[k] = w[b] @ _clarabel(*values[:3], h)
        up, down = (f[2] - f[1]) / t, (f[-1] - f[-2]) / t
        # the kink is real: 0 as h_0 grows, the active set's derivative (|.| >= 6e-3 here) as it shrinks
        assert abs(up) < 1e-4 and abs(down) > 5e-3, (b, up, down)
        assert abs(ts[3].grad[b, 0].item()) <= max(abs(up), abs(down)) + 1e-3  # (a blend, warned about)
    assert named == {0, 1, 2}


def test_weakly_active_row_at_n100_is_warned_in_forward_mode():
    """Forward mode along h_0 alone: the tangent of x is 0 as h_0 grows and, as it shrinks, the
    equality-constrained QP's with row 0 added (closed form); the tangent the system returns is
    one of them, or a blend, and must be warned about (element 1 was not: its system took the row
    at its inactive limit, as in the backward)."""
    import torch.autograd.forward_ad as fwAD

    prob, params, x = _problem()
    layer = cddn.ConvexLayer(prob, params, [x])
    data = _data(0, 3, "weak")
    values = [torch.tensor(v) for v in data]
    tangents = [torch.zeros_like(v) for v in values]
    tangents[3][:, 0] = 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fwAD.dual_level():
            out = layer(*(fwAD.make_dual(v, t) for v, t in zip(values, tangents)))
            got = fwAD.unpack_dual(out).tangent.numpy()
    assert layer.last_solve.solvers == ["batched"] * 3
    named = {e[0] for c in caught if issubclass(c.category, GradientWarning) for e in c.message.elements}
    for b in range(3):
        L, _, G, _ = (v[b] for v in data)
        rows = G[:1 + ACTIVE]
        K = np.block([[L.T @ L, rows.T], [rows, np.zeros((1 + ACTIVE, 1 + ACTIVE))]])
        down = np.linalg.solve(K, np.eye(N + 1 + ACTIVE)[N])[:N]  # (x's tangent with row 0 held: G_0 dx = 1)
        assert np.abs(down).max() > 1e-2, b  # the kink is real: the up side's tangent is 0
        assert np.abs(got[b]).max() <= np.abs(down).max() + 1e-3, b  # (a blend at most, warned about)
    assert named == {0, 1, 2}


@pytest.mark.parametrize("row0", ["inactive", "active"])
def test_row_clearly_inactive_or_active_is_not_warned_and_exact(row0):
    data, w, ts, named = _layer_grads(0, 2, row0)
    assert not named
    rng = np.random.default_rng(7)
    t = 1e-3  # (affine in (q, h) while the active set holds: slacks >= 0.08, multipliers >= 0.5)
    for b in range(2):
        values = [v[b] for v in data]
        # central differences along a direction in q and h, and in h_0 alone
        dq, dh = rng.standard_normal(N), rng.standard_normal(M)
        e0 = np.eye(M)[0]
        for direction_q, direction_h in ((dq, dh), (np.zeros(N), e0)):
            f = [w[b] @ _clarabel(values[0], values[1] + s * t * direction_q, values[2],
                                  values[3] + s * t * direction_h) for s in (1.0, -1.0)]
            fd = (f[0] - f[1]) / (2 * t)
            got = float(ts[1].grad[b].numpy() @ direction_q + ts[3].grad[b].numpy() @ direction_h)
            assert abs(got - fd) <= 1e-6 * max(1.0, abs(fd)), (b, got, fd)


# The per-element path (Clarabel, Newton polish, adjoint through the residual map): its kink test's
# tolerance followed the polished point's KKT residual, which discounts 64 rounding levels of each
# row's terms and hides the conditioning. Seed 0's first element at n = 100 (a sparse LU adjoint:
# 404 rows + columns) had the weak row's slack at 9.1e-12, its tolerance 1.2e-12, residual 0; at
# n = 50 (dense adjoint) the same element was missed too. Now the tolerance follows the point's
# forward error (convexddn/convex/point_error.py; the Newton step there: 9.1e-12).


def _closed_form(L, q, G, h, w, active) -> tuple[np.ndarray, np.ndarray]:
    """``(dL/dq, dL/dh)`` of ``L = w·x`` with the rows ``active`` held as equalities (the derivative of
    the equality-constrained QP: K [u; μ] = [w; 0], dL/dq = −u, dL/dh = μ on the active rows, 0 elsewhere)."""
    n, Ga = q.size, G[active]
    K = np.block([[L.T @ L, Ga.T], [Ga, np.zeros((len(active), len(active)))]])
    sol = np.linalg.solve(K, np.concatenate([w, np.zeros(len(active))]))
    dh = np.zeros(h.size)
    dh[active] = sol[n:]
    return -sol[:n], dh


@pytest.mark.parametrize("n", [50, 100])
def test_weakly_active_row_is_warned_on_the_per_element_path(n):
    data, w, ts, named = _layer_grads(0, 1, "weak", n, solver="Clarabel")
    values = [v[0] for v in data]
    t, f = 1e-2, {}  # (as above: differences between two points on each side of the kink)
    for k in (-2, -1, 1, 2):
        h = values[3].copy()
        h[0] += k * t
        f[k] = w[0] @ _clarabel(*values[:3], h)
    up, down = (f[2] - f[1]) / t, (f[-1] - f[-2]) / t
    assert abs(up) < 1e-4 and abs(down) > 5e-3, (up, down)  # the kink is real
    assert abs(ts[3].grad[0, 0].item()) <= max(abs(up), abs(down)) + 1e-3  # (one side, here 0: warned about)
    assert named == {0}


@pytest.mark.parametrize("row0", ["inactive", "near", "active"])
def test_per_element_row_clearly_inactive_or_active_is_not_warned_and_exact(row0):
    """Controls: no warning, and the gradient in (q, h) is the active set's closed form. At ``"near"`` the
    row's slack (~1e-6) is within the range where the forward error is estimated, and far above it."""
    data, w, ts, named = _layer_grads(0, 2, row0, 50, solver="Clarabel")
    assert not named
    for b in range(2):
        L, q, G, h = (v[b] for v in data)
        active = list(range(0 if row0 == "active" else 1, 1 + ACTIVE))
        dq, dh = _closed_form(L, q, G, h, w[b], active)
        assert np.abs(ts[1].grad[b].numpy() - dq).max() <= 1e-7 * max(1.0, np.abs(dq).max()), b
        assert np.abs(ts[3].grad[b].numpy() - dh).max() <= 1e-7 * max(1.0, np.abs(dh).max()), b
