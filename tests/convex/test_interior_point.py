"""The batched interior-point solver: cone algebra, KKT solves, statuses, accuracy.

Expected values come from Clarabel (through its own Python API, tight tolerances),
from dense linear algebra or from closed forms, never from the solver under test.
"""
from __future__ import annotations

import math
import warnings

import clarabel
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from convexddn.convex.equilibration import equilibrate
from convexddn.convex.interior_point import STATUS_NAMES, solve_cone_batch
from convexddn.convex.kkt import DENSE, DataOps, KKTStructure, KKTSystem, constant_part
from convexddn.convex.symmetric_cones import ConeLayout, NTScaling

F64 = torch.float64
SOLVED, PRIMAL_INF, DUAL_INF = 0, 1, 2


def interior(layout: ConeLayout, batch: int, gen: torch.Generator) -> torch.Tensor:
    return layout.shift_inside(torch.randn(batch, layout.cone_rows, dtype=F64, generator=gen))


def random_program(layout: ConeLayout, n: int, batch: int, seed: int, lp: bool = False):
    """Feasible and bounded programs: b = A x0 + s0 and q = -Aᵀ z0 - P x1 with s0, z0 in K."""
    gen = torch.Generator().manual_seed(seed)
    m = layout.m
    A = torch.randn(batch, m, n, dtype=F64, generator=gen)
    s0 = torch.zeros(batch, m, dtype=F64)
    s0[:, layout.zero:] = interior(layout, batch, gen)
    b = (A @ torch.randn(batch, n, 1, dtype=F64, generator=gen)).squeeze(-1) + s0
    if lp:
        P = torch.zeros(batch, n, n, dtype=F64)
        z0 = torch.zeros(batch, m, dtype=F64)
        z0[:, :layout.zero] = torch.randn(batch, layout.zero, dtype=F64, generator=gen)
        z0[:, layout.zero:] = interior(layout, batch, gen)
        q = -(A.mT @ z0.unsqueeze(-1)).squeeze(-1)
    else:
        L = torch.randn(batch, n, n, dtype=F64, generator=gen)
        P = L @ L.mT / n + 0.1 * torch.eye(n, dtype=F64)
        q = torch.randn(batch, n, dtype=F64, generator=gen)
    return P, q, A, b


def clarabel_solve(P, q, A, b, layout: ConeLayout):
    cones = []
    if layout.zero:
        cones.append(clarabel.ZeroConeT(layout.zero))
    if layout.nonneg:
        cones.append(clarabel.NonnegativeConeT(layout.nonneg))
    cones += [clarabel.SecondOrderConeT(k) for k in layout.soc]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = 1e-11
    solver = clarabel.DefaultSolver(sp.csc_matrix(np.triu(P.numpy())), q.numpy(), sp.csc_matrix(A.numpy()),
                                    b.numpy(), cones, settings)
    sol = solver.solve()
    return np.array(sol.x), str(sol.status)


LAYOUTS = {
    "lp": (ConeLayout(3, 20), 8, True),
    "qp": (ConeLayout(3, 20), 8, False),
    "socp": (ConeLayout(2, 6, (4, 3, 5)), 8, False),
    "socp_lp": (ConeLayout(1, 4, (3, 4)), 6, True),
}


def test_cone_algebra_nt_scaling():
    layout = ConeLayout(2, 3, (4, 1, 3))
    gen = torch.Generator().manual_seed(0)
    s, z = interior(layout, 5, gen), interior(layout, 5, gen)
    W = NTScaling(layout, s, z)
    assert torch.allclose(W.apply(z), W.apply_inv(s), atol=1e-12)  # λ = W z = W⁻¹ s
    eye = torch.eye(layout.cone_rows, dtype=F64).expand(5, -1, -1).clone()
    Wd = W.apply(eye)
    assert torch.allclose(Wd, Wd.mT, atol=1e-12)
    assert torch.linalg.eigvalsh(Wd).min() > 0
    assert torch.allclose(W.apply(W.apply_inv(eye)), eye, atol=1e-12)
    r = torch.randn(5, layout.cone_rows, dtype=F64, generator=gen)
    assert torch.allclose(layout.jordan(W.lam, layout.jordan_solve(W.lam, r)), r, atol=1e-12)
    assert torch.allclose(layout.jordan(layout.unit(r), r), r)


def test_cone_max_step_lands_on_boundary():
    layout = ConeLayout(0, 3, (4, 3))
    gen = torch.Generator().manual_seed(1)
    u = interior(layout, 6, gen)
    d = 3 * torch.randn(6, layout.cone_rows, dtype=F64, generator=gen)
    alpha = layout.max_step(u, d).clamp(max=1e6)
    assert (layout.min_eig(u + 0.999 * alpha[:, None] * d) > 0).all()
    assert (layout.min_eig(u + 1.001 * alpha[:, None] * d) < 0).all()


