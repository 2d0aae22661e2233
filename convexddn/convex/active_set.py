"""The signs of a polished point, and primal active-set corrections where they are wrong.

The polish (:mod:`.polish`) takes the active set the interior point's last iterate
suggests and solves the KKT conditions on it to rounding; the error estimate (a Newton
step on the same limit system) cannot see whether that set was the right one. Where it
was not, the point solves the KKT equations with an active constraint's multiplier of
the wrong sign: an LP with a small cost margin, :math:`\\min p^T x + \\|x\\|_1` s.t.
:math:`\\|x\\|_\\infty \\le 1` at :math:`p = (-1 - 10^{-8}, 0.5)`, stopped at tolerance 1e-8
in the middle of the nearly flat edge between its two vertices, and the polish landed on
the wrong one, :math:`x = 0` (the solution is :math:`(1, 0)`), with a multiplier of
:math:`-5 \\cdot 10^{-9}` (relative residual 2.5e-9, below the tolerance), an error estimate
of 5e-17 and a gradient of -313 where the derivative is 0.

So a point is accepted only with its signs right to rounding (:func:`sign_violation`):
every nonnegative row's slack and multiplier at least minus a rounding level of that
row's scale. Elements that fail get primal active-set steps from their point
(:func:`correct`: release the rows whose multiplier has the wrong sign, move along the
equality-constrained problem's step to its minimiser or the first constraint it meets,
as an active-set method for QPs does; Nocedal & Wright, *Numerical Optimization*,
§16.5), batched for all of them, then the Newton polish on the set found; an element
whose signs are still wrong is not solved (its error estimate is infinite), for the
caller's fallback. The same steps serve elements whose residual passes but whose error
estimate does not (the polish left them on an edge), and where the problem decreases
without bound along a working set's edge they end with its ray (:func:`settle_signs`).
Programs with second-order cones are left as they are.

Smaller margins leave the signs right: the polish stops inside the nearly flat face, which
its error estimate does not see (the same LP at a margin of 1e-11: x = (0.07, 0), "solved").
Such a point's cost still falls along a null direction of its limit system
(:func:`~.flat_face.flat_descent`, beyond 4 rounding levels of the dual scale), and it takes
the same steps. Their rows' regularisation is about the held multipliers where those are
unique (:func:`_step`): the vertex (1, 0) to rounding at margins 1e-9 to 1e-12, and an exact ray
(UnboundedError) for ``min c @ x s.t. x >= 0, x1 - x0 <= 1`` at ``c = (1 - e, -1)``, e = 1e-9 to
1e-12. At 1e-13 (~150 ulps of the scale) the steps end short of the vertex or with a ray the
caller's exactness test (64 rounding levels) cannot confirm: the element is not solved here, and
a point another solver returns for it carries a SolverWarning (:data:`~.measures.FLAT`). Below
~3e-14 the slope is at rounding: a tie, its point not unique (the backward's GradientWarning).
"""
from __future__ import annotations

import torch

from .._linalg import lu_factor_ex
from .dense_kkt import MAX_SIZE, MEMORY_BUDGET
from .estimate import error_estimate
from .flat_face import dual_scale, flat_descent
from .kkt import PatchedKKT, bmv, row_inf
from .polish import polish as newton_polish
from .polish import rounding_level
from .symmetric_cones import ConeLayout

__all__ = ["correct", "degenerate_vertex", "settle_signs", "sign_tolerance", "sign_tolerances", "sign_violation"]

# correct()'s dense systems take at most this share of the dense solves' MEMORY_BUDGET at
# once (settle_signs chunks beyond it: 256 MiB), and none above their MAX_SIZE.
_BUDGET_SHARE = 4
# A sign is wrong beyond rounding where it is below minus this many rounding levels
# (polish.rounding_level, 16 ulps) of its row's scale: converged Newton steps leave
# 0.3-4 ulps; the wrong vertex above had 4e6 of them.
_SIGN = 64
# The active-set step's proximal term beside P, in rounding units of the dtype (float64:
# 2.2e-10; equilibrated units, where P's entries are ~1): it bounds the step of a problem
# that is unbounded on the working set (an LP's edge: the step is the reduced gradient over
# ρ, which the ratio test cuts at the first constraint met) and lies far above LU's backward
# error (~1e-16 of the matrix), which then cannot turn such a step's direction.
_RHO = 1e6
# Regularisation of the working set's rows, in the same units (float64: 2.2e-12): dependent
# rows at a degenerate vertex make the step's matrix singular; the polish that follows
# removes its O(δ) effect.
_DELTA = 1e4
# Active-set steps at most (each one LU of the flagged elements' (n + m)-square systems).
_STEPS = 16


