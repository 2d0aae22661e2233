"""Second opinions on a verified infeasibility or unboundedness certificate
(:mod:`convexddn.convex.dissent`): programs feasible and bounded by construction whose data
reach 1e5-1e7 are not reported infeasible or unbounded, genuinely infeasible and unbounded
ones at that scale still are; a ray exact to rounding on the rows it needs decides alone (an O(1)
QP infeasible by two rows: InfeasibleError, no SCS run)."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import convexddn as cddn
from convexddn.convex.dissent import Run, _doubt, reaches
from convexddn.convex.reach import reach_scaling
from convexddn.errors import InfeasibleError, SolverError, SolverWarning, UnboundedError

F64 = torch.float64


def _quiet(layer, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        return layer(*args)


def _exp_projection():
    a = cp.Parameter(3)
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [cp.constraints.ExpCone(y[0], y[1], y[2])])
    return cddn.ConvexLayer(prob, [a], [y])


def test_exp_projection_from_the_negative_side_is_solved_not_infeasible():
    # Projection onto K_exp = cl{(r, s, t): s e^(r/s) <= t} is always feasible (y = 0). For r, s <= 0 it
    # is (r, 0, max(t, 0)): a - p = (0, s, min(t, 0)) lies in the polar cone, orthogonal to p. The
    # epigraph t >= ||y - a||^2 of the canonical form is 5.9e11 here; Clarabel's ray missed its column
    # by 3.8e-12 (relative 1.9e-12) with b^T y = -2.29: it reached x up to 6e11 only, and the old code
    # raised InfeasibleError ("certificate verified"). Re-solved at its reach, in the frame of the Lorentz
    # boost that balances the epigraph's cone block (k = 7.7e5), Clarabel lands on the solution.
    a = np.array([-12104.35501169, -753374.73923385, -189376.69107785])
    at = torch.tensor(a, dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = _exp_projection()(at)
    assert any("re-solving at the certificate's reach" in str(w.message) for w in seen), [str(w.message) for w in seen]
    np.testing.assert_allclose(out.detach().numpy(), [a[0], 0.0, 0.0], rtol=0, atol=1e-6 * np.abs(a).max())
    # (differentiated at the point found there, on the program as given: d(r, 0, 0)/da = diag(1, 0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        jac = torch.autograd.functional.jacobian(_exp_projection(), at)
    np.testing.assert_allclose(jac.numpy(), np.diag([1.0, 0.0, 0.0]), atol=1e-8)


@pytest.mark.parametrize("nudge", [-2, -1, 1, 2])
def test_exp_projection_does_not_hinge_on_the_last_bit_of_the_certificate(monkeypatch, nudge):
    # The test above passed where OpenBLAS ran its Haswell kernels and failed under its SkylakeX ones:
    # their dot products put the reach 6.0047e11 one ulp apart, and Clarabel, re-solving with the
    # column t scaled by it, stopped after 3 iterations either way ("InsufficientProgress") with a last
    # iterate the polish took to the solution on one machine only. Here the certificate's projection
    # onto K* is nudged by a few ulps (before: solved at one nudge of five); the projection (a0, 0, 0)
    # must come back at every one.
    import convexddn.convex.dissent as dissent

    real = dissent.project
    monkeypatch.setattr(dissent, "project",
                        lambda x, cones, dual=False: real(x, cones, dual) * (1 + nudge * np.finfo(np.float64).eps))
    a = np.array([-12104.35501169, -753374.73923385, -189376.69107785])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = _exp_projection()(torch.tensor(a, dtype=F64))
    assert any("re-solving at the certificate's reach" in str(w.message) for w in seen), [str(w.message) for w in seen]
    np.testing.assert_allclose(out.numpy(), [a[0], 0.0, 0.0], rtol=0, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize("seed", range(3))
def test_exp_projections_of_large_points_are_never_infeasible(seed):
    # r, s <= 0 (closed form as above) and a mixed-sign point (checked by the projection's own
    # optimality: p in K, a - p in the polar cone -K*, <p, a - p> = 0) at 1e5..1e7.
    rng = np.random.default_rng(seed)
    layer = _exp_projection()
    scale = 10.0 ** (5 + seed)
    a = np.stack([-np.abs(rng.normal(size=3)) * scale, rng.normal(size=3) * scale])
    a[0, 2] = abs(a[0, 2])
    try:
        out = _quiet(layer, torch.tensor(a, dtype=F64)).numpy()
    except SolverError as err:  # (at worst: the solvers disagree)
        assert type(err) is SolverError and "disagree" in str(err), err
        return
    np.testing.assert_allclose(out[0], [a[0, 0], 0.0, a[0, 2]], rtol=0, atol=1e-6 * np.abs(a[0]).max())
    from convexddn.convex.exp_cone import project_exp
    np.testing.assert_allclose(out[1], project_exp(a[1:2])[0], rtol=0, atol=1e-6 * np.abs(a[1]).max())


def test_entropy_regularised_projection_is_never_infeasible():
    # min ||y - a||^2 - sum(entr(y)) has no constraints but entr's domain: feasible for every a. At
    # a ~ 1e6 Clarabel claimed infeasibility with a ray that verified (InfeasibleError); SCS, warm-started
    # from its point and on its own, reports it solved (inaccurately), and Clarabel re-solving at the
    # ray's reach does not claim it again.
    a = cp.Parameter(4)
    y = cp.Variable(4)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - a) - cp.sum(cp.entr(y)))), [a], [y])
    av = torch.tensor([1801634.87, 1315103.765, 357380.411, -1208318.632], dtype=F64)
    try:
        out = _quiet(layer, av).numpy()
    except SolverError as err:
        assert type(err) is SolverError and "infeasible not certain" in str(err), err
        return
    # (solved: stationarity 2 (y - a) + log y + 1 = 0 where y > 0)
    pos = out > 1e-300
    np.testing.assert_allclose(2 * (out[pos] - av.numpy()[pos]) + np.log(out[pos]) + 1, 0, atol=1e-6 * 1.8e6)


@pytest.mark.parametrize("a", [25.0, 30.0])
def test_negative_entropy_minus_a_linear_term_is_never_unbounded(a):
    # min y log y - a y is bounded below (-e^(a-1) at y = e^(a-1)). SCS's ray (-1, 0.054) lies within
    # 0.054 e^(-18.3) = 6e-10 of K_exp: it excludes dual points below 0.36 / 6e-10 = 6e8 only, and
    # Clarabel's last dual iterate, 2.0e10 (the dual solution is e^24 = 2.6e10), lies beyond it.
    # Solved in its own unit (.own_unit), a = 25 comes back 2.8e-5 off: never unbounded, and off
    # only with the SolverWarning that its residual does not bound the error.
    av = cp.Parameter()
    y = cp.Variable()
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(-cp.entr(y) - av * y)), [av], [y])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = layer(torch.tensor(a, dtype=F64)).item()
    except SolverError as err:
        assert type(err) is SolverError and "unbounded not certain" in str(err), err
        return
    if out != pytest.approx(np.exp(a - 1), rel=1e-6):
        assert out == pytest.approx(np.exp(a - 1), rel=1e-4)
        assert any(issubclass(w.category, SolverWarning) and "does not bound the error" in str(w.message)
                   for w in caught)


def test_strongly_convex_log_barrier_is_never_unbounded():
    # min ||x||^2 - b.x - sum(log x): strongly convex, minimiser (b + sqrt(b^2 + 8)) / 4. SCS claimed
    # unboundedness ("inaccurate - reached max_iters") with a ray that verified; Clarabel failed, and
    # SCS from Clarabel's point reports it solved.
    b = cp.Parameter(4)
    x = cp.Variable(4)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(x) - b @ x - cp.sum(cp.log(x)))), [b], [x])
    bv = np.array([-535669.373, 361595.055, 1304000.045, 947080.963])
    try:
        out = _quiet(layer, torch.tensor(bv, dtype=F64)).numpy()
    except SolverError as err:
        assert type(err) is SolverError and "unbounded not certain" in str(err), err
        return
    np.testing.assert_allclose(out, (bv + np.sqrt(bv ** 2 + 8)) / 4, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e7, 1e9])
def test_second_order_cone_epigraph_is_never_infeasible_and_names_the_batch(scale):
    # min t s.t. ||y - a||^2 <= t, y >= 0 (the projection onto the orthant, y = 0 for a <= 0): the
    # epigraph t ~ 1e14 at a ~ 1e7 made Clarabel claim infeasibility (inaccurately) with a ray that
    # verified, and all four elements raised InfeasibleError; at 1e9 (t ~ 1e18) Clarabel's claim did
    # not verify, SCS's inaccurate one did, and the two claims counted as agreeing. Any failure names
    # the elements in the batch shape.
    a = cp.Parameter(3)
    y = cp.Variable(3)
    t = cp.Variable()
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(t), [cp.sum_squares(y - a) <= t, y >= 0]), [a], [y])
    rng = np.random.default_rng(0)
    if scale > 1e8:  # (the draw at which the two claims met)
        rng.normal(size=(18, 3))
    av = -np.abs(rng.normal(size=(4, 3))) * scale
    try:
        out = _quiet(layer, torch.tensor(av, dtype=F64)).numpy()
    except SolverError as err:
        assert type(err) is SolverError, err
        assert set(err.indices) <= {(0,), (1,), (2,), (3,)} and err.indices, err.indices
        return
    np.testing.assert_allclose(out, 0.0, atol=1e-6 * np.abs(av).max())


@pytest.mark.parametrize("scale", [1e6, 1e7])
def test_genuinely_infeasible_exp_programs_at_scale_stay_infeasible(scale):
    # x <= s and log x >= log s + 1: infeasible by a factor e. SCS reports it "solved (inaccurate)",
    # which puts Clarabel's ray in doubt; re-solved with x scaled by the ray's reach (8e11), Clarabel
    # claims infeasibility again with a ray that verifies.
    s = cp.Parameter(pos=True)
    lo = cp.Parameter()
    x = cp.Variable()
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(x), [x <= s, cp.log(x) >= lo]), [s, lo], [x])
    sv = torch.tensor([scale, 10 * scale], dtype=F64)
    with pytest.raises(InfeasibleError) as info:
        _quiet(layer, sv, torch.log(sv) + 1)
    assert info.value.indices == [(0,), (1,)]
    # The exponential cone needs t >= 0: t <= -s is infeasible whatever the objective's scale.
    a = cp.Parameter(3)
    sp_ = cp.Parameter(nonneg=True)
    y = cp.Variable(3)
    cone = cp.Problem(cp.Minimize(cp.sum_squares(y - a)), [cp.constraints.ExpCone(y[0], y[1], y[2]), y[2] <= -sp_])
    with pytest.raises(InfeasibleError):
        _quiet(cddn.ConvexLayer(cone, [a, sp_], [y]), torch.tensor([-0.3, 1.2, 0.5], dtype=F64) * scale,
               torch.tensor(scale, dtype=F64))
    # entr's domain y >= 0 against sum(y) <= -s.
    a4 = cp.Parameter(4)
    y4 = cp.Variable(4)
    entr = cp.Problem(cp.Minimize(cp.sum_squares(y4 - a4) - cp.sum(cp.entr(y4))), [cp.sum(y4) <= -sp_])
    with pytest.raises(InfeasibleError):
        _quiet(cddn.ConvexLayer(entr, [a4, sp_], [y4]), torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64) * scale,
               torch.tensor(scale, dtype=F64))


@pytest.mark.parametrize("scale", [1e6, 1e7])
def test_genuinely_unbounded_exp_programs_at_scale_stay_unbounded(scale):
    a = cp.Parameter(nonneg=True)
    x = cp.Variable()
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(-a * x - cp.log(x))), [a], [x])
    with pytest.raises(UnboundedError):
        _quiet(layer, torch.tensor(scale, dtype=F64))


def test_an_exact_ray_reaches_every_point():
    # x >= 1 and x <= 0 (rows -x + s0 = -1, x + s1 = 0, s >= 0): y = (1, 1) has A^T y = 0, b^T y = -1;
    # at any x the residual along y is >= |b^T y|, and no column limits its reach.
    A = sp.csc_matrix(np.array([[-1.0], [1.0]]))
    b, c = np.array([-1.0, 0.0]), np.array([0.0])
    cones = [("l", 2)]
    ray = np.array([1.0, 1.0])
    for x in (-1e12, 0.0, 0.5, 1e12):
        assert reaches(A, b, c, cones, "infeasible", ray, np.array([x]), np.zeros(2))
    assert reach_scaling(A, b, cones, ray) is None


def test_an_approximate_ray_reaches_only_so_far():
    # x0 >= 1 and x0 - d x1 <= 0.5 (feasible: x1 >= 0.5 / d): y = (1, 1) has A^T y = (0, -d) and
    # b^T y = -0.5, so it excludes only the points with d x1 < 0.5. The point (1, 1e12) is feasible
    # beyond that reach; (1, 0) violates the second row by 0.5 and is reached.
    d = 1e-12
    A = sp.csc_matrix(np.array([[-1.0, 0.0], [1.0, -d]]))
    b, c = np.array([-1.0, 0.5]), np.zeros(2)
    cones = [("l", 2)]
    ray = np.array([1.0, 1.0])
    assert reaches(A, b, c, cones, "infeasible", ray, np.array([1.0, 0.0]), np.zeros(2))
    assert not reaches(A, b, c, cones, "infeasible", ray, np.array([1.0, 1e12]), np.zeros(2))
    np.testing.assert_allclose(reach_scaling(A, b, cones, ray), [1.0, 0.5 / d])


def test_statuses_that_put_a_claim_in_doubt():
    mine = Run("Clarabel", "infeasible", "Infeasible")
    assert _doubt(mine, [Run("SCS", "other", "solved (inaccurate - reached max_iters)")]) is not None
    assert _doubt(mine, [Run("SCS", "other", "unsolved")]) is None  # (not "solved")
    assert _doubt(mine, [Run("SCS", "other", "Failure")]) is None
    assert _doubt(Run("Clarabel", "infeasible", "Infeasible Inaccurate"), []) is not None
    assert _doubt(Run("Clarabel", "infeasible", "Infeasible", also=["Optimal Inaccurate"]), []) is not None


def test_judge_polishes_no_point_that_is_not_finite(monkeypatch):
    """judge's polish projected any re-solved point onto the cones: a NaN dual (SCS's
    answer to an unbounded program) onto a 3×3 PSD cone raised numpy's LinAlgError out of
    the per-element solve, which never raises. Here a real judge call of an infeasible
    SDP (trace X <= -100) is captured and its polish handed NaN points."""
    import convexddn.convex.dissent as dissent

    seen = {}
    real = dissent.believed

    def spy(A, b, c, cones, mine, theirs, resolve, polish, tol):
        seen.update(m=A.shape[0], n=A.shape[1], polish=polish)
        return real(A, b, c, cones, mine, theirs, resolve, polish, tol)

    monkeypatch.setattr(dissent, "believed", spy)
    P, s = cp.Parameter((3, 3), symmetric=True), cp.Parameter(nonneg=True)
    X = cp.Variable((3, 3), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - P)), [X >> 0, cp.trace(X) <= -s])
    layer = cddn.ConvexLayer(prob, [P, s], [X], solver="Clarabel")
    with pytest.raises(InfeasibleError):
        layer(100 * torch.eye(3, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64))
    m, n = seen["m"], seen["n"]
    for x, y in ((np.zeros(n), np.full(m, np.nan)), (np.full(n, np.nan), np.zeros(m))):
        assert seen["polish"](x, y, np.zeros(m))[3] == float("inf")


def _conflicting_rows(y1: float, alpha: float) -> tuple:
    """x0 <= 0 and -x0 <= -1e-3 (infeasible: y = (1, 1) on them is exact, b^T y = -1e-3) beside a
    second-order cone (1 + t, x1, 1 - t) that a solver's ray leans on at its edge, alpha (1, 0, 1 - 1e-9):
    columns x0 and t then miss by 1e-9 and 1e-13, "reaches" of 1e6 and 8e9."""
    A = sp.csc_matrix(np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 0, -1.0], [0, -1.0, 0], [0, 0, 1.0]]))
    b = np.array([0.0, -1e-3, 1.0, 0.0, 1.0])
    cones = [("l", 2), ("q", [3])]
    ray = np.array([1.0, y1, alpha, 0.0, alpha * (1 - 1e-9)])
    return A, b, cones, ray


def test_a_ray_exact_on_the_rows_it_needs_has_no_reach_to_doubt():
    # A column that misses by rounding only limits nothing: 0.1 + 0.2 - 0.3 = 5.6e-17 in float64.
    A3 = sp.csc_matrix(np.array([[0.1], [0.2], [-0.3]]))
    b3, ones = np.array([0.0, 0.0, -1.0]), np.ones(3)
    assert (A3.T @ ones)[0] != 0
    assert reach_scaling(A3, b3, [("l", 3)], ones) is None
    from convexddn.convex.cone_checks import verify_certificate
    from convexddn.convex.reach import exact_ray

    assert exact_ray(A3, b3, [("l", 3)], ones)
    A, b, cones, ray = _conflicting_rows(1 - 1e-9, 1e-4)
    assert verify_certificate(A, b, np.zeros(3), cones, np.zeros(3), ray, "infeasible")
    assert reach_scaling(A, b, cones, ray) is not None  # (the ray as it came reaches only so far)
    assert exact_ray(A, b, cones, ray)  # (its nonnegative rows alone, made exact, certify)
    # The approximate ray of a feasible program (x0 >= 1, x0 - 1e-12 x1 <= 0.5) is not made exact.
    A2 = sp.csc_matrix(np.array([[-1.0, 0.0], [1.0, -1e-12]]))
    assert not exact_ray(A2, np.array([-1.0, 0.5]), [("l", 2)], np.array([1.0, 1.0]))


def _qp_with_conflicting_rows(gap: float, n: int = 30, mi: int = 40, pe: int = 5) -> tuple:
    """min ½‖Lx‖² + qᵀx s.t. Gx <= h, Ax = b with O(1) data (largest 11.6). Returns the layer
    and two elements' parameter values: one made infeasible by its last row, G₀x >= h₀ + gap
    (seed 11), and a feasible one (seed 12, its last row 0 <= 1)."""
    L, q, G, h = (cp.Parameter(shape, name=k) for k, shape in (("L", (n, n)), ("q", n), ("G", (mi, n)), ("h", mi)))
    Ap, bp = cp.Parameter((pe, n)), cp.Parameter(pe)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + q @ x), [G @ x <= h, Ap @ x == bp])

    def values(seed: int) -> list:
        rng = np.random.default_rng(seed)
        Lv, qv, Gv, x0 = rng.standard_normal((n, n)), rng.standard_normal(n), rng.standard_normal((mi, n)), \
            rng.standard_normal(n)
        hv = Gv @ x0 + rng.uniform(0.1, 1, mi)
        Av = rng.standard_normal((pe, n))
        Gv[-1], hv[-1] = -Gv[0], -(hv[0] + gap)
        return [Lv, qv, Gv, hv, Av, Av @ x0]

    bad, good = values(11), values(12)
    good[2][-1], good[3][-1] = 0.0, 1.0  # (0 <= 1: feasible)
    return cddn.ConvexLayer(prob, [L, q, G, h, Ap, bp], [x]), bad, good


def test_an_infeasible_qp_with_o1_data_raises_infeasible_error_naming_it():
    # G₀x <= h₀ and G₀x >= h₀ + 1e-3: infeasible (Farkas: the two rows, exactly). The batched interior
    # point stopped in "numerical trouble"; Clarabel's ray verified, SCS stopped at its iteration limit
    # "solved (inaccurate)", and re-solving at the ray's "reach" (4e11, set by its 2e-3 on the objective's
    # cone) confirmed nothing: SolverError "the solvers disagree" after 7 s.
    layer, bad, good = _qp_with_conflicting_rows(1e-3)
    batch = [torch.tensor(np.stack([g, g, v])) for g, v in zip(good, bad)]
    with pytest.raises(InfeasibleError) as err:
        _quiet(layer, *batch)
    assert type(err.value) is InfeasibleError and err.value.indices == [(2,)], str(err.value)


def test_no_scs_run_for_an_element_whose_exact_certificate_verifies(monkeypatch):
    # G₀x <= h₀ and G₀x >= h₀ + 1e-2: the batched path and Clarabel both verify its infeasibility, and the
    # two rows alone certify it exactly. SCS then ran three times to its iteration limit (warm-started from
    # Clarabel's ray, as the fallback, and re-solving at the ray's reach): 6 s for an InfeasibleError that
    # Clarabel gave in 0.01 s. Counted, not timed.
    from convexddn.convex.per_element import CheckedDiffcp

    layer, bad, good = _qp_with_conflicting_rows(1e-2)
    calls = []
    real = CheckedDiffcp._solve_with

    def counted(self, method, *args, **kwargs):
        calls.append(method)
        return real(self, method, *args, **kwargs)

    monkeypatch.setattr(CheckedDiffcp, "_solve_with", counted)
    with pytest.raises(InfeasibleError, match=r"\[\(1,\)\].*certificate verified") as err:
        layer(*(torch.tensor(np.stack([g, v])) for g, v in zip(good, bad)))
    assert type(err.value) is InfeasibleError and err.value.indices == [(1,)]
    assert calls == ["Clarabel"], calls  # (the per-element path was reached, and ran Clarabel alone)


def test_exact_ray_verifies_its_projection_too():
    """exact_ray vouched for the ray projected onto K* without checking that the projection
    is still a certificate: x <= 0, -x <= 0, x <= 1000 is feasible (x = 0), and the ray
    (1, 1, -0.9e-6), which the tolerant check accepts (a K* violation of 1e-6 times b =
    1000), projects to (1, 1, 0), an exact null vector with b^T y = 0 -- called exact."""
    from convexddn.convex.reach import exact_ray

    A = sp.csc_matrix(np.array([[1.0], [-1.0], [1.0]]))
    b = np.array([0.0, 0.0, 1000.0])
    assert not exact_ray(A, b, [("l", 3)], np.array([1.0, 1.0, -0.9e-6]))
    # A genuine exact certificate still is one: x <= -1, -x <= 0.
    assert exact_ray(sp.csc_matrix(np.array([[1.0], [-1.0]])), np.array([-1.0, 0.0]), [("l", 2)], np.array([1.0, 1.0]))

