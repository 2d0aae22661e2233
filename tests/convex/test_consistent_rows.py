"""Dependent equality rows with constant coefficients (:mod:`convexddn.convex.consistent_rows`).

A transport plan written the natural way, ``P @ 1 == a, P.T @ 1 == b, P >= 0``, has dependent
equality rows (the row sums and the column sums both sum ``P``): feasible only where
``sum(a) == sum(b)`` exactly. Sums that differ by rounding (float32 softmax marginals, or
``1e-12`` in float64) are solved with ``b_E`` projected onto the rows' range and agree with the
program with one column constraint dropped; sums that differ by ``1e-3`` are infeasible, and
the error says by how much. A problem with independent or parametric equality rows is not
touched (and solves bit for bit as before: checked against the previous code by hand).
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

from convexddn.convex import ConvexLayer
from convexddn.convex.consistent_rows import allowed, dependent_rows, input_precision
from convexddn.errors import GradientWarning, InfeasibleError

F64 = torch.float64
N, M, B = 4, 3, 3
SOLVERS = ("auto", "Clarabel")


def _transport(n: int = N, m: int = M, duals: bool = False, drop: bool = False):
    """The quadratically regularised transport problem; ``drop``: without the last column's
    constraint (``b`` then has ``m - 1`` entries); ``duals``: the two row blocks' multipliers too."""
    C, a, b = cp.Parameter((n, m)), cp.Parameter(n), cp.Parameter(m - drop)
    P = cp.Variable((n, m))
    rows = P @ np.ones(m) == a
    cols = (P[:, :-1] if drop else P).T @ np.ones(n) == b
    prob = cp.Problem(cp.Minimize(cp.trace(P.T @ C) + 0.1 * cp.sum_squares(P)), [rows, cols, P >= 0])
    return prob, [C, a, b], [P] + ([rows.dual_variables[0], cols.dual_variables[0]] if duals else [])


def _data(delta: float, dtype=F64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(B, N, M, dtype=F64, generator=g)
    a = torch.softmax(torch.randn(B, N, dtype=F64, generator=g), -1)
    b = torch.softmax(torch.randn(B, M, dtype=F64, generator=g), -1)
    if dtype == torch.float32:  # softmax marginals computed in float32: sums 1 ± ~1e-7
        a = torch.softmax(torch.randn(B, N, generator=g), -1)
        b = torch.softmax(torch.randn(B, M, generator=g), -1)
        return C.float(), a, b
    b[:, 0] += delta
    return C, a, b


def _reference(C, a, b):
    """cvxpy + Clarabel per element, the last column's constraint dropped."""
    prob, (pc, pa, pb), (P,) = _transport(drop=True)
    out = []
    for i in range(C.shape[0]):
        pc.value, pa.value, pb.value = (t[i].double().numpy() for t in (C, a, b[:, :-1]))
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        out.append(P.value)
    return torch.tensor(np.array(out))


def _gradient_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]


def test_dependent_rows_certificate():
    """N spans the complement of range(A_E) (a Farkas certificate: A_Eᵀ N = 0), the kept rows
    are independent, their rows of Π project, and T gives multipliers with A_Eᵀ T z = (S A_E)ᵀ z."""
    A = np.vstack([np.kron(np.eye(N), np.ones(M)), np.kron(np.ones(N), np.eye(M))])  # rows, then columns
    dep = dependent_rows(A)
    assert dep is not None and dep.r == N + M - 1 and dep.null.shape == (N + M, 1)
    assert np.abs(A.T @ dep.null).max() < 1e-14
    assert np.linalg.matrix_rank(A[dep.keep]) == dep.r
    b = np.random.RandomState(0).rand(N + M)
    Pib = b - dep.null @ (dep.null.T @ b)
    np.testing.assert_allclose(dep.project @ b, Pib[dep.keep], atol=1e-15)
    z = np.random.RandomState(1).randn(dep.r)
    np.testing.assert_allclose(A.T @ (dep.duals @ z), A[dep.keep].T @ z, atol=1e-13)
    assert abs(dep.null.T @ (dep.duals @ z)).max() < 1e-13  # (minimum norm: no component along N)
    assert dependent_rows(A[:-1]) is None  # full row rank


