"""After the iterations: Newton polishing, then certifying each element's solution.

The interior-point iterations stop at a point whose KKT residual is small. Two things
separate that from an accurate solution, and this module handles both:

- **Polishing** (:mod:`.polish`): Newton steps on the exact complementarity remove the
  ~√μ error interior points leave on second-order cones and the ~1e-7 errors of
  near-degenerate LP/QP elements.
- **Certification** (:mod:`.estimate`): the residual does not bound the error of an
  ill-conditioned element (measured on the OptNet QP: residual 1e-11, solution error
  1e-5). One more Newton step with the KKT matrix at the solution estimates the error;
  the same factorisation is what the implicit backward needs, so it is kept for it. Elements
  whose estimate stays above ``tol_error`` after extra LU polishing are reported
  unsolved, for the caller's per-element fallback.
"""
from __future__ import annotations

import math

import torch

from .estimate import error_estimate, limit_scaling_at, nearly_dependent_rows
from .kkt import PatchedKKT
from .polish import polish as newton_polish
from .polish import EXTEND, better, rounding_level
from .polish_structured import polish_nonnegative
from .refine_point import refined_estimate
from .symmetric_cones import ConeLayout, soc_frame

__all__ = ["DECIDED", "RESOLVED", "at_kink", "decided", "error_estimate", "finish", "limit_scaling_at",
           "nearly_dependent_rows", "undecided", "undecided_reach"]