def sign_tolerance(like: torch.Tensor) -> float:
    """A sign is wrong beyond rounding below minus this relative to its terms (``like``'s dtype)."""
    return _SIGN * rounding_level(like)


def sign_tolerances(P, q, A, b, layout: ConeLayout, x, z):
    """``(tol_s, tol_z)`` ``(B, k)``: :data:`_SIGN` rounding levels of each nonnegative row's
    slack, ``1 + max(|b_i|, (|A||x|)_i)``, and of the multipliers, ``1 + max(‖q‖, ‖Px‖, ‖Aᵀz‖)``
    (the dual residual's scale, through which they are determined)."""
    z0, k = layout.zero, layout.nonneg
    unit = sign_tolerance(x)
    rho = torch.maximum(b[:, z0:z0 + k].abs(), bmv(A[:, z0:z0 + k].abs(), x.abs()))
    return unit * (1 + rho), (unit * dual_scale(q, bmv(P, x), bmv(A.mT, z)))[:, None].expand(-1, k)


def sign_violation(P, q, A, b, layout: ConeLayout, x, s, z) -> torch.Tensor:
    """(B,) the largest violation of a nonnegative row's sign, ``-s_i`` or ``-z_i``, in units
    of its tolerance (:func:`sign_tolerances`): above 1, a sign wrong beyond rounding; 0 where
    none is negative, or without nonnegative rows (equilibrated data ``P, q, A, b``, point
    ``x, s, z``)."""
    z0, k = layout.zero, layout.nonneg
    if not k:
        return x.new_zeros(x.shape[0])
    return _violation(s[:, z0:z0 + k], z[:, z0:z0 + k], *sign_tolerances(P, q, A, b, layout, x, z))


def _violation(sc, zc, tol_s, tol_z) -> torch.Tensor:
    """:func:`sign_violation` of the nonnegative rows' ``sc, zc`` ``(B, k)`` with their tolerances."""
    out = torch.maximum(-sc / tol_s, -zc / tol_z).amax(1)
    return torch.where(torch.isnan(out), torch.inf, out.clamp_min(0))


def degenerate_vertex(P, q, A, b, layout: ConeLayout, x, s, z) -> torch.Tensor:
    """``(B,)`` points with their signs right (:func:`sign_violation` at most 1) whose working
    set, as :func:`correct` takes it (the equality rows and the nonnegative rows at their bound),
    has more rows than there are variables: a primal degenerate vertex, whose active rows are
    linearly dependent, so that the limit KKT system there,

    .. math::

        \\begin{bmatrix} P & A_W^T \\\\ A_W & 0 \\end{bmatrix}, \\qquad |W| > n,

    is singular. Where the error estimate could not be formed at such a point (an LP: P = 0),
    no other solver's point of the same vertex gives one (an assignment LP's vertex: 2k - 1
    independent equalities and k² - k bounds at 0 in R^{k²}; the active-set steps release
    rows but end at the same vertex, k = 15: 4 to 8 rows over).
    No second-order cones (``layout.soc``: all ``False``). Shapes as :func:`correct`'s."""
    B, m, n = A.shape
    z0, k = layout.zero, layout.nonneg
    if layout.soc or not k:
        return torch.zeros(B, dtype=torch.bool, device=A.device)
    tol_s, tol_z = sign_tolerances(P, q, A, b, layout, x, z)
    sc, zc = s[:, z0:z0 + k], z[:, z0:z0 + k]
    rows = z0 + ((sc <= tol_s) | (sc < zc)).sum(1)
    return (rows > n) & (_violation(sc, zc, tol_s, tol_z) <= 1)


