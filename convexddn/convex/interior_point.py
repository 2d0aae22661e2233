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
host synchronisation per iteration tests how many still run. An iteration is
:mod:`.ipm_step`'s pure functions; on CUDA they are captured as a graph (at most two
variants: with and without refinement) and replayed (:mod:`convexddn._step_graphs`; the
batch then stays whole), and the graphs are kept for the next solve of the same shapes.
Elements whose units a huge inactive bound set are solved again without it
(:mod:`.far_rows`); those whose solution came out far below the equilibrated units'
size, again in their own unit. Then
:mod:`.certify` polishes the solutions and estimates their errors; the measures, and the
rays of infeasibility certificates, are checked in the caller's units too.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._step_graphs import StepGraphs, capture_wanted
from .active_set import degenerate_vertex, settle_signs, sign_tolerance
from .certify import DECIDED, at_kink, finish, undecided
from .cone_solution import (DUAL_INFEASIBLE, EXACT_RAY, MAX_ITERATIONS, NUMERICAL, PRIMAL_INFEASIBLE, RUNNING,
                            SOLVED, STATUS_NAMES, ConeSolution)
from .equilibration import Scaled, equilibrate
from .far_rows import relax_far_rows
from .kkt import DENSE, DataOps, KKTFactory, KKTStructure, KKTSystem, constant_part, row_inf
from .limit_scaling import retry_at_limit
from .ipm_step import STATE, STATUS, IterationData, column_mask, step, update
from .measures import DEGENERATE, FLAT, UNVERIFIABLE, Measures, caller_measures, kkt_measures, point_residual
from .nullspace import ReducedSystems, SplitKKT, gather, reduce, unverifiable
from .resolution import unresolved_columns
from .rays import exact_unbounded_ray, verified_rays
from .second_opinion import equilibrated_start
from .symmetric_cones import ConeLayout
from .uniqueness import undetermined

__all__ = ["SOLVED", "STATUS_NAMES", "ConeSolution", "solve_cone_batch", "kkt_measures"]

_COMPACT_MIN, _COMPACT_FRACTION = 4, 0.75
# Keep the whole batch in the loop where no graphs are captured too (the tests set it to
# run the captured path's logic on the CPU).
_WHOLE_BATCH = False
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
_RESCALE_BELOW = 1e-3  # a solution (x, z) below this (equilibrated units) is solved again at its scale


