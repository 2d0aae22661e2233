"""Whether an infeasible program is reported infeasible does not depend on its objective
(:func:`convexddn.convex.ray_fit.fitted`): a Farkas ray involves only A, b and K. With a curved
objective (``sum_squares``, ``sum(exp)``) Clarabel's ray leaned on the objective's epigraph cone, whose
column set its "reach" (3e11-5e12), SCS ran to its iteration limit ("solved (inaccurate)") and the
re-solve at that reach confirmed nothing: ``SolverError`` "the solvers disagree" where the same
constraints with a linear objective raised ``InfeasibleError``. Fitted exact on the constraints' rows,
the ray decides alone."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import InfeasibleError, SolverWarning

torch.set_num_threads(1)
F64 = torch.float64

_S0 = np.array([[1.96460519, -0.25571571, 1.15698684],
                [-0.25571571, 2.6577843, -1.47524009],
                [1.15698684, -1.47524009, 2.43916101]])


def _quiet(layer, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        return layer(*args)


def _sdp(curved: bool, solver: str = "auto"):
    """X PSD, trace(X) <= 2, X01 >= w0: infeasible for w0 > 1 (|X01| <= trace(X)/2)."""
    S = cp.Parameter((3, 3), PSD=True)
    w = cp.Parameter(3)
    X = cp.Variable((3, 3), PSD=True)
    obj = cp.sum_squares(X - S) + w @ cp.diag(X) if curved else cp.trace(S @ X) + w @ cp.diag(X)
    prob = cp.Problem(cp.Minimize(obj), [cp.trace(X) <= 2, X[0, 1] >= w[0]])
    return cddn.ConvexLayer(prob, [S, w], [X], solver=solver), prob, S, w, X


def _sdp_values(w0: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random PSD S (eigenvalues 0.5-3) and w = (w0, ·, ·), for each w0 (any shape)."""
    rng = np.random.default_rng(seed)
    shape = w0.shape
    Q = np.linalg.qr(rng.standard_normal((w0.size, 3, 3)))[0]
    S = Q @ (rng.uniform(0.5, 3, (w0.size, 3, 1)) * np.swapaxes(Q, 1, 2))
    S = 0.5 * (S + np.swapaxes(S, 1, 2))
    w = rng.uniform(-0.5, 0.5, (w0.size, 3))
    w[:, 0] = w0.ravel()
    S[0] = _S0 if w0.size else S[0]
    return S.reshape(*shape, 3, 3), w.reshape(*shape, 3)


@pytest.mark.parametrize("curved", [True, False])
@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_infeasible_sdp_is_infeasible_whatever_the_objective(curved, solver):
    # Element (1, 0) is feasible (w0 = 0.5); the others are not (w0 = 1.3, 1.1, 1.7). The tester's
    # element (w = (1.3, 0.2, -0.4) against _S0) with the curved objective raised SolverError.
    w0 = np.array([[1.3, 1.1], [0.5, 1.7]])
    S, w = _sdp_values(w0)
    w[0, 0] = [1.3, 0.2, -0.4]
    layer = _sdp(curved, solver)[0]
    with pytest.raises(InfeasibleError) as err:
        _quiet(layer, torch.tensor(S, dtype=F64), torch.tensor(w, dtype=F64))
    assert type(err.value) is InfeasibleError, str(err.value)
    assert sorted(err.value.indices) == [(0, 0), (0, 1), (1, 1)], str(err.value)


def test_feasible_sdp_near_the_boundary_is_solved():
    # w0 = 0.99 (and 0.9): feasible, X01 = w0 at best against trace(X) <= 2; compared with CVXPY/Clarabel.
    w0 = np.array([0.99, 0.9])
    S, w = _sdp_values(w0, seed=1)
    layer, prob, Sp, wp, X = _sdp(True)
    out = _quiet(layer, torch.tensor(S, dtype=F64), torch.tensor(w, dtype=F64)).numpy()
    for i in range(2):
        Sp.value, wp.value = S[i], w[i]
        prob.solve(solver=cp.CLARABEL)
        assert prob.status == "optimal"
        # (the solution is nearly rank 2: CVXPY's own point is ~4e-5 off; compare objectives, and feasibility)
        assert out[i][0, 1] >= w0[i] - 1e-6 and np.trace(out[i]) <= 2 + 1e-6
        assert np.linalg.eigvalsh(out[i]).min() >= -1e-6
        value = ((out[i] - S[i]) ** 2).sum() + w[i] @ np.diag(out[i])
        assert abs(value - prob.value) <= 1e-6 * (1 + abs(prob.value)), (value, prob.value)
        np.testing.assert_allclose(out[i], X.value, atol=1e-3)


