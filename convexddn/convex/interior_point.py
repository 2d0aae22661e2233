"""A batched primal-dual interior-point method for cone programs with quadratic objectives.

Solves, for every batch element at once,

.. math::

    \\min_x \\tfrac12 x^T P x + q^T x \\quad\\text{s.t.}\\quad Ax + s = b,\\; s \\in K,
    \\qquad K = \\{0\\}^{z} \\times \\mathbb{R}_+^{l} \\times Q^{q_1} \\times \\dots

through Clarabel's homogeneous embedding with a quadratic objective (Goulart & Chen,
"Clarabel: An interior-point solver for conic programs with quadratic objectives",
2024): iterates :math:`(x, s, z, \\tau, \\kappa)` with

.. math::

    Px + A^T z + q\\tau = 0,\\quad Ax + s - b\\tau = 0,\\quad
    q^T x + b^T z + x^T P x / \\tau + \\kappa = 0,

so that :math:`\\tau \\to 0 < \\kappa` yields a primal (:math:`A^T z = 0, b^T z < 0`) or
dual (:math:`Px = 0, Ax + s = 0, q^T x < 0`) infeasibility certificate per element.
Steps are Mehrotra predictor–corrector with Nesterov–Todd scaling; each iteration
factors one reduced KKT system per element (:mod:`.kkt`) and solves it for three right-
hand sides. Data are Ruiz-equilibrated per element first (:mod:`.equilibration`).

All elements iterate together as dense ``(B, ·, ·)`` tensors on the data's device; a
converged, certified, stalled or troubled element is frozen (step length zero), and once
a quarter of the batch is frozen the running ones are gathered into a smaller batch. One
host synchronisation per iteration tests how many still run. Elements whose solution came
out far below the equilibrated units' size are solved again in their own unit. Then
:mod:`.certify` polishes the solutions and estimates their errors; the measures, and the
rays of infeasibility certificates, are checked in the caller's units too.
"""
from __future__ import annotations

import torch

from .certify import DECIDED, finish, undecided
from .cone_solution import (DUAL_INFEASIBLE, MAX_ITERATIONS, NUMERICAL, PRIMAL_INFEASIBLE, RUNNING, SOLVED,
                            STATUS_NAMES, ConeSolution)
from .equilibration import Scaled, equilibrate
from .kkt import DENSE, DataOps, KKTFactory, KKTStructure, KKTSystem, constant_part, row_inf
from .limit_scaling import retry_at_limit
from .measures import UNVERIFIABLE, Measures, caller_measures, kkt_measures, max_step, point_residual
from .nullspace import ReducedSystems, reduce, unverifiable
from .rays import verified_rays
from .second_opinion import equilibrated_start
from .symmetric_cones import ConeLayout, NTScaling

__all__ = ["SOLVED", "STATUS_NAMES", "ConeSolution", "solve_cone_batch", "kkt_measures"]

_STEP_FRACTION = 0.99
_COMPACT_MIN, _COMPACT_FRACTION = 4, 0.75
_MIN_STEP = 1e-10
# Where the initial s, z are shifted into K (smallest eigenvalue; Clarabel: 1). At 0.1 the
# start keeps more of the least-squares guess of the active pairs; against 1.0: mean
# iterations 10.8 -> 9.6, slowest 16-19 -> 12-14 (n = 50 QP, batch 64, 1024), 11.6 -> 10.6
# OptNet QP, 8.2 -> 7.8 sparsemax; slower on the L∞ ball (9.0 -> 9.9), two QPs at ~1e6.
_START_LEVEL = 0.1
# Elements stopped by numerical trouble or the iteration limit whose last iterate passes
# the infeasibility tests at this tolerance count as certified (Clarabel's reduced-accuracy
# tolerance) if their rays pass in the caller's units (rays.verified_rays): a QP with
# data ~1e4, infeasible by construction, stopped one iteration short of 1e-8 before.
_REDUCED_TOL_INF = 5e-5
# An element whose best merit has not halved in this many iterations has stalled (an
# off-centre cycle of long and short steps): it stops and the final checks decide (as
# Clarabel's insufficient progress). 15 stopped QPs at ~1e6 needing 21-22 iterations.
_STALL_GAIN, _STALL_ITERATIONS = 0.5, 30
_RESCALE_BELOW = 1e-3  # a solution (x, z) below this (equilibrated units) is solved again at its scale
# Relative change of a KKT solve by the regularisation below which iterative refinement is
# skipped during the iterations (the polish and the error estimate always refine).
_REFINE_ABOVE = 1e-8