def correct(P, q, A, b, layout: ConeLayout, x, s, z, steps: int = _STEPS, stall: torch.Tensor | None = None):
    """Primal active-set steps from ``(x, s, z)`` (equilibrated data, no second-order cones).

    The working set W is the equality rows and the nonnegative rows at their bound (slack
    within rounding, or below the multiplier). Each step solves, per element,

    .. math::

        \\begin{bmatrix} P + \\rho I & A_W^T \\\\ A_W & -\\delta I \\end{bmatrix}
        \\begin{bmatrix} p \\\\ z_W \\end{bmatrix} =
        \\begin{bmatrix} -(Px + q) \\\\ b_W - A_W x - \\delta z_W \\end{bmatrix}

    (the other multipliers 0; the held multipliers' term :math:`-\\delta z_W` only where the
    rows of W are independent, :func:`_step`): the step to the minimiser on W and its
    multipliers. The step length is the exact line search's along ``p`` (1 on a set where the problem is
    strictly convex; unbounded along an LP's edge) cut by the ratio test: a constraint met
    joins W; a step that reaches the minimiser takes its multipliers, and releases the
    rows whose multiplier is negative beyond rounding, or ends there if none is. A
    direction longer than any constraint allows, along which the objective decreases
    without bound, is a ray (the program is unbounded).

    ``stall`` ``(B,)``: elements that stop, not done, once a step leaves their working set over
    n rows at a size it has had before. At an optimal degenerate vertex (:func:`degenerate_vertex`)
    x cannot move: releasing the negative multipliers shrinks the set, or a released row at zero
    slack rejoins at once (a zero-length step), and the steps cycle (assignment LPs, 15 × 15:
    |W| 239 -> 232 -> 233 -> 234 -> 232 ... in R^225, ending 4 to 8 rows over after 11 steps,
    which no estimate certified). A size met once more is that cycle; a set that shrinks, or grows
    by a row once (4 × 4: 19 -> 16 -> 17 -> 16, 5 × 5: 29 -> 25 -> 26), may still end where the
    estimate certifies it.

    Shape:
        ``P (B, n, n), q (B, n), A (B, m, n), b (B, m), x (B, n), s, z (B, m)`` ->
        ``(x, s, z, done, ray)``: the points (``s`` 0 on W, else ``b - Ax``), where the steps
        ended at a minimiser with the signs right, and where they found a ray (``x`` is it).
    """
    B, m, n = A.shape
    z0, k = layout.zero, layout.nonneg
    ineq = torch.zeros(m, dtype=torch.bool, device=A.device)
    ineq[z0:z0 + k] = True
    tol_s, tol_z = (torch.cat([v.new_zeros(B, z0), v, v.new_zeros(B, m - z0 - k)], 1)
                    for v in sign_tolerances(P, q, A, b, layout, x, z))
    W = ~ineq | (s <= tol_s) | (s < z)
    z = torch.where(W, z, 0.0)
    done, ray = (torch.zeros(B, dtype=torch.bool, device=A.device) for _ in range(2))
    ulp = torch.finfo(A.dtype).eps
    Prho = P + _RHO * ulp * torch.eye(n, dtype=P.dtype, device=P.device)
    # The steps run on the elements still moving only (``idx``; the batch is gathered anew
    # once some stop): one that ended takes no more factorisations (assignment LPs, 15 × 15
    # at batch 8: 4 to 11 steps each, 46 factorisations of 479 × 479 where the whole batch
    # took 88). An element's steps are its own, the same alone as in any batch.
    idx = torch.arange(B, device=A.device)
    # (with ``stall``: the working-set sizes each element has had, gathered with the rest)
    tracked = () if stall is None else (stall, torch.nn.functional.one_hot(W.sum(1), m + 1).bool())
    data, point = (P, q, A, b, Prho, tol_z), (x, W, z)
    for _ in range(steps):
        point, ended, found, failed = _step(*data, ineq, *point, ulp)
        done, ray = done.index_copy(0, idx, ended), ray.index_copy(0, idx, found)
        stop = ended | found | failed
        if tracked:  # a stalled element stops where a size above n comes again
            rows = point[1].sum(1, keepdim=True)
            stalled, seen = tracked
            stop = stop | (stalled & (rows.squeeze(1) > n) & seen.gather(1, rows).squeeze(1))
            tracked = (stalled, seen.scatter(1, rows, True))
        keep = torch.nonzero(~stop).squeeze(1)  # (one host read per step, on the flagged elements only)
        if keep.numel() == idx.numel():
            continue
        x, W, z = (full.index_copy(0, idx, v) for full, v in zip((x, W, z), point))
        if not keep.numel():
            break
        idx = idx.index_select(0, keep)
        data, point, tracked = (tuple(v.index_select(0, keep) for v in group) for group in (data, point, tracked))
    else:
        x, W, z = (full.index_copy(0, idx, v) for full, v in zip((x, W, z), point))
    z = torch.where(W, z, 0.0)
    r = b - bmv(A, x)
    s = torch.where(ineq & ~W, r, 0.0)
    s = torch.where(ray[:, None], -bmv(A, x), s)
    z = torch.where(ray[:, None], 0.0, z)
    return x, s, z, done, ray


