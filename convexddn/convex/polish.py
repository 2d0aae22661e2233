"""Newton polishing of interior-point solutions on the exact complementarity condition.

On a second-order cone an interior-point method (ours, Clarabel's) leaves the slack and
the multiplier of an active cone misaligned by an angle of order :math:`\\sqrt{\\mu}`:
:math:`s^T z` only sees the misalignment to second order, so residuals of 1e-11 come
with solution errors of 1e-6 (measured on a ball projection with one extra linear
constraint; Clarabel at 1e-10 errs by 6e-6 there too). A Newton step on the KKT
conditions with the Jordan-product complementarity :math:`s \\circ z = 0`,

.. math::

    P\\,dx + A^T dz = -r_x, \\quad A\\,dx + ds = -r_z, \\quad
    L(z)\\,ds + L(s)\\,dz = -s \\circ z,

converges quadratically near a strictly complementary solution and removes it.
Only :math:`ds` is eliminated: the remaining :math:`(n + m)`-square system is
nonsymmetric (batched LU) and keeps bounded entries even where :math:`s` or :math:`z`
reach the boundary, where any further elimination through :math:`L(s)^{-1}` breaks
down (tried: entries of 1e31 after two steps). A step is kept where it lowers the KKT
residual.
"""
from __future__ import annotations

import torch

from .._linalg import lu_factor_ex
from .kkt import bmv
from .symmetric_cones import ConeLayout, soc_frame
from .tensor_cache import cached

__all__ = ["EXTEND", "better", "natural_residual", "polish", "rounding_level"]

# Residuals at most this many ulps are at rounding level (measured after converged
# Newton steps: 0.3-4 ulps).
_ROUNDING = 16
# Regularisation of the Newton matrix's dual block, relative to the equilibrated data's
# unit scale on the equality rows and to each pair's size on the cone rows (see
# _newton_step, _pair_scale).
_DELTA = 1e-10
# Residuals within this factor of each other (at rounding level) are a tie: a Newton
# step from a point at its rounding floor lands at that floor again, within a few units.
_TIE = 2.0
# Past its ``steps``, a run given ``extend`` goes on while its iterate's residual falls by at least
# _CONTRACT a step (see :func:`polish`); EXTEND is the plain runs' (:func:`~.certify._polish_subset`).
_CONTRACT, EXTEND = 0.75, 4


def rounding_level(like: torch.Tensor) -> float:
    """A relative residual at most this is at rounding level in ``like``'s dtype."""
    return _ROUNDING * torch.finfo(like.dtype).eps


