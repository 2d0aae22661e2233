"""Cone rows whose slack lies far beyond the solution: solved again without them, in the solution's unit.

The equilibration's solution scale σ (:mod:`.equilibration`) measures the right-hand side,
and a huge *inactive* bound (``y <= 1e10``, ``sum(y) <= 1e10``, ``norm(y) <= 1e10``) makes it
the bound's size, not the solution's. The iterations' measures are relative to that unit
(their "1 +"), so they stop with the solution resolved to ``tol`` of the bound: ``relu(x)``
under ``norm(y) <= R`` came back 5e-10 off at R = 1e3 and 7e-8 at 1e6 (per element: 1e-16),
and at 1e10 not at all (elements sent per element, with false warnings). Solving again at
the solution's size, with the bound kept, is no cure: its slack, ~1e12 times the solution,
starts the iterations at a complementarity ~1e12 too large (30-40 iterations, numerical
trouble at 1e12), and where the bound's pairs are undecided in the inflated unit (s ≈ z ≈
√μ) the solution's size cannot even be read from the point (it reads √μ).

So the rows and cones whose slack is far inside K at the first solution (its distance to
the boundary :data:`FAR` times the solution's size and its multiplier) are relaxed: their
rows of A set to 0 and their right-hand side to the cone's identity, so that they hold
whatever x is. Where that shrinks σ (computed from the remaining data) by :data:`SHRINK`
or more, the relaxed program is solved in its own unit; its solution, with each relaxed
row's slack ``b - Ax`` and a multiplier ~0 (the relaxed pair's complementarity), is a
solution of the original program wherever those slacks lie in K (the relaxed program's
feasible set contains the original's), which is checked; elsewhere the first point
stays. Variables that only the relaxed rows touched (CVXPY's epigraph variable t of
``norm(y) <= t, t <= R``, free between its bounds) keep their first values.
"""
from __future__ import annotations

from typing import Callable

import torch

from .cone_solution import SOLVED
from .equilibration import Scaled, rescale, solution_scale
from .kkt import row_inf
from .symmetric_cones import ConeLayout

__all__ = ["FAR", "SHRINK", "objective_size", "relax_far_rows"]

# A cone row (a second-order cone) is far inside K where its slack's distance to the boundary
# is at least this many times the solution's size (objective_size) and its multiplier.
FAR = 10.0
# ... and the relaxed program is solved where its σ is at most this fraction of the first one.
SHRINK = 0.5


def _costed(d: Scaled) -> tuple[torch.Tensor, torch.Tensor]:
    """``((B, n), (B,))``: the variables the objective sees (a column of P or an entry of q;
    all where none is), and P's largest entry. Both from P's diagonal: P is positive
    semidefinite, so a column is zero where its diagonal entry is, and
    :math:`|P_{ij}| \\le \\sqrt{P_{ii} P_{jj}}` puts the largest entry there (a pass over the
    whole of P cost 0.1 ms of the n = 50 QP's forward at batch 64)."""
    diag = d.P.diagonal(dim1=1, dim2=2)
    cols = (diag != 0) | (d.q != 0)
    p_max = diag.abs().amax(1) if diag.shape[1] else d.q.new_zeros(d.q.shape[0])
    return cols | ~cols.any(1, keepdim=True), p_max