def solve_cone_batch(P: torch.Tensor, q: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                     layout: ConeLayout, *, tol: float = 1e-10, tol_accept: float = 1e-8,
                     tol_error: float = 1e-7, tol_inf: float = 1e-8, max_iter: int = 100, refine: int = 1,
                     equilibrate_passes: int = 3, polish: str = "auto", polish_steps: int = 3,
                     structure: KKTStructure = DENSE, error_cols: torch.Tensor | None = None,
                     error_duals: torch.Tensor | None = None, keep_state: bool = False,
                     start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     prepared: tuple | None = None, decide_pairs: bool = False,
                     per_element_next: bool = False) -> ConeSolution:
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
        refine: iterative-refinement steps per KKT solve, for an element whose measures
            are below 1e-4 (the KKT systems get ill-conditioned; before, none) and whose
            system the regularisation moves (each by its own numbers, as alone).
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
        decide_pairs: iterate past ``tol`` while a complementary pair is undecided in its own
            units (:mod:`.pairs`; for elements the checks failed: a constraint far below the
            program's scale, e.g. a ball of radius 1e-7 around a centre of size 10).
        per_element_next: the caller solves per element what stays unsolved (:func:`~.active_set.settle_signs`).
        prepared: ``(d, reduced)``, these elements' equilibrated data and
            :func:`~.nullspace.reduce`'s answer, where a caller split a batch by the form
            each element takes (internal: each part reuses its rows of the batch's).

    Shape:
        ``P (B, n, n), q (B, n), A (B, m, n), b (B, m)`` ->
        ``x (B, n), s (B, m), z (B, m)``, ``status, iterations, residual, error (B,)``.

    Returns:
        :class:`ConeSolution`; ``status`` codes are :data:`STATUS_NAMES`' keys.
        Never raises for a per-element failure.
    """
    tol = min(tol, tol_accept)
    args = (P, q, A, b, layout)
    P = 0.5 * (P + P.mT)
    B = A.shape[0]
    if prepared is None:
        d = equilibrate(P, q, A, b, layout, equilibrate_passes)
        reduced = None if start is not None else reduce(d, layout, structure)
    else:
        d, reduced = prepared
    if isinstance(reduced, torch.Tensor):
        # The null-space form applies to some elements only: each group is solved apart, in
        # the form it gets alone (one batch in the regularised form moved the others' points
        # by 4e-12 and their iteration counts), from its rows of the equilibrated data (per
        # element: bitwise what it gets alone; each group equilibrated its elements again
        # before). Its QR of A_Eᵀ is its own: torch's batched Q differs in the last bit with
        # the batch (R does not), so only the group in the null-space form factorises again.
        opts = dict(tol=tol, tol_accept=tol_accept, tol_error=tol_error, tol_inf=tol_inf, max_iter=max_iter,
                    refine=refine, equilibrate_passes=equilibrate_passes, polish=polish, polish_steps=polish_steps,
                    structure=structure, error_cols=error_cols, error_duals=error_duals, keep_state=keep_state,
                    decide_pairs=decide_pairs, per_element_next=per_element_next)
        idx, other = (torch.nonzero(m).squeeze(1) for m in (reduced, ~reduced))
        part = d.select(idx)
        return _apart(args, [(idx, (part, reduce(part, layout, structure))), (other, (d.select(other), None))], opts)
    if start is not None:
        d, xs, ss, zs = equilibrated_start(d, layout, *start, rescale_below=_RESCALE_BELOW)
        status = torch.full((B,), SOLVED, dtype=torch.long, device=A.device)  # the checks decide
        iterations, certified = torch.zeros_like(status), torch.zeros_like(status, dtype=torch.bool)
        red = None
    else:
        d, xs, ss, zs, status, iterations, certified, red = _iterate(d, layout, structure, tol, tol_inf,
                                                                     max_iter, refine, reduced=reduced,
                                                                     decide=decide_pairs)
        # A huge inactive bound sets σ: solved again without it, in the solution's unit (.far_rows).
        d, xs, ss, zs, status, iterations, certified = relax_far_rows(
            d, layout, (xs, ss, zs, status, iterations, certified),
            lambda part: _iterate(part, layout, structure, tol, tol_inf, max_iter, refine, decide=decide_pairs)[:7])
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
                                                  sigma_from_start=False, decide=decide_pairs)
            d = d.merge(idx, part)
            xs, ss, zs, status = (v.index_copy(0, idx, w) for v, w in zip((xs, ss, zs, status), again))
            certified = certified.index_copy(0, idx, cert)
            iterations = iterations.index_add(0, idx, its)
    ops = DataOps(d.P, d.A, layout, structure)  # polish, estimate, backward: in the iterations' form
    systems = (KKTFactory(ops, constant_part(d.P, d.A, layout, structure), structure) if red is None
               else ReducedSystems(red, d, ops, structure))
    xs, ss, zs, residual, kkt, error = finish(
        d, systems, layout, xs, ss, zs, ~certified, point_residual(d, layout), polish, polish_steps,
        refine + 1, tol_error, error_cols, error_duals, natural=decide_pairs)
    # A polished point with a sign wrong beyond rounding: the wrong active set (.active_set).
    xs, ss, zs, residual, kkt, error, ray, flat = settle_signs(
        d, systems, layout, (xs, ss, zs, residual, kkt, error), ~certified, point_residual(d, layout),
        polish_steps if polish != "never" else 0, refine + 1, (tol_accept, tol_error), error_cols, error_duals,
        per_element_next)
    status, certified = torch.where(ray, DUAL_INFEASIBLE, status), certified | ray  # (checked below)
    xo, so, zo = d.unscale(xs, ss, zs)
    ok = torch.isfinite(xo).all(1) & torch.isfinite(so).all(1) & torch.isfinite(zo).all(1)
    xo, so, zo = (torch.where(ok[:, None], v, 0.0) for v in (xo, so, zo))
    if bool(certified.any()):
        # A ray found on the equilibrated data certifies only if it does in the caller's units.
        infeasible, unbounded = verified_rays(P, q, A, b, layout, xo, zo)
        exact = ray & exact_unbounded_ray(P, q, A, layout, xo, sign_tolerance(xo))
        real = ((status == PRIMAL_INFEASIBLE) & infeasible) | ((status == DUAL_INFEASIBLE) & (unbounded | exact))
        status = torch.where(certified & ~real, NUMERICAL, torch.where(exact, EXACT_RAY, status))
    # The measures so far are relative to the equilibrated unit (σ from the data; above: a
    # point with a relative gap of 0.02 to 1 passed there). The same measures in the
    # caller's units do not share that blind spot (nor the equilibrated ones theirs): both must pass.
    caller, points = caller_measures(P, q, A, b, layout, xo, so, zo, tol_accept, own_rows=decide_pairs)
    residual = torch.where(certified, residual, torch.maximum(residual, caller))
    short = ok & ~certified & ~(residual <= tol_accept)
    if bool(short.any()):  # (the limit point's residual: see limit_scaling.limit_point)
        ss, zs, so, zo, residual, points = retry_at_limit(
            d, layout, (P, q, A, b), xs, ss, zs, (xo, so, zo, residual, points), torch.nonzero(short).squeeze(1),
            point_residual(d, layout), tol_accept, decide_pairs)
    # Solved means: small residual and small estimated error, whatever the loop concluded.
    ok_res = ~certified & (residual <= tol_accept) & (error <= tol_error)
    status = torch.where(ok_res, SOLVED, torch.where(status == SOLVED, NUMERICAL, status))
    # A complementary pair undecided after polishing (s_i ≈ z_i ≈ 0): no derivative exists.
    # (and a bound met with a zero multiplier to rounding, whichever side its ratio reads: at_kink)
    undecided_ = ok_res & ((undecided(layout, ss, zs) > DECIDED) | at_kink(d, layout, xs, ss, zs).any(1))
    # Not certified only for want of an estimate at a degenerate vertex: the retries rarely help (second_opinion).
    stuck = ok & ~ok_res & ~certified & (residual <= tol_accept)
    if bool(stuck.any()):  # (a host read; the common case, all solved, computes nothing more)
        stuck = stuck & degenerate_vertex(d.P, d.q, d.A, d.b, layout, xs, ss, zs)
    points = points + unverifiable(error, red).long() * UNVERIFIABLE + stuck.long() * DEGENERATE + flat.long() * FLAT
    points = torch.where(certified | ~ok, 0, points)
    # Columns whose equation the solve left unresolved (a weight far below the program's
    # scale), for the derivatives' warning; where the outputs are free along the limit
    # system's null direction there, the solution itself is not determined (.uniqueness).
    unresolved = unresolved_columns(d.P, d.q, d.A, layout, xs, ss, zs) & ok_res[:, None]
    out = ConeSolution(xo, so, zo, status, iterations, residual, error, points, undecided=undecided_,
                       undetermined=undetermined(d, layout, ss, zs, unresolved, error_cols))
    if keep_state:
        out.scaled, out.kkt, out.unresolved = d, kkt, unresolved
    return out


def _apart(args: tuple, groups: list[tuple[torch.Tensor, tuple]], opts: dict) -> ConeSolution:
    """:func:`solve_cone_batch` of ``args`` ``(P, q, A, b, layout)`` for each group of elements
    (``(idx, prepared)``: index tensors covering the batch once, and the group's ``prepared``),
    merged into one :class:`ConeSolution`."""
    sols = [(idx, solve_cone_batch(*(v.index_select(0, idx) for v in args[:4]), args[4], prepared=prep, **opts))
            for idx, prep in groups]
    B = args[0].shape[0]
    merged = {name: gather(B, [(idx, getattr(sol, name)) for idx, sol in sols])
              for name in ("x", "s", "z", "status", "iterations", "residual", "error", "points", "undecided",
                           "undetermined")}
    out = ConeSolution(**merged)
    if opts["keep_state"]:
        first = sols[0][1].scaled
        scaled = first.select(torch.zeros(B, dtype=torch.long, device=first.c.device))  # (each replaced below)
        for idx, sol in sols:
            scaled = scaled.merge(idx, sol.scaled)
        out.scaled, out.kkt = scaled, SplitKKT(B, [(idx, sol.kkt) for idx, sol in sols])
        out.unresolved = gather(B, [(idx, sol.unresolved) for idx, sol in sols])
    return out


def _iterate(d: Scaled, layout: ConeLayout, structure: KKTStructure, *args, reduced=False, **kwargs):
    """:func:`_iterations`, on the program without its equalities where that applies
    (:mod:`.nullspace`; ``reduced``: :func:`~.nullspace.reduce`'s answer if known)."""
    reduced = reduce(d, layout, structure) if reduced is False else reduced
    # (A mask here: a part of a group the caller found all in one form, split by rounding now; kept whole.)
    if not isinstance(reduced, tuple):
        return (*_iterations(d, layout, structure, *args, **kwargs), None)
    dr, red = reduced
    dr, ys, ss, zs, status, iterations, certified = _iterations(dr, red.layout, DENSE, *args, **kwargs)
    d = d.with_sigma(dr.sigma)
    xs, ss, zs = red.lift(d, dr, ys, ss, zs, status == PRIMAL_INFEASIBLE, status == DUAL_INFEASIBLE)
    return d, xs, ss, zs, status, iterations, certified, red


def _iterations(d: Scaled, layout: ConeLayout, structure: KKTStructure, tol: float, tol_inf: float,
                max_iter: int, refine: int, sigma_from_start: bool = True, decide: bool = False):
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
    s = torch.zeros_like(z)
    s[:, z0:] = layout.shift_inside(-z[:, z0:], _START_LEVEL)
    z[:, z0:] = layout.shift_inside(z[:, z0:], _START_LEVEL)
    tau = x.new_ones(B)
    kappa = x.new_ones(B)
    status = torch.where(kkt.failed, NUMERICAL, torch.full_like(tau, RUNNING, dtype=torch.long))
    iterations = torch.zeros_like(status)
    best_merit = torch.full_like(tau, torch.inf)
    data = IterationData(d, ops, base, layout, structure, tol, tol_inf, decide)
    state, res, counts = update(data, (x, s, z, tau, kappa, status, iterations, x, s, z, tau, best_merit,
                                       best_merit, torch.zeros_like(status)),
                                kkt.regularisation_effect, max_iter == 0)
    # On CUDA a step and the next update are one graph, replayed (_step_graphs): the
    # iterations' kernels cost their launches, not their arithmetic, there. The loop then
    # keeps the whole batch (no compaction: that would change the graphs' shapes).
    # The graphs are kept for the next solve of the same shapes and program (a layer in
    # training): they read the equilibrated data from their own buffers.
    consts = (d.P, d.q, d.A, d.b)
    site = "interior point, second-order cones" if layout.soc else "interior point"
    if capture_wanted(x):
        key = (tuple((t.shape, t.dtype) for t in (*consts, *state, *res)), x.device, id(layout), structure, tol,
               tol_inf, refine, decide)
        graphs = StepGraphs.kept(site, key, holds=layout)
    else:
        graphs = StepGraphs(False, site)
    whole = graphs.capture or _WHOLE_BATCH
    full, slot = None, None  # full-batch (data, state) and positions of the active elements

    for it in range(max_iter + 1):
        # The one host round-trip per iteration: is anyone running, does anyone refine? (The
        # refinement is computed for the batch then, and taken by those update() marked.)
        n_running, n_refined = counts.tolist()
        if not n_running:
            break
        if not whole and state[0].shape[0] >= _COMPACT_MIN and n_running <= _COMPACT_FRACTION * state[0].shape[0]:
            # Most elements are done: iterate on the running ones only (the tail of a
            # batch often takes half again the median's iterations).
            idx = torch.nonzero(state[STATUS] == RUNNING).squeeze(1)
            if full is None:
                full, slot = (data, state), idx
            else:
                full = (full[0], tuple(f.index_copy(0, slot, v) for f, v in zip(full[1], state)))
                slot = slot.index_select(0, idx)
            state, res = (tuple(v.index_select(0, idx) for v in part) for part in (state, res))
            data = data.select(idx)
        ref = refine if n_refined else 0
        last = it + 1 == max_iter
        if it == 0 or last or not whole:  # (variants run once: not worth a capture)
            state, effect = step(data, state, res, it == 0, ref)
            state, res, counts = update(data, state, effect, last)
        else:
            flat, (counts,) = graphs.run(ref, _graph_body(layout, structure, tol, tol_inf, ref, decide), (*state, *res),
                                         consts)
            state, res = tuple(flat[:len(STATE)]), tuple(flat[len(STATE):])
    if graphs.replays:  # (the state lies in the graphs' buffers, which the next solve overwrites)
        state = tuple(v.clone() for v in state)
    graphs.release()

    if full is not None:
        state = tuple(f.index_copy(0, slot, v) for f, v in zip(full[1], state))
        data = full[0]
    d, ops = data.d, data.ops
    x, s, z, tau, kappa, status, iterations, *best, _, _, _ = state
    stopped = (status == NUMERICAL) | (status == MAX_ITERATIONS)
    if bool(stopped.any()):  # their last iterate is where they stopped
        r = Measures(d, ops, row_inf(d.b), row_inf(d.q), x, s, z, tau, kappa, _REDUCED_TOL_INF)
        status = torch.where(stopped & r.pinf, PRIMAL_INFEASIBLE,
                             torch.where(stopped & r.dinf, DUAL_INFEASIBLE, status))
    # Solved and stalled elements return their best point; certificates their last one.
    certified = (status == PRIMAL_INFEASIBLE) | (status == DUAL_INFEASIBLE)
    x, s, z, tau = (torch.where(column_mask(~certified, bv), bv, v) for v, bv in zip((x, s, z, tau), best))
    xs, ss, zs = x / tau[:, None], s / tau[:, None], z / tau[:, None]
    return d, xs, ss, zs, status, iterations, certified


def _graph_body(layout: ConeLayout, structure: KKTStructure, tol: float, tol_inf: float, refine: int,
                decide: bool = False):
    """A step and the next update as one function of the data and the flat ``(*state,
    *residuals)`` (what :class:`~convexddn._step_graphs.StepGraphs` captures, and keeps
    across solves): returns the new flat state and the counts. Everything derived from
    the data is derived inside, so that a kept graph reads no tensor of an earlier solve."""
    def body(P, q, A, b, *flat):
        data = IterationData(_Data(P, q, A, b), DataOps(P, A, layout, structure),
                             constant_part(P, A, layout, structure), layout, structure, tol, tol_inf, decide)
        state, effect = step(data, flat[:len(STATE)], flat[len(STATE):], False, refine)
        state, res, counts = update(data, state, effect, False)
        return (*state, *res, counts)
    return body


class _Data(NamedTuple):
    """The equilibrated data the iterations read (a :class:`~.equilibration.Scaled`'s)."""

    P: torch.Tensor
    q: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
