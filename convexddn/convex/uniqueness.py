"""Is a batched cone program's solution unique? The test in the limit system.

The backward (:mod:`.vjp`) differentiates through the KKT system factorised at the
solution, with each active row's slack lifted to 1e-12 (a weight ~z/1e-12). A
non-unique solution (an LP with an edge of optima, an SOCP with a disc) makes that system
singular in exact arithmetic, but rounding caps the blow-up of its solve at about
lift/(eps·max z): 2.5e3 to 1.6e6 on the audit's LPs and SOCPs, never the 1e7 the
amplification test needs. So uniqueness is tested in the limit system itself:

.. math::

    S_{\\lim} = P + C^\\top C,

``C`` the rows that constrain ``x`` at the solution, each scaled to unit length (only
whether a row is present matters; rows 1e-4 next to 1e4 in one cone, squared, had a
condition of 1e16 at a unique solution): the equalities, the nonnegative rows and, per
second-order cone, its two Jordan-frame directions and its tangent rows, all but those
decided inactive. ``x`` is unique iff :math:`S_{\\lim}` is nonsingular; a right-hand side
that reaches its null space is amplified by ~1/(n eps) (2.7e14 to 1.4e15 measured),
one that does not by at most its condition (2.2e5 over the test suite and the bench
problems).

:math:`C^\\top C` is not formed: it squares the rows' own condition, and equality rows
1e-6 apart (a unique vertex, derivative 1.2e6) made an eigenvalue of 1e-12, amplified
beyond :data:`LIMIT_AMPLIFICATION`: "not unique". In the basis of ``C``'s right singular
vectors, :math:`C = U \\Sigma V^\\top`, :math:`V^\\top S_{\\lim} V = V^\\top P V +
\\Sigma^2`, and the Jacobi scaling of that matrix takes each :math:`\\sigma_i^2` to 1
wherever :math:`P` adds nothing along :math:`v_i`: rows ``d`` apart amplify by O(1), not
1/d². Singular values below 1/:data:`LIMIT_AMPLIFICATION` (the amplification they stand
for, unsquared; rounding leaves ~max(rows, n) eps) and :math:`V^\\top P V`'s diagonal at
rounding (:math:`\\le` n eps max) are zeros, so a null direction keeps its ~1/(n eps).
An auxiliary variable that is not unique (an epigraph variable between two inactive bounds)
is reached neither by the requested outputs' probe nor, usually, by the cotangent: no
warning for it.
"""
from __future__ import annotations

import math

import torch

from .._generic import generic_vector
from .certify import at_kink, decided
from .symmetric_cones import soc_frame
from .zero_rows import zero_rows

__all__ = ["INCONSISTENT_AMPLIFICATION", "INCONSISTENT_SURE", "LIMIT_AMPLIFICATION", "limit_inconsistency",
           "limit_nonunique", "limit_rows", "rows_basis", "undetermined"]

# Amplification of the Jacobi-scaled limit matrix above which a right-hand side reaches
# a null direction (see the module docstring: ~1e15 there, at most 2.2e5 elsewhere).
LIMIT_AMPLIFICATION = 1e10