def natural_residual(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(B,) :math:`\\max_i |\\min(s_i, z_i)|` over the nonnegative rows of ``s, z`` (B, m): the
    complementarity's natural residual, zero exactly where every pair has a member at 0
    (and none below). It bounds a solution's error linearly where the product
    :math:`s_i z_i` bounds it only by its square root."""
    z0, k = layout.zero, layout.nonneg
    return torch.minimum(s[:, z0:z0 + k], z[:, z0:z0 + k]).abs().amax(1) if k else s.new_zeros(s.shape[0])


def better(layout: ConeLayout, res: torch.Tensor, s: torch.Tensor, z: torch.Tensor, res_old: torch.Tensor,
           s_old: torch.Tensor, z_old: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(B,) whether the point with residual ``res`` (B,) and pairs ``s, z`` (B, m) beats the
    one with ``res_old, s_old, z_old``: the lower residual, except where the residual
    cannot tell them apart, in a program of nonnegative rows only: both at rounding level
    and within :data:`_TIE` of ``low`` (B,), the lowest residual the steps have met;
    there the lower :func:`natural_residual` (then the lower residual) wins.

    The residual measures complementarity by :math:`s_i z_i`, at rounding level once
    :math:`s_i, z_i` are ~1e-8, the interior point's end at a weakly active bound
    (s_i = z_i = 0 at the solution): the semismooth steps that take both to ~1e-19 left
    the residual at 8.7e-17, as it was, and the box [0, 1] projection of x_i = 0 came
    out at y_i = 3.8e-9. Only near ``low``: a relative residual at rounding level may
    still hide the error of a badly scaled element (a box [-1, 1] projection with an
    entry at 1e10: a point of residual 4e-18 preferred by its natural residual to one of
    5e-26 left y 6.5e-9 off). (Not on second-order cones: there s ∘ z at rounding hides
    a misalignment that min(s_i, z_i) over the nonnegative rows does not see; a tie there
    goes to the newer point, a Newton step's: a ball of radius 1e-6, iterated to μ ~ 1e-22
    by :mod:`.pairs`, kept the interior point, y 2e-10 and dy/dx 1.2e-4 off, the step exact.)
    """
    lower = res < res_old
    top = torch.maximum(res, res_old)
    tie = (top <= rounding_level(res)) & (top <= _TIE * low)
    if layout.soc:
        return lower | tie
    if not layout.nonneg:
        return lower
    nat, nat_old = natural_residual(layout, s, z), natural_residual(layout, s_old, z_old)
    return torch.where(tie, (nat < nat_old) | ((nat == nat_old) & lower), lower)


def _arrow(layout: ConeLayout, u: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """L(u) V column by column: u (B, mc), V (B, mc, k) -> (B, mc, k)."""
    B, mc, k = V.shape
    flat = V.permute(0, 2, 1).reshape(B * k, mc)
    out = layout.jordan(u.repeat_interleave(k, 0), flat)
    return out.reshape(B, k, mc).permute(0, 2, 1)


def _pair_scale(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """(B, mc) the regularisation's scale beside L(s) on each row: on a nonnegative row
    the size of its complementary pair, |s_i| + |z_i|, times its row's own size ``rho``
    (B, mc) (its terms' magnitude, max(|b_i|, (|A||x|)_i)), each where below 1, the
    product never below sqrt(eps) (an exactly zero pair keeps a nonzero row); 1
    elsewhere. An absolute δ is not small beside a pair whose members are both small: a
    transport plan's entry of 2e-9 (a marginal of 1e-9) beside δ = 1e-10 kept 5 % of its
    multiplier each step (dz_i = -z_i s_i / (s_i + δ)), and six steps left the point where
    they found it. Nor may it grow with a large multiplier: δ·z beside s ≈ 1e-12 at z ≈
    2.8e7 (a badly scaled LP) swamped L(s), and the polish stalled where δ alone had
    converged. Nor is a pair's size the slack's unit: the unit ball written ‖1e-6 y‖ ≤
    1e-6 leaves its epigraph's bound t ≤ 1e-6 with terms of 2e-4 (equilibrated) and a
    slack of 2e-12 beside a multiplier of 0.1, where δ·0.1 removed 15 % of the pair per
    step: 1e-7 inside the ball, y stayed 3e-8 off (on the sphere) and its gradient 0.5 off."""
    k = layout.nonneg
    scale = torch.ones_like(s)
    if k:
        pair = (s[:, :k].abs() + z[:, :k].abs()).clamp_(max=1.0) * rho[:, :k].clamp(max=1.0)
        scale[:, :k] = pair.clamp_(min=torch.finfo(s.dtype).eps ** 0.5)
    return scale


def _arrow_into(layout: ConeLayout, u: torch.Tensor, out: torch.Tensor) -> None:
    """Write L(u), the matrix of v -> u ∘ v, into ``out`` (B, mc, mc), zero on entry.

    Its entries directly: ``diag(u)`` on the nonnegative rows; per second-order cone
    :math:`u_0 I` plus :math:`u_1` in the head's row and column. (Formed as L(u) I by
    :func:`_arrow`, it took five more (B, mc, mc) temporaries: the Newton step's peak.)
    The values are those Jordan products, to the sign of a zero.
    """
    k = layout.nonneg
    diag = out.diagonal(dim1=-2, dim2=-1)
    diag[:, :k] = u[:, :k]
    if not layout.soc:
        return
    idx = layout.index(u.device)
    us = u[:, k:]
    diag[:, k:] = us[:, idx.heads][:, idx.soc_id]
    tail, head = cached(layout._cache, ("arrow", str(u.device)), lambda: _arrow_rows(layout, u.device))
    out[:, head, tail] = u[:, tail]
    out[:, tail, head] = u[:, tail]


def _arrow_rows(layout: ConeLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the cones' u_1 parts and the head of each one's cone, among the cone
    rows: formed from the host's index once per layout and device (kept: a copy to the
    device on every Newton step would sync it)."""
    k = layout.nonneg
    host = layout.index(torch.device("cpu"))
    tail = torch.nonzero(host.tail).squeeze(1)
    return tuple(k + v.to(device) for v in (tail, host.heads[host.soc_id[tail]]))


def _newton_step(P, q, A, b, layout: ConeLayout, x, s, z, fixed, decide=None, tight=False):
    """One full Newton step (dx, ds, dz) on the KKT conditions; (B,) failure mask.

    ``fixed``: what is the same at every step: ``(B, n)`` :func:`_empty_columns` of ``P, A``
    and ``|A|`` of the cone rows.
    ``decide``: ``(s, z) -> (active, inactive)`` masks of the complementary pairs that are
    decided, the nonnegative rows' and the second-order cones' Jordan-frame pairs; a
    nonnegative row's linearisation is then the limit one, :math:`s_i + ds_i = 0` (active)
    or :math:`z_i + dz_i = 0` (inactive), a cone's where both its pairs are decided the
    semismooth one of :func:`_soc_limit_rows`.
    ``tight``: the nonnegative rows ``decide`` takes as active are regularised at rounding
    level (``eps`` in place of :data:`_DELTA`, where smaller; see :func:`polish`).

    With :math:`ds = -r_z - A\\,dx` substituted, the system in :math:`(dx, dz)` is

    .. math::

        \\begin{bmatrix} P & A^T \\\\ A_E & 0 \\\\ -L(z) A_I & L(s) \\end{bmatrix}
        \\begin{bmatrix} dx \\\\ dz \\end{bmatrix} =
        \\begin{bmatrix} -r_x \\\\ -r_{z,E} \\\\ L(z) r_{z,I} - s \\circ z \\end{bmatrix},

    whose entries stay bounded as :math:`s` or :math:`z` reach :math:`\\partial K` (unlike
    any elimination through :math:`L(s)^{-1}`), factored by batched LU.
    """
    z0, n = layout.zero, P.shape[-1]
    B, m = s.shape
    rx = bmv(P, x) + bmv(A.mT, z) + q
    rz = bmv(A, x) + s - b
    sc, zc = s[:, z0:], z[:, z0:]
    # The Jacobian's s and z: a decided pair's smaller member at its limit 0. Full Newton
    # steps on z_i s_i = 0 with both small oscillate where x moves by a fair part of s_i
    # (a box of half-width 7e-5 around a component of an ill-conditioned QP: z_i crossed
    # zero each step and the point stayed 2e-6 off, normwise).
    # A decided row is the limit's own, scaled to unit coefficients: s_i + ds_i = 0 reads
    # (with ds = -r_z - A dx) -A_i dx = r_z,i - s_i, and z_i + dz_i = 0 reads dz_i = -z_i.
    # (Multiplied by z_i, resp. s_i, as the Jordan rows are, a multiplier of 1e-9 met the
    # regularisation δ below at 1e-10: each step gained only 10×.)
    sl, zl, comp = sc, zc, layout.jordan(sc, zc)
    delta = _DELTA
    if decide is not None and layout.nonneg:
        k = layout.nonneg
        active, inactive = decide(sc[:, :k], zc[:, :k])
        if tight:
            delta = torch.full_like(sc, _DELTA)
            delta[:, :k] = torch.where(active, min(torch.finfo(s.dtype).eps, _DELTA), _DELTA)
        sl = torch.cat([torch.where(active, 0.0, torch.where(inactive, 1.0, sc[:, :k])), sc[:, k:]], 1)
        zl = torch.cat([torch.where(active, 1.0, torch.where(inactive, 0.0, zc[:, :k])), zc[:, k:]], 1)
        comp = torch.cat([torch.where(active, sc[:, :k], torch.where(inactive, zc[:, :k], comp[:, :k])), comp[:, k:]],
                         1)
    K = P.new_zeros(B, n + m, n + m)
    K[:, :n, :n] = P
    K[:, :n, n:] = A.mT
    K[:, n:n + z0, :n] = A[:, :z0]
    K[:, n + z0:, :n] = -_arrow(layout, zl, A[:, z0:])
    _arrow_into(layout, sl, K[:, n + z0:, n + z0:])
    # Static regularisation of the dual block (−δ on the equality rows, +δ beside L(s), in
    # units of the pair's size on a nonnegative row):
    # redundant equality rows (the row and column sums of a doubly-stochastic matrix)
    # or dependent active constraints make K exactly singular, and LU then fails every
    # step. With δ the step along such a direction is bounded and the others move by
    # O(δ) relative, which the next step's exact residual corrects.
    dual = torch.diagonal(K[:, n:, n:], dim1=-2, dim2=-1)
    dual[:, :z0] -= _DELTA
    empty, cone_abs = fixed
    rho = torch.maximum(b[:, z0:].abs(), bmv(cone_abs, x.abs())) if layout.nonneg else None
    dual[:, z0:] += delta * _pair_scale(layout, sl, zl, rho)
    rhs = torch.cat([-rx, -rz[:, :z0], layout.jordan(zl, rz[:, z0:]) - comp], 1)
    if decide is not None and layout.soc:
        # Second-order cones whose frame pairs are decided: their semismooth rows instead.
        c = n + z0 + layout.nonneg
        J, phi, rows = _soc_limit_rows(layout, sc[:, layout.nonneg:], zc[:, layout.nonneg:], decide)
        As, rs, on = A[:, c - n:], rz[:, c - n:], rows.unsqueeze(-1)
        K[:, c:, :n] = torch.where(on, torch.bmm(J, As) - As, K[:, c:, :n])
        K[:, c:, c:] = torch.where(on, J, K[:, c:, c:])
        rhs[:, c:] = torch.where(rows, rs - bmv(J, rs) - phi, rhs[:, c:])
        del J
    # A variable that appears nowhere (its column of P and A zero: the unused entries of a
    # vector variable) leaves K's row and column zero, and LU failed every step: a sqrt
    # epigraph with such a t stayed at the interior point's √μ error, 7e-7. Its row reads
    # 0 · dx_j = −q_j; a unit pivot there gives dx_j = −q_j (0 wherever the program is
    # bounded) and the step of the program without it for the others.
    diag = torch.diagonal(K[:, :n, :n], dim1=-2, dim2=-1)
    diag += empty.to(P.dtype)
    # A non-finite matrix never reaches LAPACK: MKL's getrf can hang on NaN. (In place:
    # K and its factors are the step's two (B, n + m, n + m) tensors, and its peak.)
    bad = ~torch.isfinite(K).flatten(1).all(1)
    identity = torch.eye(n + m, dtype=P.dtype, device=P.device)
    torch.where(bad[:, None, None], identity, K, out=K)
    LU, piv, info = lu_factor_ex(K)
    del K
    failed = (info != 0) | bad
    torch.where(failed[:, None, None], identity, LU, out=LU)
    sol = torch.linalg.lu_solve(LU, piv, rhs.unsqueeze(-1)).squeeze(-1)
    dx, dz = sol[:, :n], sol[:, n:]
    ds = -rz - bmv(A, dx)
    ds = torch.cat([torch.zeros_like(ds[:, :z0]), ds[:, z0:]], 1)
    return dx, ds, dz, failed | ~torch.isfinite(sol).all(1)


def _soc_limit_rows(layout: ConeLayout, s: torch.Tensor, z: torch.Tensor, decide):
    """``(J, phi, rows)``: semismooth Newton rows :math:`(I - J)\\,ds + (J + \\delta I)\\,dz =
    -\\Phi` of the second-order cones (parts ``s, z`` ``(B, msoc)``) whose two Jordan-frame pairs
    ``decide`` decides (``rows`` ``(B, msoc)``: their rows; :func:`~.symmetric_cones.soc_frame`:
    :math:`s = a_1 c_1 + a_2 c_2 + t`, :math:`z = b_1 c_1 + b_2 c_2 + t`, :math:`c_{1,2} = (1,
    \\pm u)/2`). :math:`\\Phi = s - \\Pi_K(s - z)` is the natural residual, :math:`m_1 c_1 + m_2 c_2
    + t` with :math:`m_k` the member the decision takes to 0 (``phi`` ``(B, msoc)``), and ``J``
    ``(B, msoc, msoc)`` (block diagonal, δ I included) the projection's Jacobian at
    :math:`s - z`, with eigenvalues along :math:`c_1, c_2` and the tangent

    - 1, 1, 1 where both pairs are inactive (s interior at the limit: :math:`dz = -z`, no δ);
    - 0, 0, 0 where both are active (z interior: :math:`ds = -s`);
    - 1, 0, :math:`\\beta = \\lambda_1 / (\\lambda_1 - \\lambda_2)` where pair 1 is inactive and
      pair 2 active (both on the boundary), :math:`\\lambda_k = a_k - b_k`.

    At a strictly complementary solution they are the Jordan rows' limit (scaled); away from
    it they do not halve: a cone 1e-8 of its element's size from its tip, whose interior
    point ends with s and z ~1e-5 (both interior, their product at rounding), took Jordan
    steps that only halve both (a near-double root) and was left undecided after nine, the
    solution 1.5e-7 off and its gradient 0.29 off, warned about as not differentiable. (As
    arrow matrices, scaled by diag(2β, 2(1 - β), 1) in the frame, the rows along c₂ were
    1e-8 of the others at a ball's multiplier of 1e-8, and the steps swung across the tip.)"""
    a1, a2, b1, b2, u = soc_frame(layout, s, z)
    (act1, off1), (act2, off2) = decide(a1, b1), decide(a2, b2)
    lam1, lam2 = a1 - b1, a2 - b2
    inside, edge = off1 & off2, off1 & act2
    rows = layout._spread(inside | edge | (act1 & act2))
    beta = torch.where(inside, 1.0, torch.where(edge, lam1 / torch.where(edge, lam1 - lam2, 1.0), 0.0))
    idx = layout.index(s.device)
    head = (1 - idx.tail).to(s.dtype)
    spread = layout._spread
    t = s - spread(a1) * (head + u) / 2 - spread(a2) * (head - u) / 2  # s's part off the frame (z's too)
    phi = (spread(torch.where(off1, b1, a1)) * (head + u) + spread(torch.where(off2, b2, a2)) * (head - u)) / 2 + t
    # J = e₁ (1, u)(1, u)ᵀ/2 + e₂ (1, -u)(1, -u)ᵀ/2 + β (diag(tail) - u uᵀ), cone by cone: each
    # vector's entries in its cone's column of a (B, msoc, nsoc) matrix G, J = G diag(w) Gᵀ + diag.
    one_hot = torch.nn.functional.one_hot(idx.soc_id, len(layout.soc)).to(s.dtype)  # (msoc, nsoc)
    G = torch.cat([v.unsqueeze(-1) * one_hot for v in (head + u, head - u, u)], 2)
    w = torch.cat([(inside | edge).to(s.dtype) / 2, inside.to(s.dtype) / 2, -beta], 1)
    J = torch.bmm(G * w.unsqueeze(1), G.mT)
    J.diagonal(dim1=-2, dim2=-1).add_(spread(beta) * idx.tail + torch.where(spread(inside), 0.0, _DELTA))
    return J, phi, rows


def _empty_columns(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """(B, n) the variables of each element that appear nowhere: their column of ``P``
    (B, n, n) and of ``A`` (B, m, n) is exactly zero (``m = 0`` included: no rows)."""
    return ~((P != 0).any(-2) | (A != 0).any(-2))


def polish(P, q, A, b, layout: ConeLayout, x, s, z, residual_fn, steps: int = 3, settled=None, decide=None,
           tight=False, extend: int = 1):
    """Newton-polish (x, s, z); return each element's best point.

    Full steps are taken (the first one may raise the residual slightly while it
    removes an error of order √μ; the next lands at rounding level), and the best point
    over the steps is kept (:func:`better`: the lowest residual, or at a tie at rounding
    level the lowest natural residual), so an element the steps do not help keeps its
    interior-point solution. An element stops once its best point has a residual at
    rounding level and, where ``settled`` is given, satisfies it (later steps of the others
    change nothing of it: its point is the one it gets alone); the steps end when all have.

    Args:
        residual_fn: ``(x, s, z) -> (B,)`` relative KKT residual (cone violation included).
        settled: ``(x, s, z) -> (B,)`` bool, what a best point must also satisfy before
            the steps stop early (e.g. every complementary pair decided).
        decide: complementary pairs taken at their limit (see :func:`_newton_step`).
        tight: the rows ``decide`` takes as active regularised at rounding level, not by
            :data:`_DELTA`: δ damps the step along a direction where the active rows are
            nearly dependent, by λ/(λ + δ) with λ the curvature there. Two halfspaces whose
            normals differ by 1e-6 (λ ≈ 2e-13) kept the point 2.4e-7 off, at a residual of
            1.5e-13 no step lowered; tight, 7e-11 (float64's limit there: ~1e-10). Exactly
            dependent rows (a degenerate vertex) make the matrix singular to rounding then,
            their multipliers' split arbitrary: the caller keeps such a run only where it
            lowers the residual.
        extend: at most this many times ``steps`` in all, for an element whose iterate's residual
            still falls by :data:`_CONTRACT` a step once ``steps`` are spent. Near a double root
            (a bound whose multiplier lies below the interior point's √μ: 3λx² of |x|³ in a 3-norm
            ball's cone tree at x ~ 1e-6) the steps first raise the residual 100-fold, then halve
            it: cut at 3 or 6 they kept the interior point's, that bound on its wrong side (r = 6e-6
            for |x| = 1e-6 at a residual of 1.4e-11), and the derivative linearised there dropped the
            curvature of |x|³ (dx/da 1.0 for 0.9999979, silently); 12 reach rounding. Where the steps
            past ``steps`` end at rounding with a pair still open (``settled``), the run as cut is
            returned: both members halved to rounding at a cone's tip read as a kink there, which the
            semismooth steps from the cut point decide.

    Returns:
        ``(x, s, z, residual, polished)``: the best points, their residual and where a
        Newton step was taken.
    """
    best = (x, s, z)
    res = low = residual_fn(x, s, z)
    polished = torch.zeros_like(res, dtype=torch.bool)
    going = torch.ones_like(polished)  # not yet done: an element done keeps its best, as alone
    fixed = (_empty_columns(P, A), A[:, layout.zero:].abs())  # (|A| of the cone rows: each row's size)
    last = res  # (the iterate's own residual, which a first step may raise while it removes √μ's error)
    for step in range(steps * extend):
        dx, ds, dz, failed = _newton_step(P, q, A, b, layout, x, s, z, fixed, decide, tight)
        x, s, z = x + dx, s + ds, z + dz
        rn = residual_fn(x, s, z)
        # An element whose step failed or left the finite numbers restarts from its best
        # point (a diverging one would otherwise feed inf/NaN to the next factorisation).
        lost = failed | ~torch.isfinite(rn)
        x, s, z = (torch.where(lost[:, None], bv, v) for v, bv in zip((x, s, z), best))
        low = torch.where(lost, low, torch.minimum(low, rn))
        take = going & ~lost & better(layout, rn, s, z, res, *best[1:], low)
        best = tuple(torch.where(take[:, None], v, bv) for v, bv in zip((x, s, z), best))
        res = torch.where(take, rn, res)
        polished = polished | take
        # Rounding level: no further step can lower the residual (one host sync per step).
        floor = res <= rounding_level(res)
        ok = settled(*best) if settled is not None else True
        done = floor & ok
        falls = ~lost & (rn <= _CONTRACT * last)
        last = torch.where(lost, last, rn)
        going = going & ~done & (falls | (step + 1 < steps))
        if step + 1 == steps:
            cut = (*best, res, polished)  # (the run cut at ``steps``)
        if not bool(going.any()):
            break
    if steps and step >= steps and settled is not None:  # (the run as cut where its extension ended open)
        back = floor & ~ok  # (the last pass's: the same best)
        return tuple(torch.where(back.view(-1, *(1,) * (v.dim() - 1)), c, v)
                     for c, v in zip(cut, (*best, res, polished)))
    return (*best, res, polished)
