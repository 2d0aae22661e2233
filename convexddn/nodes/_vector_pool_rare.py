r"""The polish of robust vector pooling, its rare steps: the gradient's rounding noise, H's lowest
curvature, and the decision of a step where some row has a quiet gradient or an H not shown positive
definite (:func:`full_rule`), with its escapes from saddles and maxima. The rule is stated in
:mod:`._vector_pool_polish`.

The step's terms come as ``(κ, φ'', n, c)`` per point (R, N) / (R, N, C), or, for a set whose points
are taken in chunks (:mod:`._vector_pool_sums`), as their sums (:class:`~._vector_pool_sums.Sums`,
with H formed): what these steps read of them is H, its smallest eigenvalue and Σ min(κ_i, φ''_i).
"""
from __future__ import annotations

import math

import torch

from ._vector_pool_solvers import _forming_noise, _hessian, forming_noise
from ._vector_pool_sums import Sums, gradient_noise_of, phi_sums
from .pooling.rounding import _LOCAL_SPAN, grid

# Trial steps along a direction of negative curvature, in alpha (both signs).
_ESCAPE = (2.0, 1.0, 0.5, 0.25, 0.125, 1.0 / 16)


def gradient_noise(k1: torch.Tensor, d2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(r,): the rounding noise of the computed gradient g, eps (2.5 √N ‖φ'‖₂ + 4 Σ_i
    |φ''(z_i)| z_i) (:mod:`._vector_pool_polish`), from κ_i = φ'(z_i)/z_i ``k1``, φ''(z_i) ``d2`` and
    the distances ``z`` (r, N). The polish's stopping rule, and the refinement's bound on
    y's distance to the minimiser (:mod:`._vector_pool_refine`)."""
    return gradient_noise_of(torch.linalg.vector_norm(k1 * z, dim=-1), torch.linalg.vecdot(d2.abs(), z), z.shape[-1],
                             z.dtype)


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


def _on_grid(au: torch.Tensor, a: torch.Tensor, tol: float, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Whether u's own rounding, ``4 eps ‖u‖∞``, is within the tolerance (rows stopped on a
    quiet gradient are unresolved where it is not) and, in float32, within the span
    alpha / 2: beyond it the grid of u is coarser than the curvature near a data point,
    whose quiet gradient then says nothing of the points between, and such rows are
    solved again in float64."""
    g = grid(au, eps)
    ok = g <= tol * (a + au)
    return ok & (g <= _LOCAL_SPAN * a) if dtype == torch.float32 else ok


def full_rule(pen, x, u, a, ar, tol, need_grid, eps, active, n_todo, unres, terms, s1, H, weyl, pd, good,
              step, u_nt, new, same, astep, au, lim, noise, quiet, slack, chunks):
    """One step's decision by the full rule (:mod:`._vector_pool_polish`), for a step where some
    active row has a quiet gradient or an H not shown positive definite: ``(u, active,
    unres, rows still to go)``. (The step's point ``new`` is the rule's already; n_todo
    rows are active. ``terms``: module docstring; ``chunks``: the sets' point chunks, or None.)"""
    every = n_todo == active.shape[0]  # (no mask by `active` needed)
    with torch.no_grad():
        if weyl is not None:
            lam = weyl
        else:
            lam = terms.lo if isinstance(terms, Sums) else torch.minimum(terms[0], terms[1]).sum(-1)
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
        stop, new, unres = _rare(pen, x, u, a, ar, tol, rare, stop, new, unres, s1, terms, H, near, quiet, noise,
                                 au, lim, slack, chunks)
        stuck_r = rare & ~stop & (new == u).all(-1)
        stuck, stop = stuck | stuck_r, stop | stuck_r
        n_go = int((active & ~stop).sum())
    unres = unres | stuck
    # A stop on a quiet gradient keeps u, with the Newton point's tangent (value u exactly).
    at_stop = torch.where((quiet | stuck).unsqueeze(-1), u - (step - step.detach()), u_nt)
    u = torch.where(stop.unsqueeze(-1), at_stop, new if every else torch.where(active.unsqueeze(-1), new, u))
    return u, ~stop if every else active & ~stop, unres, n_go


def _rare(pen, x, u, a, ar, tol, rare, stop, new, unres, s1, terms, H, near, quiet, noise, au, lim, slack, chunks):
    """The rows whose step or stop needs H's smallest eigenvalue: a quiet gradient where
    the bound on it does not show H positive definite or the row resolved, or H not shown
    positive definite (C > N, or a nonconvex penalty's curvature). Decides their stops;
    where H is not positive definite the row moves to the lowest of its step and trial
    points along H's direction of lowest curvature (a saddle or a maximum with a quiet
    gradient is left that way; elsewhere IRLS crawled through the concave region: Welsch
    at 0.013 alpha per step)."""
    idx = rare.nonzero().squeeze(-1)
    with torch.no_grad():
        s_i = s1[idx]
        if isinstance(terms, Sums):  # (chunked points: H formed, C <= N)
            lam, V = torch.linalg.eigh(H[idx])
            lam, v = lam[:, 0], V[:, :, 0]
            fn = _forming_noise(s_i, terms.cabs[idx], *x.shape[-2:])
        else:
            n_i, c_i = terms[2][idx], terms[3][idx]
            lam, v = lowest(s_i, n_i, c_i)
            fn = forming_noise(s_i, n_i, c_i)
        pd = lam > fn  # (positive definite beyond the rounding of forming H)
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
                            q.index_select(0, sub), stop, new, slack, chunks)
    return stop, new, unres


def _escape(pen, x, u, a, ar, j, v, q, stop, new, slack, chunks):
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
        if chunks is None:
            ft = pen.phi(torch.linalg.vector_norm(trial.unsqueeze(-2) - x[j].detach().unsqueeze(-3), dim=-1),
                         aa).sum(-1)
        else:  # ((r, T + 2, N) distances: a chunk of the points at a time)
            ft = phi_sums(pen, x.detach().index_select(0, j), trial, aa, chunks)
        f_u = ft[:, -1]
        fbest, best = ft[:, :-1].min(-1)
        lower = fbest < f_u - slack[j]
        escape = lower & (best < t.numel())
    stop = stop.index_put((j,), q & ~lower)
    moved = trial[torch.arange(j.numel(), device=u.device), best]
    new = new.index_put((j,), torch.where(escape.unsqueeze(-1), moved + (u[j] - u[j].detach()), new[j]))
    return stop, new