def solve_cone_batch(P: torch.Tensor, q: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                     layout: ConeLayout, *, tol: float = 1e-10, tol_accept: float = 1e-8,
                     tol_error: float = 1e-7, tol_inf: float = 1e-8, max_iter: int = 100, refine: int = 1,
                     equilibrate_passes: int = 3, polish: str = "auto", polish_steps: int = 3,
                     structure: KKTStructure = DENSE, error_cols: torch.Tensor | None = None,
                     error_duals: torch.Tensor | None = None, keep_state: bool = False,
                     start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> ConeSolution:
    """Solve a batch of cone programs ``min ½xᵀPx + qᵀx s.t. Ax + s = b, s ∈ K``.

    Args:
        P, q, A, b: the data, any floating dtype (computed in that dtype), one device.
        layout: the cone :math:`K` (rows of ``A`` in its order).
        tol: an element stops once the largest of its relative primal residual, dual
            residual and gap (:func:`kkt_measures`, equilibrated units) is below this.
        tol_accept: an element that cannot get there (iterates degrade near the
            boundary in finite precision, as in Clarabel) is still solved if the best
            point it visited has measures below this; that point is returned.
        tol_error: largest estimated relative error of a solution reported as solved
            (one Newton step's size; catches ill-conditioned elements whose residual
            is small but whose solution is not).
        tol_inf: relative tolerance of the infeasibility certificates.
        max_iter: iterations before an element is reported as ``max iterations``.
        refine: iterative-refinement steps per KKT solve, once some element's measures
            are below 1e-4 (the KKT systems get ill-conditioned; before, none).
        equilibrate_passes: Ruiz passes (0: no equilibration).
        polish: Newton steps on the exact complementarity after the iterations
            (:mod:`.polish`): ``"auto"``: LU-based steps for programs with second-order
            cones (whose interior-point solutions err by ~√μ), one step through the
            structured factorisation otherwise; ``"always"``: LU-based steps for all;
            ``"never"``.
        polish_steps: at most this many such steps.
        structure: what the sparsity pattern says about the reduced KKT matrix
            (:class:`~.kkt.KKTStructure`; dense with the ρ term by default).
        error_cols, error_duals: the variables (all by default) and the multipliers (none
            by default) that count in the error estimate: the outputs a caller asks for.
        keep_state: keep the equilibrated data and the KKT system factorised at the
            solution (for the backward).
        start: ``(x, s, z)``, a solution found elsewhere (:mod:`.second_opinion`) to
            polish, check and keep instead of iterating: no interior-point iterations.

    Shape:
        ``P (B, n, n), q (B, n), A (B, m, n), b (B, m)`` ->
        ``x (B, n), s (B, m), z (B, m)``, ``status, iterations, residual, error (B,)``.

    Returns:
        :class:`ConeSolution`; ``status`` codes are :data:`STATUS_NAMES`' keys.
        Never raises for a per-element failure.
    """
    tol = min(tol, tol_accept)
    P = 0.5 * (P + P.mT)
    d = equilibrate(P, q, A, b, layout, equilibrate_passes)
    B = A.shape[0]
    if start is not None:
        d, xs, ss, zs = equilibrated_start(d, layout, *start, rescale_below=_RESCALE_BELOW)
        status = torch.full((B,), SOLVED, dtype=torch.long, device=A.device)  # the checks decide
        iterations, certified = torch.zeros_like(status), torch.zeros_like(status, dtype=torch.bool)
        red = None
    else:
        d, xs, ss, zs, status, iterations, certified, red = _iterate(d, layout, structure, tol, tol_inf,
                                                                     max_iter, refine)
        # σ sizes the equilibrated units from the data; an inactive constraint with a huge
        # right-hand side inflates it far above the solution, whose error the measures'
        # "1 +" then hides. Elements whose solution came out that small are solved again
        # in its own unit (tests/convex/test_reliability.py's badly scaled QP at scales 2e4
        # to 1e6 ended 2e-5 to 4.4 off before, now to 2e-10).
        size = torch.maximum(row_inf(xs), row_inf(zs))
        small = ~certified & (size < _RESCALE_BELOW) & (size > 0)
        if bool(small.any()):
            idx = torch.nonzero(small).squeeze(1)
            part = d.select(idx)
            part = part.with_sigma(part.sigma * size.index_select(0, idx))
            part, *again, its, cert, _ = _iterate(part, layout, structure, tol, tol_inf, max_iter, refine,
                                                  sigma_from_start=False)
            d = d.merge(idx, part)
            xs, ss, zs, status = (v.index_copy(0, idx, w) for v, w in zip((xs, ss, zs, status), again))
            certified = certified.index_copy(0, idx, cert)
            iterations = iterations.index_add(0, idx, its)
    ops = DataOps(d.P, d.A, layout, structure)  # polish, estimate, backward: in the iterations' form
    systems = (KKTFactory(ops, constant_part(d.P, d.A, layout, structure), structure) if red is None
               else ReducedSystems(red, d, ops, structure))
    xs, ss, zs, residual, kkt, error = finish(
        d, systems, layout, xs, ss, zs, ~certified, point_residual(d, layout), polish, polish_steps,
        refine + 1, tol_error, error_cols, error_duals)
    xo, so, zo = d.unscale(xs, ss, zs)
    ok = torch.isfinite(xo).all(1) & torch.isfinite(so).all(1) & torch.isfinite(zo).all(1)
    xo, so, zo = (torch.where(ok[:, None], v, 0.0) for v in (xo, so, zo))
    if bool(certified.any()):
        # A ray found on the equilibrated data certifies only if it does in the caller's units.
        infeasible, unbounded = verified_rays(P, q, A, b, layout, xo, zo)
        real = ((status == PRIMAL_INFEASIBLE) & infeasible) | ((status == DUAL_INFEASIBLE) & unbounded)
        status = torch.where(certified & ~real, NUMERICAL, status)
    # The measures so far are relative to the equilibrated unit (σ from the data; above: a
    # point with a relative gap of 0.02 to 1 passed there). The same measures in the
    # caller's units do not share that blind spot (nor the equilibrated ones theirs): both must pass.
    caller, points = caller_measures(P, q, A, b, layout, xo, so, zo, tol_accept)
    residual = torch.where(certified, residual, torch.maximum(residual, caller))
    short = ok & ~certified & ~(residual <= tol_accept)
    if bool(short.any()):  # (the limit point's residual: see limit_scaling.limit_point)
        ss, zs, so, zo, residual, points = retry_at_limit(
            d, layout, (P, q, A, b), xs, ss, zs, (xo, so, zo, residual, points), torch.nonzero(short).squeeze(1),
            point_residual(d, layout), tol_accept)
    # Solved means: small residual and small estimated error, whatever the loop concluded.
    ok_res = ~certified & (residual <= tol_accept) & (error <= tol_error)
    status = torch.where(ok_res, SOLVED, torch.where(status == SOLVED, NUMERICAL, status))
    # A complementary pair undecided after polishing (s_i ≈ z_i ≈ 0): no derivative exists.
    undecided_ = ok_res & (undecided(layout, ss, zs) > DECIDED)
    points = torch.where(certified | ~ok, 0, points + unverifiable(error, red).long() * UNVERIFIABLE)
    out = ConeSolution(xo, so, zo, status, iterations, residual, error, points, undecided=undecided_)
    if keep_state:
        out.scaled, out.kkt = d, kkt
    return out


def _iterate(d: Scaled, layout: ConeLayout, structure: KKTStructure, *args, **kwargs):
    """:func:`_iterations`, on the program without its equalities where that applies (:mod:`.nullspace`)."""
    reduced = reduce(d, layout, structure)
    if reduced is None:
        return (*_iterations(d, layout, structure, *args, **kwargs), None)
    dr, red = reduced
    dr, ys, ss, zs, status, iterations, certified = _iterations(dr, red.layout, DENSE, *args, **kwargs)
    d = d.with_sigma(dr.sigma)
    xs, ss, zs = red.lift(d, dr, ys, ss, zs, status == PRIMAL_INFEASIBLE, status == DUAL_INFEASIBLE)
    return d, xs, ss, zs, status, iterations, certified, red


def _iterations(d: Scaled, layout: ConeLayout, structure: KKTStructure, tol: float, tol_inf: float,
                max_iter: int, refine: int, sigma_from_start: bool = True):
    """The interior-point iterations on the equilibrated data ``d``; returns ``(d, xs, ss,
    zs, status, iterations, certified)``: the data (with the solution scale refined from
    the initial point when ``sigma_from_start``), each element's best point divided by
    τ (its last one where it is certified infeasible), status and iteration count."""
    B, m, n = d.A.shape
    z0 = layout.zero
    for first in (True, False) if sigma_from_start else (False,):
        base = constant_part(d.P, d.A, layout, structure)
        ops = DataOps(d.P, d.A, layout, structure)
        # Initial point (CVXOPT/Clarabel): x, z of K [x; z] = [-q; b] with H = I, s = -z,
        # then s and z shifted into the interior of K.
        kkt = KKTSystem(ops, None, base, structure)
        x, z, _ = kkt.solve(-d.q.unsqueeze(-1), d.b.unsqueeze(-1), refine)
        x, z = x.squeeze(-1), z.squeeze(-1)
        if first and sigma_from_start:
            # Refine the solution scale σ from this point's size (within 1e±3 of the first
            # guess, which measures b, not x: a dense row of A sums many entries of x), so
            # that the measures' "1 +" is the solution's own unit.
            size = row_inf(x)
            ratio = torch.where(size > 0, size, 1.0).clamp(1e-3, 1e3)
            d = d.with_sigma(d.sigma * ratio)
    norm_b, norm_q = row_inf(d.b), row_inf(d.q)
    bE, bI = d.b[:, :z0], d.b[:, z0:]
    s = torch.zeros_like(z)
    s[:, z0:] = layout.shift_inside(-z[:, z0:], _START_LEVEL)
    z[:, z0:] = layout.shift_inside(z[:, z0:], _START_LEVEL)
    tau = x.new_ones(B)
    kappa = x.new_ones(B)
    status = torch.where(kkt.failed, NUMERICAL, torch.full_like(tau, RUNNING, dtype=torch.long))
    iterations = torch.zeros_like(status)
    best = (x, s, z, tau)
    best_merit = torch.full_like(tau, torch.inf)
    stall_ref, stall_count = best_merit, torch.zeros_like(status)
    nu = layout.degree
    # A diagonal W (no second-order cone): W (W⁻¹A_I x) is A_I x to rounding, and the KKT
    # solves' products give A_I x of their solutions (three batched products fewer per
    # iteration). A second-order cone's W reaches a condition number of 1e10 near ∂K; in
    # float32 the rounding is near the tolerances (3 more of 64 QPs uncertified).
    diagonal_w = not layout.soc and x.dtype == torch.float64

    def rows(zero, cone):  # right-hand side rows: the zero cone's (if any) above the cone's
        return torch.cat([zero, cone], 1) if z0 else cone

    def a_i(x, p):  # A_I x of a KKT solution x, p its products (this iteration's W and data)
        return W.apply(p[0]) if diagonal_w else ops.Av(x)[:, z0:]
    full_data = (d, ops, base)
    saved, slot = None, None  # full-batch state and positions of the active elements

    for it in range(max_iter + 1):
        r = Measures(d, ops, norm_b, norm_q, x, s, z, tau, kappa, tol_inf)
        running = status == RUNNING
        better = running & (r.merit < best_merit)
        # Iterates stay finite (non-finite steps are never taken): lerp, exact at weights 0, 1.
        keep = better.to(x.dtype)
        best = tuple(torch.lerp(bv, v, _col(keep, v)) for v, bv in zip((x, s, z, tau), best))
        best_merit = torch.where(better, r.merit, best_merit)
        progress = best_merit < _STALL_GAIN * stall_ref
        stall_ref = torch.where(progress, best_merit, stall_ref)
        stall_count = torch.where(progress, 0, stall_count + 1)
        new = torch.where(r.dinf, DUAL_INFEASIBLE, RUNNING)
        new = torch.where(r.pinf, PRIMAL_INFEASIBLE, new)
        new = torch.where(r.merit <= tol, SOLVED, new)
        # Finite precision: iterates near ∂K can degrade; stop once clearly worse.
        new = torch.where(~r.finite | ((best_merit < 1e-5) & (r.merit > 1e4 * best_merit))
                          | (stall_count >= _STALL_ITERATIONS), NUMERICAL, new)
        if it == max_iter:
            new = torch.where(new == RUNNING, MAX_ITERATIONS, new)
        status = torch.where(running, new, status)
        running = status == RUNNING
        # The one host round-trip per iteration: is anyone running, is anyone close
        # (iterative refinement pays only once the KKT systems get ill-conditioned)?
        # Refinement only corrects the static regularisation δ (and rounding): where the
        # pivots certify that δ moves a solve by less than _REFINE_ABOVE relative (last
        # iteration's system; a separable strictly convex program), it is skipped.
        effect = kkt.regularisation_effect
        coarse = running if effect is None else running & ~(effect <= _REFINE_ABOVE)
        n_running, close, coarse = torch.stack([running.sum(), (running & (best_merit < 1e-4)).sum(),
                                                coarse.sum()]).tolist()
        if not n_running:
            break
        if x.shape[0] >= _COMPACT_MIN and n_running <= _COMPACT_FRACTION * x.shape[0]:
            # Most elements are done: iterate on the running ones only (the tail of a
            # batch often takes half again the median's iterations).
            state = [x, s, z, tau, kappa, status, iterations, *best, best_merit, stall_ref, stall_count]
            idx = torch.nonzero(running).squeeze(1)
            if saved is None:
                saved, slot = state, idx
            else:
                saved = [f.index_copy(0, slot, v) for f, v in zip(saved, state)]
                slot = slot.index_select(0, idx)
            x, s, z, tau, kappa, status, iterations, *best, best_merit, stall_ref, stall_count = (
                v.index_select(0, idx) for v in state)
            d = d.select(idx)
            ops, base = DataOps(d.P, d.A, layout, structure), base.index_select(0, idx)
            norm_b, norm_q = row_inf(d.b), row_inf(d.q)
            bE, bI = d.b[:, :z0], d.b[:, z0:]
            r = r.select(idx)
            running = status == RUNNING
        iterations = iterations + running.long()
        rx, rz, rtau = r.rx, r.rz, r.rtau
        sc, zc = (s[:, z0:], z[:, z0:]) if z0 else (s, z)

        W = NTScaling(layout, sc, zc)
        kkt = KKTSystem(ops, W, base, structure)
        status = torch.where(running & kkt.failed, NUMERICAL, status)
        lam = W.lam
        mu = ((lam * lam).sum(1) + tau * kappa) / (nu + 1)  # λᵀλ = sᵀz
        ref = refine if close and coarse else 0
        xi = x / tau[:, None]
        qPxi = d.q + 2.0 * r.Px / tau[:, None]
        Wrz = W.apply_inv(rz[:, z0:])  # right-hand sides enter the KKT solve as W⁻¹(·)

        # Predictor (affine) and the constant system K [x1; z1] = [-q; b], solved together;
        # the affine cone rows are W⁻¹(s − r_z) = λ − W⁻¹ r_z.
        (x1, z1, h1, *p1), affine = kkt.solve_columns(
            [(-d.q, rows(bE, W.apply_inv(bI))), (-rx, rows(-rz[:, :z0] if z0 else None, lam - Wrz))], ref,
            product=diagonal_w)
        v = x1 - xi
        # Δτ from the third row after eliminating Δs, Δκ (Clarabel §4.1); h = W Δz_I and
        # den = ‖x1 − ξ‖²_P + ‖z1‖²_H + κ/τ > 0.
        den = (v * ops.Pv(v)).sum(1) + (h1 * h1).sum(1) + kappa / tau
        bAx1 = bI - a_i(x1, p1)

        def direction(dtau_, dz_, dkappa_, x2, z2, h2, *p2):
            dtau = (dtau_ - dkappa_ / tau + (qPxi * x2).sum(1) + (d.b * z2).sum(1)) / den
            t = dtau[:, None]
            DX, DZ, DH = torch.addcmul(x2, t, x1), torch.addcmul(z2, t, z1), torch.addcmul(h2, t, h1)
            # Δs from the linearised primal equation A Δx + Δs − b Δτ = −d_z rather than
            # from Δs = −d_s − W (W Δz): W reaches 1e10 on off-centre cones near ∂K, and
            # this keeps the primal residual falling by exactly (1 − α).
            DSc = torch.addcmul(-(a_i(x2, p2) + dz_[:, z0:]), t, bAx1)
            dkappa = -(dkappa_ + kappa * dtau) / tau
            return DX, DZ, DH, DSc, dtau, dkappa

        DXa, DZa, DHa, DSa, dtau_a, dkappa_a = direction(rtau, rz, tau * kappa, *affine)
        alpha_a = max_step(layout, sc, zc, tau, kappa, DSa, DZa[:, z0:], dtau_a, dkappa_a).clamp(max=1.0)
        one_a = 1.0 - alpha_a
        sigma = one_a * one_a * one_a

        # Corrector: centring σμ and Mehrotra's second-order term (damped on the first
        # iteration, as Clarabel does for a badly centred start).
        one_s = (1.0 - sigma)[:, None]
        corr = layout.jordan(W.apply_inv(DSa), DHa)
        if it == 0:
            corr = alpha_a[:, None] * corr
        ds_lam = layout.add_unit(layout.jordan(lam, lam) + corr, -sigma * mu)
        dkappa_c = tau * kappa + dtau_a * dkappa_a * (alpha_a if it == 0 else 1.0) - sigma * mu
        rhs2_r = rows(-one_s * rz[:, :z0] if z0 else None, layout.jordan_solve(lam, ds_lam) - one_s * Wrz)
        corrector = kkt.solve((-one_s * rx).unsqueeze(-1), rhs2_r.unsqueeze(-1), ref, scaled=True,
                              product=diagonal_w)
        DX, DZ, _, DSc, dtau, dkappa = direction((1.0 - sigma) * rtau, one_s * rz, dkappa_c,
                                                 *(v[..., 0] for v in corrector))
        alpha = torch.clamp(_STEP_FRACTION * max_step(layout, sc, zc, tau, kappa, DSc, DZ[:, z0:], dtau, dkappa),
                            max=1.0)
        status = torch.where(running & ~(alpha > _MIN_STEP), NUMERICAL, status)
        alpha = torch.where(status == RUNNING, alpha, 0.0)
        # Non-finite directions of frozen elements must not leak in through 0 * inf.
        a = alpha[:, None]
        move = a > 0
        x = torch.where(move, torch.addcmul(x, a, DX), x)
        z = torch.where(move, torch.addcmul(z, a, DZ), z)
        sc = torch.where(move, torch.addcmul(sc, a, DSc), sc)
        if z0:
            s = s.clone()
            s[:, z0:] = sc
        else:
            s = sc
        tau = torch.where(alpha > 0, torch.addcmul(tau, alpha, dtau), tau)
        kappa = torch.where(alpha > 0, torch.addcmul(kappa, alpha, dkappa), kappa)

    if saved is not None:
        state = [x, s, z, tau, kappa, status, iterations, *best, best_merit, stall_ref, stall_count]
        x, s, z, tau, kappa, status, iterations, *best, best_merit, stall_ref, stall_count = (
            f.index_copy(0, slot, v) for f, v in zip(saved, state))
        d, ops, base = full_data
    stopped = (status == NUMERICAL) | (status == MAX_ITERATIONS)
    if bool(stopped.any()):  # their last iterate is where they stopped
        r = Measures(d, ops, row_inf(d.b), row_inf(d.q), x, s, z, tau, kappa, _REDUCED_TOL_INF)
        status = torch.where(stopped & r.pinf, PRIMAL_INFEASIBLE,
                             torch.where(stopped & r.dinf, DUAL_INFEASIBLE, status))
    # Solved and stalled elements return their best point; certificates their last one.
    certified = (status == PRIMAL_INFEASIBLE) | (status == DUAL_INFEASIBLE)
    x, s, z, tau = (torch.where(_col(~certified, bv), bv, v) for v, bv in zip((x, s, z, tau), best))
    xs, ss, zs = x / tau[:, None], s / tau[:, None], z / tau[:, None]
    return d, xs, ss, zs, status, iterations, certified


def _col(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask if like.dim() == 1 else mask[:, None]
