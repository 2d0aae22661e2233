r"""The polish of robust vector pooling: Newton/IRLS from a start to a local minimum, and
its stopping rule.

Notation per pooled set (row): ``g = Σ_i φ'(z_i) n_i`` the objective's gradient, ``H =
(Σ κ_i) I + Σ c_i n_i n_iᵀ`` its Hessian (κ_i = φ'(z_i)/z_i, c_i = φ''(z_i) − κ_i,
:mod:`._vector_pool_solvers`), ``p = H⁻¹ g`` the Newton step. As in the scalar pooling
(:mod:`.pooling.iterations`), rounding makes the computed ``g`` uncertain by up to
``noise = eps (2.5 √N ‖φ'‖₂ + 4 Σ_i |φ''(z_i)| z_i)`` (2-norm: the sums' rounding, and
that of each difference u − x_i, relative to z_i; u and x_i themselves are exact, so
unlike the scalar's ``h |u|`` the offset of a set does not enter: that term made a data
point 1e7 alpha from the origin, whose φ''(0) dominates H, look quiet). A row
stops

* on its Newton step, where H is positive definite, ``‖g‖ > noise`` and ``‖p‖∞`` is at
  most both the tolerance ``tol (alpha + ‖u‖∞)`` and the span over which the curvature
  holds (alpha / 2, or the penalty's :meth:`~.pooling.penalties.Penalty.newton_span`):
  at a data point, where one term's φ''(0) dominates H, a step of about alpha times
  ``|Σ_{i≠k} n_i|`` said nothing of a minimiser 2e11 alpha away (the Weiszfeld stall);
* where ``‖g‖ <= noise`` (no reliable direction) and H is positive definite. The row is
  *unresolved* when ``noise / λ_min(H)`` (how far from the minimiser such a point can
  be) exceeds that tolerance or span, or u's own rounding exceeds the tolerance (in
  float32 also the span, see :func:`_on_grid`): float32 rows are solved again in
  float64, others get a SolverWarning. A Newton step taken there would move on rounding
  (collinear points 0, 0.1, ..., 0.9 with alpha 1e-8: from the exact minimiser 0.45 to
  0.4503, with no warning).

A quiet gradient where H is not positive definite is a saddle or a maximum, not a stop:
the row steps along H's lowest eigenvector to the lowest of a few trial points (Welsch,
two points 2.01 alpha apart: the mean start, a maximum by symmetry, was returned).
"""
from __future__ import annotations

import math

import torch

from .._warn import warn
from .degeneracy import shown_indices
from ..errors import SolverWarning
from ._vector_pool_solvers import (
    _hessian,
    _masked,
    forming_noise,
    _polish_irls,
    geometry,
    hess_solve,
    irls_point,
    kappa,
    unit,
)
from ._vector_pool_starts import _centre, _start
from .pooling.rounding import _LOCAL_SPAN, _NOISE, _SUM_NOISE, grid
from .pooling.penalties import Penalty, Quadratic, TruncatedQuadratic

# Newton steps shorter than _SHORT alpha may raise the objective by its rounding (polish).
_SHORT = 1e-3
# Trial steps along a direction of negative curvature, in alpha (both signs).
_ESCAPE = (2.0, 1.0, 0.5, 0.25, 0.125, 1.0 / 16)


def _newton(s: torch.Tensor, n: torch.Tensor, c: torch.Tensor, g: torch.Tensor):
    """``(p, good, pd, H)``: the Newton step H⁻¹g, where it is good, and (C <= N: by
    Cholesky, which also solves) whether H is positive definite (None for C > N, whose
    Woodbury form does not tell; H None too)."""
    H = _hessian(s, n, c)
    if H is None:
        p, good = hess_solve(s, n, c, g)
        return p, good, None, None
    L, info = torch.linalg.cholesky_ex(H)
    p, good = _masked(torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1), info == 0, s)
    return p, good, good, H