@pytest.mark.parametrize("layout", [ConeLayout(3, 6), ConeLayout(2, 3, (4, 3))], ids=["qp", "socp"])
def test_kkt_solve_matches_dense_solve(layout):
    """The reduced Cholesky solve equals a dense solve of K = [[P, Aᵀ], [A, -H]]."""
    n, B = 5, 3
    P, _, A, _ = random_program(layout, n, B, seed=2)
    gen = torch.Generator().manual_seed(3)
    s, z = interior(layout, B, gen), interior(layout, B, gen)
    W = NTScaling(layout, s, z)
    kkt = KKTSystem(DataOps(P, A, layout, DENSE), W, constant_part(P, A, layout))
    m, mc = layout.m, layout.cone_rows
    H = torch.zeros(B, m, m, dtype=F64)
    Wd = W.apply(torch.eye(mc, dtype=F64).expand(B, -1, -1).clone())
    H[:, layout.zero:, layout.zero:] = Wd @ Wd
    K = torch.cat([torch.cat([P, A.mT], 2), torch.cat([A, -H], 2)], 1)
    rhs = torch.randn(B, n + m, 2, dtype=F64, generator=gen)
    x, zz, _ = kkt.solve(rhs[:, :n], rhs[:, n:], refine=2)
    expected = torch.linalg.solve(K, rhs)
    assert not kkt.failed.any()
    assert torch.allclose(torch.cat([x, zz], 1), expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_solve_cone_batch_matches_clarabel(name):
    layout, n, lp = LAYOUTS[name]
    P, q, A, b = random_program(layout, n, 6, seed=4, lp=lp)
    sol = solve_cone_batch(P, q, A, b, layout)
    assert (sol.status == SOLVED).all(), [STATUS_NAMES[int(s)] for s in sol.status]
    assert (sol.residual <= 1e-8).all()
    for i in range(6):
        x_ref, status = clarabel_solve(P[i], q[i], A[i], b[i], layout)
        # Clarabel itself cannot reach 1e-11 on second-order cones ("AlmostSolved"), and
        # its solutions err by ~√μ there: 1e-5 is its accuracy, not ours (see below).
        assert status in ("Solved", "AlmostSolved")
        assert np.allclose(sol.x[i].numpy(), x_ref, atol=1e-5 * (1 + np.abs(x_ref).max()))
    # Ours, checked on the KKT conditions directly: feasibility, stationarity, gap.
    Ax = (A @ sol.x.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(Ax + sol.s, b, atol=1e-8 * (1 + b.abs().max()))
    stat = (P @ sol.x.unsqueeze(-1) + A.mT @ sol.z.unsqueeze(-1)).squeeze(-1) + q
    assert stat.abs().max() < 1e-8 * (1 + q.abs().max())
    assert (sol.s * sol.z)[:, layout.zero:].sum(1).abs().max() < 1e-7
    assert (layout.min_eig(sol.s[:, layout.zero:]) > -1e-9).all()
    assert (layout.min_eig(sol.z[:, layout.zero:]) > -1e-9).all()


def test_solve_cone_batch_polish_reaches_rounding_on_second_order_cones():
    """A ball projection with an inactive half-space: interior points err by ~√μ there."""
    n, B = 5, 16
    gen = torch.Generator().manual_seed(5)
    a = 2 * torch.randn(B, n, dtype=F64, generator=gen)
    r = torch.rand(B, dtype=F64, generator=gen) + 0.5
    layout = ConeLayout(0, 1, (n + 1,))  # x_0 >= -5 ; (r, x) in Q
    A = torch.zeros(B, n + 2, n, dtype=F64)
    A[:, 0, 0] = -1.0
    A[:, 2:, :] = -torch.eye(n, dtype=F64)
    b = torch.zeros(B, n + 2, dtype=F64)
    b[:, 0], b[:, 1] = 5.0, r
    P = torch.eye(n, dtype=F64).expand(B, n, n)
    exact = r[:, None] * a / a.norm(dim=1, keepdim=True).clamp(min=r[:, None])
    plain = solve_cone_batch(P, -a, A, b, layout, polish="never")
    polished = solve_cone_batch(P, -a, A, b, layout)
    assert (polished.status == SOLVED).all()
    assert (polished.x - exact).abs().max() < 1e-12
    assert (polished.x - exact).abs().max() <= (plain.x - exact).abs().max()


def test_polish_stops_at_rounding_level_unless_not_settled():
    """Newton polishing stops once every best point is at rounding level (fewer residual
    evaluations than steps allow), and keeps stepping while ``settled`` says no."""
    from convexddn.convex.interior_point import kkt_measures
    from convexddn.convex.polish import polish

    n, B = 4, 6
    gen = torch.Generator().manual_seed(15)
    a = 2 * torch.randn(B, n, dtype=F64, generator=gen)
    layout = ConeLayout(0, 0, (n + 1,))  # ‖x‖ <= 1
    A = torch.zeros(B, n + 1, n, dtype=F64)
    A[:, 1:, :] = -torch.eye(n, dtype=F64)
    b = torch.zeros(B, n + 1, dtype=F64)
    b[:, 0] = 1.0
    P = torch.eye(n, dtype=F64).expand(B, n, n)
    start = solve_cone_batch(P, -a, A, b, layout, polish="never")
    calls = []

    def residual(x, s, z):
        calls.append(1)
        return torch.stack(kkt_measures(P, -a, A, b, x, s, z)).amax(0)

    x, *_, res, _ = polish(P, -a, A, b, layout, start.x, start.s, start.z, residual, steps=8)
    assert len(calls) < 1 + 8 and (res <= 16 * torch.finfo(F64).eps).all()
    assert torch.allclose(x, a / a.norm(dim=1, keepdim=True).clamp(min=1.0), atol=1e-13)
    calls.clear()
    polish(P, -a, A, b, layout, start.x, start.s, start.z, residual, steps=8,
           settled=lambda x, s, z: torch.zeros(B, dtype=torch.bool))
    assert len(calls) == 1 + 8


def test_polish_steps_through_redundant_equality_rows():
    # Simplex projection with its equality row stated twice: the Newton matrix is then
    # exactly singular (the doubly-stochastic matrices' row and column sums are the case
    # met in practice), and before its dual block was regularised LU failed every step,
    # so polishing never moved the point.
    from convexddn.convex.interior_point import kkt_measures
    from convexddn.convex.polish import polish

    B, n = 16, 6
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(B, n, dtype=F64, generator=gen)
    layout = ConeLayout(2, n)
    A = torch.cat([torch.ones(2, n, dtype=F64), -torch.eye(n, dtype=F64)]).expand(B, -1, -1)
    b = torch.cat([torch.ones(B, 2, dtype=F64), torch.zeros(B, n, dtype=F64)], 1)
    P = torch.eye(n, dtype=F64).expand(B, n, n)
    start = solve_cone_batch(P, -a, A, b, layout, polish="never")

    def residual(x, s, z):
        return torch.stack(kkt_measures(P, -a, A, b, x, s, z)).amax(0)

    x, *_, res, polished = polish(P, -a, A, b, layout, start.x, start.s, start.z, residual, steps=4)
    assert polished.all() and (res <= 16 * torch.finfo(F64).eps).all()
    # Closed form (sorting): x = max(a - tau, 0) with tau from the sorted entries.
    srt = a.sort(1, descending=True).values
    k = torch.arange(1, n + 1, dtype=F64)
    tau_k = (srt.cumsum(1) - 1) / k
    rho = (srt > tau_k).sum(1, keepdim=True)
    tau = tau_k.gather(1, rho - 1)
    assert torch.allclose(x, (a - tau).clamp(min=0), atol=1e-14, rtol=0)


def test_solve_cone_batch_infeasible_and_unbounded_in_one_batch():
    # min cᵀx s.t. x >= lo, sum(x) <= h  (row order: x >= lo, then the sum)
    n = 3
    A = torch.cat([-torch.eye(n, dtype=F64), torch.ones(1, n, dtype=F64)]).expand(4, -1, -1).clone()
    lo = torch.tensor([[0.0] * n, [1.0] * n, [0.0] * n, [0.0] * n], dtype=F64)
    h = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)
    b = torch.cat([-lo, h[:, None]], 1)
    c = torch.tensor([[1.0, 2, 3], [1, 1, 1], [-1, 1, 1], [1, 1, 1]], dtype=F64)
    A[3, n] = 0.0  # element 3: no sum row, so min over x >= 0 of ... with c >= 0: bounded
    c[3] = torch.tensor([-1.0, 1, 1])  # ... and a negative cost: unbounded
    P = torch.zeros(4, n, n, dtype=F64)
    sol = solve_cone_batch(P, c, A, b, ConeLayout(0, n + 1))
    assert sol.status.tolist() == [SOLVED, PRIMAL_INF, SOLVED, DUAL_INF]
    assert torch.allclose(sol.x[0], torch.zeros(n, dtype=F64), atol=1e-8)
    assert torch.allclose(sol.x[2], torch.tensor([1.0, 0, 0], dtype=F64), atol=1e-8)
    assert torch.isfinite(sol.x).all()


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_solve_cone_batch_not_fooled_by_scale(scale):
    """Projection onto {x >= 0, sum x = t}: input and t scaled together scale the solution."""
    n, B = 6, 4
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(B, n, dtype=F64, generator=gen)
    t = torch.rand(B, dtype=F64, generator=gen) + 0.5
    layout = ConeLayout(1, n)
    A = torch.cat([torch.ones(1, n, dtype=F64), -torch.eye(n, dtype=F64)]).expand(B, -1, -1)
    P = torch.eye(n, dtype=F64).expand(B, n, n)

    def solve(k):
        b = torch.cat([k * t[:, None], torch.zeros(B, n, dtype=F64)], 1)
        return solve_cone_batch(P, -k * x, A, b, layout)

    ref, scaled = solve(1.0), solve(scale)
    assert (scaled.status == SOLVED).all()
    assert torch.allclose(scaled.x / scale, ref.x, atol=1e-9, rtol=1e-9)
    assert torch.allclose(scaled.x.sum(1) / scale, t, atol=1e-9)


def test_solve_cone_batch_converged_elements_stop():
    """Elements that converge early stop there: same point, same count as alone."""
    layout, n, _ = LAYOUTS["qp"]
    data = random_program(layout, n, 8, seed=7)
    batch = solve_cone_batch(*data, layout)
    first = int(batch.iterations.argmin())
    assert batch.iterations[first] < batch.iterations.max()
    alone = solve_cone_batch(*(v[first:first + 1] for v in data), layout)
    assert alone.iterations[0] == batch.iterations[first]
    # Refinement starts once any element is close, so a batch differs from a lone
    # solve at rounding level only.
    assert torch.allclose(batch.x[first], alone.x[0], atol=1e-9)


def test_stalled_element_stops_and_is_certified(monkeypatch):
    """An element whose best merit stops improving stops after _STALL_ITERATIONS and is
    left to the final checks. Element 996 of the registry QP's seed-0 batch, started at
    level 0.1 (the default; at 1.0 it converges in 8), cycles between long and short
    steps with its merit stuck near 1e-2 (it ran all 100 iterations before the rule);
    now it stops 30 iterations after its last progress, and polishing solves it
    (checked against Clarabel)."""
    import convexddn as cddn
    import convexddn.convex.cone_solve as batched_vjp
    import convexddn.convex.interior_point as ip

    gen = torch.Generator().manual_seed(0)
    layer = cddn.layer("qp", backend="cvxpy", n=10, n_ineq=5, n_eq=2)
    params = [torch.randn(1024, *p.shape, dtype=F64, generator=gen)[996:997] for p in layer.parameters_]
    seen = {}

    def spy(*args, **kwargs):
        seen["sol"] = sol = solve_cone_batch(*args, **kwargs)
        return sol

    monkeypatch.setattr(ip, "_START_LEVEL", 0.1)
    monkeypatch.setattr(batched_vjp, "solve_cone_batch", spy)
    y = layer(*params)
    sol = seen["sol"]
    assert 30 <= int(sol.iterations[0]) <= 45
    assert layer.last_solve.solvers == ["batched"] and layer.last_solve.statuses == ["solved"]
    want = cddn.layer("qp", backend="cvxpy", n=10, n_ineq=5, n_eq=2, solver="Clarabel")(*params)
    torch.testing.assert_close(y, want, atol=1e-8, rtol=0)


def test_slow_elements_are_not_stopped_as_stalled():
    """Two registry QP elements (seed 3, all data times 1e6) converge slowly from the
    0.1 start: 21-22 iterations with long stretches where the best merit does not
    halve. A 15-iteration stall window stopped both (then the per-element path failed on
    them: SolverError); the 30-iteration window lets them finish. Reference: with all
    data scaled by c the minimiser is that of the unscaled problem with q / c, solved
    per element by Clarabel."""
    import convexddn as cddn

    layer = cddn.layer("qp", backend="cvxpy", n=10, n_ineq=5, n_eq=2)
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(256, *p.shape, dtype=F64, generator=gen)[[88, 127]] for p in layer.parameters_]
    c = 1e6
    y = layer(*(p * c for p in base))
    assert layer.last_solve.solvers == ["batched"] * 2 and layer.last_solve.statuses == ["solved"] * 2
    names = [p.name() for p in layer.parameters_]
    ref = cddn.layer("qp", backend="cvxpy", n=10, n_ineq=5, n_eq=2, solver="Clarabel")(
        *(p / c if name == "q" else p for p, name in zip(base, names)))
    torch.testing.assert_close(y, ref, atol=1e-8, rtol=0)