def _exp(curved: bool):
    """z >= p, log_sum_exp(z) <= 0: infeasible for every p > 0."""
    p = cp.Parameter(3)
    z = cp.Variable(3)
    obj = cp.sum(cp.exp(z)) if curved else cp.sum(z)
    prob = cp.Problem(cp.Minimize(obj), [z >= p, cp.log_sum_exp(z) <= 0])
    return cddn.ConvexLayer(prob, [p], [z]), prob, p, z


@pytest.mark.parametrize("curved", [True, False])
def test_infeasible_exp_cone_program_is_infeasible_whatever_the_objective(curved):
    # p = (1, 1, 1) with sum(exp(z)) raised SolverError ("the solvers disagree"), with sum(z) InfeasibleError;
    # element (0, 1) is feasible (p = -2: log(3 e^-2) < 0).
    rng = np.random.default_rng(3)
    p = rng.uniform(0.05, 2.0, (2, 3, 3))
    p[0, 0] = 1.0
    p[0, 1] = -2.0
    with pytest.raises(InfeasibleError) as err:
        _quiet(_exp(curved)[0], torch.tensor(p, dtype=F64))
    assert type(err.value) is InfeasibleError, str(err.value)
    assert sorted(err.value.indices) == [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2)], str(err.value)


def test_feasible_exp_cone_program_near_the_boundary_is_solved():
    # p = -log(3) + 0.01... below: z = p is feasible where log(3) + max p <= 0; near that edge.
    p = np.array([[-np.log(3) - 1e-3] * 3, [-np.log(3) - 0.1, -2.0, -1.5]])
    layer, prob, pp, z = _exp(True)
    out = _quiet(layer, torch.tensor(p, dtype=F64)).numpy()
    for i in range(2):
        pp.value = p[i]
        prob.solve(solver=cp.CLARABEL)
        assert prob.status == "optimal"
        np.testing.assert_allclose(out[i], z.value, atol=1e-5)


def test_fitted_drops_the_objective_cone_a_ray_leans_on_and_keeps_the_constraints_cone():
    # x1 <= 1, x0 >= 2, |x0| <= x1 (a second-order cone): infeasible, by y = (1, 0.75) on the two rows and
    # (1, -0.75) on the cone, inside it. Beside them the objective's epigraph (x0, 1, t) in K_exp (rows
    # -x0, 1, -t), on which the ray puts (-0.004, 0.17, 0), balanced by the cone's tail (-0.746): just off
    # K*_exp (w >= 0.004 e^(-43.5) needed), so projected, t's column misses by that alone (a "reach" of 1e21),
    # and x1's by 1e-12. The rows alone certify nothing (the old parts); fitted, the exponential block is
    # dropped and the rows and the second-order cone, made exact, certify.
    import scipy.sparse as sp

    from convexddn.convex.reach import exact_ray, reach_point
    from convexddn.convex.ray_fit import fitted

    A = sp.csc_matrix(np.array([[0, 1.0, 0], [-1.0, 0, 0], [0, -1.0, 0], [-1.0, 0, 0],
                                [-1.0, 0, 0], [0, 0, 0], [0, 0, -1.0]]))
    b = np.array([1.0, -2.0, 0, 0, 0, 1.0, 0])
    cones = [("l", 2), ("q", [2]), ("ep", 1)]
    ray = np.array([1 + 1e-12, 0.75, 1.0, -0.746, -0.004, 0.17, 0.0])
    assert reach_point(A, b, cones, ray) is not None
    y = fitted(A, cones, ray)
    assert y is not None and np.all(y[4:] == 0) and b @ y < 0
    assert reach_point(A, b, cones, y) is None
    assert exact_ray(A, b, cones, ray)
    # x0 >= 0.5 instead: feasible (x = (0.5, 1)), and no part of the ray is a certificate.
    assert not exact_ray(A, np.array([1.0, -0.5, 0, 0, 0, 1.0, 0]), cones, ray)


def test_fitted_stops_after_its_cap_of_drops(monkeypatch):
    # Each round of dropping edge blocks is a dense least squares: at most _MAX_DROPS rounds, past which
    # the ray is returned as it stands (not exact: the caller keeps its doubt). The case above needs one.
    import scipy.sparse as sp

    from convexddn.convex import ray_fit
    from convexddn.convex.reach import exact_ray

    A = sp.csc_matrix(np.array([[0, 1.0, 0], [-1.0, 0, 0], [0, -1.0, 0], [-1.0, 0, 0],
                                [-1.0, 0, 0], [0, 0, 0], [0, 0, -1.0]]))
    b = np.array([1.0, -2.0, 0, 0, 0, 1.0, 0])
    cones = [("l", 2), ("q", [2]), ("ep", 1)]
    ray = np.array([1 + 1e-12, 0.75, 1.0, -0.746, -0.004, 0.17, 0.0])
    monkeypatch.setattr(ray_fit, "_MAX_DROPS", 0)
    y = ray_fit.fitted(A, cones, ray)
    assert y is not None and np.any(ray_fit.column_misses(A, y) != 0)
    assert not exact_ray(A, b, cones, ray)
    monkeypatch.setattr(ray_fit, "_MAX_DROPS", 1)
    assert exact_ray(A, b, cones, ray)


