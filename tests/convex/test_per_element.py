"""The per-element backend (:mod:`convexddn.convex.per_element`) on semidefinite cones."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import InfeasibleError, SolverWarning, UnboundedError

F64 = torch.float64


def _clarabel_alone(layer: cddn.ConvexLayer) -> None:
    """The call was solved by Clarabel's own point, polished, at a residual of rounding level."""
    info = layer.last_solve
    assert info.solvers == ["Clarabel"] and info.residuals[0] <= 1e-8, (info.solvers, info.statuses, info.residuals)


def _spd(k: int, seed: int) -> np.ndarray:
    B = np.random.default_rng(seed).standard_normal((k, k))
    return B @ B.T / k + np.eye(k)


def _sym(k: int, seed: int) -> np.ndarray:
    B = np.random.default_rng(seed).standard_normal((k, k))
    return (B + B.T) / 2


def test_log_det_of_a_4x4_is_solved_by_clarabel_alone():
    """max log det X - tr(C X): X* = C⁻¹, and d<W, X*>/dC = -C⁻¹ W C⁻¹ (W, C symmetric). Its cone
    block is 8x8: diffcp gave Clarabel's y and s back in the wrong row order from 4x4 on, the KKT
    residual stayed ~0.8 after polishing, and fallback=None raised SolverError."""
    k = 4
    C = cp.Parameter((k, k), symmetric=True)
    X = cp.Variable((k, k), symmetric=True)
    layer = cddn.ConvexLayer(cp.Problem(cp.Maximize(cp.log_det(X) - cp.trace(C @ X))), [C], [X],
                             solver="Clarabel", fallback=None)
    c = torch.tensor(_spd(k, 0), requires_grad=True)
    W = torch.tensor(_sym(k, 1))
    out = layer(c)
    _clarabel_alone(layer)
    inv = torch.linalg.inv(c.detach())
    torch.testing.assert_close(out.detach(), inv, atol=1e-7, rtol=0)
    (grad,) = torch.autograd.grad((W * out).sum(), c)
    torch.testing.assert_close(grad, -inv @ W @ inv, atol=1e-6, rtol=0)


def test_lambda_max_of_a_5x5_is_solved_by_clarabel_alone():
    """min t s.t. t I - A ⪰ 0: t* = λ_max(A), dt*/dA = v vᵀ (v its unit eigenvector: also the
    constraint's multiplier). With Clarabel's multiplier in the wrong row order the KKT residual
    stayed ~1 (SolverError, fallback=None)."""
    k = 5
    A = cp.Parameter((k, k), symmetric=True)
    t = cp.Variable()
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(t), [t * np.eye(k) - A >> 0]), [A], [t],
                             solver="Clarabel", fallback=None)
    a = torch.tensor(_sym(k, 2), requires_grad=True)
    w, V = torch.linalg.eigh(a.detach())
    out = layer(a)
    _clarabel_alone(layer)
    torch.testing.assert_close(out.detach(), w[-1], atol=1e-7, rtol=0)
    (grad,) = torch.autograd.grad(out, a)
    torch.testing.assert_close(grad, torch.outer(V[:, -1], V[:, -1]), atol=1e-6, rtol=0)


