"""Degenerate solutions on the per-element path above 400 rows + columns, where its adjoint is
not solved densely (modes "sparse", "lsmr", "lsqr"; "auto" picks one of the first two there).

A 15 × 15 assignment LP ``min <C, X>`` s.t. ``X 1 = 1``, ``Xᵀ 1 = 1``, ``X >= 0`` (480 rows +
columns in its cone form) with two optimal permutations has no derivative in C: the solution
jumps to either vertex as C moves (checked with cvxpy + Clarabel below). With a loss constant on
that face of optima, the adjoint system is consistent, so LSMR returned its minimum-norm gradient
without a GradientWarning, where the dense adjoint (and so an 8 × 8 LP) warned. The same LP
with one optimal permutation is degenerate too (a permutation is a degenerate vertex) but unique
and constant in C: its gradient is 0 and exact, unwarned. A QP of similar size in LSMR mode,
strictly complementary, matches central finite differences unwarned.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn.convex.cone as cone_module
from convexddn.convex import ConvexLayer
from convexddn.errors import GradientWarning

K = 15
MODES = ["auto", "sparse", "lsmr", "lsqr"]


def _assignment():
    C, X = cp.Parameter((K, K)), cp.Variable((K, K))
    return cp.Problem(cp.Minimize(cp.sum(cp.multiply(C, X))), [cp.sum(X, 1) == 1, cp.sum(X, 0) == 1, X >= 0]), C, X


def _tied_cost() -> np.ndarray:
    """The identity and the (0 1) swap both cost 0, every other assignment at least 1."""
    C = 1.0 + np.random.default_rng(0).random((K, K))
    np.fill_diagonal(C, 0.0)
    C[0, 1] = C[1, 0] = 0.0
    return C


def _face_blind_weights() -> np.ndarray:
    """A loss ⟨W, X⟩ equal at both optima: ⟨W, D⟩ = 0 for the swap's direction D."""
    W = np.random.default_rng(1).standard_normal((K, K))
    W[0, 1] = W[0, 0] + W[1, 1] - W[1, 0]
    return W


def _backward(C0: np.ndarray, W: np.ndarray, adjoint: str) -> tuple[np.ndarray, list]:
    prob, C, X = _assignment()
    layer = ConvexLayer(prob, [C], [X], solver="Clarabel", adjoint=adjoint)
    Ct = torch.tensor(C0, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (layer(Ct) * torch.from_numpy(W)).sum().backward()
    return Ct.grad.numpy(), [w for w in caught if issubclass(w.category, GradientWarning)]


def _clarabel_x(C0: np.ndarray) -> np.ndarray:
    prob, C, X = _assignment()
    C.value = C0
    prob.solve(solver=cp.CLARABEL)
    return X.value


def test_tied_assignment_has_no_derivative():
    """The premise, independently of convexddn: C's entry (0, 1) moved by ±1e-5 sends the solution to
    either vertex (X₀₀ 1 or 0, from ~0.5 between them): difference quotients of ~5e4, no derivative."""
    C0, E = _tied_cost(), np.zeros((K, K))
    E[0, 1] = 1e-5
    mid, up, down = (_clarabel_x(C0 + t * E)[0, 0] for t in (0.0, 1.0, -1.0))
    assert 0.1 < mid < 0.9 and abs(up - 1.0) < 1e-3 and abs(down) < 1e-3


@pytest.mark.parametrize("adjoint", MODES)
def test_tied_assignment_warns_whatever_the_adjoint(adjoint):
    _, caught = _backward(_tied_cost(), _face_blind_weights(), adjoint)
    assert any("not unique or not differentiable" in str(w.message) for w in caught)


@pytest.mark.parametrize("adjoint", ["sparse", "lsmr"])
def test_tied_assignment_warns_without_the_dense_fallback(monkeypatch, adjoint):
    """Above 3000 rows + columns no dense solve confirms: the iterative test decides alone."""
    monkeypatch.setattr(cone_module, "_DENSE_FALLBACK_MAX", 0)
    _, caught = _backward(_tied_cost(), _face_blind_weights(), adjoint)
    assert any("not unique or not differentiable" in str(w.message) for w in caught)


@pytest.mark.parametrize("dense_fallback", [True, False])
@pytest.mark.parametrize("adjoint", ["auto", "lsmr"])
def test_unique_degenerate_assignment_is_exact_and_unwarned(monkeypatch, adjoint, dense_fallback):
    """One optimal permutation (a clear margin: cost 0 against at least 1): X is constant in C
    nearby, so every one-sided derivative, and the gradient, is 0."""
    if not dense_fallback:
        monkeypatch.setattr(cone_module, "_DENSE_FALLBACK_MAX", 0)
    C0 = 1.0 + np.random.default_rng(2).random((K, K))
    np.fill_diagonal(C0, 0.0)
    E = np.random.default_rng(3).standard_normal((K, K))
    assert np.abs(_clarabel_x(C0 + 1e-3 * E) - _clarabel_x(C0 - 1e-3 * E)).max() < 1e-6  # (constant in C)
    grad, caught = _backward(C0, np.random.default_rng(1).standard_normal((K, K)), adjoint)
    assert not caught
    assert np.abs(grad).max() < 1e-8


@pytest.mark.parametrize("adjoint", ["auto", "lsmr"])
def test_strictly_complementary_qp_matches_central_differences_unwarned(adjoint):
    """Projection onto the capped simplex {0 <= x <= 1, Σx = 60} in R^200 (its squared
    objective one long second-order cone: LSMR mode under "auto", 805 rows + columns), at a
    point with every bound clearly active or inactive; reference: central differences of
    cvxpy + Clarabel along three random directions."""
    n = 200
    p = cp.Parameter(n)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= 0, x <= 1, cp.sum(x) == 60])
    rng = np.random.default_rng(4)
    p0 = 3.0 * rng.random(n) - 1.0
    w = rng.standard_normal(n)
    layer = ConvexLayer(prob, [p], [x], solver="Clarabel", adjoint=adjoint)
    pt = torch.tensor(p0, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (layer(pt) @ torch.from_numpy(w)).backward()
    x0 = layer(pt).detach().numpy()
    assert np.sum((x0 > 1e-4) & (x0 < 1 - 1e-4)) > 10  # (some coordinates free, so the gradient is not 0)

    def loss(q):
        p.value = q
        prob.solve(solver=cp.CLARABEL)
        return float(w @ x.value)

    for d in rng.standard_normal((3, n)):
        h = 1e-5
        want = (loss(p0 + h * d) - loss(p0 - h * d)) / (2 * h)
        assert abs(float(pt.grad.numpy() @ d) - want) < 1e-5 * (1 + abs(want))
