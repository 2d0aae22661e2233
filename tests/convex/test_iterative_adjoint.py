"""The per-element path's iterative adjoints (``adjoint="lsmr"``, ``"lsqr"``): a gradient accurate to ~1e-6 of the
closed form or a GradientWarning naming the element, never a silent wrong one.

LSMR and LSQR stop at relative residuals up to ~1e-9 on an ill-conditioned derivative system, which the gradient's
cancellation turned into errors of 2e-5 (entropy, y ~ 1e4) and 1.5e-4 (a log barrier at a ~ 1e3) without a warning;
what stays above rounding is now in doubt: re-solved densely up to 3000 rows + columns, refined above
(:func:`convexddn.convex.iterative._refine`), warned about where neither helps.
"""
from __future__ import annotations

import math
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.convex import cone
from convexddn.convex.iterative import iterative_solve
from convexddn.errors import ConvexDDNWarning, GradientWarning


def _entropy():
    """min −Σ entr(y) − aᵀy: y = exp(a − 1), ~1e4 here."""
    a = cp.Parameter(3, name="a")
    y = cp.Variable(3)
    a0 = torch.tensor(np.random.default_rng(1).normal(size=3) * 0.5) + 1 + math.log(1e4)
    return cp.Problem(cp.Minimize(-cp.sum(cp.entr(y)) - a @ y)), a, y, a0, lambda t: torch.exp(t - 1)


def _log_barrier():
    """max Σ log(y) s.t. aᵀy = 1 (a ~ 1e3): y = 1 / (4 a)."""
    a = cp.Parameter(4, pos=True, name="a")
    y = cp.Variable(4)
    a0 = torch.tensor(np.random.default_rng(13).uniform(0.5, 2.0, size=4)) * 1e3
    return cp.Problem(cp.Maximize(cp.sum(cp.log(y))), [a @ y == 1]), a, y, a0, lambda t: 1.0 / (4 * t)


def _box():
    """Projection onto [0, 1]^5: y = clip(a, 0, 1), well conditioned."""
    a = cp.Parameter(5, name="a")
    y = cp.Variable(5)
    a0 = torch.tensor([-0.7, 0.2, 0.45, 0.8, 1.6], dtype=torch.float64)
    return cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [y >= 0, y <= 1]), a, y, a0, lambda t: t.clamp(0, 1)


def _run(make, adjoint: str):
    """(gradient's relative error against the closed form, the ConvexDDN warnings) of a weighted sum of y."""
    prob, par, var, a0, closed = make()
    layer = cddn.ConvexLayer(prob, parameters=[par], variables=[var], solver="Clarabel", adjoint=adjoint)
    a = a0.clone().unsqueeze(0).requires_grad_()
    w = torch.tensor(np.random.default_rng(7).normal(size=(1, a0.numel())))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, = torch.autograd.grad((layer(a) * w).sum(), a)
    ar = a0.clone().requires_grad_()
    ref, = torch.autograd.grad((closed(ar) * w[0]).sum(), ar)
    err = ((g[0] - ref).norm() / ref.norm()).item()
    return err, [x.message for x in caught if issubclass(x.category, ConvexDDNWarning)]


@pytest.mark.parametrize("adjoint", ["lsmr", "lsqr"])
@pytest.mark.parametrize("make", [_entropy, _log_barrier], ids=["entropy", "log_barrier"])
def test_ill_conditioned_gradient_is_accurate_or_warned(make, adjoint):
    err, caught = _run(make, adjoint)
    named = [m for m in caught if isinstance(m, GradientWarning) and (0,) in getattr(m, "elements", [])]
    assert err <= 1e-6 or named, f"gradient {err:.1e} off the closed form without a GradientWarning"


@pytest.mark.parametrize("adjoint", ["lsmr", "lsqr"])
def test_well_conditioned_is_quiet_and_exact(adjoint):
    err, caught = _run(_box, adjoint)
    assert not caught
    assert err <= 1e-8


@pytest.mark.parametrize("adjoint", ["lsmr", "lsqr"])
@pytest.mark.parametrize("make", [_entropy, _log_barrier], ids=["entropy", "log_barrier"])
def test_refined_above_dense_fallback_is_accurate_or_warned(make, adjoint, monkeypatch):
    # Above the dense fallback's size (here: every size) the adjoint is refined, not re-solved densely.
    monkeypatch.setattr(cone, "_DENSE_FALLBACK_MAX", 0)
    err, caught = _run(make, adjoint)
    named = [m for m in caught if isinstance(m, GradientWarning) and (0,) in getattr(m, "elements", [])]
    assert err <= 1e-6 or named, f"gradient {err:.1e} off the closed form without a GradientWarning"


@pytest.mark.parametrize("lsqr", [False, True])
def test_refined_solve_matches_minimum_norm(lsqr):
    # A consistent system, singular along one direction, condition 1e6 on the rest (LSMR unrefined: 1.2e-6 off at
    # relative residual 1.2e-11): refined, its residual is at rounding level and its solution the minimum-norm one
    # (numpy's pseudo-inverse, independent).
    rng = np.random.default_rng(3)
    N = 20
    U, V = (np.linalg.qr(rng.standard_normal((N, N)))[0] for _ in range(2))
    M = (U * np.append(np.geomspace(1e2, 1e-4, N - 1), 0.0)) @ V.T
    rhs = M @ rng.standard_normal(N)

    class Op:
        matvec, rmatvec = (lambda self, x: M @ x), (lambda self, y: M.T @ y)

    d, relative, outcome = iterative_solve(Op(), rhs, False, lsqr, refine=3)
    assert outcome == "solved"
    measured = np.linalg.norm(rhs - M @ d) / np.linalg.norm(rhs)
    assert measured <= 1e-14 and relative == pytest.approx(measured, rel=1e-6)
    ref = np.linalg.pinv(M, rcond=1e-12) @ rhs
    assert np.linalg.norm(d - ref) / np.linalg.norm(ref) <= 1e-9


def test_an_adjoint_lsmr_solves_quickly_is_refined_not_solved_densely(monkeypatch):
    """The bench's L1-ball projection (n = 512, 2,900 rows + columns, per element): LSMR solved the
    adjoint in a few hundred iterations (5 ms) to a residual above 1e-12, and every element then
    went to the dense fallback (an O(N³) least squares, 3.4 s each: the bench's batch of 128 would
    take 7 minutes). Refinement steps cost as many iterations as that solve: they are taken where
    that is below N, and the dense solve only where they leave the residual above 1e-12.
    Reference: the projection's closed-form Jacobian, I − s sᵀ/k on the support (k entries, signs s)."""
    from convexddn.bench.cases.convex import CONVEX_PROBLEMS

    dense = []
    real = cone.min_norm_solve
    monkeypatch.setattr(cone, "min_norm_solve", lambda *a, **k: dense.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    prob, params, variables, data = CONVEX_PROBLEMS["l1ball512"][1](2, gen)
    g = torch.randn((2,) + tuple(variables[0].shape), dtype=torch.float64, generator=gen)
    layer = cddn.ConvexLayer(prob, params, variables)
    args = [d.detach().clone().requires_grad_(True) for d in data]
    y = layer(*args)
    assert layer.last_solve.backend == ["per_element"] * 2
    dense.clear()
    grads = torch.autograd.grad(y, args, g)
    assert not dense, "the dense fallback ran"
    for i in range(2):
        yi = y[i].detach()
        s = torch.sign(yi) * (yi.abs() > 1e-9 * yi.abs().max())
        gi = g[i] * (s != 0)
        ref = gi - s * (s @ gi) / (s != 0).sum()
        assert float((grads[0][i] - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
