"""Tests of convexddn.convex.certify: what the polish after the iterations leaves, against
closed forms."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import cvxpy as cp
import numpy as np
import pytest
import torch

from convexddn.convex.layer import ConvexLayer
from convexddn.errors import GradientWarning

sys.path.insert(0, str(Path(__file__).parent))
from test_batched import sparsemax, sparsemax_problem  # noqa: E402

F64 = torch.float64


def test_a_weakly_active_bound_is_solved_exactly_and_still_warned_about():
    """The box [0, 1] projection of ReLU outputs: where xᵢ = 0 the bound yᵢ ≥ 0 is met with
    a zero multiplier. The semismooth steps find yᵢ = 0, but that point was refused (its
    pair at rounding reads as decided) and the interior point's came back, 2.8e-7 off on
    145 of 320 entries. Now the solution is clamp(x, 0, 1) to rounding, and the backward
    still names exactly the elements with such a bound (no derivative exists there)."""
    n, batch = 10, 32
    y, xp = cp.Variable(n), cp.Parameter(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - xp)), [y >= 0, y <= 1]), [xp], [y])
    x = torch.relu(torch.randn(batch, n, dtype=F64, generator=torch.Generator().manual_seed(0)))
    x[3] = torch.linspace(0.05, 0.95, n, dtype=F64)  # no bound met: no warning for it
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(xg)
        (g,) = torch.autograd.grad(out.sum(), xg)
    assert (out.detach() - x.clamp(0, 1)).abs().max() < 1e-12
    named = {e for w in caught if issubclass(w.category, GradientWarning) for e in w.message.elements}
    kinks = {(i,) for i in range(batch) if bool(((x[i] == 0) | (x[i] == 1)).any())}
    assert kinks and named == kinks  # (3,) has no bound met
    # Off the bounds the derivative is exact: 1 strictly inside, 0 strictly outside.
    inside, outside = (x > 0) & (x < 1), x > 1
    assert (g[inside] - 1).abs().max() < 1e-8 and (g[outside].numel() == 0 or g[outside].abs().max() < 1e-8)


def test_weakly_active_bounds_of_relu_outputs_come_out_exact_to_rounding():
    """The box [0, 1] projection of 0.5·relu(randn) (n = 20): every element has entries
    xᵢ = 0, bounds met with a zero multiplier. The interior point ends there at sᵢ ≈ zᵢ ≈
    1e-8, whose product is already at rounding; the semismooth steps took both to ~1e-19,
    but at an unchanged residual (8.7e-17) the polish kept its first point, and 11 of 32
    elements came back up to 3.7e-9 off (y = 3.8e-9 where x = 0). Now every entry is
    clamp(x, 0, 1) to a few eps, and the backward still warns about every element (each
    has a kink: no derivative exists)."""
    n, batch = 20, 32
    y, xp = cp.Variable(n), cp.Parameter(n)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - xp)), [y >= 0, y <= 1]), [xp], [y])
    x = 0.5 * torch.relu(torch.randn(batch, n, dtype=F64, generator=torch.Generator().manual_seed(0)))
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(xg)
        torch.autograd.grad(out.sum(), xg)
    assert set(layer.last_solve.statuses) == {"solved"}
    assert float((out.detach() - x.clamp(0, 1)).abs().max()) <= 4 * torch.finfo(F64).eps
    named = {e for w in caught if issubclass(w.category, GradientWarning) for e in w.message.elements}
    assert named == {(i,) for i in range(batch)}


@pytest.mark.parametrize("offset", [0.0, 1e3, 3e3, 1e5])
def test_sparsemax_is_accurate_whatever_the_offset(offset):
    """sparsemax(x + c) = sparsemax(x). With c = 3e3 the simplex's multiplier is ~3e3 beside
    a solution of size 1: one structured polish step left 4 of 16 elements 1.2e-7 off, an
    estimate of 7e-8 below tol_error (1e-7), so they were not polished further. Elements
    estimated above 1e-8 are polished now."""
    layer = ConvexLayer(*sparsemax_problem(8))
    x = torch.randn(16, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert (layer(x + offset) - sparsemax(x)).abs().max() < 2e-8


def test_nearly_dependent_rows_are_measured_on_the_rows_directions():
    """Only rows whose unit-length directions are nearly dependent count: a transport
    problem's 0/1 rows (singular values 0.73..2.73) and orthogonal rows of scales 1 and
    1e-8 are not; rows parallel to 1e-7, a zero row, or more rows than variables are."""
    from convexddn.convex.certify import nearly_dependent_rows

    M = 4
    transport = torch.zeros(7, M * M, dtype=F64)
    for i in range(M):
        transport[i, i * M:(i + 1) * M] = 1
    for j in range(M - 1):
        transport[M + j, j::M] = 1
    d = torch.tensor([0.3, -1.0, 0.7, 0.2], dtype=F64)
    parallel = torch.stack([d, d + 1e-7 * torch.tensor([1.0, 0.5, -2.0, 0.1], dtype=F64)])
    scaled = torch.tensor([[1.0, 0, 0, 0], [0, 1e-8, 0, 0]], dtype=F64)
    zero = torch.tensor([[1.0, 2, 0, 0], [0, 0, 0, 0]], dtype=F64)
    for A, expected in ((transport, False), (parallel, True), (scaled, False), (zero, True)):
        assert nearly_dependent_rows(A[None], torch.tensor([True])).tolist() == [expected]
    # only the elements asked about
    assert nearly_dependent_rows(torch.stack([parallel, parallel]), torch.tensor([False, True])).tolist() == [False,
                                                                                                            True]
    assert nearly_dependent_rows(torch.ones(1, 3, 2, dtype=F64), torch.tensor([True])).tolist() == [True]


def test_a_transport_marginal_below_the_solvers_resolution_is_not_refused_as_dependent_rows():
    """ot_lp with a = (1 − 3e, e, e, e), e = 1e-11: the interior point ends with the plan's
    small entries ~1e-11 beside multipliers ~0.4, which decides every variable of rows 2-4
    active; the error estimate's step then cannot solve those rows (the system at that
    point is singular along them, not the rows: singular values 0.73..2.73), and that was
    read as nearly dependent rows: Clarabel's "Solved" was refused with that message. Now
    the element is only not certified by the batched path, and another solver's plan is
    returned: within 1e-10 of the closed form (its entries of 1e-11 are at the solvers'
    resolution; their derivative is warned about, not silently wrong)."""
    from test_polish import tiny_mass_transport

    import convexddn as cddn

    C, a, b, P = tiny_mass_transport(1e-11)
    layer = cddn.layer("ot_lp", m=4, n=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(*(torch.tensor(v) for v in (C, a, b)))
    assert layer.last_solve.solved.all()
    assert (out - torch.tensor(P)).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("box", [(0.0, 1.0), (-1.0, 1.0)])
def test_a_bound_met_beside_an_entry_far_outside_the_box_is_solved_on_the_batched_path(box, dtype):
    """min ‖y − x‖² s.t. lo ≤ y ≤ hi with x₀ exactly on a bound and x₁ at 1e5..1e10: the
    equilibrated solution is ~1/x₁ beside multipliers ~1, and the kink's pair was set to 64
    rounding levels of the multipliers' size, s₀ = 1.9e-7 in the caller's units at 1e6
    beside y₀ = 7e-17: a Newton step (the error estimate) of 1.07e-7 > tol_error, and
    Clarabel and SCS failed (SolverError); at 1e5 the estimate was 1.07e-8. All such
    elements, and x = 0 (every entry at the kink), are solved on the batched path now,
    clamp(x, lo, hi) to rounding; the backward warns about exactly the elements with a
    bound met, and elsewhere gives the closed form (1 strictly inside, 0 outside)."""
    lo, hi = box
    xp, y = cp.Parameter(3), cp.Variable(3)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - xp)), [y >= lo, y <= hi]), [xp], [y])
    rows = [[on, far, 0.3] for on in (lo, hi) for far in (1e5, 1e6, 1e8, 1e10, -1e6)] + [[lo, lo, lo], [0.2, 1e6, 0.3]]
    x = torch.tensor(rows, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(xg)
        (g,) = torch.autograd.grad(out.sum(), xg)
    assert layer.last_solve.solvers == ["batched"] * len(rows)
    assert set(layer.last_solve.statuses) == {"solved"}
    want = x.clamp(lo, hi)
    err = (out.detach() - want).abs()
    eps = torch.finfo(dtype).eps
    # (the box [-1, 1] at 1e5 leaves y₀ 3e-11 from its bound, as it did where it was solved,
    # and the far entry's bound, with a multiplier of 2e10 at 1e10, is met to 2e-11)
    # The last row (no bound met; its far bound's multiplier 2e6 sets its KKT system's rounding
    # at ~4e-10) came out 8e-14 off, alone as on old code; it met 4 eps only inside this batch,
    # whose other elements' refinement it used to take (now each element gets what it gets alone).
    exact = err[:-1, [0, 2]] if lo == 0 else err[:-1][x[:-1, 1].abs() > 1e5][:, [0, 2]]
    assert float(exact.max()) <= 4 * eps and float(err[-1, [0, 2]].max()) <= max(4 * eps, 1e-12)
    assert float(err.max()) <= max(4 * eps, 1e-10)
    named = {e for w in caught if issubclass(w.category, GradientWarning) for e in w.message.elements}
    assert named == {(i,) for i in range(len(rows) - 1)}  # the last has no bound met
    inside, outside = (x > lo) & (x < hi), (x < lo) | (x > hi)
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    assert float((g[inside] - 1).abs().max()) <= tol and float(g[outside].abs().max()) <= tol


def test_error_estimate_of_an_unpolished_second_order_cone_point_is_its_error():
    """The interior point's solution of a sqrt epigraph (the cones' pairs misaligned by
    ~√μ, polish="never"; what a polish that cannot step leaves): the estimate linearised
    s ∘ z = 0 as ds + H dz = −s, which misses the tangent's (s₀/z₀) z_t, and said 1e-8 to
    8.7e-8 where the solution was 8.1e-8 to 4.9e-7 off (relative, against the closed form):
    all four solved, three beyond tol_error = 1e-7. Newton's right-hand side, s_t + (s₀/z₀) z_t
    on the tangent, gives the error itself (to 1e-7 of it), and only the one within tol_error is solved."""
    from test_polish import UNUSED_X, sqrt_reference, unused_entries_program

    program = unused_entries_program("sqrt", scalar=True, polish="never")
    (y,), info = program(torch.tensor(UNUSED_X))
    ref = sqrt_reference(UNUSED_X)
    actual = torch.tensor(np.abs(y.numpy() - ref).max(1) / (1 + np.abs(ref).max(1)))
    assert (actual > 1e-8).all()  # (the interior point's error: something to estimate)
    assert ((info.error >= 0.5 * actual) & (info.error <= 2 * actual)).all()
    assert not (info.solved & (actual > program.tol_error)).any()


def test_the_polishs_test_reads_a_frame_coefficient_at_rounding_beside_a_larger_one_as_zero():
    """A cone's frame pair whose smaller member is at rounding level of the cone (a₂ = s₀ −
    ‖s₁‖ ≈ 4e-16 beside s₀ ≈ 2, exact to no better, against a ball's multiplier of 3e-10)
    is as decided as float64 can tell: the polish's test had called it open (ratio 1.5e-6
    > RESOLVED) and kept the Jordan steps' point, undecided, 0.2 off in the gradient. A
    cone whose members are all small keeps its ratios (the floor is the cone's own)."""
    from convexddn.convex.certify import RESOLVED, undecided
    from convexddn.convex.symmetric_cones import ConeLayout

    one, two = ConeLayout(0, 0, (2,)), ConeLayout(0, 0, (2, 2))
    # cone 1: a = (4, 2⁻⁵¹ ≈ 4.4e-16), b = (0, 3e-10); cone 2: a = (1e-16, 0), b = (1e-17, 0)
    s = torch.tensor([[2.0 + 2.0 ** -51, 2.0, 5e-17, 5e-17]], dtype=F64)
    z = torch.tensor([[1.5e-10, -1.5e-10, 5e-18, 5e-18]], dtype=F64)
    assert float(undecided(one, s[:, :2], z[:, :2])) == pytest.approx(2.0 ** -51 / 3e-10)  # (> RESOLVED)
    assert float(undecided(one, s[:, :2], z[:, :2], rounding=True)) == 0.0
    assert float(undecided(two, s, z, rounding=True)) == pytest.approx(0.1)
    assert 2.0 ** -51 / 3e-10 > RESOLVED


def test_a_second_order_cone_at_its_tip_with_its_multiplier_on_the_boundary_is_a_kink():
    """The semismooth steps end such a cone (s = 0, z = b₂ c₂) with its first frame pair at
    rounding on both sides (a₁ = -6e-17, b₁ = 0), whose ratio calls it decided: the pair is
    set to one rounding level of the element on both sides, undecided (ratio 1), as the
    derivative's checks must see it (a group soft-threshold at ‖v‖ = λ: one-sided
    derivatives 0 and 0.64); the point is settled once that pair counts as decided."""
    from convexddn.convex.certify import DECIDED, RESOLVED, _at_kink, undecided
    from convexddn.convex.symmetric_cones import ConeLayout, soc_frame

    layout = ConeLayout(0, 1, (3,))
    u = torch.tensor([0.6, 0.8], dtype=F64)
    s = torch.tensor([[1.5, -3.5e-17, 0.0, 0.0]], dtype=F64)  # (a₁ = a₂ = -3.5e-17 along u)
    z = torch.cat([torch.tensor([[0.0, 1.0]], dtype=F64), -u[None]], 1)  # b₁ = 0, b₂ = 2
    settled = lambda x, s, z: undecided(layout, s, z) <= RESOLVED  # noqa: E731
    there, (_, s2, z2) = _at_kink(layout, (None, s, z), settled)
    assert bool(there)
    a1, a2, b1, b2, _ = soc_frame(layout, s2[:, 1:], z2[:, 1:])
    assert float(b2) == pytest.approx(2.0) and float(a1) == pytest.approx(float(b1), rel=0.1)
    assert float(undecided(layout, s2, z2)) > DECIDED
    assert float((s2 - s).abs().max()) < 1e-13 and float((z2 - z).abs().max()) < 1e-13


def test_nearly_parallel_active_rows_are_solved_to_float64s_limit():
    """Projections onto three halfspaces whose normals differ by 1e-6 or 1e-4, all or two of
    them active, beside a nearly parallel pair of which one is inactive and independent rows,
    in one batch. The polish regularised each active row by δ = 1e-10, which damps its steps
    along the rows' nearly dependent direction (curvature ~1e-13) by λ/(λ + δ): the point
    stayed 2e-7 off at a residual of 1e-13, estimated 5e-8 (damped too) and reported solved.
    Now the polish ends with steps regularised at rounding on the rows it decided active,
    and every element is solved within 1e-9 (float64's limit here, eps·κ: ~1e-10)."""
    from test_estimate import nearly_parallel, projections

    from convexddn.convex.interior_point import STATUS_NAMES, solve_cone_batch
    from convexddn.convex.symmetric_cones import ConeLayout

    cases = [nearly_parallel(1e-6, 3, 0), nearly_parallel(1e-6, 3, 1), nearly_parallel(1e-4, 3, 2),
             nearly_parallel(1e-6, 2, 3), nearly_parallel(1e-6, 1, 4, parallel=2), nearly_parallel(1.0, 2, 5)]
    P, q, A, b, ref = projections(cases)
    sol = solve_cone_batch(P, q, A, b, ConeLayout(0, 3))
    assert [STATUS_NAMES[int(s)] for s in sol.status] == ["solved"] * len(cases)
    err = (sol.x - ref).abs().amax(1)
    assert float(err.max()) < 1e-9, err
    assert float(err[4:].max()) < 1e-14, err  # (no nearly dependent active rows: at rounding)


def test_two_nearly_parallel_halfspaces_project_exactly_without_a_warning():
    """The layer's view of the same: two halfspaces whose normals differ by 1e-6 e₂, both
    active (multipliers 0.26 and 0.90), were projected 2.4e-7 off, "solved", no warning,
    by the batched path and by Clarabel's (whose point it polishes). Now within 1e-9 of the
    50-digit solution, in float64 and (to its rounding) from float32 inputs."""
    from test_estimate import projection_reference

    hexes = lambda v: np.array([float.fromhex(t) for t in v.split()])  # noqa: E731
    G = hexes("0x1.0p+0 0x1.0p-1 -0x1.3333333333333p-2 0x1.0p+0 0x1.0000218def417p-1 "
              "-0x1.3333333333333p-2").reshape(2, 3)
    h = hexes("0x1.0p-1 0x1.00000a10fafa0p-1")
    x = hexes("0x1.aabacef83ffdep+0 0x1.c216226acff76p-1 0x1.74441aa48c7e2p-3")
    xp, y = cp.Parameter(3), cp.Variable(3)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - xp)), [G @ y <= h])
    for solver in ("auto", "Clarabel"):
        layer = ConvexLayer(problem, [xp], [y], solver=solver)
        for dtype in (F64, torch.float32):
            x_in = torch.tensor(x, dtype=dtype)
            ref = projection_reference(G, h, x_in.double().numpy(), 2)
            tol = 1e-9 if dtype == F64 else 2 * torch.finfo(dtype).eps * np.abs(ref).max()  # (its rounding)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = layer(x_in)
            assert layer.last_solve.statuses == ["solved"]
            assert np.abs(out.double().numpy() - ref).max() < tol, (solver, dtype)