def objective_size(d: Scaled, x: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` the primal solution's size in the units of ``d``: ``|x_j|`` over the variables
    the objective sees (``cols``, by default :func:`_costed`'s). A variable without cost, such
    as CVXPY's epigraph t of a norm bound, may sit anywhere between its bounds (at ~R/2 under
    ``norm(y) <= R``): it is no measure of the solution. Nor are the multipliers, in the
    inflated unit: with ``sum(y) == 1`` beside the bound, b's equality entry is ~1/R there and
    the dual direction (ν, λ = ν 1) of that row and ``y >= 0`` costs ~nothing, so they came
    out ~1 beside a solution of 1e-13."""
    cols = _costed(d)[0] if cols is None else cols
    return row_inf(torch.where(cols, x, 0.0))


def _far(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``(B, mc)`` the cone rows far inside K (whole second-order cones): the slack's distance
    to the boundary (smallest eigenvalue) :data:`FAR` times the solution's size and the
    multiplier's largest eigenvalue, inactive beyond doubt. (Not the slack alone: with
    ``sum(y) == 1`` beside the bound, the inflated unit's first point had slacks of 1.2e-11 on
    ``y >= 0`` beside a solution of 3.3e-13, with multipliers of 1.1.)"""
    k = layout.nonneg
    sc, zc = s[:, layout.zero:], z[:, layout.zero:]
    limit = FAR * size[:, None]
    far = (sc[:, :k] > limit) & (sc[:, :k] > FAR * zc[:, :k])
    if layout.soc:
        idx = layout.index(s.device)
        us, uz = sc[:, k:], zc[:, k:]
        lam = us[:, idx.heads] - torch.sqrt(layout._seg(us * us * idx.tail))
        top = uz[:, idx.heads] + torch.sqrt(layout._seg(uz * uz * idx.tail))
        far = torch.cat([far, layout._spread((lam > limit) & (lam > FAR * top))], 1)
    return far


def _unit(layout: ConeLayout, like: torch.Tensor) -> torch.Tensor:
    """``(B, m)`` the identity of K on the cone rows, 0 on the zero cone's."""
    return torch.cat([torch.zeros_like(like[:, :layout.zero]), layout.unit(like[:, layout.zero:])], 1)


def _relaxed(d: Scaled, layout: ConeLayout, far: torch.Tensor, sigma: torch.Tensor) -> Scaled:
    """The program ``d`` with the rows ``far`` (B, m) relaxed (``0 x + s = e``), at the σ ``sigma``."""
    c, sig = d.c[:, None], d.sigma[:, None]  # undo: P̃ = P̂/c, q̃ = σ q̂/c, b̃ = σ b̂ (Ruiz units)
    b = torch.where(far, _unit(layout, d.b) * sigma[:, None], d.b * sig)
    return rescale(d.P / c[:, :, None], d.q * sig / c, torch.where(far[:, :, None], 0.0, d.A), b, d.D, d.E, sigma)


def _centred(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, s_new: torch.Tensor,
             rows: torch.Tensor) -> torch.Tensor:
    """``(B, m)`` multipliers for the slacks ``s_new`` on the relaxed ``rows``: each pair
    (cone) keeps the relaxed point's complementarity, ``s_new ∘ z_new = <s, z> e`` (0 would
    stop the structured Newton step, which needs an interior pair, and a multiplier kept as
    it was would pair a slack ~R with μ: far off the central path)."""
    z0, k = layout.zero, layout.nonneg
    mu = (s * z)[:, z0:]
    if layout.soc:
        mu = torch.cat([mu[:, :k], layout._spread(layout._seg(mu[:, k:]))], 1)
    unit = layout.unit(mu)
    safe = torch.where(rows[:, z0:], s_new[:, z0:], unit)
    out = layout.jordan_solve(safe, mu * unit)
    return torch.cat([z[:, :z0], out], 1)


def relax_far_rows(d: Scaled, layout: ConeLayout, point: tuple, solve: Callable) -> tuple:
    """The first solution ``point`` = ``(x, s, z, status, iterations, certified)`` of ``d``
    improved where far rows inflate σ (see the module docstring).

    Args:
        solve: ``Scaled -> (d', x, s, z, status, iterations, certified)``, the iterations
            on a part of the batch (σ refined as for a fresh program).

    Returns:
        ``(d, x, s, z, status, iterations, certified)``: σ changed where the relaxed
        solution was taken (its iterations added to the first ones).
    """
    x, s, z, status, iterations, certified = point
    z0 = layout.zero
    if not layout.cone_rows:
        return (d, *point)
    cols, p_max = _costed(d)
    size = objective_size(d, x, cols)
    far = _far(layout, s, z, size) & (~certified & (size > 0))[:, None]
    if not bool(far.any()):  # (a host sync; most programs end here, after a dozen small ops)
        return (d, *point)
    far = torch.cat([torch.zeros_like(s[:, :z0], dtype=torch.bool), far], 1)
    # σ of the rest, from the equilibrated data (c cancels in q/P; σ scales q and b alike).
    sigma = solution_scale(p_max, d.q * d.sigma[:, None], torch.where(far, 0.0, d.b * d.sigma[:, None]))
    idx = torch.nonzero(far.any(1) & (sigma <= SHRINK * d.sigma)).squeeze(1)
    if not idx.numel():
        return (d, *point)
    pick = lambda v: v.index_select(0, idx)  # noqa: E731
    sub = d.select(idx)
    part, xr, sr, zr, st, its, cert = solve(_relaxed(sub, layout, pick(far), pick(sigma)))
    full = sub.with_sigma(part.sigma)  # (the same c: P and q are not relaxed)
    # Variables only the relaxed rows touched are free in the relaxed program: their first value.
    free = ~((full.P != 0).any(1) | (full.q != 0) | (part.A != 0).any(1))
    xr = torch.where(free, pick(x) * (pick(d.sigma) / part.sigma)[:, None], xr)
    rows = pick(far)
    s_far = torch.where(rows, full.b - torch.bmm(full.A, xr.unsqueeze(-1)).squeeze(-1), sr)
    zr = torch.where(rows, _centred(layout, sr, zr, s_far, rows), zr)
    sr = s_far
    # Solved, and the relaxed rows' slacks in K: a solution of the original program.
    inside = layout.violation(torch.where(rows, sr, _unit(layout, sr))[:, z0:]) == 0
    take = (st == SOLVED) & ~cert & inside & torch.isfinite(xr).all(1) & torch.isfinite(zr).all(1)
    keep = idx[take]
    sel = lambda v: v[take]  # noqa: E731
    d = d.merge(keep, full.select(torch.nonzero(take).squeeze(1)))
    x, s, z, status = (v.index_copy(0, keep, sel(w)) for v, w in zip((x, s, z, status), (xr, sr, zr, st)))
    iterations = iterations.index_add(0, idx, its)
    return d, x, s, z, status, iterations, certified.index_copy(0, keep, sel(cert))