def _by_sign(s: torch.Tensor, z: torch.Tensor,
             floor: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(active, inactive)``: every pair decided by its larger member, except one whose
    members are both within ``floor`` (``(B, 1)``: :func:`_kink_floor`) of 0, taken as active:
    their signs are rounding. Coupled pairs cycled on that rounding: CVXPY's form of
    ‖x‖ ≤ t (a bound t' ≤ t and a cone at t', one multiplier) at a point 1e-7 outside the
    cone; a step taking the bound as inactive left the cone's pair at (4e-16, 2e-16), taken
    inactive in turn, and the steps swung between the two wrong active sets, the pair
    undecided: the projection 6.5e-9 off, its gradient 6.5e-2 off and "not differentiable"
    (at scale 1 rounding's sign happened to end the cycle, at scale 1 + 1e-7 it did not).
    Taken active, its next step settles the side (a multiplier of the wrong sign beyond
    rounding then decides it inactive)."""
    active = (s < z) | (torch.maximum(s.abs(), z.abs()) <= floor)
    return active, ~active


def _kink_floor(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(B, 1)`` 64 rounding levels of the element's size, at or below which both members of
    a complementary pair are a kink (a bound met with a zero multiplier), which ends the
    semismooth steps at s, z ~1e-16 and 1e-19, whose ratio alone calls it decided: the box
    [-1, 1] at x = 1 gave a gradient of 2e-10 (and 0.7 at x = -1), without a warning,
    where none exists."""
    cone_s, cone_z = s[:, layout.zero:], z[:, layout.zero:]
    return (64 * rounding_level(s) * (1 + cone_s.abs().amax(1) + cone_z.abs().amax(1)))[:, None]


def at_kink(d, layout: ConeLayout, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(B, nonneg)`` the nonnegative rows of a solution ``(x, s, z)`` of the equilibrated data
    ``d`` whose slack and multiplier are both 0 to rounding in their row's own scales (the sign
    tolerances, :func:`~.active_set.sign_tolerances`): a bound met with a zero multiplier,
    whichever side the ratio of the two roundings points to (:func:`decided` reads ``(6e-17,
    0)`` as inactive, :func:`undecided` ``(0, 0)`` as decided). The derivative's checks take
    such a row as undecided and holding. The active-set steps (:func:`~.active_set.settle_signs`,
    which take over where a degenerate vertex's singular limit system leaves the estimate rough)
    release a dependent row there, at ``z = 0`` with ``s`` its residual's rounding (a transport
    plan whose marginals' partial sums coincide) or 0 (``min c·y`` s.t. ``-y₂ = b₀``, ``y₀ - y₁ +
    y₂ = b₁``, ``0 <= y <= 3`` at ``(3, 3, 2)``, four rows in R³); read as decided, the one-sided
    derivative came back without a warning. (Not the element's size: beside an inactive bound
    of 1e12, a multiplier of 5e-3 was within 64 rounding levels of it.)"""
    from .active_set import sign_tolerances  # (active_set imports certify's decisions)

    z0, k = layout.zero, layout.nonneg
    tol_s, tol_z = sign_tolerances(d.P, d.q, d.A, d.b, layout, x, z)
    return (s[:, z0:z0 + k] <= tol_s) & (z[:, z0:z0 + k] <= tol_z)


def _at_kink(layout: ConeLayout, point: tuple, settled) -> tuple[torch.Tensor, tuple]:
    """``(settled_there (B,), point')``: whether ``point`` = ``(x, s, z, ...)`` is
    ``settled`` once its kink pairs (:func:`_kink_floor`: nonnegative rows, and second-order
    cones' Jordan-frame pairs, :func:`soc_frame`) count as decided, and the point with each
    such pair at ``s_i = z_i = max(min(s_i, z_i), tiny)`` (a cone's frame pair at least one
    rounding level of the element): undecided (ratio 1),
    as the derivative's checks must see them, where the semismooth steps left one side's
    rounding. Each member moves by at most its own size, so the point's residual moves by
    no more than what the semismooth point left in that row and column (its Newton step,
    the error estimate, stays at rounding). Its x stays the semismooth one: a bound of a
    box projection met at 0 with a zero multiplier was 2.8e-7 off at the interior point's
    s ≈ z (the derivative's warning was right, the solution's accuracy was not). (A cone's
    pair moves along its frame vector c_k: a group soft-threshold at ‖v‖ = λ, at the tip
    with its multiplier on the boundary, was called decided, its one-sided derivatives'
    blend returned without a warning.)"""
    x, s, z, *rest = point
    floor, tiny = _kink_floor(layout, s, z), torch.finfo(s.dtype).tiny
    z0, c = layout.zero, layout.zero + layout.nonneg  # (the nonnegative rows: z0:c)
    # (Both at the kink's floor, 64 rounding levels of the element's size, which the
    # multipliers set, moved s by that much: a box projection with an entry at 1e6, x ~
    # 2.7e-6 beside multipliers ~1 equilibrated, got s_0 = 1.9e-7 in the caller's units
    # beside y_0 = 7e-17, a Newton step of 1.07e-7 > tol_error and no solution.)
    kink = torch.maximum(s[:, z0:c], z[:, z0:c]) <= floor
    pair = torch.minimum(s[:, z0:c], z[:, z0:c]).clamp_min(tiny)
    at = lambda v, value: torch.cat([v[:, :z0], torch.where(kink, value, v[:, z0:c]), v[:, c:]], 1)  # noqa: E731
    s_at, z_at, z_off = at(s, pair), at(z, pair), at(z, 0.0)  # (z_off: the kinks' z at 0)
    if layout.soc:
        ds, dz = torch.zeros_like(s[:, c:]), torch.zeros_like(s[:, c:])  # (moves along the frame)
        a1, a2, b1, b2, u = soc_frame(layout, s[:, c:], z[:, c:])
        head = 1 - layout.index(s.device).tail
        for a, b, vec in ((a1, b1, (head + u) / 2), (a2, b2, (head - u) / 2)):
            on = torch.maximum(a, b) <= floor
            # (at least one rounding level of the element: a frame coefficient a_k = s₀ ± s₁ᵀu is
            # exact to no better, and members of 1e-308 came back as 0 and 1e-16, decided)
            p = torch.maximum(torch.minimum(a, b), floor / 64)
            ds += layout._spread(torch.where(on, p - a, 0.0)) * vec
            dz += layout._spread(torch.where(on, p - b, 0.0)) * vec
            z_off[:, c:] -= layout._spread(torch.where(on, b, 0.0)) * vec
        s_at[:, c:], z_at[:, c:] = s_at[:, c:] + ds, z_at[:, c:] + dz
    return settled(x, s, z_off), (x, s_at, z_at, *rest)


def _keep(take: torch.Tensor, alt: tuple, out: tuple) -> tuple:
    """``alt``'s entries where ``take`` ``(B,)``, else ``out``'s."""
    return tuple(torch.where(take.view((-1,) + (1,) * (o.dim() - 1)), a, o) for a, o in zip(alt, out))


def _polish_subset(d, layout, xs, ss, zs, residual, polished, idx, residual_fn, steps, decide=False, tight=None,
                   natural=False):
    """LU Newton steps on the elements ``idx`` only; merged back into the batch. With
    ``decide``, a second run from the same points takes the decided nonnegative pairs at
    their limit (see :func:`.polish.polish`), each element keeping the lower residual, and
    where a pair is still open a third run decides every pair (:func:`_by_sign`), and where
    ``tight`` ``(k,)`` and the residual stays above rounding a fourth, from the best point, is
    tight; last, ``(k,)`` who moved."""
    pick = lambda v: v.index_select(0, idx)  # noqa: E731
    args = (pick(d.P), pick(d.q), pick(d.A), pick(d.b), layout, pick(xs), pick(ss), pick(zs),
            lambda *v: residual_fn(*v, idx), steps)
    settled = lambda x, s, z: undecided(layout, s, z, rounding=True) <= RESOLVED  # noqa: E731
    out = newton_polish(*args, settled=settled, extend=EXTEND)
    if decide and (layout.nonneg or layout.soc):
        # Plain steps oscillated where both members of a pair are small beside x's move
        # (a box of half-width 7e-5 in an ill-conditioned QP: 2e-6 off, normwise); the
        # limit rows alone took a weakly active bound (s, z ~1e-11, 1e-13) as inactive
        # and left it violated by 3e-11 where plain steps reach rounding.
        alt = newton_polish(*args, settled=settled, decide=decided)
        out = _keep(better(layout, alt[3], *alt[1:3], out[3], *out[1:3], torch.minimum(alt[3], out[3]))
                    if natural else alt[3] < out[3], alt, out)  # (natural: a tie at rounding by polish.better)
        # Where a pair is still open, a semismooth run: every pair taken at the limit its
        # larger member points to (active where s < z), i.e. Newton on min(s, z) = 0. Plain
        # steps from an interior point with s, z ~1e-5 beside a multiplier of 1e-7 only halve
        # both each step (a near-double root) and left the pair open after 9 steps: a
        # halfspace projection 1e-7 outside its plane was 1.3e-7 off, its gradient 0.23 off
        # with a warning, where the semismooth steps find the active set in two.
        open_ = ~settled(*out[:3])
        if bool(open_.any()):
            floor = _kink_floor(layout, args[6], args[7])  # (the start's size: a step moves it little)
            alt = newton_polish(*args, settled=settled, decide=lambda s, z: _by_sign(s, z, floor))
            # (within _SEMISMOOTH_SLACK of the plain run's residual or rounding: plain steps that
            # halve a pair's members end a few ulps lower with the pair open, on its wrong side
            # where its multiplier is below √μ: 2.6e-15 beside the semismooth 1.0e-14 at 3λx² of a
            # 3-norm ball at x = 3e-7, whose dx/da read 1.0 for 0.99999937)
            fine = alt[3] <= _SEMISMOOTH_SLACK * out[3].clamp_min(rounding_level(out[3]))
            there, alt = _at_kink(layout, alt, settled)
            out = _keep(open_ & there & fine, alt, out)
        # Where the estimate's step fell short on the active rows (``tight``) and these steps
        # stopped above rounding, more from the best point with those rows regularised at
        # rounding level (:func:`.polish.polish`'s ``tight``): nearly dependent active rows,
        # along which δ damped every step. (Only there: an MPC's elements at 2e-14 took
        # them, 700 ms, for nothing.)
        j = torch.nonzero(tight & (out[3] > rounding_level(out[3]))).squeeze(1) if tight is not None else None
        if j is not None and j.numel():
            sel = lambda v: v.index_select(0, j)  # noqa: E731
            part = tuple(sel(v) for v in out)
            alt = newton_polish(*(sel(v) for v in args[:4]), layout, *part[:3], lambda *v: residual_fn(*v, idx[j]),
                                steps, settled=settled, decide=decided, tight=True)
            alt = _keep(alt[3] < part[3], alt[:4] + (alt[4] | part[4],), part)
            out = tuple(v.index_copy(0, j, a) for v, a in zip(out, alt))
    took = out[4]
    out = out[:4] + (took | pick(polished),)
    merged = (full.index_copy(0, idx, part) for full, part in zip((xs, ss, zs, residual, polished), out))
    return (*merged, took)


def finish(d, systems, layout: ConeLayout, xs, ss, zs, live, residual_fn, polish: str,
           polish_steps: int, refine: int, tol_error: float, error_cols, error_duals, natural: bool = False):
    """Polish and certify the normalised solutions ``(xs, ss, zs)`` of the equilibrated data ``d``.

    Args:
        systems: the KKT systems of ``d`` (:class:`~.kkt.KKTFactory` or
            :class:`~.nullspace.ReducedSystems`).
        live: elements worth polishing (not certified infeasible).
        residual_fn: ``(x, s, z[, idx]) -> (B,)`` relative KKT residual.
        polish: ``"auto"``, ``"always"`` or ``"never"`` (see :func:`~.interior_point.solve_cone_batch`).

    Returns:
        ``(xs, ss, zs, residual, kkt, error)``: the polished points, their residual, the
        KKT system factorised at them and the estimated relative error.
    """
    residual = residual_fn(xs, ss, zs)
    polished = torch.zeros_like(live)
    live = live & torch.isfinite(residual)
    if polish_steps and polish == "auto" and not layout.soc:
        # LPs and QPs: one Newton step through the structured factorisation (errors of
        # near-degenerate elements drop from ~1e-7 to rounding; measured on sparsemax).
        xs, ss, zs, residual, polished = polish_nonnegative(
            systems, d.q, d.b, layout, xs, ss, zs, residual_fn, live, residual, refine)
    elif polish_steps and polish != "never":
        # Second-order cones (errors ~√μ there) or "always": LU Newton steps.
        idx = torch.nonzero(live).squeeze(1)  # one more host round-trip, after the loop
        if idx.numel():
            xs, ss, zs, residual, polished, _ = _polish_subset(d, layout, xs, ss, zs, residual, polished,
                                                               idx, residual_fn, polish_steps)
    # (the elements the LU polish below leaves as they are: refined along the estimate's step)
    cap = min(POLISH_ERROR, tol_error)
    xs, ss, zs, residual, kkt, error, damped = refined_estimate(
        systems, d, layout, (xs, ss, zs, residual), polished, live, residual_fn, refine, error_cols, error_duals, cap)
    if polish_steps and polish != "never":
        # Elements still above POLISH_ERROR, with a complementary pair not yet decided, or
        # whose estimate understates Newton's step (damped: those steps end tight on the
        # active rows) get twice polish_steps LU Newton steps (on those only: quadratic
        # convergence from an undecided pair of ratio ~1 needs about five), then a fresh
        # estimate; what remains above tol_error is left to the caller's fallback. (Still
        # damped then, as it stays where the outputs' split along the direction is not
        # determined, α-entmax's cone form on a tie, it is what .uniqueness warns about.)
        rough = ~(error <= min(POLISH_ERROR, tol_error)) | damped
        idx = torch.nonzero(live & rough | (live & (undecided(layout, ss, zs) > RESOLVED))).squeeze(1)
        if idx.numel():
            xs, ss, zs, residual, polished, took = _polish_subset(d, layout, xs, ss, zs, residual, polished,
                                                                  idx, residual_fn, 2 * polish_steps, True,
                                                                  damped.index_select(0, idx), natural)
            if bool(took.any()):
                # Estimated again on the elements that moved only: a full-batch factorisation cost
                # a third of this function at batch 1024 (n = 50 QP), for 16 elements (and one that
                # did not move keeps its estimate, as alone).
                idx = idx[took]
                pick = lambda v: v.index_select(0, idx)  # noqa: E731
                sub = d.select(idx)
                *moved, part, part_error, part_damped = refined_estimate(
                    systems.select(idx, sub), sub, layout, tuple(pick(v) for v in (xs, ss, zs, residual)),
                    pick(polished), torch.ones_like(took[took]), lambda *v: residual_fn(*v, idx), refine, error_cols,
                    error_duals, cap)
                xs, ss, zs, residual = (v.index_copy(0, idx, w) for v, w in zip((xs, ss, zs, residual), moved))
                kkt, error = PatchedKKT(kkt, idx, part), error.index_copy(0, idx, part_error)
                damped = damped.index_copy(0, idx, part_damped)
    # A damped estimate is no estimate (a point 3e-7 off read 8e-8; polished and still
    # damped, points 2e-8 to 3.5e-8 off read 1e-10 to 5e-10 at tol_error = 1e-9).
    error = torch.where(damped, torch.inf, error)
    return xs, ss, zs, residual, kkt, error


# The derivative linearises complementarity with H_i = s_i / z_i on a nonnegative row
# and needs its limit at the solution: 0 (active) or ∞ (inactive). The interior point
# leaves the pair of a weakly active constraint (a multiplier of 1e-6) undecided, s_i ≈
# z_i, which blends the two limits: gradient errors of 3e-2 on the OptNet QP with the
# solution within 5e-7. Elements with a pair of ratio min/max > RESOLVED are polished
# by LU Newton steps; then a pair of ratio < DECIDED is decided (its smaller member
# taken as 0, lifted like a polished point), and one above DECIDED, with both members
# near 0, is a failure of strict complementarity: no derivative exists there.
RESOLVED = 1e-6
DECIDED = 1e-2
# Estimated error above which a solution gets the LU polish, though below tol_error: one
# structured step leaves most elements at ~1e-15, but sparsemax at an offset of 3e3 (a
# multiplier of 3e3 beside a solution of 1) kept 4 of 16 at 1.2e-7, estimated 7e-8; at
# 1e-10 the MPC's element estimated 9e-9 was polished too, for +38 % of its time.
POLISH_ERROR = 1e-8
# How much above the plain steps' residual (or rounding) a semismooth run may end and still be
# kept where the plain steps left a pair open (_polish_subset).
_SEMISMOOTH_SLACK = 4.0


def _ratio(a: torch.Tensor, b: torch.Tensor, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    a, b = a.clamp_min(0), b.clamp_min(0)
    a, b = torch.where((a <= floor) & (b > floor), 0.0, a), torch.where((b <= floor) & (a > floor), 0.0, b)
    hi = torch.maximum(a, b)
    return torch.minimum(a, b) / torch.where(hi > 0, hi, 1.0)


def decided(s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(active, inactive)`` masks of complementary pairs ``(s, z)`` (same shapes): the
    limit scaling H = s/z is 0 where ``s < DECIDED z``, ∞ where ``z < DECIDED s``."""
    s, z = s.clamp_min(0), z.clamp_min(0)
    return s < DECIDED * z, z < DECIDED * s


def undecided(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, rounding: bool = False) -> torch.Tensor:
    """(B,) largest min/max ratio of a complementary pair (0: all decided): the nonnegative
    rows' (s_i, z_i) and, on each second-order cone, the two Jordan-frame pairs (a_k, b_k)
    of :func:`soc_frame` (strict complementarity there: s + z in the cone's interior, i.e.
    a_k + b_k > 0; at the tip with a multiplier on the boundary, e.g. a group
    soft-threshold at ‖v‖ = λ, a pair has ratio ~1: one-sided derivatives 0 and 0.64
    were blended into 0.007 without a warning). With ``rounding``, a frame coefficient at
    rounding level of its cone (:func:`~.polish.rounding_level` of Σ|a_k| + |b_k|, to which
    a_k = s₀ ± s₁ᵀu is exact) beside one above it counts as 0: the polish's test, which
    a₂ ≈ 4e-16 beside s₀ ≈ 2 failed against a multiplier of 3e-10 (a ball's 1e-10
    outside). (Both there: a kink, as it comes, see :func:`_at_kink`.)"""
    z0, k = layout.zero, layout.nonneg
    out = s.new_zeros(s.shape[0])
    if k:
        out = _ratio(s[:, z0:z0 + k], z[:, z0:z0 + k]).amax(1)
    if layout.soc:
        a1, a2, b1, b2, _ = soc_frame(layout, s[:, z0 + k:], z[:, z0 + k:])
        floor = rounding_level(s) * (a1.abs() + a2.abs() + b1.abs() + b2.abs()) if rounding else 0.0
        out = torch.maximum(out, torch.maximum(_ratio(a1, b1, floor), _ratio(a2, b2, floor)).amax(1))
    return out


def undecided_reach(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
                    kinks: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) largest component of ``w`` along a direction whose limit scaling an undecided
    pair leaves open (0 where there is none): ``s, z`` the cone rows of a solution,
    ``w`` ``(B, mc)`` those of the dual part of a derivative system's solution.

    The limit systems of the two sides (H = 0 or ∞ along such a direction) differ from
    the factorised one only there, and by ΔH·w (K' u = K u − ΔH w; on the side where H
    is ∞ the row reads w = 0 instead): where ``w`` has no component there, the solution
    solves both, and the derivative is the same whichever side the pair takes. (An
    auxiliary cone at its tip, as CVXPY's second-order-cone form of p^1.5 at p = 0,
    leaves a pair undecided that the outputs do not see.) The directions: a nonnegative
    row; on a second-order cone with one undecided Jordan-frame pair and the other
    decided active, that pair's c_k (H's part on the tangent space tends to 0 on both
    sides); on any other cone with an undecided pair, the whole cone. ``kinks`` ``(B, nonneg)``:
    nonnegative rows open whatever their ratio (:func:`at_kink`).
    """
    k = layout.nonneg
    open_ = (_ratio(s[:, :k], z[:, :k]) > DECIDED) | (False if kinks is None else kinks)
    out = torch.where(open_, w[:, :k].abs(), 0.0).amax(1) if k else w.new_zeros(w.shape[0])
    if layout.soc:
        a1, a2, b1, b2, u = soc_frame(layout, s[:, k:], z[:, k:])
        open1, open2 = _ratio(a1, b1) > DECIDED, _ratio(a2, b2) > DECIDED
        active1, active2 = decided(a1, b1)[0], decided(a2, b2)[0]
        ws = w[:, k:]
        head, along = ws[:, layout.index(w.device).heads], layout._seg(ws * u)
        # ⟨w, c_k⟩ with c_{1,2} = (1, ±u)/√2 normalised
        c1, c2 = (head + along).abs() / math.sqrt(2.0), (head - along).abs() / math.sqrt(2.0)
        whole = torch.sqrt(layout._seg(ws * ws))
        cone = torch.where(open1 & ~open2 & active2, c1,
                           torch.where(open2 & ~open1 & active1, c2, torch.where(open1 | open2, whole, 0.0)))
        out = torch.maximum(out, cone.amax(1))
    return out