def test_diagonal_structure_matches_dense():
    """A separable projection (box) solved with the diagonal factorisation and densely."""
    n, B = 5, 8
    gen = torch.Generator().manual_seed(8)
    layout = ConeLayout(0, 2 * n)
    A = torch.cat([torch.eye(n, dtype=F64), -torch.eye(n, dtype=F64)]).expand(B, -1, -1)
    b = torch.ones(B, 2 * n, dtype=F64)
    P = (torch.rand(B, n, dtype=F64, generator=gen) + 0.5).diag_embed()
    q = 3 * torch.randn(B, n, dtype=F64, generator=gen)
    diag = KKTStructure(rho=False, diagonal=True, cols=tuple(range(n)) * 2)
    fast = solve_cone_batch(P, q, A, b, layout, structure=diag)
    dense = solve_cone_batch(P, q, A, b, layout)
    exact = (-q / P.diagonal(dim1=1, dim2=2)).clamp(-1, 1)
    assert (fast.status == SOLVED).all()
    assert torch.allclose(fast.x, exact, atol=1e-9)
    assert torch.allclose(fast.x, dense.x, atol=1e-9)


def test_diagonal_structure_identity_columns_matches_dense():
    """Cone row i on variable i (the gathers are skipped) with one equality row (the
    products with it are broadcast): a projection onto the simplex, against sorting."""
    n, B = 6, 16
    gen = torch.Generator().manual_seed(18)
    layout = ConeLayout(1, n)
    A = torch.cat([torch.ones(1, n, dtype=F64), -torch.eye(n, dtype=F64)]).expand(B, -1, -1)
    b = torch.cat([torch.ones(B, 1, dtype=F64), torch.zeros(B, n, dtype=F64)], 1)
    P = torch.eye(n, dtype=F64).expand(B, -1, -1)
    y = torch.randn(B, n, dtype=F64, generator=gen)
    diag = KKTStructure(rho=False, diagonal=True, cols=tuple(range(n)))
    fast = solve_cone_batch(P, -y, A, b, layout, structure=diag)
    dense = solve_cone_batch(P, -y, A, b, layout)
    # Euclidean projection onto the simplex (Held et al.): clamp(y - θ, 0).
    u = y.sort(-1, descending=True).values
    k = torch.arange(1, n + 1, dtype=F64)
    cs = (u.cumsum(-1) - 1) / k
    rho = (u > cs).sum(-1, keepdim=True)
    exact = (y - cs.gather(-1, rho - 1)).clamp_min(0)
    assert (fast.status == SOLVED).all()
    assert torch.allclose(fast.x, exact, atol=1e-9)
    assert torch.allclose(fast.x, dense.x, atol=1e-9)
    assert torch.allclose(fast.z, dense.z, atol=1e-8)


