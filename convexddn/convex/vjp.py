"""The batched backend's derivative: implicit differentiation of a batched cone solve.

**Backward.** At the solution :math:`(x, z)` with slack :math:`s`, the interior point
satisfies :math:`Px + A^T z + q = 0`, :math:`Ax + s = b` and, to first order along the
central path, :math:`ds = -H\\,dz` with :math:`H = W^T W` the Nesterov–Todd scaling
(:math:`H = 0` on equality rows; on a nonnegative row :math:`H = s/z`, which tends to
0 on active and ∞ on inactive constraints). Differentiating,

.. math::

    K \\begin{bmatrix} dx \\\\ dz \\end{bmatrix} = -\\begin{bmatrix} dP\\,x + dq + dA^T z
    \\\\ dA\\,x - db \\end{bmatrix}, \\qquad K = \\begin{bmatrix} P & A^T \\\\ A & -H
    \\end{bmatrix},

the differentiated KKT system with complementarity of OptNet (Amos & Kolter, 2017),
written for symmetric cones (on a second-order cone :math:`H` takes its limit on the
tangent space of the boundary, see :class:`~.limit_scaling.LimitScaling`). With
:math:`K u = (\\bar x, \\bar z)` for the cotangents, :math:`\\bar q = -u_x`,
:math:`\\bar b = u_z`, :math:`\\bar P = -\\tfrac12(u_x x^T + x u_x^T)`,
:math:`\\bar A = -(z u_x^T + u_z x^T)`. :math:`K` is the matrix the forward factors at
every iteration; it factors it once more at the solution (its Newton step there is the
error estimate that certifies each element), and the backward reuses that
factorisation: one batched solve, no new factorisation. We chose this over the residual-map
derivative (Agrawal et al., 2019) because it keeps the quadratic term, stays symmetric
(Cholesky instead of LU of an :math:`(n+m+1)`-square matrix) and reuses the solver.
**Forward mode** (:func:`cone_jvp`) solves the same system for the data's tangents with
the same factorisation. Where no derivative exists the backward warns (``GradientWarning``) and names the
elements: a complementary pair undecided (a nonnegative row, or a second-order cone's
Jordan-frame pair, :func:`~.certify.undecided`) along whose open direction the derivative
has a component (:func:`~.certify.undecided_reach`; elsewhere both sides agree; a kink's row taken
inactive: its other side solved, :func:`~.kink_reach.kinks_reached`), a non-unique solution (a derivative
system that amplifies the cotangent like 1/δ, or, where rounding caps that, a cotangent
or requested output reaching a null direction of the limit system, :mod:`.uniqueness`;
an amplification beyond :data:`AMPLIFICATION` where that test finds the solution unique is
an ill-conditioned derivative, returned where a dense solve certifies it, :func:`_certify`),
or a derivative along a fixed direction of the parameters requiring grad (one unrefined
probe solve) that blows up, or damped by an undecided pair's lift: there the rows holding are tested
for being dependent and moved apart (:func:`~.uniqueness.limit_inconsistency`: a
degenerate vertex, an equality combining others with its b moved alone, or a zero
row with b = 0, :func:`~.zero_rows.zero_rows`, moved at all; constant
rows do not move: a fixed polytope's vertex stays smooth; on second-order cones the
blow-up decides), and the probe for reaching a null direction of the limit system (the
parameters tilt a face of optima, or weigh an epigraph variable left free: a
regulariser's weight at 0), where the loss may be unique and its derivative still not.
"""
from __future__ import annotations

import math

import torch

from .._generic import generic_vector
from .dense_kkt import dense_limit_solve, dense_limit_solve_error
from .interior_point import SOLVED, ConeSolution
from .kink_reach import SIDE_RTOL, kinks_reached, read_by, read_cols
from .kkt import bmv, row_inf
from .limit_scaling import inactive_zero
from .uniqueness import INCONSISTENT_AMPLIFICATION, INCONSISTENT_SURE, limit_tests_at
from .vjp_gates import (AMPLIFICATION, BACKWARD_ACCEPT, BACKWARD_RTOL, CERTIFIED_ERROR, GRADIENT_ACCURACY, LIMIT_GATE,
                        LOOSE, PROBE_GAIN, PROBE_GATE, backward_accept)
from .zero_rows import held_zero_rows, moved_zero_rows