def test_tolerance_follows_the_inputs_precision():
    """The inconsistency allowed: the path's tolerance, and 16 rounding units of the least
    precise floating input (float32 inputs are only that precise); float64 outside a call."""
    assert allowed(1e-8) == 1e-8
    with input_precision([torch.zeros(2, dtype=F64), torch.zeros(2), torch.zeros(2, dtype=torch.long)]):
        assert allowed(1e-8) == 16 * torch.finfo(torch.float32).eps and allowed(1e-4) == 1e-4
    with input_precision([torch.zeros(2, dtype=F64)], 1e-6):  # (a layer's tol, on either path)
        assert allowed(1e-8) == 1e-6
    assert allowed(1e-8) == 1e-8


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("delta", [0.0, 1e-12, 1e-9, "float32"])
def test_transport_solves(solver, delta):
    """Sums that differ by rounding: solved, as the program with one column constraint dropped."""
    dtype = torch.float32 if delta == "float32" else F64
    C, a, b = _data(0.0 if delta == "float32" else delta, dtype)
    layer = ConvexLayer(*_transport(), solver=solver)
    P = layer(C, a, b)
    assert P.dtype == dtype and all(layer.last_solve.solved.tolist())
    ref = _reference(C, a, b)
    tol = 1e-6 if dtype == torch.float32 else 1e-7
    assert (P.double() - ref).abs().max() < tol
    assert layer.last_solve.backend == (["batched"] * B if solver == "auto" else ["per_element"] * B)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("delta", [0.0, 1e-9])
def test_transport_gradients(solver, delta):
    """Gradients in C and a (and b) against central differences along perturbations that keep
    sum(a) - sum(b) fixed; none along the inconsistent direction (1, -1); no GradientWarning."""
    C, a, b = _data(delta)
    layer = ConvexLayer(*_transport(), solver=solver)
    W = torch.linspace(-1, 1, N * M, dtype=F64).view(N, M)
    xs = [t.clone().requires_grad_() for t in (C, a, b)]
    _, warned = _gradient_warnings(lambda: (layer(*xs) * W).sum().backward())
    assert not warned
    gC, ga, gb = (x.grad for x in xs)
    torch.testing.assert_close(ga.sum(1), gb.sum(1), atol=1e-9, rtol=0)  # (no component along (1, -1))
    g = torch.Generator().manual_seed(3)
    for which in ("C", "a", "both"):
        dC = torch.randn(C.shape, dtype=F64, generator=g) * (which != "a")
        da = torch.randn(a.shape, dtype=F64, generator=g) * (which != "C")
        db = torch.randn(b.shape, dtype=F64, generator=g) * (which == "both")
        db += (da.sum(1, keepdim=True) - db.sum(1, keepdim=True)) / M  # sums move together
        h = 1e-5
        with torch.no_grad():
            up = (layer(C + h * dC, a + h * da, b + h * db) * W).sum((1, 2))
            down = (layer(C - h * dC, a - h * da, b - h * db) * W).sum((1, 2))
        fd = (up - down) / (2 * h)
        an = (gC * dC).sum((1, 2)) + (ga * da).sum(1) + (gb * db).sum(1)
        torch.testing.assert_close(an, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("solver", SOLVERS)
def test_transport_inconsistent_raises(solver):
    """Sums that differ by 1e-3: infeasible, the message saying the rows disagree and by how much."""
    C, a, b = _data(1e-3)
    layer = ConvexLayer(*_transport(), solver=solver)
    with pytest.raises(InfeasibleError, match=r"linearly dependent and their right-hand sides disagree by 0\.000"):
        layer(C, a, b)
    C, a, b = _data(0.0)
    b[1, 0] += 1e-3  # only element 1
    with pytest.raises(InfeasibleError, match=r"at 1 batch index\(es\) \[\(1,\)\]"):
        layer(C, a, b)
    layer.on_failure = "mask"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P = layer(C, a, b)
    assert P[1].isnan().all() and not P[[0, 2]].isnan().any()


@pytest.mark.parametrize("solver", SOLVERS)
def test_transport_disagreement_within_the_layers_tol(solver):
    """Sums that differ by 1e-5 (~5e-6 of ‖b_E‖): infeasible at the default tol 1e-6, solved with
    tol=1e-4 on either path (the batched one too, although it certifies to 1e-8)."""
    C, a, b = _data(1e-5)
    with pytest.raises(InfeasibleError, match="disagree by"):
        ConvexLayer(*_transport(), solver=solver)(C, a, b)
    layer = ConvexLayer(*_transport(), solver=solver, tol=1e-4)
    P = layer(C, a, b)
    assert all(layer.last_solve.solved.tolist())
    assert (P.sum(2) - a).abs().max() < 1e-5 and (P.sum(1) - b).abs().max() < 1e-5


@pytest.mark.parametrize("solver", SOLVERS)
def test_transport_duals(solver):
    """The two row blocks' multipliers: the minimum-norm ones (sum(u) = sum(v)), with the sums
    u_i + v_j that decide the plan equal to the reduced problem's."""
    C, a, b = _data(1e-12)
    layer = ConvexLayer(*_transport(duals=True), solver=solver)
    _, u, v = layer(C, a, b)
    prob, (pc, pa, pb), _ = _transport(drop=True)
    for i in range(B):
        pc.value, pa.value, pb.value = C[i].numpy(), a[i].numpy(), b[i, :-1].numpy()
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        ru, rv = prob.constraints[0].dual_value, np.append(prob.constraints[1].dual_value, 0.0)
        np.testing.assert_allclose((u[i][:, None] + v[i][None, :]).numpy(), ru[:, None] + rv[None, :], atol=1e-6)
        assert abs(float(u[i].sum() - v[i].sum())) < 1e-9


def _entropic_ot(n: int, m: int):
    C, a, b = cp.Parameter((n, m)), cp.Parameter(n), cp.Parameter(m)
    P, eps = cp.Variable((n, m)), cp.Parameter(1, nonneg=True)
    entropy = cp.sum(cp.entr(P)) + cp.sum(P)
    prob = cp.Problem(cp.Minimize(cp.trace(P.T @ C) - eps * entropy),
                      [P @ np.ones(m) == a, P.T @ np.ones(n) == b, P >= 0])
    return prob, [C, a, b, eps], [P]


@pytest.mark.filterwarnings("ignore::convexddn.errors.SolverWarning")  # (polish warnings: exact marginals too)
def test_entropic_ot_float32_marginals():
    """cvxpylayers' optimal-transport example with float32 marginals 1/6 and 1/5 (sums differ
    by 1.5e-8; exponential cones, so per element): every seed solves, the marginals hold."""
    n, m = 6, 5
    layer = ConvexLayer(*_entropic_ot(n, m))
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, generator=g), torch.randn(m, generator=g)
        a, b = torch.full((n,), 1 / n), torch.full((m,), 1 / m)
        P = layer((x[:, None] - y[None, :]) ** 2, a, b, torch.tensor([0.1])).double()
        assert (P.sum(1) - 1 / n).abs().max() < 1e-6 and (P.sum(0) - 1 / m).abs().max() < 1e-6