def test_refinement_skipped_only_where_pivots_certify_the_regularisation(monkeypatch):
    """Diagonal S with large pivots (a strictly convex separable program): the iterations
    solve without refinement, the start and the end (polish, error estimate) with it; an LP
    over the same set (a pivot -> 0) keeps refining, and both are exact."""
    import convexddn.convex.kkt as kkt_module

    refined = []
    solve = kkt_module.KKTSystem.solve

    def counting(self, rx, rz, refine=1, scaled=False, product=False, mask=None):
        refined.append(refine > 0 and (mask is None or bool(mask.any())))
        return solve(self, rx, rz, refine, scaled, product=product, mask=mask)

    monkeypatch.setattr(kkt_module.KKTSystem, "solve", counting)
    n, B = 6, 8
    gen = torch.Generator().manual_seed(19)
    layout = ConeLayout(1, n)
    A = torch.cat([torch.ones(1, n, dtype=F64), -torch.eye(n, dtype=F64)]).expand(B, -1, -1)
    b = torch.cat([torch.ones(B, 1, dtype=F64), torch.zeros(B, n, dtype=F64)], 1)
    y = torch.randn(B, n, dtype=F64, generator=gen)
    diag = KKTStructure(rho=False, diagonal=True, cols=tuple(range(n)))
    sol = solve_cone_batch(torch.eye(n, dtype=F64).expand(B, -1, -1), -y, A, b, layout, structure=diag)
    # Refined: the initial point's two solves, the polish step and the error estimate.
    assert (sol.status == SOLVED).all() and sum(refined) == 4 < len(refined)
    refined.clear()
    # The LP min yᵀx over the same simplex: x = e_argmin(y); the basic variable's pivot
    # z/s -> 0, so the regularisation is not negligible there and refinement stays on.
    sol = solve_cone_batch(torch.zeros(B, n, n, dtype=F64), y, A, b, layout, structure=diag)
    assert (sol.status == SOLVED).all() and sum(refined) > 4
    assert torch.allclose(sol.x, torch.nn.functional.one_hot(y.argmin(1), n).to(F64), atol=1e-9)