__all__ = ["AMPLIFICATION", "BACKWARD_ACCEPT", "BACKWARD_RTOL", "CERTIFIED_ERROR", "GRADIENT_ACCURACY", "LIMIT_GATE",
           "PROBE_GAIN", "PROBE_GATE", "SIDE_RTOL", "cone_jvp", "cone_vjp"]


def cone_vjp(sol: ConeSolution, layout, gx: torch.Tensor, gz: torch.Tensor, refine: int = 3,
             tangent: tuple[torch.Tensor, torch.Tensor] | None = None, cols: torch.Tensor | None = None):
    """Vector–Jacobian product of a batched cone solve; see the module docstring.

    Args:
        sol: a solution from ``solve_cone_batch(..., keep_state=True)``.
        gx, gz: cotangents of ``sol.x`` ``(B, n)`` and ``sol.z`` ``(B, m)``.
        tangent: ``(dP, dq, dA, db, secant)``, how a fixed, generic direction of the
            parameters moves the data (``dP``, ``dq`` None: ``secant(idx)`` gives them for
            the elements ``idx``, where a generic vector finds the system near singular); where the
            derivative along it grows by more than :data:`PROBE_GATE` and the limit tests
            find it moving dependent rows apart or reaching a null direction (or, with
            second-order cones, by more than :data:`PROBE_GAIN`), none exists.
        cols: the requested outputs' columns of ``x`` (all by default), whose uniqueness
            the limit test checks (the solve's ``error_cols``).

    Returns:
        ``(gP, gq, gA, gb, not_differentiable, nonunique, unsolved, zero_rows, error)``: the gradients, exactly zero
        for elements that are not solved, whose cotangent is zero, whose final KKT matrix
        could not be factorised or whose solution is not unique; ``(B,)`` masks of the
        solved elements whose solution is not unique along the cotangent (``nonunique``:
        the derivative system amplifies it by more than :data:`AMPLIFICATION` and no dense
        solve certifies the answer (:func:`_certify`), or it
        reaches a null direction of the limit system, :func:`~.uniqueness.limit_nonunique`,
        or the system could not be solved, not even densely: :data:`BACKWARD_ACCEPT`)
        and, including those, whose derivative does not exist (``not_differentiable``:
        also a complementary pair undecided, see :data:`~.certify.RESOLVED`, that the
        derivative reaches, see :data:`SIDE_RTOL`, requested
        outputs that are not unique, or a degenerate vertex, see ``tangent``); ``unsolved``:
        those of ``nonunique`` whose system could not be solved and that no other test flags;
        ``zero_rows``: those of ``not_differentiable`` with a zero row that holds, which the
        ``tangent`` moves (:func:`~.zero_rows.moved_zero_rows`: no derivative in its data);
        ``error``: ``(B,)`` the estimated relative error of the gradients kept from a dense solve
        (:func:`_certify`; 0 elsewhere; None where none was solved), to be warned about above
        :data:`GRADIENT_ACCURACY`.
    """
    d, kkt = sol.scaled, sol.kkt  # factorised at the solution by the forward
    rc = d.c.sqrt()[:, None]

    def equilibrated(vx, vz):  # right-hand sides in the factorised system's units
        return (rc * d.D * vx).unsqueeze(-1), (d.E * vz / rc).unsqueeze(-1)

    rx, rz_all = equilibrated(gx, gz)
    rz = inactive_zero(kkt, layout, rz_all)  # (the cotangent of a multiplier that stays 0)
    ux, uz, unsolved = _solve_derivative(sol, layout, kkt, rx, rz, refine)
    loose = _loose(sol, kkt, unsolved, rx)
    vertex = zero = torch.zeros_like(sol.status, dtype=torch.bool)
    gain = px = secant = None
    if tangent is not None:
        # The derivative of (x, z) along the tangent: K (dx, dz) = (-dP x - dq - dAᵀz,
        # db - dA x). Unrefined: only a blow-up by ~1/δ matters.
        dP, dq, dA, db, secant = tangent
        wx = -bmv(dA.mT, sol.z)
        if dP is not None:
            wx = wx - _objective_part(dP, dq, sol.x)
        px, pz = equilibrated(wx, db - bmv(dA, sol.x))
        size = torch.maximum(row_inf(px), row_inf(pz))
        du, dz, _ = kkt.solve(px, pz, 0)
        gain = torch.maximum(row_inf(du), row_inf(dz)) / size.clamp_min(torch.finfo(size.dtype).tiny)
        gain = torch.where(size > 0, gain, 0.0)
        vertex, raw = (gain > PROBE_GAIN) & bool(layout.soc), gain
    # How much the (equilibrated) derivative system amplifies the cotangent: O(1)-O(10)
    # where the solution is unique and differentiable, ~1/δ (δ the 1e-12 lift of
    # the polished slacks) along a direction of non-uniqueness (measured: 2e9 on an LP
    # with two equal costs, at most 4 on the OptNet QPs).
    amplification = (torch.maximum(row_inf(ux), row_inf(uz))
                     / torch.maximum(row_inf(rx), row_inf(rz)).clamp_min(torch.finfo(rx.dtype).tiny))
    ok = ((sol.status == SOLVED) & ~kkt.failed & ((gx != 0).any(1) | (gz != 0).any(1)))[:, None]
    # A non-unique solution's "gradient" is the cotangent amplified by ~1/δ (2e9 on an LP
    # with two equal costs): no derivative exists; it is replaced by zero. Rounding caps
    # that blow-up wherever an active row is in the factorised system (2.5e3 on an LP with
    # an edge of optima): where it passes LIMIT_GATE, the limit system's own test
    # (:mod:`.uniqueness`) decides (on those elements only: on all, +5 % on the n = 50 QP).
    outputs, reached = _limit_test(sol, layout, ok[:, 0], amplification, rx.squeeze(-1), cols)
    steep = torch.zeros_like(vertex)
    if gain is not None:
        # The parameters reach a null direction of the limit system (a face of optima they
        # tilt, an epigraph variable free where they weigh it: min ‖x‖₁ s.t. aᵀx = b at
        # a = (1, 1, 1), a regulariser's weight at 0): the loss may be unique while its
        # derivative is not (one-sided derivatives -1 and 0; 0 returned where the right
        # one is 0.6), and rounding caps the probe's blow-up there as the cotangent's.
        if secant is not None:
            # P and q move nonlinearly with the parameters (eliminated variables): their
            # secant costs a fill of the data (11 % of sparsemax's forward at batch 1024),
            # so only where a generic vector shows the system near singular.
            gen = generic_vector(px.shape[1], px.dtype, px.device)
            gu, gz_, _ = kkt.solve(gen.expand(px.shape[0], -1).unsqueeze(-1), torch.zeros_like(pz), 0)
            near = ok[:, 0] & (torch.maximum(row_inf(gu), row_inf(gz_)) / row_inf(gen[None]) > PROBE_GATE)
            idx = torch.nonzero(near).squeeze(1)
            gain = torch.where(near, math.inf, 0.0)
            if idx.numel():
                dP, dq = secant(idx)
                part = torch.zeros_like(sol.x).index_copy(0, idx, -_objective_part(dP, dq, sol.x.index_select(0, idx)))
                px = px + equilibrated(part, torch.zeros_like(sol.z))[0]
        vertex = vertex | _limit_test(sol, layout, ok[:, 0], gain / PROBE_GATE * LIMIT_GATE, px.squeeze(-1),
                                      cols)[1]
        # Dependent rows that hold, moved apart: where the probe blew up (pz needs no secant),
        # or the cotangent's solve missed its target (rows 1e-8 apart: the probe is damped).
        # A zero row that holds, moved (its 1/δ blow-up is the regularisation's, not a test).
        stuck = unsolved | ~(kkt.solve_residual <= BACKWARD_RTOL)
        zero = ok[:, 0] & moved_zero_rows(sol, layout, pz.squeeze(-1))
        # (the probe's du solves the rows that hold for pz up to the lifted slacks: where that
        # shows them consistent, no factorisation of the rows is needed, see limit_inconsistency)
        # Also where a pair is undecided: its lift (H ~ 1) keeps the probe from blowing up at a
        # degenerate vertex (a bound released there at its kink, see certify.at_kink).
        apart = limit_tests_at(sol, layout, ok[:, 0] & ((raw > PROBE_GATE) | stuck | zero | sol.undecided), px,
                               cols, pz.squeeze(-1), du.squeeze(-1))[0]
        # (between INCONSISTENT_AMPLIFICATION and INCONSISTENT_SURE: rows nearly dependent,
        # whose derivative is as large; it exists, and counts where the cotangent's is certified)
        vertex = vertex | ~(apart <= INCONSISTENT_SURE)
        zero = zero & ~(apart <= INCONSISTENT_SURE)
        steep = ~(apart <= INCONSISTENT_AMPLIFICATION) & ~vertex
    # Beyond AMPLIFICATION, where the limit test finds the solution unique, an ill-conditioned
    # but unique solution (u^1.005 at u = 6e3: du/dq = 1.2e6): its answer kept where accurate.
    big = ok[:, 0] & (amplification > AMPLIFICATION)
    big = big | loose  # (an answer whose residual does not bound its error: certified the same way)
    ux, uz, certified, error = _certify(sol, layout, ok[:, 0] & ((big & ~reached) | steep) & ~unsolved, rx, rz,
                                        ux, uz)
    ux, uz = _confirm(sol, layout, kkt, ok[:, 0] & ~(big | reached | steep | unsolved | outputs), rx, rz, ux, uz)
    uz = inactive_zero(kkt, layout, uz)
    # (not certified: unique, by the limit test or the rows' own rank, but not solved accurately:
    # rows 1e-7 apart in a QP, multipliers ~1/d², 5e-2 off; zeroed and warned as such)
    big, steep = big & ~certified, steep & ~certified
    uncertain = (big & ~reached & ~unsolved & (rx.dtype == torch.float64)) | steep
    kinks = kinks_reached(sol, layout, ok[:, 0], ux.squeeze(-1), uz.squeeze(-1),
                          None if tangent is None else read_by(tangent, sol.x.shape[1], sol.z.shape[1]),
                          torch.maximum(row_inf(rx), row_inf(rz)), (rx.squeeze(-1), rz_all.squeeze(-1)))
    ux = rc * d.D * ux.squeeze(-1)  # K⁻¹ = V⁻¹ K̃⁻¹ V⁻¹ with V⁻¹ = diag(√c D, E/√c)
    uz = d.E * uz.squeeze(-1) / rc
    # (A solved element's KKT matrix was factorised: its failure would have made the
    # error estimate infinite and the element unsolved.)
    nonunique = ok[:, 0] & (big | reached | unsolved | steep)
    not_differentiable = ok[:, 0] & (kinks | nonunique | vertex | outputs)
    ok = ok & ~nonunique[:, None]
    ux = torch.where(ok, ux, 0.0)
    uz = torch.where(ok, uz, 0.0)
    x, z = torch.where(ok, sol.x, 0.0), torch.where(ok, sol.z, 0.0)
    # Sums of two outer products as one batched product each (one pass over the output
    # instead of four): gP = -½ [u_x x] [x u_x]ᵀ, gA = -[z u_z] [u_x x]ᵀ.
    left = torch.stack([ux, x], -1)
    gP = torch.bmm(left, torch.stack([x, ux], 1)).mul_(-0.5)
    gA = torch.bmm(torch.stack([z, uz], -1), left.mT).neg_()
    unsolved = nonunique & (unsolved | uncertain) & ~(reached | outputs | vertex | kinks | (big & ~uncertain))
    error = None if error is None else torch.where(ok[:, 0], error, 0.0)  # (of the gradients kept)
    return gP, -ux, gA, uz, not_differentiable, nonunique, unsolved, zero & not_differentiable, error