def test_an_estimate_still_damped_after_the_second_polish_certifies_nothing(monkeypatch):
    """finish() re-estimates the elements its second polish moved; an estimate still damped
    there understates Newton's step as the first did, and is no estimate. The re-estimate's
    flag was dropped: with tol_error = 1e-9, projections onto nearly parallel halfspaces
    (normals 1e-7 and 3e-7 apart) came back solved 2e-8 to 3.5e-8 off at estimates of
    1e-10. Here every estimate reports damped: no element may be certified."""
    from test_estimate import nearly_parallel, projections

    import convexddn.convex.estimate as estimate
    import convexddn.convex.refine_point as refine_point
    from convexddn.convex.interior_point import solve_cone_batch
    from convexddn.convex.symmetric_cones import ConeLayout

    real = estimate.limit_step

    def always_damped(*args, **kwargs):
        error, damped, step = real(*args, **kwargs)
        return error, torch.ones_like(damped), step

    # (every estimate's step: error_estimate's, settle_signs' through it, and finish's refined_estimate's)
    monkeypatch.setattr(estimate, "limit_step", always_damped)
    monkeypatch.setattr(refine_point, "limit_step", always_damped)
    P, q, A, b, _ = projections([nearly_parallel(1e-6, 3, seed) for seed in range(4)])
    sol = solve_cone_batch(P, q, A, b, ConeLayout(0, 3))
    assert torch.isinf(sol.error).all(), sol.error