# Where no certificate stands at all (Clarabel "Failure", SCS at its iteration limit) because a curved
# objective kept the solvers from a ray, the element's constraints alone (objective dropped) decide:
# an exact ray of that feasibility problem proves infeasibility (convexddn/convex/feasibility.py).
# Each family: element 0 infeasible (a SolverError until then), element 1 feasible near the boundary.
_A3 = np.array([1.0, 2.0, 2.0]) / 3
_LSE_B = np.log(1e4)


def _ball():
    """||x|| <= r, a@x >= h, min sum(exp(w x)): infeasible for h > r (scale 1e-4, w = 1e4)."""
    x, rh, w = cp.Variable(3), cp.Parameter(2), cp.Parameter()
    prob = cp.Problem(cp.Minimize(cp.sum(cp.exp(w * x))), [cp.norm(x) <= rh[0], _A3 @ x >= rh[1]])
    r = 0.00012697867137638705
    return prob, [rh, w], [x], [np.array([[r, 2 * r], [r, 0.5 * r]]), np.array([1e4, 1e4])]


def _psd():
    """X PSD, trace(X) <= p0, X01 >= p1, min sum(exp(w diag X)): infeasible for p1 > p0 / 2."""
    X, p, w = cp.Variable((2, 2), symmetric=True), cp.Parameter(2), cp.Parameter()
    prob = cp.Problem(cp.Minimize(cp.sum(cp.exp(w * cp.diag(X)))), [X >> 0, cp.trace(X) <= p[0], X[0, 1] >= p[1]])
    p0 = 0.0003669963261004018
    return prob, [p, w], [X], [np.array([[p0, 1.1 * p0 / 2], [p0, 0.99 * p0 / 2]]), np.array([1e4, 1e4])]


def _lse():
    """z >= c, log_sum_exp(z) <= log(1e4), min sum(exp(z - q)): infeasible for c + log 3 > log(1e4)."""
    z, pz, q = cp.Variable(3), cp.Parameter(3), cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum(cp.exp(z - q))), [z >= pz, cp.log_sum_exp(z) <= _LSE_B])
    c = _LSE_B - np.log(3) + np.log(np.array([1.001, 0.99]))
    qq = [0.6257293982571508, 2.164325358952666, 0.9555405586957074]
    return prob, [pz, q], [z], [np.repeat(c[:, None], 3, 1), np.array([qq, qq])]


def _negent():
    """exp(x) <= t <= p1, x >= p0, min -entr(t) + t: infeasible for p0 > log(p1) (p1 = 1e4)."""
    x, t, p = cp.Variable(), cp.Variable(), cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(-cp.entr(t) + 0.3 * t), [cp.exp(x) <= t, t <= p[1], x >= p[0]])
    return prob, [p], [x, t], [np.array([[np.log(1.1e4), 1e4], [np.log(0.99e4), 1e4]])]


@pytest.mark.parametrize("family", [_ball, _psd, _lse, _negent])
@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
def test_infeasible_with_no_certificate_is_decided_by_its_constraints_alone(family, solver):
    prob, params, variables, values = family()
    layer = cddn.ConvexLayer(prob, params, variables, solver=solver)
    with pytest.raises(InfeasibleError) as err:
        _quiet(layer, *(torch.tensor(v, dtype=F64) for v in values))
    assert type(err.value) is InfeasibleError, str(err.value)
    assert err.value.indices == [(0,)], str(err.value)
    # The feasible element alone: solved, feasible and optimal as CVXPY/Clarabel solves it (their points
    # differ by 5e-4 relative at scale 1e-4: compare objectives).
    out = _quiet(layer, *(torch.tensor(v[1:], dtype=F64) for v in values))
    out = out if isinstance(out, tuple) else (out,)
    for par, v in zip(params, values):
        par.value = v[1]
    prob.solve(solver=cp.CLARABEL)
    assert prob.status == "optimal"
    best = prob.value
    for o, var in zip(out, variables):
        var.value = o[0].numpy()
    scale = max(np.abs(v[1]).max() for v in values[:1])
    assert max(float(np.max(c.violation())) for c in prob.constraints) <= 1e-7 * scale
    assert abs(prob.objective.value - best) <= 1e-6 * (1 + abs(best)), (prob.objective.value, best)