def _objective_part(dP: torch.Tensor, dq: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sym(dP) x + dq: how the stationarity row moves with the objective's data."""
    return 0.5 * (bmv(dP, x) + bmv(dP.mT, x)) + dq


def _limit_test(sol: ConeSolution, layout, ok: torch.Tensor, amplification: torch.Tensor, rx: torch.Tensor,
                cols: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.uniqueness.limit_nonunique`'s ``(outputs, reached)`` on the elements ``ok``
    whose amplification passes :data:`LIMIT_GATE` (False elsewhere; on all, +5 % on the
    n = 50 QP); ``rx`` ``(B, n)`` the equilibrated right-hand side's x part."""
    return limit_tests_at(sol, layout, ok & (amplification > LIMIT_GATE), rx, cols)


def cone_jvp(sol: ConeSolution, layout, dP, dq, dA, db, refine: int = 3, cols: torch.Tensor | None = None):
    """Jacobian–vector product of a batched cone solve: ``(dx, dz)`` from
    :math:`K (dx, dz) = -(dP\\,x + dq + dA^T z,\\ dA\\,x - db)` (the module docstring's
    system, solved with the factorisation the forward kept; ``None`` for a tangent that
    is zero).

    Returns:
        ``(dx, dz, flagged, zeroed, unsolved, zero_rows, error)``: the tangents, exactly zero for elements that are
        not solved and where no derivative exists (``zeroed``): the system amplifies the
        tangent's right-hand side by more than :data:`AMPLIFICATION` uncertified (:func:`_certify`), or the requested
        outputs (``cols``) or that right-hand side reach a null direction of the limit
        system (:func:`~.uniqueness.limit_nonunique`: a
        solution that is not unique), or the system could not be solved, not even densely
        (:data:`BACKWARD_ACCEPT`); ``flagged`` also marks solved elements with an
        undecided complementary pair that the tangent reaches or a gain above :data:`PROBE_GAIN` (a degenerate
        vertex moved apart: a one-sided derivative); ``unsolved`` those ``zeroed`` whose
        system could not be solved and that nothing else flags; ``zero_rows`` the solved elements
        with a zero row that holds, which the tangent moves (:func:`~.zero_rows.held_zero_rows`):
        that part of the tangent is dropped (no derivative in the row's data exists), the rest kept;
        ``error`` as :func:`cone_vjp`'s.
    """
    d, kkt, x, z = sol.scaled, sol.kkt, sol.x, sol.z
    rx, rz = torch.zeros_like(x), torch.zeros_like(z)
    # A zero row that holds, moved: no derivative in its data exists; that part of the tangent is
    # dropped and the rest kept, as the backward keeps the gradient of what has one (it zeroed the
    # element's whole tangent: x's and the other rows' parts, which exist, included).
    held = held_zero_rows(sol, layout)
    moving = torch.zeros_like(z)  # (how the tangent moves b - Ax, the held zero rows included)
    if dP is not None:
        rx = rx - bmv(dP, x)
    if dq is not None:
        rx = rx - dq
    if dA is not None:
        moving = moving - bmv(dA, x)
        dA = torch.where(held.unsqueeze(-1), 0.0, dA)
        rx, rz = rx - bmv(dA.mT, z), rz - bmv(dA, x)
    if db is not None:
        moving = moving + db
        rz = rz + torch.where(held, 0.0, db)
    moved = (held & (moving != 0)).any(1)
    rc = d.c.sqrt()[:, None]
    ex, ez = (rc * d.D * rx).unsqueeze(-1), (d.E * rz / rc).unsqueeze(-1)  # V⁻¹ r, as cone_vjp
    ez_all, ez = ez, inactive_zero(kkt, layout, ez)  # (an inactive row's data moves nothing)
    ux, uz, unsolved = _solve_derivative(sol, layout, kkt, ex, ez, refine)
    loose = _loose(sol, kkt, unsolved, ex)
    amplification = (torch.maximum(row_inf(ux), row_inf(uz))
                     / torch.maximum(row_inf(ex), row_inf(ez)).clamp_min(torch.finfo(rx.dtype).tiny))
    ok = (sol.status == SOLVED) & ~kkt.failed & ((rx != 0).any(1) | (rz != 0).any(1))
    # Rounding caps a non-unique solution's blow-up (2.5e3 on an LP with an edge of
    # optima), and a tangent may not excite it at all: the limit system decides for every
    # solved element (the backward gates it by the cotangent's gain, its hot path).
    outputs, reached = _limit_test(sol, layout, ok, torch.full_like(amplification, math.inf), ex.squeeze(-1), cols)
    big = ok & ((amplification > AMPLIFICATION) | loose)
    ux, uz, certified, error = _certify(sol, layout, big & ~reached & ~unsolved, ex, ez, ux, uz)  # (as the backward)
    ux, uz = _confirm(sol, layout, kkt, ok & ~(big | reached | unsolved | outputs), ex, ez, ux, uz)
    uz = inactive_zero(kkt, layout, uz)
    big = big & ~certified
    uncertain = big & ~reached & ~unsolved & (rx.dtype == torch.float64)
    zeroed = ok & (big | outputs | reached | unsolved)
    keep = (ok & ~zeroed)[:, None]
    dx = torch.where(keep, rc * d.D * ux.squeeze(-1), 0.0)
    dz = torch.where(keep, d.E * uz.squeeze(-1) / rc, 0.0)
    # The tangent is its own probe: a gain beyond the backward's vertex probe's bound is a
    # degenerate vertex moved apart (a one-sided derivative), warned about but kept.
    kinks = kinks_reached(sol, layout, ok, ux.squeeze(-1), uz.squeeze(-1), read_cols(cols, x.shape[1], z.shape[1]),
                          torch.maximum(row_inf(ex), row_inf(ez)), (ex.squeeze(-1), ez_all.squeeze(-1)))
    # (where a pair is undecided, dependent rows that hold moved apart: the backward's vertex test)
    apart = limit_tests_at(sol, layout, ok & sol.undecided, ex.squeeze(-1), cols, ez.squeeze(-1), ux.squeeze(-1))[0]
    steep = ((amplification > PROBE_GAIN) & ~certified) | ~(apart <= INCONSISTENT_SURE)
    unsolved = zeroed & (unsolved | uncertain) & ~(outputs | reached | kinks | (steep & ~uncertain))
    flagged = zeroed | (ok & (kinks | steep | moved))
    error = None if error is None else torch.where(keep[:, 0], error, 0.0)  # (of the tangents kept)
    return dx, dz, flagged, zeroed, unsolved, flagged & moved, error


def _certify(sol, layout, test: torch.Tensor, rx: torch.Tensor, rz: torch.Tensor, ux: torch.Tensor, uz: torch.Tensor):
    """``(ux, uz, certified, error)``: the elements ``test`` ``(B,)`` (amplified beyond
    :data:`AMPLIFICATION`, unique by the limit system's test) solved densely
    (:func:`~.dense_kkt.dense_limit_solve_error`); ``certified`` where that answer's estimated
    forward error is below :data:`CERTIFIED_ERROR` (the estimate holds the residual), whose answers
    replace ``ux (B, n, 1), uz (B, m, 1)`` (all in the equilibrated units of ``rx, rz``); ``error``
    ``(B,)`` their estimated relative error (0 elsewhere, None where none is tested; above
    :data:`GRADIENT_ACCURACY` the caller warns). The amplification is the derivative's size, not an
    error: equality rows 1e-7 apart, unique vertex, amplify by 2.2e7 and come out 1e-8 exact; in a QP
    (multipliers ~1/d²) by 1.3e7, 5e-2 off, not certified. float64 only, as the limit test."""
    idx = torch.nonzero(test).squeeze(1) if rx.dtype == torch.float64 else test.new_zeros(0, dtype=torch.long)
    return _dense_where(sol, layout, test, idx, rx, rz, ux, uz, True)


def _confirm(sol, layout, kkt, test: torch.Tensor, rx, rz, ux, uz) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ux, uz)`` with the answers of the elements ``test`` ``(B,)`` whose refinement's own corrections
    estimate an error above :data:`GRADIENT_ACCURACY` (``kkt.solve_estimate``, :func:`~.stall.refinement_error`)
    replaced by a dense solve's where that one's estimated error is below it; elsewhere unchanged, and no
    element flagged: those corrections also wander along directions the system leaves free (the auxiliary
    cones of entmax's CVXPY form, whose outputs' derivatives are exact), which no cheap test tells from an
    ill-conditioned unique answer. A residual at its target does not bound the error: relative to the
    right-hand side it may be κ times smaller (u⁴ − q u at u* = 10: residual 4e-10, gradient 4e-7 off; u^2.5
    at u* = 100 3.8e-7; an element of the bench's MPC 4-8e-7 off central differences; now 3e-12, 1e-10 and
    5e-12). float64 only, as the certification."""
    if rx.dtype != torch.float64:
        return ux, uz
    test = test & (kkt.solve_estimate > GRADIENT_ACCURACY)
    idx = torch.nonzero(test).squeeze(1)
    return _dense_where(sol, layout, test, idx, rx, rz, ux, uz, True, GRADIENT_ACCURACY)[:2]


def _loose(sol, kkt, unsolved: torch.Tensor, rx: torch.Tensor) -> torch.Tensor:
    """(B,) the solved float64 elements whose factorised answer is kept with its solve stopped above the target
    (:data:`BACKWARD_RTOL`), beyond :data:`LOOSE` (below :data:`BACKWARD_ACCEPT`; above, solved densely): the
    residual, relative to the right-hand side, does not bound the answer's error. K's smallest singular value may be
    far below δ (the regularised factors' refinement gains nothing along its vector, and stalls with no correction
    to see, :mod:`.stall`): ``argmin_{u≥0} u³ − q u`` at u* = 1e3, K's condition 2e21, stopped at 5e-7 with an answer
    2.5e6 times too small (its component along that vector missing), no amplification to see (2e3). Certified
    densely, as the amplified ones (:func:`_certify`); below LOOSE, see :func:`_confirm`. float64 only, as the
    certification (float32 solves stop at ~1e-5)."""
    res = kkt.solve_residual
    return ((sol.status == SOLVED) & ~kkt.failed & ~unsolved & (res > LOOSE) & (res <= backward_accept(rx))
            & (rx.dtype == torch.float64))



def _solve_derivative(sol, layout, kkt, rx, rz, refine: int):
    """``(ux, uz, unsolved)``: the derivative system solved for the equilibrated ``rx (B, n, 1),
    rz (B, m, 1)``, refined to :data:`BACKWARD_RTOL`, densely where that stays above
    :func:`~.vjp_gates.backward_accept` or stalled (:mod:`.stall`: ``kkt.solve_error``, the estimated
    error). A dense answer that moved by less than :data:`RECOVERED` of that estimate
    stalled too (its refinement is from a regularised matrix as well) and is unsolved."""
    ux0, uz0, _ = kkt.solve(rx, rz, refine, until=BACKWARD_RTOL)
    ux, uz, unsolved = _densely_where_unsolved(sol, layout, kkt, rx, rz, ux0, uz0)
    left = kkt.solve_error
    if left is not None:
        short = (left > 0) & ~(row_inf(ux - ux0, uz - uz0) >= RECOVERED * left)  # (∞, NaN: short)
        unsolved = unsolved | ((sol.status == SOLVED) & ~kkt.failed & short)
    return ux, uz, unsolved


# (rows 3e-5 to 3e-7 apart: the dense solve moved the answer by 1.000 to 1.003 of the estimate)
RECOVERED = 0.1


def _densely_where_unsolved(sol, layout, kkt, rx, rz, ux, uz):
    """``(ux, uz, unsolved)``: the solved elements whose factorised solve stayed above
    :func:`~.vjp_gates.backward_accept` solved again densely (:func:`~.dense_kkt.dense_limit_solve`);
    ``unsolved`` ``(B,)`` marks those still above it. One host sync."""
    unsolved = (sol.status == SOLVED) & ~kkt.failed & ~(kkt.solve_residual <= backward_accept(rx))  # (NaN: unsolved)
    ux, uz, fixed, _ = _dense_where(sol, layout, unsolved, torch.nonzero(unsolved).squeeze(1), rx, rz, ux, uz, False)
    return ux, uz, unsolved & ~fixed


def _dense_where(sol, layout, like: torch.Tensor, idx: torch.Tensor, rx, rz, ux, uz, with_error: bool,
                 accept: float = CERTIFIED_ERROR):
    """``(ux, uz, good, error)``: the elements ``idx`` solved densely (:mod:`.dense_kkt`), their
    answers taking the place of ``ux, uz`` where ``good`` ``(B,)``, like ``like``: with ``with_error``
    the estimated error below ``accept``, else the residual below
    :func:`~.vjp_gates.backward_accept` (NaN: not good); ``error`` ``(B,)`` that estimate where ``good``
    (0 elsewhere; None without ``with_error`` or elements: the backward's usual case, no host read)."""
    good, estimate = torch.zeros_like(like), None
    if idx.numel():
        sub = (sol, layout, idx, rx.index_select(0, idx), rz.index_select(0, idx))
        x, z, res, error = dense_limit_solve_error(*sub) if with_error else (*dense_limit_solve(*sub), None)
        # (with its error estimate, that alone: it holds the residual, and a residual relative to the right-hand
        # side does not shrink where the answer is far larger, beside large entries: u³ at u* = 1e3, 1.1e-6 for
        # an answer 4e-8 off the exact solve, estimated 1e-5)
        ok = res <= backward_accept(rx) if error is None else error <= accept
        keep = ok[:, None, None]
        ux = ux.index_copy(0, idx, torch.where(keep, x, ux.index_select(0, idx)))
        uz = uz.index_copy(0, idx, torch.where(keep, z, uz.index_select(0, idx)))
        good = good.index_copy(0, idx, ok)
        if error is not None:
            estimate = torch.zeros_like(like, dtype=rx.dtype).index_copy(0, idx, torch.where(ok, error, 0.0))
    return ux, uz, good, estimate