def _present(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether a direction with slack part ``a`` and multiplier part ``b`` constrains the
    limit system: all but those decided inactive (H = ∞, :func:`~.certify.decided`)."""
    return ~decided(a, b)[1]


def _unit_rows(C: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    norm = C.norm(dim=-1)
    keep = present & (norm > 0)
    return C * torch.where(keep, 1.0 / torch.where(keep, norm, 1.0), 0.0).unsqueeze(-1)


def _tangent_rows(layout, u: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """``(B, msoc)`` mask of the tangent rows :math:`t_j = A_j - u_j\\,u^\\top A_{tail}`
    (``j`` a tail row, :math:`t = (I - u u^\\top) A_{tail}`) that enter the limit system.

    A cone's tangent rows carry :math:`H = s_0/z_0` (:class:`~.limit_scaling.LimitScaling`):
    the boundary's curvature weighted by the multiplier, finite wherever the multiplier
    does not vanish, i.e. unless both Jordan-frame pairs are decided inactive (``on``
    ``(B, nsoc)`` False). :math:`s_0/z_0` itself converges to a value of the data's order,
    not to 0 or ∞: tested against :data:`~.certify.DECIDED` it dropped a strictly
    complementary cone's curvature at :math:`z_0 < 10^{-2} s_0` and called a unique
    solution not unique.

    The rows are dependent, :math:`\\sum_j u_j t_j = u^\\top (I - u u^\\top) A_{tail} = 0`:
    the row at ``u``'s largest entry is a combination of the others (coefficients
    :math:`|u_i/u_j| \\le 1`) and is left out. Where ``u`` is a coordinate axis it is
    zero up to rounding, and scaled to unit length it was a constraint that does not exist
    (a segment of optima along a ray of the cone passed as unique)."""
    idx = layout.index(u.device)
    B, msoc = u.shape
    pos = torch.arange(msoc, device=u.device).expand(B, msoc)
    cone = idx.soc_id.expand(B, msoc)
    mag = (u * idx.tail).abs()
    top = mag.new_zeros(B, len(layout.soc)).scatter_reduce(1, cone, mag, "amax")
    first = torch.where((mag == layout._spread(top)) & (mag > 0), pos, msoc)
    first = torch.full_like(top, msoc, dtype=torch.long).scatter_reduce(1, cone, first, "amin")
    return layout._spread(on) & (idx.tail > 0) & (pos != layout._spread(first))


def limit_rows(d, layout, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(B, k, n)`` the unit rows ``C`` of the limit matrix :math:`P + C^\\top C` (see the
    module docstring) of the equilibrated data ``d`` at the equilibrated ``(s, z)`` ``(B, m)``
    (zero rows for those not present)."""
    z0, k = layout.zero, layout.nonneg
    A, rows = d.A, []
    if z0:
        rows.append(_unit_rows(A[:, :z0], torch.ones_like(A[:, :z0, 0], dtype=torch.bool)))
    if k:
        rows.append(_unit_rows(A[:, z0:z0 + k], _present(s[:, z0:z0 + k], z[:, z0:z0 + k])))
    if layout.soc:
        off, idx = z0 + k, layout.index(A.device)
        As = A[:, off:]
        a1, a2, b1, b2, u = soc_frame(layout, s[:, off:], z[:, off:])
        head = torch.zeros_like(u)
        head[:, idx.heads] = 1.0
        tangent, on = As, torch.zeros_like(a1, dtype=torch.bool)
        for a, b, sign in ((a1, b1, 1.0), (a2, b2, -1.0)):
            f = (head + sign * u) / math.sqrt(2.0)
            g = layout._seg(f.unsqueeze(-1) * As)  # fᵀA per cone
            present = _present(a, b)
            rows.append(_unit_rows(g, present))
            tangent = tangent - f.unsqueeze(-1) * layout._spread(g)
            on = on | present  # (decided on the frame pairs, not on s0/z0: see _tangent_rows)
        rows.append(_unit_rows(tangent, _tangent_rows(layout, u, on)))
    return torch.cat(rows, 1) if rows else A[:, :0]