def _step(P, q, A, b, Prho, tol_z, ineq, x, W, z, ulp: float):
    """One of :func:`correct`'s steps for every element given (all still moving; ``Prho`` = P + ρI,
    ``tol_z`` ``(B, m)``, ``ineq`` ``(m,)`` the nonnegative rows, ``W`` ``(B, m)`` the working sets):
    ``((x, W, z), done, ray, failed)``, the elements' new points and working sets, where they ended
    at a minimiser with the signs right, where the step was a ray (``x`` is it) and where the
    factorisation failed (the point unchanged)."""
    B, m, n = A.shape
    rho, delta = _RHO * ulp, _DELTA * ulp
    g, r = bmv(P, x) + q, b - bmv(A, x)
    w = W.to(A.dtype)
    K = A.new_zeros(B, n + m, n + m)
    K[:, :n, :n] = Prho
    K[:, :n, n:] = A.mT * w[:, None, :]
    K[:, n:, :n] = A * w[:, :, None]
    K[:, n:, n:] = torch.diag_embed(1 - w - delta * w)
    LU, piv, info = lu_factor_ex(K)
    # The rows' regularisation is taken about the multipliers held, -δ(z_W' - z_W) (a proximal
    # step on them), where those are unique: -δ z_W' alone bent the step by δ z_W off the working
    # rows, and where the cost falls along them by less than ~1e5 ulps of z (an LP's edge with a
    # margin of 1e-11, z ~ 1) that bend outweighed the step's own descent (ρ‖p‖²): the line search
    # stopped short of the vertex, and a ray left its rows by 1e-12 to 4e-11 (no exact ray).
    # Where the rows are dependent (a degenerate vertex) the multipliers are not unique and the
    # proximal term would keep the held ones (the interior point's, strictly inside their set):
    # there the term about 0 picks the least-norm ones, whose wrong signs release a row. The
    # second column tells them apart: its multipliers are z_W's part in the null space of A_Wᵀ
    # (0 to ~δρ/σ_min(A_W)² where the rows are independent).
    centre = torch.cat([torch.zeros_like(g), -delta * z * w], 1)
    both = torch.linalg.lu_solve(LU, piv, torch.stack([torch.cat([-g, r * w], 1), centre], -1))
    unique = row_inf(both[:, n:, 1]) <= ulp ** 0.5 * (1 + row_inf(z * w))
    sol = both[..., 0] + torch.where(unique[:, None], both[..., 1], 0.0)
    failed = (info != 0) | ~torch.isfinite(sol).all(1)
    sol = torch.where(failed[:, None], 0.0, sol)
    p, zn = sol[:, :n], sol[:, n:]
    # The ratio test: the first row outside W whose slack the step uses up.
    Ap = bmv(A, p)
    ratio = torch.where(ineq & ~W & (Ap > 0), r.clamp_min(0) / torch.where(Ap > 0, Ap, 1.0), torch.inf)
    a_max, first = ratio.min(1)
    # The line search: exact on the quadratic. Beyond a unit step only along the system's own
    # direction (-gᵀp = pᵀ(P + ρI)p on W), not along rounding noise, whose -gᵀp has any sign.
    gp, pPp = (g * p).sum(1), (p * bmv(P, p)).sum(1)
    own = (gp < 0) & (pPp + rho * (p * p).sum(1) >= -0.5 * gp)
    a_star = torch.where(pPp > 0, -gp / torch.where(pPp > 0, pPp, 1.0), torch.inf)
    alpha = torch.where(own, torch.minimum(a_star, a_max), a_max.clamp(max=1.0))
    unbounded = ~failed & torch.isinf(alpha)
    blocked = ~failed & ~unbounded & (a_max <= alpha)
    move = ~failed & ~unbounded
    x = torch.where(move[:, None], x + torch.where(move, alpha, 0.0)[:, None] * p, x)
    x = torch.where(unbounded[:, None], p / row_inf(p).clamp_min(torch.finfo(p.dtype).tiny)[:, None], x)
    W = W | (blocked[:, None] & torch.nn.functional.one_hot(first, m).bool())
    full = move & ~blocked
    neg = ineq & W & (zn < -tol_z)
    z = torch.where(full[:, None], torch.where(W, zn, 0.0), z)
    W = torch.where((full & neg.any(1))[:, None], W & ~neg, W)
    return (x, W, z), full & ~neg.any(1), unbounded, failed