def test_equilibration_is_an_equivalent_program():
    layout, n, _ = LAYOUTS["socp"]
    P, q, A, b = random_program(layout, n, 3, seed=9)
    d = equilibrate(P, q, A, b, layout)
    # E constant on each second-order cone keeps the cone invariant.
    soc = d.E[:, layout.zero + layout.nonneg:]
    assert torch.allclose(layout._spread(layout._seg(soc) / layout._seg(torch.ones_like(soc))), soc)
    sol = solve_cone_batch(P, q, A, b, layout)
    x, s, z = sol.x, sol.s, sol.z
    # The unscaled point satisfies the original KKT conditions.
    assert torch.allclose((A @ x.unsqueeze(-1)).squeeze(-1) + s, b, atol=1e-8)
    stat = (P @ x.unsqueeze(-1) + A.mT @ z.unsqueeze(-1)).squeeze(-1) + q
    assert stat.abs().max() < 1e-8


def test_solve_cone_batch_never_raises_on_broken_elements():
    layout, n, _ = LAYOUTS["qp"]
    P, q, A, b = random_program(layout, n, 3, seed=10)
    q = q.clone()
    q[1] = float("nan")
    sol = solve_cone_batch(P, q, A, b, layout)
    assert sol.status[1] != SOLVED
    assert (sol.status[[0, 2]] == SOLVED).all()
    assert torch.isfinite(sol.x).all()


# --------------------------------------------------------------------------- certificates in the caller's units