def _soc_projection(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The projection of ``v = (x, t)`` with ‖x‖ > |t| onto {‖x‖ ≤ t} and its Jacobian, closed
    form: ((‖x‖ + t)/2)·(x/‖x‖, 1)."""
    x, t = v[:-1], v[-1]
    nx = np.linalg.norm(x)
    u, a = x / nx, (nx + t) / 2
    J = np.zeros((v.size, v.size))
    J[:-1, :-1] = a / nx * np.eye(x.size) - t / (2 * nx) * np.outer(u, u)
    J[:-1, -1] = J[-1, :-1] = u / 2
    J[-1, -1] = 0.5
    return np.concatenate([a * u, [a]]), J


@pytest.mark.parametrize("scale", [1.0, 1.0000001, 1e-6])
def test_a_soc_projection_just_outside_the_cone_is_smooth_at_every_scale(scale):
    """A point 1e-7 (relative) outside {‖x‖ ≤ t}, away from its tip: CVXPY's form (a bound
    t' ≤ t, a cone at t', sharing one multiplier) left the semismooth steps cycling between
    two wrong active sets on a pair whose members were both rounding (see certify._by_sign):
    at scales 1 + 1e-7 and 1e-6 the projection came back 6.5e-9 off and its gradient 6.5e-2
    off with a GradientWarning "not unique or not differentiable"; at scale 1 rounding's sign
    happened to end the cycle. The derivative exists (closed form) and is found at each."""
    n = 3
    p, y = cp.Parameter(n + 1), cp.Variable(n + 1)
    layer = ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - p)), [cp.norm(y[:n]) <= y[n]]),
                        parameters=[p], variables=[y])
    rng = np.random.default_rng(0)
    x0, w = rng.standard_normal(n), rng.standard_normal(n + 1)
    v = np.concatenate([x0, [np.linalg.norm(x0) * (1 - 1e-7)]]) * scale
    want, J = _soc_projection(v)
    P = torch.tensor(v, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        out = layer(P)
        grad, = torch.autograd.grad((torch.tensor(w) * out).sum(), P)
    assert layer.last_solve.solvers == ["batched"]
    assert np.abs(out.detach().numpy() - want).max() <= 1e-12 * scale
    expected = J.T @ w
    assert np.abs(grad.numpy() - expected).max() <= 1e-6 * np.abs(expected).max()



def test_a_pair_at_its_kink_is_one_whichever_side_its_rounding_points_to():
    """Nonnegative pairs (0, 0) and (6e-17, 0) of rows of size ~1: a bound met with a zero
    multiplier, as the active-set steps release a row at a degenerate vertex. The ratio reads
    0/0 as decided and (6e-17, 0) as inactive; :func:`at_kink` takes both as kinks, in each
    row's own scale: (1e-6, 0) is decided, and so is (0, 5e-3) beside another row's slack of 1e12
    (64 rounding levels of that element's size are 0.1)."""
    from types import SimpleNamespace

    from convexddn.convex.certify import at_kink, decided, undecided
    from convexddn.convex.symmetric_cones import ConeLayout

    layout = ConeLayout(1, 3, ())
    A = torch.tensor([[[1.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]]] * 2, dtype=F64)
    d = SimpleNamespace(P=torch.zeros(2, 2, 2, dtype=F64), q=torch.ones(2, 2, dtype=F64), A=A,
                        b=torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1e12]], dtype=F64))
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    s = torch.tensor([[0.0, 0.0, 6e-17, 1e-6], [0.0, 1.0, 0.0, 1e12]], dtype=F64)
    z = torch.tensor([[0.7, 0.0, 0.0, 0.0], [0.7, 0.0, 5e-3, 0.0]], dtype=F64)
    assert at_kink(d, layout, x, s, z).tolist() == [[True, True, False], [False, False, False]]
    assert decided(s[:1, 2:3], z[:1, 2:3])[1].item()  # (the ratio's reading)
    assert undecided(layout, s, z).tolist() == [0.0, 0.0]