def settle_signs(d, systems, layout: ConeLayout, point: tuple, live: torch.Tensor, residual_fn, polish_steps: int,
                 refine: int, tols: tuple[float, float], error_cols, error_duals, per_element_next: bool = False):
    """The hook after :func:`~.certify.finish`: ``point`` = ``(xs, ss, zs, residual, kkt, error)``.

    The elements among ``live`` whose signs are wrong beyond rounding (:func:`sign_violation`),
    or whose residual is within ``tol_accept`` but error estimate above ``tol_error`` (``tols``;
    the polish's active set did not make the point a solution: an edge of the same LP left at
    x_i = 6e-6 with a cost margin of 1e-9 along it, estimated 2e-5 off), get :func:`correct`'s
    steps (none with ``polish_steps`` 0: ``polish="never"``), then ``polish_steps`` Newton
    steps with the pairs decided (as :func:`~.certify.finish`'s second polish), a new KKT
    system and error estimate (:func:`~.estimate.error_estimate`). The new
    point replaces the old one where the steps ended with the signs right and its estimate
    within ``tol_error``; elsewhere the old one stays, with an infinite error (not solved)
    where its signs are wrong. Only the elements whose steps ended at a minimiser or found a ray
    are polished and estimated again (the others keep their point in any case).

    ``per_element_next``: the caller solves per element what this leaves unsolved; then the
    elements at a degenerate vertex with their signs right (:func:`degenerate_vertex`) stop their
    steps once these cycle there (:func:`correct`'s ``stall``), their point and bits as before.

    Returns:
        ``(*point, ray, flat)``: ``ray`` ``(B,)`` where the steps found the program unbounded along
        a direction, then ``xs`` (``ss = -A xs``, ``zs = 0``): a candidate certificate, for the
        caller to verify; ``flat`` ``(B,)`` where the point's cost fell along a face of its limit system
        beyond rounding (:func:`~.flat_face.flat_descent`) and the steps did not end at a solution
        (their error infinite; a ray found stays flagged).
    """
    from .certify import decided

    xs, ss, zs, residual, kkt, error = point
    ray = torch.zeros_like(live)
    if layout.soc or not layout.nonneg:
        return (*point, ray, ray)
    tol_accept, tol_error = tols
    wrong = live & (sign_violation(d.P, d.q, d.A, d.b, layout, xs, ss, zs) > 1)
    rough = live & (residual <= tol_accept) & ~(error <= tol_error)
    # A point whose cost still falls along its face (.flat_face): no solution either.
    flat = flat_descent(d, layout, xs, ss, zs, live & ~wrong & (residual <= tol_accept), error_cols,
                        error_duals)
    wrong = wrong | flat
    # (what stays of a wrong point: an infinite error, whatever the steps do)
    stays = torch.where(wrong, torch.inf, error)
    if not polish_steps:
        return xs, ss, zs, residual, kkt, stays, ray, flat
    if d.A.shape[1] + d.A.shape[2] > MAX_SIZE:  # (no dense system that large: as without steps)
        return xs, ss, zs, residual, kkt, stays, ray, flat
    idx = torch.nonzero(wrong | rough).squeeze(1)  # (one host read per solve)
    if not idx.numel():
        return (*point, ray, flat)
    sub = d.select(idx)
    pick = lambda v: v.index_select(0, idx)  # noqa: E731
    data = (sub.P, sub.q, sub.A, sub.b)
    # correct() factorises dense (k, n + m, n + m) systems: in chunks (a 30-step MPC's
    # elements, n + m = 3000, hold 72 MB each).
    n_all = data[2].shape[1] + data[2].shape[2]
    chunk = max(1, MEMORY_BUDGET // (_BUDGET_SHARE * n_all * n_all * data[2].element_size()))
    start = (pick(xs), pick(ss), pick(zs))
    stall = degenerate_vertex(*data, layout, *start) if per_element_next else None
    parts = [correct(*(v[lo:lo + chunk] for v in data), layout, *(v[lo:lo + chunk] for v in start),
                     stall=None if stall is None else stall[lo:lo + chunk])
             for lo in range(0, idx.numel(), chunk)]
    x0, s0, z0, done, found = (torch.cat(v) for v in zip(*parts))
    # (ok needs done: the others keep their point, ``stays``: an infinite error where their signs are wrong)
    moved = torch.nonzero(done | found).squeeze(1)  # (one host read, on the flagged elements only)
    if not moved.numel():
        return xs, ss, zs, residual, kkt, stays, ray, flat
    if moved.numel() < idx.numel():
        idx, sub = idx.index_select(0, moved), sub.select(moved)
        x0, s0, z0, done, found = (v.index_select(0, moved) for v in (x0, s0, z0, done, found))
        data = (sub.P, sub.q, sub.A, sub.b)
    res_fn = lambda *v: residual_fn(*v, idx)  # noqa: E731
    x, s, z, res, _ = newton_polish(*data, layout, x0, s0, z0, res_fn, polish_steps, decide=decided)
    part, part_error, damped = error_estimate(systems.select(idx, sub), sub, layout, x, s, z, torch.ones_like(done),
                                              refine, error_cols, error_duals)
    part_error = torch.where(damped, torch.inf, part_error)  # (no polish follows: no estimate, as finish's)
    ok = done & (sign_violation(*data, layout, x, s, z) <= 1) & (part_error <= tol_error)
    # (and no descent left along its face: the steps resolve margins to ~1e-12, not 1e-13)
    ok = ok & ~flat_descent(sub, layout, x, s, z, ok, error_cols, error_duals)
    keep = lambda new, a, b: torch.where(new.view((-1,) + (1,) * (a.dim() - 1)), a, b)  # noqa: E731
    x, s, z, res = (keep(found, v0, keep(ok, v, pick(old)))
                    for v0, v, old in zip((x0, s0, z0, res), (x, s, z, res), (xs, ss, zs, residual)))
    part_error = torch.where(ok, part_error, torch.where(found, torch.inf, pick(stays)))
    if not bool(ok.all()):  # (the system at the new points only: the others keep theirs)
        took = torch.nonzero(ok).squeeze(1)
        idx_ok, sub_ok = idx.index_select(0, took), sub.select(took)
        part = None if not took.numel() else error_estimate(
            systems.select(idx_ok, sub_ok), sub_ok, layout, *(v.index_select(0, took) for v in (x, s, z)),
            torch.ones_like(took, dtype=torch.bool), refine, error_cols, error_duals)[0]
    else:
        idx_ok = idx
    kkt = kkt if part is None else PatchedKKT(kkt, idx_ok, part)
    out = (xs.index_copy(0, idx, x), ss.index_copy(0, idx, s), zs.index_copy(0, idx, z),
           residual.index_copy(0, idx, res), kkt, stays.index_copy(0, idx, part_error))
    # (a ray found stays flagged: the caller's check may not certify it, and then nothing resolved the face)
    return (*out, ray.index_copy(0, idx, found), flat.index_copy(0, idx, flat.index_select(0, idx) & ~ok))