def limit_nonunique(d, layout, s: torch.Tensor, z: torch.Tensor, rx: torch.Tensor,
                    cols: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, reached)`` ``(B,)`` masks: the requested outputs (the variables
    ``cols``, all if ``None``) are not unique — a fixed generic vector on their columns
    reaches a null direction of the limit matrix :math:`P + C^\\top C` — and the cotangent ``rx`` ``(B, n)``
    (equilibrated) reaches one. One Cholesky of the Jacobi-scaled matrix plus ``n eps I``
    and one solve with both columns; where that finds one, the same in the rows' singular
    basis (the module docstring: squared, nearly dependent rows look like a null direction;
    an SVD of ``C`` on every element cost the MPC's backward 65 %). float64 only (in float32
    a null direction amplifies by ~1/(n eps) ≈ 1e6, no margin over ill-conditioned unique
    solutions): all False for other dtypes."""
    B, n = rx.shape
    none = torch.zeros(B, dtype=torch.bool, device=rx.device)
    if rx.dtype != torch.float64 or n == 0:
        return none, none
    C = limit_rows(d, layout, s, z)
    probe = generic_vector(n, rx.dtype, rx.device)
    if cols is not None:
        cols = cols.to(rx.device)
        probe = torch.zeros_like(probe).index_copy(0, cols, probe.index_select(0, cols))
    R = torch.stack([probe.expand(B, n), rx], -1)
    found = _amplified(torch.baddbmm(d.P, C.mT, C), R)
    idx = torch.nonzero(found.any(1)).squeeze(1)
    if idx.numel():
        found = found.index_copy(0, idx, _unsquared(d.P.index_select(0, idx), C.index_select(0, idx),
                                                    R.index_select(0, idx)))
    return found[:, 0], found[:, 1]


def undetermined(d, layout, s: torch.Tensor, z: torch.Tensor, unresolved: torch.Tensor,
                 cols: torch.Tensor | None) -> torch.Tensor:
    """``(B,)`` the elements with an unresolved column (``unresolved`` ``(B, n)``,
    :func:`~.resolution.unresolved_columns`) whose requested outputs ``cols`` (all if
    ``None``) the limit system leaves free (:func:`limit_nonunique`): a solution that float64
    determines only along the directions the program's resolved terms fix. ``d`` the
    equilibrated data, ``s, z`` ``(B, m)`` the equilibrated solution.

    A strictly convex program whose curvature along some direction lives in terms far
    below its scale (α-entmax at α = 50, written in second-order cones: on a tie at the
    maximum, p^α's curvature ~p^48 ~ 1e-23 sits in multipliers of that size) is flat
    there in float64: its objective and KKT residual at every point of that face are at
    rounding, the limit scaling decides those multipliers inactive, and the KKT matrix
    factorised at that limit amplifies a probe on the outputs by only 6 (error estimate
    2e-15). The point returned is any one on the face: (0.309, 0.353, 0.338) for (1/3, 1/3, 1/3).
    Such terms leave their columns unresolved (their residual far above their own size);
    the limit system, which drops the decided-inactive rows, then has a null direction
    along the outputs. Where no column is unresolved, a null direction is a face of
    optima of the program itself (an LP with two equal costs), any point of which is a
    solution; nothing is tested (no cost beyond one host read). float64 only, as
    :func:`limit_nonunique` (all False in other dtypes)."""
    gate = unresolved.any(1)
    idx = torch.nonzero(gate).squeeze(1)
    if not idx.numel():
        return gate
    pick = lambda v: v.index_select(0, idx)  # noqa: E731
    rx = torch.zeros(idx.numel(), d.A.shape[2], dtype=s.dtype, device=s.device)
    outputs, _ = limit_nonunique(d.select(idx), layout, pick(s), pick(z), rx, cols)
    return gate.index_copy(0, idx, outputs)


def _amplified(S: torch.Tensor, R: torch.Tensor, dg: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, k)``: whether ``S`` ``(B, n, n)`` (Jacobi-scaled by ``dg``, its diagonal by default,
    plus ``n eps I``) amplifies the columns of ``R`` ``(B, n, k)`` beyond
    :data:`LIMIT_AMPLIFICATION`; the first column also where it does not factorise (the
    requested outputs' probe: not shown unique)."""
    n = S.shape[-1]
    dg = S.diagonal(dim1=1, dim2=2) if dg is None else dg
    dj = torch.where(dg > 0, dg, 1.0).rsqrt()
    S = dj[:, :, None] * S * dj[:, None, :]
    S.diagonal(dim1=1, dim2=2).add_(n * torch.finfo(S.dtype).eps)
    L, info = torch.linalg.cholesky_ex(S)
    R = dj[:, :, None] * R
    amp = torch.cholesky_solve(R, L).abs().amax(1) / R.abs().amax(1).clamp_min(torch.finfo(S.dtype).tiny)
    found = ~(amp <= LIMIT_AMPLIFICATION)  # (NaN: amplified)
    found[:, 0] |= info != 0
    return found


def rows_basis(C: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sv (B, n), Vt (B, n, n), free (B, n))``: the singular values of the unit rows ``C`` ``(B, k, n)``
    padded with zeros to n, their right singular vectors (all of them; the identity where k = 0), and
    the directions the rows leave free: σ at most ``max(max(k, n)·eps, 1/LIMIT_AMPLIFICATION)`` (unit rows:
    the largest σ is at least 1; below that, a direction free up to the rounding of the rows' data, or
    one whose derivative is beyond reach)."""
    B = C.shape[0]
    if not C.shape[1]:
        eye = torch.eye(n, dtype=C.dtype, device=C.device).expand(B, n, n)
        return C.new_zeros(B, n), eye, torch.ones(B, n, dtype=torch.bool, device=C.device)
    _, sv, Vt = torch.linalg.svd(C)  # (full: Vt (B, n, n))
    sv = torch.cat([sv, sv.new_zeros(B, max(0, n - sv.shape[1]))], 1)[:, :n]
    return sv, Vt, ~(sv > max(max(C.shape[1:]) * torch.finfo(C.dtype).eps, 1 / LIMIT_AMPLIFICATION))  # (NaN: free)


def _unsquared(P: torch.Tensor, C: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """:func:`_amplified` for :math:`P + C^\\top C` in the basis of ``C``'s right singular
    vectors, :math:`V^\\top P V + \\Sigma^2`, Jacobi-scaled by its diagonal with the singular
    values and ``V^T P V``'s entries at rounding taken as 0 (see the module docstring)."""
    n = P.shape[-1]
    eps = torch.finfo(P.dtype).eps
    sv, Vt, free = rows_basis(C, n)
    sv = torch.where(free, 0.0, sv)
    S = Vt @ P @ Vt.mT
    pw = S.diagonal(dim1=1, dim2=2)
    dg = torch.where(pw > n * eps * pw.abs().amax(1, keepdim=True), pw, 0.0) + sv * sv
    S.diagonal(dim1=1, dim2=2).add_(sv * sv)
    return _amplified(S, Vt @ R, dg)


def limit_inconsistency(d, layout, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                        rz: torch.Tensor, dx: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` how far the right-hand side ``rz`` ``(B, m)`` (equilibrated; how a direction
    of the parameters moves :math:`b - Ax`) is inconsistent on the rows that hold at the
    solution, the equalities and the nonnegative rows not decided inactive:
    :math:`C\\,dx = r_C` has no solution, the rows' multipliers are not unique, and along
    that direction the program turns infeasible on both sides (an equality row that is a
    combination of others, its ``b`` moved alone) or has one-sided derivatives (a
    degenerate vertex moved apart): no derivative exists, whether or not :math:`x` is
    unique (NaN read as ∞).

    With the rows scaled to unit length, :math:`U = V \\Sigma W^\\top`, the least-norm
    :math:`dx` has coefficients :math:`(V^\\top r)_i / \\sigma_i` (:math:`\\sigma_i = 0`
    beyond ``min(rows, n)``): amplified by more than :data:`INCONSISTENT_AMPLIFICATION`
    where ``r`` reaches a direction the rows do not span. Unsquared, unlike a Gram matrix
    :math:`UU^\\top`: rows 1e-6 apart amplify by 4.4e6 (a derivative that the backward
    resolves), rows 1e-7 apart by 4.4e7 (beyond its :data:`~.vjp.AMPLIFICATION`), exactly
    redundant rows by 3e12 and more. (The factorised probe's blow-up ~1/δ is relative to the whole right-hand side,
    whose stationarity part :math:`dA^\\top z` was 1e3 times larger: 7e5, below
    :data:`~.vjp.PROBE_GAIN`; rows 1e-5 apart, with a derivative, gain 1e10.) A row that is
    zero (:func:`~.zero_rows.zero_rows`) holds where its ``b`` is zero, whatever its pair's values (its
    multiplier is any), and is not at all elsewhere; it stays a zero row, its ``r`` in the
    units of the element's largest row, so that a parameter that moves it reaches a singular
    value 0 (dropped, as it was, the row's :math:`dA_i` went unseen: a projection with a
    zero equality row got a gradient in it silently). Second-order cones do not enter.
    float64 only, as :func:`limit_nonunique`; ``x`` ``(B, n)`` the equilibrated solution.

    The SVD runs only where two cheaper upper bounds of that amplification do not show it at
    most :data:`INCONSISTENT_AMPLIFICATION` (:func:`_residual_bound`: from any solution of
    the rows and its residual): first with ``dx`` ``(B, n)`` if given (equilibrated as ``x``;
    the backward's probe, which solves the derivative system along the same direction: its
    :math:`A\\,dx` meets ``rz`` on the rows that hold up to the lifted slacks), then with the
    rows' least-norm solution (:func:`_least_norm_bound`, one QR). Where a bound shows it, that
    bound is returned: the decisions against :data:`INCONSISTENT_AMPLIFICATION` and
    :data:`INCONSISTENT_SURE` are the SVD's. (On every element, the SVD of the MPC's 284 rows
    took 37 ms of a 55 ms backward at batch 1, 350 of 500 at batch 8: its derivative system
    is ill-conditioned but unique, misses the refinement's target, and so is tested.)"""
    B = rz.shape[0]
    z0, k = layout.zero, layout.nonneg
    if rz.dtype != torch.float64 or not z0 + k:
        return torch.zeros(B, dtype=rz.dtype, device=rz.device)
    A, r = d.A[:, :z0 + k], rz[:, :z0 + k]
    present = torch.ones_like(r, dtype=torch.bool)
    if k:  # (a row at its kink holds: at_kink)
        present[:, z0:] = _present(s[:, z0:z0 + k], z[:, z0:z0 + k]) | at_kink(d, layout, x, s, z)
    zero, holds = zero_rows(d, layout, x)
    present = torch.where(zero, holds, present)
    norms = d.A.norm(dim=-1)
    keep = present & ~zero
    inv = torch.where(keep, 1.0 / torch.where(keep, norms[:, :z0 + k], 1.0), 0.0)
    # (a zero row's r in the units of the others': its E undone, over the largest row's size)
    largest = (norms / d.E).amax(1, keepdim=True)
    rinv = torch.where(holds, 1.0 / (d.E[:, :z0 + k] * torch.where(largest > 0, largest, 1.0)), inv)
    U, rr = A * inv.unsqueeze(-1), r * rinv
    # (singular values at rounding, and the zeros beyond min(rows, n), floored at it: a
    # consistent right-hand side's rounding there is no inconsistency)
    floor = max(A.shape[1:]) * _EPS
    size = rr.abs().amax(1).clamp_min(torch.finfo(r.dtype).tiny)
    amp = torch.full_like(size, math.inf)
    if dx is not None:
        amp = _residual_bound(U, rr.unsqueeze(-1), dx.unsqueeze(-1), floor) / size
    for bound in (_least_norm_bound, _svd_amplification):
        hard = torch.nonzero(~(amp <= INCONSISTENT_AMPLIFICATION)).squeeze(1)  # (NaN: not shown)
        if not hard.numel():
            break
        amp = amp.index_copy(0, hard, bound(U.index_select(0, hard), rr.index_select(0, hard), floor)
                             / size.index_select(0, hard))
    return torch.where(torch.isnan(amp), torch.inf, amp)


def _svd_amplification(U: torch.Tensor, r: torch.Tensor, floor: float) -> torch.Tensor:
    """``(B,)`` :func:`limit_inconsistency`'s :math:`\\max_i |(V^\\top r)_i| / \\max(\\sigma_i, f)`,
    :math:`U = V \\Sigma W^\\top` ``(B, k, n)`` the unit rows (zero rows for those absent), ``r``
    ``(B, k)``, :math:`f` = ``floor`` (:math:`\\sigma_i = 0` beyond ``min(k, n)``)."""
    V, sv, _ = torch.linalg.svd(U)
    coef = (V.mT @ r.unsqueeze(-1)).squeeze(-1).abs()
    sv = torch.cat([sv, sv.new_zeros(U.shape[0], coef.shape[1] - sv.shape[1])], 1).clamp_min(floor)
    return (coef / sv).amax(1)


def _residual_bound(U: torch.Tensor, r: torch.Tensor, dx: torch.Tensor, floor: float) -> torch.Tensor:
    """``(B,)`` an upper bound of :func:`_svd_amplification` from any ``dx`` ``(B, n, 1)``, with
    ``r`` ``(B, k, 1)``: with :math:`e = r - U\\,dx`, :math:`V^\\top r = \\Sigma W^\\top dx + V^\\top e`,
    so :math:`|(V^\\top r)_i| / \\max(\\sigma_i, f) \\le |(W^\\top dx)_i| + |(V^\\top e)_i| / f \\le
    \\|dx\\|_2 + \\|e\\|_2 / f`, whatever the rows' rank (NaN where ``dx`` is not finite). The
    residual's own rounding, :math:`(n + 1)\\,\\epsilon\\,\\||r| + |U||dx|\\|_2`, counts in
    :math:`\\|e\\|_2`. A solution that misses the rows by more than
    :data:`INCONSISTENT_AMPLIFICATION` :math:`f` (~1e-6 of ``r`` at 450 rows or columns) does
    not show them consistent."""
    e = r - U @ dx
    rounding = (U.shape[2] + 1) * _EPS * (r.abs() + U.abs() @ dx.abs()).norm(dim=(1, 2))
    return dx.norm(dim=(1, 2)) + (e.norm(dim=(1, 2)) + rounding) / floor


def _least_norm_bound(U: torch.Tensor, r: torch.Tensor, floor: float) -> torch.Tensor:
    """:func:`_residual_bound` for the rows' least-norm solution, ``U`` ``(B, k, n)``, ``r``
    ``(B, k)``; ∞ where there are more rows than columns.

    The rows :math:`C` that carry data (absent rows with :math:`r_i = 0` dropped, the batch
    padded with zero rows): :math:`C^\\top = QR` (Householder, unsquared), :math:`dx = C^\\top
    (R^\\top R)^{-1} r` with one step of refinement (the corrected semi-normal equations,
    accurate as the QR's least squares where :math:`\\kappa(C) \\lesssim 1/\\sqrt{\\epsilon}`). A
    zero row that ``r`` moves (a zero row that holds) is a zero column of :math:`C^\\top`,
    ordered last: its :math:`R` column and row are exactly 0, its pivot is set to 1 and its
    :math:`e_i = r_i` counts in full. Rows dependent up to rounding leave a pivot at rounding
    and a residual of the order of ``r``: the bound is then far above the SVD's value, which
    decides. Cost: one QR of ``(n, k)`` and four triangular solves (2 ms against the SVD's
    37 ms on the MPC's 284 rows at batch 1; 33 against 350 ms at batch 8)."""
    B, k, n = U.shape
    nonzero = (U != 0).any(-1)
    rank = torch.where(nonzero, 0, torch.where(r != 0, 1, 2))  # rows with data, zero rows r moves, the rest
    counts = (rank < 2).sum(1)
    kept = min(int(counts.amax()), n)
    if kept == 0:
        return U.new_zeros(B)
    order = torch.argsort(rank, dim=1, stable=True)[:, :kept]
    C = U.gather(1, order.unsqueeze(-1).expand(-1, -1, n))
    rc = r.gather(1, order).unsqueeze(-1)
    R = torch.linalg.qr(C.mT, mode="r")[1]
    R = R + torch.diag_embed((~nonzero.gather(1, order)).to(R.dtype))  # (zero rows: pivot 1)

    def step(v):  # Cᵀ (RᵀR)⁻¹ v: two triangular solves (cholesky_solve copied R: 3x slower)
        return C.mT @ torch.linalg.solve_triangular(R, torch.linalg.solve_triangular(R.mT, v, upper=False), upper=True)

    dx = step(rc)
    dx = dx + step(rc - C @ dx)
    return torch.where(counts > n, math.inf, _residual_bound(C, rc, dx, floor))


# Amplification of the least-norm solution of the rows that hold above which a right-hand
# side reaches a direction they do not span, as the backward's AMPLIFICATION (see
# limit_inconsistency: rows 1e-6, 1e-7 and 1e-8 apart 4.4e6, 4.4e7 and 4.4e8, exactly
# redundant rows with a condition of 1e4 3e12) ...
INCONSISTENT_AMPLIFICATION = 1e7
# ... and above which it does whatever the derivative's accuracy: below it, nearly dependent
# rows whose derivative is as large (the backward certifies its answer there, vjp._certify).
INCONSISTENT_SURE = 1e10
_EPS = torch.finfo(torch.float64).eps


def limit_tests_at(sol, layout, test: torch.Tensor, rx: torch.Tensor, cols: torch.Tensor | None,
                   rz: torch.Tensor | None = None, dx: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`limit_nonunique`'s ``(outputs, reached)`` for a right-hand side ``(rx, ·)`` in a
    batched solution's ``sol`` equilibrated units, on the elements ``test`` ``(B,)`` only
    (False elsewhere); with ``rz`` ``(B, m)`` instead, :func:`limit_inconsistency` (0 elsewhere),
    given the candidate solution ``dx`` ``(B, n)`` if any."""
    idx = torch.nonzero(test).squeeze(1)
    if not idx.numel():
        return (torch.zeros_like(test, dtype=rx.dtype),) if rz is not None else (test, test)
    part = sol.scaled.select(idx)
    x, s, z = part.scale(*(v.index_select(0, idx) for v in (sol.x, sol.s, sol.z)))
    if rz is not None:
        amp = limit_inconsistency(part, layout, x, s, z, rz.index_select(0, idx),
                                  None if dx is None else dx.index_select(0, idx))
        return (torch.zeros_like(test, dtype=amp.dtype).index_copy(0, idx, amp),)
    found = limit_nonunique(part, layout, s, z, rx.index_select(0, idx), cols)
    return tuple(test.index_copy(0, idx, f) for f in found)