def test_verified_rays_accepts_true_certificates_at_any_scale_and_rejects_false_ones():
    from convexddn.convex.rays import verified_rays

    layout = ConeLayout(0, 2)
    # x <= -1 and -x <= -1 (x >= 1): y = (1, 1) has Aᵀy = 0, bᵀy = -2 < 0.
    A = torch.tensor([[[1.0], [-1.0]]], dtype=torch.float64)
    b = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    P, q = torch.zeros(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    x = torch.zeros(1, 1, dtype=torch.float64)
    for scale in (1e-6, 1.0, 1e6):
        for ray in ([1.0, 1.0], [3e-9, 3e-9]):  # the ray's own size does not matter
            infeasible, unbounded = verified_rays(P, q, scale * A, scale * b, layout, x,
                                                  torch.tensor([ray], dtype=torch.float64))
            assert infeasible.tolist() == [True] and unbounded.tolist() == [False]
    for ray in ([1.0, 0.5], [-1.0, -1.0], [0.0, 0.0]):  # Aᵀy ≠ 0, y ∉ K* (bᵀy > 0), no ray
        infeasible, _ = verified_rays(P, q, A, b, layout, x, torch.tensor([ray], dtype=torch.float64))
        assert infeasible.tolist() == [False], ray
    # min -x s.t. x >= 0 (-x + s = 0): d = 1 has -Ad = 1 ∈ K, Pd = 0, qᵀd < 0.
    A1, b1, q1 = -torch.ones(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), -torch.ones(1, 1, dtype=torch.float64)
    z1, d = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    one = ConeLayout(0, 1)
    for scale in (1e-6, 1.0, 1e6):
        assert verified_rays(P, scale * q1, scale * A1, b1, one, d, z1)[1].tolist() == [True]
    assert verified_rays(torch.ones(1, 1, 1, dtype=torch.float64), q1, A1, b1, one, d, z1)[1].tolist() == [False]  # Pd ≠ 0
    assert verified_rays(P, q1, A1, b1, one, -d, z1)[1].tolist() == [False]  # -Ad ∉ K


def test_verified_rays_measure_a_dual_ray_column_by_column():
    """min x₀ + x₁ s.t. p x₀ >= 1, x₁ <= 1, x >= 0 is feasible for every p > 0 (x* = (1/p, 0)),
    yet y = e₀ has Aᵀy = (−p, 0): within 1e-6 of the largest |A| entry (1) up to p = 1e-7,
    so the feasible LP was certified infeasible. Each column is now measured against its
    own terms |A|ᵀ|y|; a true certificate (p x₀ >= 1 beside x₀ <= −1) still passes, also with
    noise on the rows it does not use."""
    from convexddn.convex.rays import verified_rays

    def infeasible(A, b, y):
        A, b = torch.tensor([A], dtype=F64), torch.tensor([b], dtype=F64)
        P, q = torch.zeros(1, 2, 2, dtype=F64), torch.ones(1, 2, dtype=F64)
        return verified_rays(P, q, A, b, ConeLayout(0, 4), torch.zeros(1, 2, dtype=F64),
                             torch.tensor([y], dtype=F64))[0].tolist()

    for p in (1e-14, 1e-10, 1e-7):
        assert infeasible([[-p, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], [-1.0, 1.0, 0.0, 0.0],
                          [1.0, 0.0, 0.0, 0.0]) == [False]
        # -p x₀ <= -1 and x₀ <= -1: y = (1, p) has Aᵀy = 0, bᵀy < 0 (with noise on x₁ <= 1 of
        # 1e-9 of the certificate's rows |y_i| ‖A_i‖∞)
        assert infeasible([[-p, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]], [-1.0, 1.0, -1.0, 0.0],
                          [1.0, 1e-9 * p, p, 0.0]) == [True]


def test_verified_rays_drop_noise_on_second_order_cone_tails():
    """t >= ‖u‖ (u ∈ R³) and t <= −1: y = (1, 1, 0, 0, 0) with Aᵀy = 0, bᵀy = −1; the solvers
    return the tails at 1e-12, which alone make u's columns fail a column test."""
    from convexddn.convex.rays import verified_rays

    # rows: t <= -1 (nonnegative), then the cone (t, u) with s = (t, u): -A = I on it
    A = torch.zeros(1, 5, 4, dtype=F64)
    A[0, 0, 0] = 1.0
    A[0, 1:, :] = -torch.eye(4, dtype=F64)
    b = torch.tensor([[-1.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64)
    P, q = torch.zeros(1, 4, 4, dtype=F64), torch.ones(1, 4, dtype=F64)
    for noise in (0.0, 1e-15, 1e-12):
        y = torch.tensor([[1.0, 1.0, noise, noise, noise]], dtype=F64)
        infeasible, _ = verified_rays(P, q, A, b, ConeLayout(0, 1, (4,)), torch.zeros(1, 4, dtype=F64), y)
        assert infeasible.tolist() == [True], noise


def test_verified_rays_measure_a_primal_ray_row_by_row():
    """min −x₀ − x₁ s.t. p x₀ <= 1, x₁ <= 1, x >= 0: the ray (1, 0) leaves the row p x₀ <= 1
    by p per unit step, so it is no ray for any p > 0 (the LP is bounded). At p = 1e-14 it
    passed against the largest |A| entry (1); each row is now measured against its own
    (also the zero cone's rows: the same row as an equality p x₀ + s = 1, s = 0)."""
    from convexddn.convex.rays import verified_rays

    def rays(p, layout):
        A = torch.tensor([[[p, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]], dtype=F64)
        b = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=F64)
        P, q = torch.zeros(1, 2, 2, dtype=F64), torch.tensor([[-1.0, -1.0]], dtype=F64)
        d = torch.tensor([[1.0, 0.0]], dtype=F64)
        return verified_rays(P, q, A, b, layout, d, torch.zeros(1, 4, dtype=F64))[1].tolist()

    for layout in (ConeLayout(0, 4), ConeLayout(1, 3)):
        assert rays(1e-14, layout) == [False]
        assert rays(0.0, layout) == [True]  # p = 0: unbounded, and (1, 0) its ray


def test_iterations_read_the_host_once_per_step(host_reads):
    # The GPU path's promise: one host read per interior-point iteration (how many still
    # run, which need refinement), besides a fixed number before and after the loop. With
    # max_iter = k every element still runs after k steps (no compaction), so each further
    # allowed step adds exactly one read.
    g = torch.Generator().manual_seed(0)
    B, n, m = 32, 20, 30
    P = torch.randn(B, n, n, generator=g, dtype=F64)
    P = P @ P.mT / n
    q = torch.randn(B, n, generator=g, dtype=F64)
    A = torch.randn(B, m, n, generator=g, dtype=F64)
    b = (A @ torch.randn(B, n, 1, generator=g, dtype=F64)).squeeze(-1) + torch.rand(B, m, generator=g, dtype=F64)
    layout = ConeLayout(5, m - 5)  # the first five rows as equalities (null-space form)
    counts = []
    for k in range(1, 6):
        with host_reads.counting():
            sol = solve_cone_batch(P, q, A, b, layout, max_iter=k, polish="never")
        assert int(sol.iterations.min()) == k  # all still running: no compaction yet
        counts.append(host_reads.count)
    assert [c - counts[0] for c in counts] == [0, 1, 2, 3, 4]


def test_cone_violation_against_a_scale_per_row():
    """``violation(scale=ρ)``: each nonnegative row's violation over 1 + its ρ, each
    second-order cone's over 1 + the largest ρ of its rows (the caller-unit check's slack
    test, ρ its rows' term magnitudes), so that a slack of 1e6 in another row does not
    shrink them."""
    layout = ConeLayout(0, 3, (3,))
    v = torch.tensor([[1e6, -1e-3, 0.5, 1.0, 2.0, 0.0]], dtype=torch.float64)
    rho = torch.tensor([[1e6, 0.5, 0.5, 1.0, 3.0, 0.0]], dtype=torch.float64)
    # nonneg: 1e-3 / (1 + 0.5); cone (1, (2, 0)): distance (2 - 1)/√2 over 1 + 3
    want = max(1e-3 / 1.5, (1 / math.sqrt(2)) / 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = layout.violation(v, scale=rho)
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64))
    inside = torch.tensor([[1e6, 0.0, 0.5, 3.0, 2.0, 0.0]], dtype=torch.float64)
    assert float(layout.violation(inside, scale=rho)) == 0.0
    torch.testing.assert_close(layout.violation(v), torch.tensor([1 / math.sqrt(2)], dtype=torch.float64))


def test_tiny_inactive_box_of_an_ill_conditioned_qp_is_solved_exactly(exact_solve):
    # The normal equations of a least-squares fit with data ~6e9 (P = 2AᵀA, cond 5.5e4)
    # under a box |x| <= u whose x_1 side is 7e-5 wide in the equilibrated units. The
    # interior point stopped with both of x_1's bound multipliers at ~1e-8, which held
    # x_1 5500 off (386 exact; 2.2e-6 normwise); the error estimate said 5e-14 and
    # the point was reported solved. Truth: P x = -q in exact rationals (box inactive).
    P = [[2.89715583626305229, 28.70376098227248818, 37.83793446299129215],
         [28.70376098227248818, 286.59819533797957547, 377.08471884715208944],
         [37.83793446299129215, 377.08471884715208944, 496.78297048310730588]]
    q = [1.46285380079531345e10, 1.46253666153860260e11, 1.92615917626524780e11]
    u = [1.2310022945242610e12, 1.6176454429863543e04, 1.1074491547386644e10]
    exact = exact_solve[0](P, [-v for v in q])
    assert bool((exact.abs() < torch.tensor(u, dtype=F64)).all())  # the box is inactive
    eye = torch.eye(3, dtype=F64)
    sol = solve_cone_batch(torch.tensor([P], dtype=F64), torch.tensor([q], dtype=F64),
                           torch.cat([eye, -eye])[None], torch.tensor([u + u], dtype=F64),
                           ConeLayout(0, 6))
    assert STATUS_NAMES[int(sol.status[0])] == "solved"
    assert float((sol.x[0] - exact).abs().max() / (1 + exact.abs().max())) < 1e-9


@pytest.mark.parametrize("name", ["qp", "socp"])
def test_whole_batch_loop_matches_compacting_loop(monkeypatch, name):
    """On CUDA the loop keeps every element (its steps replay as captured graphs, whose
    shapes cannot shrink): finished, infeasible and unbounded elements are frozen in place
    instead of gathered out. Each element's iterates are its own, so statuses, iteration
    counts and points agree with the compacting loop's (here on the CPU, where the same
    loop runs its captured bodies eagerly)."""
    import convexddn.convex.interior_point as ip

    layout, n, lp = LAYOUTS[name]
    data = random_program(layout, n, 12, seed=3, lp=lp)
    P, q, A, b = (v.clone() for v in data)
    z0 = layout.zero
    # element 0 primal infeasible (aᵀx <= -1 and -aᵀx <= -1), 1 unbounded (x_0 free of
    # every constraint and of curvature, with cost -x_0)
    A[0, z0 + 1] = -A[0, z0]
    b[0, z0], b[0, z0 + 1] = -1.0, -1.0
    P[1, 0], P[1, :, 0], A[1, :, 0] = 0.0, 0.0, 0.0
    q[1, 0] = -1.0
    ref = solve_cone_batch(P, q, A, b, layout)
    assert ref.iterations.min() < ref.iterations.max()  # the compacting loop did compact
    monkeypatch.setattr(ip, "_WHOLE_BATCH", True)
    whole = solve_cone_batch(P, q, A, b, layout)
    assert whole.status.tolist() == ref.status.tolist()
    assert ref.status[0] == PRIMAL_INF and ref.status[1] == DUAL_INF and (ref.status[2:] == SOLVED).all()
    assert whole.iterations.tolist() == ref.iterations.tolist()
    assert torch.allclose(whole.x[2:], ref.x[2:], atol=1e-9, rtol=1e-9)
    assert torch.allclose(whole.z[2:], ref.z[2:], atol=1e-9, rtol=1e-9)


def test_whole_batch_loop_reads_the_host_once_per_step(host_reads, monkeypatch):
    # What a replayed graph step costs the host: the same one read per iteration.
    import convexddn.convex.interior_point as ip

    monkeypatch.setattr(ip, "_WHOLE_BATCH", True)
    layout, n, _ = LAYOUTS["qp"]
    data = random_program(layout, n, 8, seed=7)
    counts = []
    for k in range(2, 6):
        with host_reads.counting():
            sol = solve_cone_batch(*data, layout, max_iter=k, polish="never")
        assert int(sol.iterations.min()) == k
        counts.append(host_reads.count)
    assert [c - counts[0] for c in counts] == [0, 1, 2, 3]


@pytest.mark.parametrize("refine", [0, 1, 2, 3])
def test_every_refinement_count_solves_a_box_lp(refine):
    """With refine >= 2 a float64 program without second-order cones (whose KKT solves
    carry W⁻¹A_I x along) failed with a raw TypeError once refinement started: the
    second step added the product of a step that had none. min qᵀx over the box
    [-1, 1]³ is x = -sign(q)."""
    n = 3
    A = torch.cat([torch.eye(n), -torch.eye(n)]).double()[None].expand(2, 2 * n, n)
    b = torch.ones(2, 2 * n, dtype=torch.float64)
    P = torch.zeros(2, n, n, dtype=torch.float64)
    q = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.25, 1.0]], dtype=torch.float64)
    sol = solve_cone_batch(P, q, A, b, ConeLayout(0, 2 * n), refine=refine)
    assert sol.status.tolist() == [0, 0]
    torch.testing.assert_close(sol.x, -q.sign(), atol=1e-8, rtol=0)