def test_psd_projection_of_a_5x5_is_solved_by_clarabel_alone():
    """argmin ‖X - A‖_F s.t. X ⪰ 0: A's eigenvalues clamped at 0; the gradient of <W, X*> against
    central differences of that closed form."""
    k = 5
    A = cp.Parameter((k, k), symmetric=True)
    X = cp.Variable((k, k), symmetric=True)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - A)), [X >> 0]), [A], [X],
                             solver="Clarabel", fallback=None)

    def project(m: np.ndarray) -> np.ndarray:
        w, V = np.linalg.eigh(m)
        return (V * np.maximum(w, 0)) @ V.T

    a, W = _sym(k, 3), _sym(k, 4)
    at = torch.tensor(a, requires_grad=True)
    out = layer(at)
    _clarabel_alone(layer)
    torch.testing.assert_close(out.detach(), torch.tensor(project(a)), atol=1e-7, rtol=0)
    (grad,) = torch.autograd.grad((torch.tensor(W) * out).sum(), at)
    h, fd = 1e-6, np.zeros((k, k))
    for i, j in zip(*np.triu_indices(k)):
        E = np.zeros((k, k))
        E[i, j] = E[j, i] = h
        fd[i, j] = fd[j, i] = np.sum(W * (project(a + E) - project(a - E))) / (2 * h) / (1 if i == j else 2)
    torch.testing.assert_close(grad, torch.tensor(fd), atol=1e-6, rtol=0)


SETTINGS = [{}, {"solver": "SCS"}, {"solver": "Clarabel", "fallback": None}]


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_an_unbounded_psd_element_raises_unbounded_error(kwargs):
    """min tr(C X) s.t. X ⪰ 0, X₀₀ <= 1 with C = diag(1, 1, -1): unbounded along e₃e₃ᵀ. SCS returns
    NaN for y (also warm-started from Clarabel's point); the polish projected it onto the PSD
    cone, numpy's eigh raised "Eigenvalues did not converge", and that discarded the attempt, Clarabel's
    verified certificate included: SolverError under the default settings and with solver="SCS"."""
    C = cp.Parameter((3, 3), symmetric=True)
    X = cp.Variable((3, 3), symmetric=True)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.trace(C @ X)), [X >> 0, X[0, 0] <= 1]), [C], [X], **kwargs)
    batch = torch.tensor(np.stack([np.eye(3), np.diag([1.0, 1.0, -1.0])]))
    with pytest.raises(UnboundedError, match=r"\[\(1,\)\].*certificate verified") as err:
        layer(batch)
    assert "Eigenvalues" not in str(err.value)


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("kwargs", SETTINGS)
def test_an_infeasible_psd_element_raises_infeasible_error(kwargs, k):
    """X ⪰ 0 (k x k) with tr X <= t, t = -1: infeasible. SCS returns NaN for x, whose polish
    ended in "Eigenvalues did not converge" (SolverError); from k = 4 on Clarabel's certificate,
    given back in the wrong row order, did not verify."""
    t = cp.Parameter()
    X = cp.Variable((k, k), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.trace(X)), [X >> 0, cp.trace(X) <= t, cp.trace(X) >= -10])
    layer = cddn.ConvexLayer(prob, [t], [X], **kwargs)
    with pytest.raises(InfeasibleError, match=r"\[\(1,\)\].*certificate verified") as err:
        layer(torch.tensor([1.0, -1.0], dtype=F64))
    assert "Eigenvalues" not in str(err.value)