def gradient_noise(k1: torch.Tensor, d2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(r,): the rounding noise of the computed gradient g, eps (2.5 √N ‖φ'‖₂ + 4 Σ_i
    |φ''(z_i)| z_i) (module docstring), from κ_i = φ'(z_i)/z_i ``k1``, φ''(z_i) ``d2`` and
    the distances ``z`` (r, N). The polish's stopping rule, and the refinement's bound on
    y's distance to the minimiser (:mod:`._vector_pool_refine`)."""
    sum_noise = _SUM_NOISE * math.sqrt(z.shape[-1])
    return (torch.linalg.vector_norm(k1 * z, dim=-1) * sum_noise
            + _NOISE * torch.linalg.vecdot(d2.abs(), z)) * torch.finfo(z.dtype).eps


def lowest(s: torch.Tensor, n: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H's smallest eigenvalue (r,) and a unit direction (r, C) of that curvature, for the
    few rows that need them (detached). C <= N: eigh of H; C > N: H = sI + U D Uᵀ has the
    eigenvalue s off the span of the n_i and there those of K = sI + G½ D G½ (G = UᵀU,
    N × N), whose eigenvector w gives the direction U G^{-½} w."""
    N, C = n.shape[-2:]
    if C <= N:
        lam, V = torch.linalg.eigh(_hessian(s, n, c))
        return lam[:, 0], V[:, :, 0]
    ev, Q = torch.linalg.eigh(n @ n.mT)
    big = ev > ev.amax(-1, keepdim=True) * (N * torch.finfo(ev.dtype).eps)
    root = (Q * ev.clamp(min=0).sqrt().unsqueeze(-2)) @ Q.mT
    K = root @ (c.unsqueeze(-1) * root)
    K.diagonal(dim1=-2, dim2=-1).add_(s.unsqueeze(-1))
    mu, W = torch.linalg.eigh(K)
    inv = (Q * torch.where(big, ev.clamp(min=1e-300).rsqrt(), 0.0).unsqueeze(-2)) @ Q.mT
    v = (n.mT @ (inv @ W[:, :, :1])).squeeze(-1)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)
    return torch.minimum(mu[:, 0], s), v


def _span(pen: Penalty, h: torch.Tensor, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """How far a Newton step or a noise bound is trusted (R,): alpha / 2, or further where
    the penalty knows its curvature ``h = Σ φ''`` holds further (pseudo-Huber far from every
    point). Huber's unlimited span rests on its scalar g being piecewise linear, which the
    vector one is not: its outliers' terms (α/z_i)(I − n_i n_iᵀ) vary on the scale z_i,
    so it is a quarter of the nearest distance (alpha / 2 at least). (With alpha / 2, the
    geometric-median regime, alpha 1e-40 of a spread of 3, was called unresolved.)"""
    half = _LOCAL_SPAN * a.reshape(-1) if a.dim() else _LOCAL_SPAN * a
    own = pen.newton_span(h.unsqueeze(-1), a)
    if own is None:
        return half.expand(h.shape)
    own = own.reshape(-1)
    own = torch.where(torch.isfinite(own), own, 0.25 * z.amin(-1))
    return torch.maximum(own, half)


def _on_grid(au: torch.Tensor, a: torch.Tensor, tol: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Whether u's own rounding, ``4 eps ‖u‖∞``, is within the tolerance (rows stopped on a
    quiet gradient are unresolved where it is not) and, in float32, within the span
    alpha / 2: beyond it the grid of u is coarser than the curvature near a data point,
    whose quiet gradient then says nothing of the points between, and such rows are
    solved again in float64."""
    g = grid(au, eps)
    ok = g <= tol * (a + au)
    return ok & (g <= _LOCAL_SPAN * a) if dtype == torch.float32 else ok


def polish(pen: Penalty, x: torch.Tensor, u: torch.Tensor, a: torch.Tensor, tol: float,
           max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton/IRLS from u (R, C) until the stopping rule of the module docstring holds in
    every row; returns the points and the unresolved rows (R,) bool.

    The IRLS point never raises the objective (majorise–minimise); the Newton point is
    taken instead where it lowers the objective below the current one. A row stopped on
    its Newton step returns the Newton point (whose forward-mode tangent is the implicit
    function's, where these ops are differentiated: the node's own derivatives, jacfwd's
    included, come from its Function); one stopped on a quiet gradient returns its point,
    with the tangent of that Newton point.

    Each step first applies the rule as it reads where no active row has a quiet gradient
    or an H not shown positive definite (the common case: no λ_min bound, no saddle
    test); where one has, the step's decision is made again by the full rule
    (:func:`_full_rule`), the same for every row.
    """
    R, N = x.shape[:2]
    eps = torch.finfo(x.dtype).eps
    ar = a.reshape(-1) if a.dim() > 0 else a
    active = torch.ones(R, dtype=torch.bool, device=x.device)
    unres = torch.zeros_like(active)
    n_todo = R
    # Where no tolerance tol (alpha + |u|) can exceed alpha / 2 (|u| within twice the
    # largest |x|), the span is not computed: the tests use alpha / 2, which it is at
    # least; likewise u's grid where it is within the tolerance and (float32) alpha / 2.
    # (One host read; they cost a tenth of a Huber solve at (16, 8, 36).)
    half = _LOCAL_SPAN * ar
    reach = 2 * x.detach().abs().amax((-2, -1))
    need_span, need_grid = torch.stack([(tol * (ar + reach) > half).any(),
                                        (_NOISE * eps * reach > half).any()]).tolist()
    need_grid = tol < _NOISE * eps or (bool(need_grid) and x.dtype == torch.float32)
    short = _SHORT * ar
    # (d, z, f) at u where every row that goes on took the last step's Newton point: those
    # of that point, the same values (and tangents) as formed again from u.
    carry = None
    for _ in range(max_iter):
        every = n_todo == R  # every row active: no mask by `active` needed
        d, z, f = (*geometry(x, u), None) if carry is None else carry
        k1 = kappa(pen, z, a)
        s1 = k1.sum(-1)
        d2 = pen.d2phi(z, a)
        n, c = unit(d, z), d2 - k1
        g = (k1.unsqueeze(-2) @ d).squeeze(-2)
        step, good, pd, H = _newton(s1, n, c, g)
        u_nt = u - step
        d_nt, z_nt = geometry(x, u_nt)
        if f is None:  # f at u and at the Newton point in one pass of phi (rows of the same sums)
            f, f_nt = pen.phi(torch.cat((z, z_nt), -1), a).unflatten(-1, (2, N)).sum(-1).unbind(-1)
        else:
            f_nt = pen.phi(z_nt, a).sum(-1)
        astep = step.abs().amax(-1)
        with torch.no_grad():  # the stopping rule (module docstring), on detached values
            au = u.abs().amax(-1)
            span = _span(pen, d2.sum(-1), a, z) if need_span else half
            lim = torch.minimum(tol * (ar + au), span)
            noise = gradient_noise(k1, d2, z)
            quiet = torch.linalg.vector_norm(g, dim=-1) <= noise
            # λ_min(H) >= Σ_i min(κ_i, φ''_i) (Weyl: term i's eigenvalues are κ_i and φ''_i).
            weyl = torch.minimum(k1, d2).sum(-1) if pd is None else None
            pd_c = good if pd is not None else weyl > 0
            # Slack of the sums' rounding: near a minimum the Newton step's decrease (gᵀp / 2)
            # falls below it and f cannot judge the step. It is taken there on a positive
            # definite H within the span where the curvature holds (IRLS crawled 1.5e-14 per
            # step 4.4e-8 from a minimiser), or when short (below _SHORT alpha). (Huber's
            # Newton steps between two points of equal objective 0.43 alpha apart, each
            # decreasing the model by more than the slack, alternated forever.)
            slack = N * eps * f.abs()
            # (pd_c & ~quiet: pd_c is good where pd is not None, which take has already.)
            flat_f = (astep <= short) | ((~quiet if pd is not None else pd_c & ~quiet) & (astep <= span)
                                         & (torch.linalg.vecdot(g, step) <= 2 * slack))
            take = good & ((f_nt < f) | (flat_f & (f_nt <= f + slack)))
            # The stop as it reads where every active row has ~quiet and pd_c (`special`: not).
            special = quiet | ~pd_c
            stop = good & (astep <= lim)
            if not every:
                special, stop = special & active, stop & active
            # The IRLS point is formed only where a row goes on without its Newton point (in a
            # step the full rule decides: where an active row has not taken it).
            notake = ~take if every else active & ~take
            irls = notake & ~stop
        # A row that cannot move although its gradient points somewhere (float32 at a data
        # point 1e7 alpha from the origin: every step rounds back to it) stops unresolved:
        # float32 rows are solved again in float64. (Rows that go on take u_nt unless irls.)
        new, same = u_nt, (u_nt == u).all(-1)
        stuck = ~stop & same if every else active & ~stop & same
        counts = torch.stack([special, notake, irls, stop, stuck]).sum(-1).tolist()  # one host sync
        n_special, n_notake, n_irls, n_stop, n_stuck = counts
        carry = None if n_irls or n_special else (d_nt, z_nt, f_nt)
        if n_irls or (n_special and n_notake):
            new = torch.where(take.unsqueeze(-1), u_nt, irls_point(k1, s1, x, u))
            same = (new == u).all(-1)
            if not n_special:
                stuck = ~stop & same if every else active & ~stop & same
                n_stuck = int(stuck.sum())  # a second read, in IRLS steps only
        n_go = n_todo - n_stop - n_stuck  # (stop and stuck: disjoint sets of active rows)
        if n_special:
            u, active, unres, n_go = _full_rule(pen, x, u, a, ar, tol, need_grid, eps, active, n_todo, unres, k1, d2,
                                                s1, n, c, H, weyl, pd, good, step, u_nt, new, same, astep, au, lim,
                                                noise, quiet, slack)
        else:
            at_stop = u_nt
            if n_stuck:
                unres, stop = unres | stuck, stop | stuck
                # A stop on a quiet gradient keeps u, with the Newton point's tangent (value u).
                at_stop = torch.where(stuck.unsqueeze(-1), u - (step - step.detach()), u_nt)
            if every and at_stop is new:  # (every row takes u_nt)
                u = new
            else:
                u = torch.where(stop.unsqueeze(-1), at_stop,
                                new if every else torch.where(active.unsqueeze(-1), new, u))
            active = ~stop if every else active & ~stop
        n_todo = n_go
        if n_todo == 0:
            return u, unres
    warn(
        f"robust_vector_pool(penalty={pen.name!r}): {n_todo} of {u.shape[0]} row(s) did not "
        f"reach tol={tol:g} within max_iter={max_iter}; returning the last iterate",
        SolverWarning)
    return u, unres


def _full_rule(pen, x, u, a, ar, tol, need_grid, eps, active, n_todo, unres, k1, d2, s1, n, c, H, weyl, pd, good,
               step, u_nt, new, same, astep, au, lim, noise, quiet, slack):
    """One step's decision by the module docstring's full rule, for a step where some
    active row has a quiet gradient or an H not shown positive definite: ``(u, active,
    unres, rows still to go)``. (The step's point ``new`` is the rule's already; n_todo
    rows are active.)"""
    every = n_todo == active.shape[0]  # (no mask by `active` needed)
    with torch.no_grad():
        lam = torch.minimum(k1, d2).sum(-1) if weyl is None else weyl
        if H is not None:  # and >= s − ‖H − sI‖_F (Huber's outliers: Weyl's bound is 0)
            B = H.clone()
            B.diagonal(dim1=-2, dim2=-1).sub_(s1.unsqueeze(-1))
            lam = torch.maximum(lam, s1 - torch.linalg.matrix_norm(B))
        pd_c = (lam > 0) if pd is None else pd
        near = good & ~quiet & (astep <= lim)
        resolved = (lam > 0) & (noise / lam <= lim)
        if need_grid:
            resolved &= _on_grid(au, ar, tol, eps, x.dtype)
        firm = pd_c & resolved
        stop = (near if pd is not None else near & pd_c) | (quiet & firm)  # (near: good, pd_c where pd)
        rare = (quiet & ~firm) | ~pd_c
        if not every:
            stop, rare = stop & active, rare & active
    stuck = ~(stop | rare) & same if every else active & ~(stop | rare) & same
    stop = stop | stuck
    # (stop and rare: disjoint sets of active rows, by pd_c, quiet and firm)
    n_rare, n_stop = torch.stack([rare, stop]).sum(-1).tolist()  # one host sync
    n_go = n_todo - n_rare - n_stop
    if n_rare:
        stop, new, unres = _rare(pen, x, u, a, ar, tol, rare, stop, new, unres, s1, n, c, near, quiet, noise,
                                 au, lim, slack)
        stuck_r = rare & ~stop & (new == u).all(-1)
        stuck, stop = stuck | stuck_r, stop | stuck_r
        n_go = int((active & ~stop).sum())
    unres = unres | stuck
    # A stop on a quiet gradient keeps u, with the Newton point's tangent (value u exactly).
    at_stop = torch.where((quiet | stuck).unsqueeze(-1), u - (step - step.detach()), u_nt)
    u = torch.where(stop.unsqueeze(-1), at_stop, new if every else torch.where(active.unsqueeze(-1), new, u))
    return u, ~stop if every else active & ~stop, unres, n_go


def _rare(pen, x, u, a, ar, tol, rare, stop, new, unres, s1, n, c, near, quiet, noise, au, lim, slack):
    """The rows whose step or stop needs H's smallest eigenvalue: a quiet gradient where
    the bound on it does not show H positive definite or the row resolved, or H not shown
    positive definite (C > N, or a nonconvex penalty's curvature). Decides their stops;
    where H is not positive definite the row moves to the lowest of its step and trial
    points along H's direction of lowest curvature (a saddle or a maximum with a quiet
    gradient is left that way; elsewhere IRLS crawled through the concave region: Welsch
    at 0.013 alpha per step)."""
    idx = rare.nonzero().squeeze(-1)
    with torch.no_grad():
        s_i, n_i, c_i = s1[idx], n[idx], c[idx]
        lam, v = lowest(s_i, n_i, c_i)
        pd = lam > forming_noise(s_i, n_i, c_i)  # (positive definite beyond the rounding of forming H)
        q = quiet[idx]
        eps = torch.finfo(lam.dtype).eps
        flat = q & pd & ((noise[idx] / lam > lim[idx]) | ~_on_grid(au[idx], ar[idx] if ar.dim() else ar, tol, eps,
                                                                    lam.dtype))
        # Where H is positive definite the row halts on a near step or a quiet gradient and
        # keeps its step: no trial points.
        halt = (near[idx] | q) & pd
    stop = stop.index_put((idx,), halt)
    unres = unres.index_put((idx,), unres[idx] | flat)
    sub = (~pd).nonzero().squeeze(-1)
    if sub.numel():
        stop, new = _escape(pen, x, u, a, ar, idx.index_select(0, sub), v.index_select(0, sub),
                            q.index_select(0, sub), stop, new, slack)
    return stop, new, unres


def _escape(pen, x, u, a, ar, j, v, q, stop, new, slack):
    """The rows j whose H is not positive definite: to the lowest of the trial points u ±
    t alpha v (v: the direction of lowest curvature), the step's point and u; a row halts
    where its gradient is quiet and none is lower than u (by the slack)."""
    with torch.no_grad():
        a_j = (ar[j] if ar.dim() else ar.expand(j.shape)).unsqueeze(-1)
        t = torch.tensor([s * r for r in _ESCAPE for s in (1.0, -1.0)], dtype=u.dtype, device=u.device)
        u_j = u[j].detach()
        trial = torch.cat([u_j.unsqueeze(-2) + (a_j * t).unsqueeze(-1) * v.unsqueeze(-2),
                           new[j].detach().unsqueeze(-2), u_j.unsqueeze(-2)], -2)  # (r, T + 2, C)
        aa = a[j].unsqueeze(-1) if a.dim() else a
        ft = pen.phi(torch.linalg.vector_norm(trial.unsqueeze(-2) - x[j].detach().unsqueeze(-3), dim=-1),
                     aa).sum(-1)
        f_u = ft[:, -1]
        fbest, best = ft[:, :-1].min(-1)
        lower = fbest < f_u - slack[j]
        escape = lower & (best < t.numel())
    stop = stop.index_put((j,), q & ~lower)
    moved = trial[torch.arange(j.numel(), device=u.device), best]
    new = new.index_put((j,), torch.where(escape.unsqueeze(-1), moved + (u[j] - u[j].detach()), new[j]))
    return stop, new


def solve(pen: Penalty, x: torch.Tensor, a: torch.Tensor, tol: float, max_iter: int, starts: int,
          batch: tuple[int, ...] | None = None) -> torch.Tensor:
    """The pooled points (R, C) of the sets x (R, N, C): the mean (quadratic); a polish
    from the mean or median (convex) or from the multi-start search (nonconvex). ``batch``:
    the caller's batch shape of the R sets, to name them in the warning (flat if None)."""
    if isinstance(pen, Quadratic):  # (by type: a user penalty may share the name)
        return x.mean(-2)
    if pen.convex:
        # From the mean or the coordinate median, whichever has the lower objective: from
        # the mean alone, one outlier 1e70 away put the start 1e69 off, and IRLS (about
        # 4-fold closer per step there, Newton's steps rejected) stopped at max_iter, 2.5e29
        # off at 1e100 (with a SolverWarning).
        xd = x.detach()
        mean, med = xd.mean(-2), _centre(xd).squeeze(-2)
        N = x.shape[-2]  # (both objectives in one pass of phi)
        f_mean, f_med = pen.phi(torch.cat((geometry(xd, mean)[1], geometry(xd, med)[1]), -1), a).unflatten(
            -1, (2, N)).sum(-1).unbind(-1)
        u = torch.where((f_med < f_mean).unsqueeze(-1), med, mean)
    else:
        # The start only picks the basin; the polish's steps (Newton; the truncated
        # quadratic's mean of its inliers) carry the derivative where these ops are
        # differentiated (torch.func.jacfwd did until 2026-12-05; the node's Function now
        # gives every derivative). Differentiated, the search's distances, square roots
        # of 0 at its data-point starts, made NaN tangents that reached the Jacobian
        # (jacfwd over several Welsch sets).
        u = _start(pen, x.detach(), a.detach(), starts, max_iter)
    if isinstance(pen, TruncatedQuadratic):  # its Newton step is the IRLS step, the inliers' mean
        return _polish_irls(pen, x, u, a, tol, max_iter)
    u, unres = polish(pen, x, u, a, tol, max_iter)
    n_unres = int(unres.sum())
    if n_unres and x.dtype == torch.float32:
        # Float32 rows whose gradient's rounding hides the minimiser (a data point at 1e7
        # alpha from the origin: the grid of u is an alpha wide) are solved again in
        # float64 from where they stopped.
        idx = unres.nonzero().squeeze(-1)
        a64 = (a.index_select(0, idx) if a.dim() > 0 else a).double()
        u64, unres64 = polish(pen, x.index_select(0, idx).double(), u.index_select(0, idx).double(), a64, tol,
                              max_iter)
        u = u.index_copy(0, idx, u64.to(u.dtype))
        unres = unres.index_copy(0, idx, unres64)
        n_unres = int(unres.sum())
    if n_unres:
        warn(
            f"robust_vector_pool(penalty={pen.name!r}): {shown_indices(unres, batch)} cannot be resolved to "
            f"tol={tol:g} in float64: the objective is so flat there that the rounding noise of its gradient, over its "
            "curvature, exceeds tol (alpha + |y|) or the span over which that curvature holds (alpha / 2 "
            "near a data point); returning the point where the gradient is at its noise level",
            SolverWarning)
    return u