def mixed_qps(B: int = 1024, seed: int = 5):
    """A tester's batch of the registry's ``qp`` (n = 6, 4 ≤, 2 =), ``½‖Lᵀy‖² + qᵀy``, feasible
    by construction, each element one of six kinds (random, P of condition 1e12, a constraint
    active at 1e-9, q ×1e6, equality rows 1e-9 apart, random); returns the parameters
    ``(L, q, G, h, A, b)`` and the kinds."""
    g = torch.Generator().manual_seed(seed)
    L, q, G = (torch.randn(*s, dtype=F64, generator=g) for s in ((B, 6, 6), (B, 6), (B, 4, 6)))
    h, A = torch.rand(B, 4, dtype=F64, generator=g), torch.randn(B, 2, 6, dtype=F64, generator=g)
    z0 = torch.randn(B, 6, dtype=F64, generator=g)
    b, h = (A @ z0[..., None])[..., 0], (G @ z0[..., None])[..., 0] + h
    kind = torch.randint(0, 6, (B,), generator=g)
    for i in range(B):
        k = int(kind[i])
        if k == 1:
            L[i] = torch.diag(10.0 ** torch.linspace(-3, 3, 6)).double()
        elif k == 2:
            h[i] = G[i] @ z0[i] + 1e-9
        elif k == 3:
            q[i] *= 1e6
        elif k == 4:
            A[i, 1] = A[i, 0] + 1e-9 * torch.randn(6, dtype=F64, generator=g)
            b[i] = A[i] @ z0[i]
    return (L, q, G, h, A, b), kind


def _as_cone_program(L, q, G, h, A, b):
    return L @ L.mT, q, torch.cat([A, G], 1), torch.cat([b, h], 1)


