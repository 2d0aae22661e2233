"""One iteration of the batched interior-point method (:mod:`.interior_point`), as pure
functions of the data and the iterate: :func:`update` measures an iterate and decides
each element's status, :func:`step` takes the Mehrotra predictor-corrector step.

Neither reads a value on the host, so on CUDA a step followed by the next update is
captured once as a graph and replayed (:mod:`convexddn._step_graphs`); the loop reads
only the counts :func:`update` returns.

The iterate is a tuple of ``(B, ·)`` tensors in the order of :data:`STATE`: the
embedding's point, the status and iteration count, the best point visited with its merit,
and the stall bookkeeping. The residuals of the last update that the step needs travel
beside it as ``(r_x, r_z, r_τ, Px, refined)`` (``refined``: whose solves the step refines).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cone_solution import DUAL_INFEASIBLE, MAX_ITERATIONS, NUMERICAL, PRIMAL_INFEASIBLE, RUNNING, SOLVED
from .equilibration import Scaled
from .kkt import DataOps, KKTStructure, KKTSystem, row_inf
from .measures import Measures, max_step
from .pairs import pairs_open
from .symmetric_cones import ConeLayout, NTScaling

__all__ = ["STATE", "STATUS", "IterationData", "column_mask", "step", "update"]

STATE = ("x", "s", "z", "tau", "kappa", "status", "iterations", "best_x", "best_s", "best_z", "best_tau",
         "best_merit", "stall_ref", "stall_count")
STATUS = STATE.index("status")

_STEP_FRACTION = 0.99
_MIN_STEP = 1e-10
# An element whose best merit has not halved in this many iterations has stalled (an
# off-centre cycle of long and short steps): it stops and the final checks decide (as
# Clarabel's insufficient progress). 15 stopped QPs at ~1e6 needing 21-22 iterations.
_STALL_GAIN, _STALL_ITERATIONS = 0.5, 30
# Iterations without progress (best merit halving) after which an element whose measures
# are below tol stops with a complementary pair open (both members > 0, degenerate).
_OPEN_STALL = 3
# Relative change of a KKT solve by the regularisation below which iterative refinement is
# skipped during the iterations (the polish and the error estimate always refine).
_REFINE_ABOVE = 1e-8


@dataclass
class IterationData:
    """The equilibrated data of the running elements and what the iterations derive from it."""

    d: Scaled
    ops: DataOps
    base: torch.Tensor  # kkt.constant_part
    layout: ConeLayout
    structure: KKTStructure
    tol: float
    tol_inf: float
    decide: bool = False  # go on past tol while a pair is open in its own units (.pairs)

    def __post_init__(self) -> None:
        self.norm_b, self.norm_q = row_inf(self.d.b), row_inf(self.d.q)
        # A diagonal W (no second-order cone): W (W⁻¹A_I x) is A_I x to rounding, and the
        # KKT solves' products give A_I x of their solutions (three batched products fewer
        # per iteration). A second-order cone's W reaches a condition number of 1e10 near
        # ∂K; in float32 the rounding is near the tolerances (3 more of 64 QPs uncertified).
        self.diagonal_w = not self.layout.soc and self.d.A.dtype == torch.float64

    def select(self, idx: torch.Tensor) -> "IterationData":
        """The data of the elements ``idx``."""
        d = self.d.select(idx)
        return IterationData(d, DataOps(d.P, d.A, self.layout, self.structure), self.base.index_select(0, idx),
                             self.layout, self.structure, self.tol, self.tol_inf, self.decide)


def update(data: IterationData, state: tuple, effect: torch.Tensor | None, last: bool):
    """Measure the iterate, keep each element's best point, decide who stops.

    ``effect``: the last KKT system's ``regularisation_effect`` (or None); ``last``: the
    iteration limit is reached (who still runs stops there).

    Returns ``(state, residuals, counts)``: ``residuals`` ``(r_x, r_z, r_τ, Px, refined)``,
    ``refined`` ``(B,)`` the running elements whose next step refines its KKT solves: close
    (best merit below 1e-4) and coarse (the regularisation's effect on the last system above
    ``_REFINE_ABOVE``), each by its own numbers; ``counts`` ``(2,)``: how many run, how many refine.
    """
    x, s, z, tau, kappa, status, iterations, *best, best_merit, stall_ref, stall_count = state
    r = Measures(data.d, data.ops, data.norm_b, data.norm_q, x, s, z, tau, kappa, data.tol_inf)
    running = status == RUNNING
    better = running & (r.merit < best_merit)
    # Iterates stay finite (non-finite steps are never taken): lerp, exact at weights 0, 1.
    keep = better.to(x.dtype)
    best = tuple(torch.lerp(bv, v, column_mask(keep, v)) for v, bv in zip((x, s, z, tau), best))
    best_merit = torch.where(better, r.merit, best_merit)
    progress = best_merit < _STALL_GAIN * stall_ref
    stall_ref = torch.where(progress, best_merit, stall_ref)
    stall_count = torch.where(progress, 0, stall_count + 1)
    new = torch.where(r.dinf, DUAL_INFEASIBLE, RUNNING)
    new = torch.where(r.pinf, PRIMAL_INFEASIBLE, new)
    # Solved: the measures below tol; with ``decide``, each complementary pair decided in its
    # own units too (.pairs), or the merit stalled past tol (a degenerate pair stays open).
    met = r.merit <= data.tol
    if data.decide:
        d = data.d
        met = met & (~pairs_open(data.layout, d.A, d.b, d.q, x, s, z, tau, data.tol) | (stall_count >= _OPEN_STALL))
    new = torch.where(met, SOLVED, new)
    # Finite precision: iterates near ∂K can degrade; stop once clearly worse.
    new = torch.where(~r.finite | ((best_merit < 1e-5) & (r.merit > 1e4 * best_merit))
                      | (stall_count >= _STALL_ITERATIONS), NUMERICAL, new)
    if last:
        new = torch.where(new == RUNNING, MAX_ITERATIONS, new)
    status = torch.where(running, new, status)
    running = status == RUNNING
    # Iterative refinement pays only once the KKT systems get ill-conditioned, and only
    # corrects the static regularisation δ (and rounding): where the pivots certify that
    # δ moves a solve by less than _REFINE_ABOVE relative (last iteration's system; a
    # separable strictly convex program), it is skipped.
    # Decided per element (an element's iterates are those it has alone, whoever shares its batch).
    coarse = running if effect is None else running & ~(effect <= _REFINE_ABOVE)
    refined = coarse & (best_merit < 1e-4)
    counts = torch.stack([running.sum(), refined.sum()])
    state = (x, s, z, tau, kappa, status, iterations, *best, best_merit, stall_ref, stall_count)
    return state, (r.rx, r.rz, r.rtau, r.Px, refined), counts


def step(data: IterationData, state: tuple, res: tuple, first: bool, refine: int):
    """The predictor-corrector step of the running elements (the others keep their
    point: step length 0); ``first``: damp the corrector, as Clarabel does for a badly
    centred start; ``refine``: refinement steps per KKT solve, applied to the elements that
    :func:`update` marked (``res``' last member) only.

    Returns ``(state, effect)``: the new iterate and this step's KKT system's
    ``regularisation_effect`` (or None).
    """
    x, s, z, tau, kappa, status, iterations, *rest = state
    rx, rz, rtau, Px, refined = res
    d, ops, layout = data.d, data.ops, data.layout
    z0, nu = layout.zero, layout.degree
    bE, bI = d.b[:, :z0], d.b[:, z0:]
    running = status == RUNNING
    iterations = iterations + running.long()
    sc, zc = (s[:, z0:], z[:, z0:]) if z0 else (s, z)

    def rows(zero, cone):  # right-hand side rows: the zero cone's (if any) above the cone's
        return torch.cat([zero, cone], 1) if z0 else cone

    def a_i(x, p):  # A_I x of a KKT solution x, p its products (this iteration's W and data)
        return W.apply(p[0]) if data.diagonal_w else ops.Av(x)[:, z0:]

    W = NTScaling(layout, sc, zc)
    kkt = KKTSystem(ops, W, data.base, data.structure)
    status = torch.where(running & kkt.failed, NUMERICAL, status)
    lam = W.lam
    mu = ((lam * lam).sum(1) + tau * kappa) / (nu + 1)  # λᵀλ = sᵀz
    xi = x / tau[:, None]
    qPxi = d.q + 2.0 * Px / tau[:, None]
    Wrz = W.apply_inv(rz[:, z0:])  # right-hand sides enter the KKT solve as W⁻¹(·)

    # Predictor (affine) and the constant system K [x1; z1] = [-q; b], solved together;
    # the affine cone rows are W⁻¹(s − r_z) = λ − W⁻¹ r_z.
    (x1, z1, h1, *p1), affine = kkt.solve_columns(
        [(-d.q, rows(bE, W.apply_inv(bI))), (-rx, rows(-rz[:, :z0] if z0 else None, lam - Wrz))], refine,
        product=data.diagonal_w, mask=refined)
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

    # Corrector: centring σμ and Mehrotra's second-order term.
    one_s = (1.0 - sigma)[:, None]
    corr = layout.jordan(W.apply_inv(DSa), DHa)
    if first:
        corr = alpha_a[:, None] * corr
    ds_lam = layout.add_unit(layout.jordan(lam, lam) + corr, -sigma * mu)
    dkappa_c = tau * kappa + dtau_a * dkappa_a * (alpha_a if first else 1.0) - sigma * mu
    rhs2_r = rows(-one_s * rz[:, :z0] if z0 else None, layout.jordan_solve(lam, ds_lam) - one_s * Wrz)
    corrector = kkt.solve((-one_s * rx).unsqueeze(-1), rhs2_r.unsqueeze(-1), refine, scaled=True,
                          product=data.diagonal_w, mask=refined)
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
    return (x, s, z, tau, kappa, status, iterations, *rest), kkt.regularisation_effect


def column_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(B,)`` mask shaped to select rows of ``like`` (``(B,)`` or ``(B, k)``)."""
    return mask if like.dim() == 1 else mask[:, None]