def test_independent_or_parametric_rows_untouched():
    """Full-rank constant equality rows and parametric ones: no rows removed on either path."""
    layer = ConvexLayer(*_transport(drop=True), solver="auto")
    C, a, b = _data(0.0)
    layer(C, a, b[:, :-1])
    assert layer._batched.data.rows_T is None
    x, y, E, f = cp.Parameter(3), cp.Variable(3), cp.Parameter((2, 3)), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [E @ y == f, E @ y == f])  # dependent, but parametric
    layer = ConvexLayer(prob, [x, E, f], [y], solver="Clarabel")
    layer(torch.randn(3, dtype=F64), torch.randn(2, 3, dtype=F64), torch.randn(2, dtype=F64))
    assert layer._backend._rows is None
    full = ConvexLayer(*_transport(), solver="Clarabel")
    full(*_data(0.0))
    assert full._backend._rows is not None and full._backend._rows.r == N + M - 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_rounding_allowed_is_that_of_the_marginals_not_of_the_cost(solver):
    """Masses 1 and 1.01 (float32 marginals) are infeasible whatever the cost's dtype: a float16 cost
    (an autocast network's) set the allowed disagreement to 16 float16 units (1.6e-2), and the plan came
    back solved with column sums 0.408 for 0.41, silently. The cost is in no equality row; the marginals'
    own float32 rounding (16 units: 1.9e-6) is what the rows may disagree by."""
    prob, params, variables = _transport()
    layer = ConvexLayer(prob, params, variables, solver=solver)
    C, a, _ = _data(0.0, torch.float32)
    b = torch.softmax(torch.randn(B, M, generator=torch.Generator().manual_seed(1)), -1)
    b[:, 0] += 0.01
    # (b_E reads a and b, parameters 1 and 2; the cost C, parameter 0, is in no equality row)
    assert (layer._batched or layer._opinion_program(C.device, False)).data.equality_parameters() == [1, 2]
    for cost in (C, C.half()):
        with pytest.raises(InfeasibleError):
            layer(cost, a, b)
    # Within the marginals' rounding (1e-7 of mass), solved whatever the cost's dtype.
    b[:, 0] += 1e-7 - 0.01
    b = b / b.sum(-1, keepdim=True) + torch.tensor([1e-7, 0.0, 0.0])
    torch.testing.assert_close(layer(C.half(), a, b).double(), layer(C.half().float(), a, b).double())