@pytest.mark.parametrize("whole", [False, True])
def test_an_element_iterates_as_alone_whatever_its_neighbours(monkeypatch, whole):
    """Whether an iteration refined its KKT solves was decided for the whole batch (some element
    close and some element's solves coarse), so an element's iterates depended on the others:
    element 235 (equality rows 1e-9 apart) was refused alone and SOLVED beside one easy
    element (8.8e-8 away); element 147 was SOLVED alone and refused beside 7. Each refines
    by its own rule now: the same status, iterations and point in any batch (to rounding:
    torch's batched kernels are not bitwise batch-size invariant), on the captured path's
    logic too."""
    import convexddn.convex.interior_point as ip

    monkeypatch.setattr(ip, "_WHOLE_BATCH", whole)
    params, kind = mixed_qps()
    P, q, A, b = _as_cone_program(*params)
    layout = ConeLayout(2, 4)
    easy = torch.nonzero(kind == 0).squeeze(1)
    for e in (235, 147):
        alone = solve_cone_batch(P[e:e + 1], q[e:e + 1], A[e:e + 1], b[e:e + 1], layout)
        for k in (1, 7, 63):
            idx = torch.cat([torch.tensor([e]), easy[:k]])
            sol = solve_cone_batch(P[idx], q[idx], A[idx], b[idx], layout)
            assert sol.status[0] == alone.status[0] and sol.iterations[0] == alone.iterations[0], (e, k)
            torch.testing.assert_close(sol.x[0], alone.x[0], atol=1e-12, rtol=0)
            torch.testing.assert_close(sol.z[0], alone.z[0], atol=1e-12, rtol=0)


def test_random_qps_solve_in_a_batch_as_each_alone():
    """48 QPs of all six kinds (:func:`mixed_qps`, another seed), solved together and one by one:
    the same statuses, iterations, points and error estimates."""
    params, _ = mixed_qps(48, seed=11)
    P, q, A, b = _as_cone_program(*params)
    layout = ConeLayout(2, 4)
    batch = solve_cone_batch(P, q, A, b, layout)
    assert 0 < int((batch.status == SOLVED).sum()) < 48  # hard elements among them
    for i in range(48):
        one = solve_cone_batch(P[i:i + 1], q[i:i + 1], A[i:i + 1], b[i:i + 1], layout)
        assert (one.status[0], one.iterations[0]) == (batch.status[i], batch.iterations[i]), i
        torch.testing.assert_close(one.x[0], batch.x[i], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(one.error[0], batch.error[i], atol=1e-15, rtol=1e-6)


def test_an_elements_value_and_gradient_do_not_depend_on_its_batch():
    """Through the layer, forward and backward, the first 64 elements of :func:`mixed_qps`
    together and six of them alone: before, their solutions differed by up to 1.3e-7 and
    their gradients by up to 1.1e-7 (element 63 was solved in the batch, refused alone); now
    the same solvers, solutions and gradients."""
    import convexddn as cddn

    params, _ = mixed_qps()
    layer = cddn.layer("qp", backend="cvxpy", n=6, n_ineq=4, n_eq=2, on_failure="mask")
    up = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(1))

    def run(idx):
        ins = [p[idx].clone().requires_grad_(True) for p in params]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the refused and the ill-conditioned ones warn)
            y = layer(*ins)
            grads = torch.autograd.grad((y * up).sum(), ins)
        return y.detach(), grads, layer.last_solve.solvers

    y, grads, solvers = run(torch.arange(64))
    for i in (9, 22, 24, 40, 42, 63):
        y1, grads1, solvers1 = run(torch.tensor([i]))
        assert solvers1[0] == solvers[i], i
        torch.testing.assert_close(y1[0], y[i], atol=1e-12, rtol=1e-12, equal_nan=True)
        for g1, g in zip(grads1, grads):
            torch.testing.assert_close(g1[0], g[i], atol=1e-10, rtol=1e-10)


def test_mixed_batch_equilibrates_once_and_each_part_gets_its_own_numbers(monkeypatch):
    """A batch where the null-space form applies to some elements only (element 1's equality
    rows dependent to 1e-14) is solved in two parts; each part equilibrated its elements and
    factorised their equalities again (three Ruiz runs and three QRs of A_Eᵀ for one batch).
    Now each part takes its rows of the batch's equilibration, and only the part in the
    null-space form factorises again (torch's batched Q is not bitwise the same across batch
    sizes); every element's numbers (point, status, iterations, residual, error, kept KKT
    answer) are bitwise those of its part solved alone, as before."""
    from convexddn.convex import interior_point as ip

    layout = ConeLayout(2, 3)
    P, q, A, b = random_program(layout, 5, 4, seed=2)
    A[1, 1] = A[1, 0] * (1 + 1e-14)
    calls = {"equilibrate": 0, "qr": 0}
    real_eq, real_qr = ip.equilibrate, torch.linalg.qr

    def count_eq(*a, **k):
        calls["equilibrate"] += 1
        return real_eq(*a, **k)

    def count_qr(M, *a, **k):
        calls["qr"] += k.get("mode") == "complete"
        return real_qr(M, *a, **k)

    monkeypatch.setattr(ip, "equilibrate", count_eq)
    monkeypatch.setattr(torch.linalg, "qr", count_qr)
    got = solve_cone_batch(P, q, A, b, layout, keep_state=True)
    assert calls == {"equilibrate": 1, "qr": 2}, calls
    monkeypatch.setattr(torch.linalg, "qr", real_qr)
    rhs = torch.randn(4, 5, 1, dtype=F64, generator=torch.Generator().manual_seed(3))
    ux, uz, _ = got.kkt.solve(rhs, torch.zeros(4, 5, 1, dtype=F64), 1)
    for part in ([0, 2, 3], [1]):
        idx = torch.tensor(part)
        alone = solve_cone_batch(*(v[idx] for v in (P, q, A, b)), layout, keep_state=True)
        for name in ("x", "s", "z", "status", "iterations", "residual", "error"):
            torch.testing.assert_close(getattr(alone, name), getattr(got, name)[idx], rtol=0, atol=0,
                                       equal_nan=True, msg=f"{part} {name}")  # (error: NaN where unverifiable)
        vx, vz, _ = alone.kkt.solve(rhs[idx], torch.zeros(len(part), 5, 1, dtype=F64), 1)
        assert torch.equal(vx, ux[idx]) and torch.equal(vz, uz[idx]), part