def _simplex_projection(v: np.ndarray) -> np.ndarray:
    """argmin_{w >= 0, sum w = 1} ||w - v||² by sorting (Held, Wolfe & Crowder)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    k = np.nonzero(u - css / np.arange(1, v.size + 1) > 0)[0][-1]
    return np.maximum(v - css[k] / (k + 1), 0)


def test_a_failed_first_solve_rescued_by_scs_from_its_point_warns():
    """Clarabel stopped after one iteration (status Failure) and SCS, warm-started at its
    point, solved: returned with no SolverWarning, while the same rescue by the fallback
    (refine=0 skips the warm start) warned "solved by the fallback SCS". Now it warns too.
    Reference: the projection onto {X ⪰ 0, tr X = 1} is V diag(Π_simplex(λ)) Vᵀ."""
    k = 4
    C = cp.Parameter((k, k), symmetric=True)
    X = cp.Variable((k, k), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - C)), [X >> 0, cp.trace(X) == 1])
    c = _sym(k, 3) * 2
    lam, V = np.linalg.eigh(c)
    expected = torch.tensor(V @ np.diag(_simplex_projection(lam)) @ V.T)
    layer = cddn.ConvexLayer(prob, [C], [X], solver="Clarabel", solver_args={"max_iter": 1})
    with pytest.warns(SolverWarning, match=r"Clarabel: Failure; solved by SCS from its point"):
        out = layer(torch.tensor(c))
    assert layer.last_solve.solvers == ["Clarabel→SCS"]
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)
    # A solve that succeeded is only polished by SCS from its point where that helps: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        out = cddn.ConvexLayer(prob, [C], [X], solver="Clarabel")(torch.tensor(c))
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)


def test_fallback_rescues_are_one_warning_naming_the_elements():
    """ECOS stopped after one iteration raises on every element, and SCS solves each: the
    per-element path gave one SolverWarning per element (6 for a (2, 3) batch, 64 for 64),
    each naming one element. Now one per call names all six, in the caller's batch shape, and
    lists them in ``elements`` (their notes in ``notes``). Reference: the projection onto
    y >= 0 is clamp(p, min=0)."""
    p = cp.Parameter(3)
    y = cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - p)), [y >= 0]), [p], [y], solver="ECOS")
    P = torch.randn(2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(P, solver_args={"max_iters": 1})
    said = [w.message for w in caught if issubclass(w.category, SolverWarning)]
    assert len(said) == 1, [str(w) for w in said]
    every = [(i, j) for i in range(2) for j in range(3)]
    assert said[0].elements == every and len(said[0].notes) == 6
    assert str(said[0]).startswith("ConvexLayer: 6 batch element(s) (batch indices [(0, 0), (0, 1), (0, 2), (1, 0)")
    assert "solved by the fallback SCS" in str(said[0])
    torch.testing.assert_close(out, P.clamp(min=0), atol=1e-7, rtol=0)


def _soc_projection(v: np.ndarray) -> np.ndarray:
    """The closed-form projection onto {(x, t): ‖x‖ <= t} of v = (x, t)."""
    x, t = v[:-1], v[-1]
    nx = np.linalg.norm(x)
    if nx <= t:
        return v.copy()
    if nx <= -t:
        return np.zeros_like(v)
    return (nx + t) / 2 * np.concatenate([x / nx, [1.0]])


@pytest.mark.parametrize("scale", [1.0, 1e-6])
def test_projection_onto_a_second_order_cone_near_its_polar_is_right_at_any_scale(scale):
    """Points just outside the polar cone (t = -‖x‖(1 - f)), beside points inside, in the polar
    cone and far from both, at data of 1 and 1e-6: each element is the closed-form projection
    within tol of the data, or a warning names it. At 1e-6 the tip at f = 1e-5 (6.5e-12) came
    back as 4e-16, unwarned: the multiplier's distance to K* was measured against 1 + ‖y‖∞, not
    its cone block's own size (residual 8.7e-12, accepted; at data of 1, 7e-6, re-solved)."""
    n = 3
    p, z = cp.Parameter(n + 1), cp.Variable(n + 1)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(z - p)), [cp.norm(z[:n]) <= z[n]])
    x0 = np.array([0.3, -0.4, 1.2])
    nx = np.linalg.norm(x0)
    points = np.stack([np.concatenate([x0, [-nx * (1 - f)]]) for f in (1e-3, 1e-5, 1e-7)]
                      + [np.concatenate([x0, [2.0]]), np.concatenate([x0, [-2.0]]), np.concatenate([x0, [0.1]])])
    points = points * scale
    layer = cddn.ConvexLayer(prob, parameters=[p], variables=[z], solver="Clarabel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = layer(torch.tensor(points, dtype=F64)).numpy()
    named = {e for w in caught for e in getattr(w.message, "elements", [])}
    for i, v in enumerate(points):
        err = np.abs(out[i] - _soc_projection(v)).max() / np.abs(v).max()
        assert err <= layer.tol or (i,) in named or i in named, (i, err, layer.last_solve.solvers, named)
