"""The derivative's KKT system solved densely, for the elements whose factorised form fails.

The backward (:mod:`.vjp`) solves the KKT system at the limit of the solution
(:class:`~.limit_scaling.LimitScaling`) through the reduced, Cholesky-factorised form of
:mod:`.kkt`, :math:`P + (W^{-1}A)^T (W^{-1}A)`, whose condition is the square of the
scaled system's. Where :math:`W` spans many decades that square is beyond float64 and
the iterative refinement stalls: CVXPY's chain of 40 second-order cones for
:math:`p^{1.005}` (:math:`H` from 1e-12 to 1e12) left a relative residual of 0.46 and a
gradient 0.4 off. The scaled system itself,

.. math::

    \\begin{bmatrix} P & A_E^T & (W^{-1}A_I)^T \\\\ A_E & 0 & 0 \\\\ W^{-1}A_I & 0 & -I
    \\end{bmatrix} \\begin{bmatrix} x \\\\ z_E \\\\ \\hat z \\end{bmatrix} =
    \\begin{bmatrix} r_x \\\\ r_E \\\\ W^{-1} r_I \\end{bmatrix}, \\qquad z_I = W^{-1}\\hat z,

has condition 1e10 there, and a batched LU of it gives the gradient to 1e-7 of finite
differences. As in :meth:`.kkt.KKTSystem.solve`, the refinement is against the exact limit
system, :math:`H = 0` (no :math:`\\hat z` term) on the nonnegative rows decided active,
whose scaling keeps an absolute δ (against the δ-regularised matrix, a multiplier of 1e-8
left gradients 1e-4 off). It costs :math:`(n + m)^3` per element, so it is only taken for
the elements the factorised form could not solve, in chunks of at most
:data:`MEMORY_BUDGET` bytes, and not at all above :data:`MAX_SIZE` rows.
"""
from __future__ import annotations

import torch

from .._generic import generic_vector
from .._linalg import lu_factor_ex
from .._pow2 import pow2_round
from .kkt import row_inf
from .symmetric_cones import ConeLayout

__all__ = ["dense_limit_solve", "dense_limit_solve_error"]

# Refinement steps against the exact limit matrix (an O(N²) solve each, beside the O(N³)
# factorisation): each gains the factor by which the regularised matrix differs from it,
# ~0.02 where the program's own curvature is small beside δ·AᵀA (x ~ 5e5 under a quadratic
# of 1e-6: 3 steps left 1.8e-6 of the residual, 10 leave rounding).
_REFINE = 10
# Bytes of the dense matrices (three of (n + m)² per element) solved at once, and the
# largest n + m solved densely at all (beyond, the element keeps its zeroed gradient and
# warning: 6000² doubles are 288 MB a matrix).
MEMORY_BUDGET = 1 << 30
MAX_SIZE = 6000
# Static regularisation of the equality block, relative to the equilibrated data's unit
# scale: exactly repeated equality rows make the matrix singular (as in the polish).
_DELTA = 1e-12


def dense_limit_solve(sol, layout: ConeLayout, idx: torch.Tensor, rx: torch.Tensor, rz: torch.Tensor,
                      hold: torch.Tensor | None = None):
    """Solve the limit KKT system of the elements ``idx`` of ``sol`` (a solution kept for the
    backward) for right-hand sides in its equilibrated units, returned as
    :meth:`.kkt.KKTSystem.solve` returns its ``(x, z)``, with the relative residual of
    the exact limit system (``inf`` where not solved: a failed factorisation, or n + m
    above :data:`MAX_SIZE`). ``hold`` ``(k, nonneg)``: nonnegative rows taken at their
    active limit (H = 0) whatever their pair's values (a kink's other side,
    :func:`~.kink_reach.kinks_reached`).

    Shape:
        ``rx (k, n, 1), rz (k, m, 1)`` (the elements ``idx``) ->
        ``x (k, n, 1), z (k, m, 1)``, residual ``(k,)``.
    """
    return _chunks(sol, layout, idx, rx, rz, False, hold)[:3]


def dense_limit_solve_error(sol, layout: ConeLayout, idx: torch.Tensor, rx: torch.Tensor, rz: torch.Tensor):
    """:func:`dense_limit_solve`'s ``(x, z, residual)`` and ``(k,)`` each answer's estimated
    forward error relative to its size (``inf`` where not solved): a small residual need not
    mean an accurate answer where the matrix's condition nears 1/eps."""
    return _chunks(sol, layout, idx, rx, rz, True)


def _chunks(sol, layout: ConeLayout, idx: torch.Tensor, rx: torch.Tensor, rz: torch.Tensor, with_error: bool,
            hold: torch.Tensor | None = None):
    """:func:`_solve` in chunks within :data:`MEMORY_BUDGET`; the error estimate (three more
    solves) only ``with_error`` (None in its place otherwise)."""
    size = sol.scaled.P.shape[-1] + sol.scaled.A.shape[1]
    if size > MAX_SIZE:
        inf = rx.new_full((rx.shape[0],), torch.inf)
        return rx.new_zeros(rx.shape), rz.new_zeros(rz.shape), inf, inf
    step = max(1, MEMORY_BUDGET // (3 * size * size * rx.element_size()))
    parts = [_solve(sol, layout, idx[lo:lo + step], rx[lo:lo + step], rz[lo:lo + step], with_error,
                    None if hold is None else hold[lo:lo + step])
             for lo in range(0, idx.numel(), step)]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def _solve(sol, layout: ConeLayout, idx: torch.Tensor, rx: torch.Tensor, rz: torch.Tensor, with_error: bool,
           hold: torch.Tensor | None = None):
    from .estimate import limit_scaling_at

    d = sol.scaled.select(idx)
    pick = lambda v: v.index_select(0, idx)  # noqa: E731
    _, s, z = d.scale(pick(sol.x), pick(sol.s), pick(sol.z))
    z0, n, m = layout.zero, d.P.shape[-1], d.A.shape[1]
    if hold is not None:
        # A held row decided active: slack 0 beside a unit multiplier (the equilibrated data's
        # scale), so that its factorised H is the absolute δ of the other active rows (its own
        # multiplier, ~0 at a kink, made H ~ 1 there and the refinement slow); the refinement's
        # exact limit has H = 0 whatever the multiplier (LimitRows.kept).
        k = layout.nonneg
        s = torch.cat([s[:, :z0], torch.where(hold, 0.0, s[:, z0:z0 + k]), s[:, z0 + k:]], 1)
        z = torch.cat([z[:, :z0], torch.where(hold, 1.0, z[:, z0:z0 + k]), z[:, z0 + k:]], 1)
    # (lifted as a polished point: the pairs this decides are set at their limits anyway)
    W = limit_scaling_at(layout, s[:, z0:], z[:, z0:], s.new_ones(s.shape[0], 1, dtype=torch.bool))
    WA = W.apply_inv(d.A[:, z0:])
    K = d.P.new_zeros(d.P.shape[0], n + m, n + m)
    K[:, :n, :n] = d.P
    K[:, :n, n:n + z0] = d.A[:, :z0].mT
    K[:, :n, n + z0:] = WA.mT
    K[:, n:n + z0, :n] = d.A[:, :z0]
    K[:, n + z0:, :n] = WA
    rhs = torch.cat([rx, rz[:, :z0], W.apply_inv(rz[:, z0:])], 1)
    # The factorised matrix: -I beside the cone rows, -δ on the equality rows (exactly
    # repeated rows make the matrix singular, as in the polish).
    diag = torch.diagonal(K, dim1=-2, dim2=-1)
    diag[:, n:n + z0] = -_DELTA
    diag[:, n + z0:] = -1.0
    bad = ~torch.isfinite(K).flatten(1).all(1)
    eye = torch.eye(n + m, dtype=K.dtype, device=K.device)
    # Solved as D K D (D y) = D rhs, u = D y (see _balance): the LU's backward error is relative to
    # the balanced entries, not to the largest one of K.
    Kc = torch.where(bad[:, None, None], eye, K)
    D = _balance(Kc)  # (1 where bad: the identity stays the identity)
    LU, piv, info = lu_factor_ex(D[:, :, None] * Kc * D[:, None, :])
    # The exact limit (as in KKTSystem.solve): no -δ on the equality rows, no ẑ term in
    # the cone rows along H = 0, none in the first block row along H = ∞.
    diag[:, n:n + z0] = 0.0
    K[:, n + z0:, n + z0:] = -W.rows.kept(eye[n + z0:, n + z0:].expand(K.shape[0], -1, -1))
    K[:, :n, n + z0:] = W.rows.held(WA).mT
    K, rhs = D[:, :, None] * K * D[:, None, :], D[:, :, None] * rhs  # (exact: D holds powers of 2)
    u = torch.linalg.lu_solve(LU, piv, rhs)
    for _ in range(_REFINE):
        u = u + torch.linalg.lu_solve(LU, piv, rhs - K @ u)
    res = _residual(K, u, rhs)
    res = torch.where((info != 0) | bad | ~torch.isfinite(res), torch.inf, res)
    # The exact limit matrix itself, where it is nonsingular: where it differs much from
    # the regularised one, the refinement above gains little per step (entmax through
    # CVXPY's cone forms: 1.7e-6 to 1.2e-6 in ten steps, above BACKWARD_ACCEPT, and the
    # gradient was zeroed as "not unique"; its own LU: 3e-11). Each element keeps the
    # smaller residual.
    LU2, piv2, info2 = lu_factor_ex(torch.where(bad[:, None, None], eye, K))
    u2 = torch.linalg.lu_solve(LU2, piv2, rhs)
    u2 = u2 + torch.linalg.lu_solve(LU2, piv2, rhs - K @ u2)
    res2 = _residual(K, u2, rhs)
    exact = (info2 == 0) & ~bad
    take = exact & (res2 < res)  # (NaN: not taken)
    u = torch.where(take[:, None, None], u2, u)
    res = torch.where(take, res2, res)
    # The residual relative to the right-hand side cannot get small where the solution is
    # far larger than it beside large entries: CVXPY's chain of second-order cones for
    # u^1.005 at u = 2e6 (K's entries to 7e5, the solution's to 4e6, a right-hand side of
    # 0.33) leaves the rounding of K u alone at 1.5e-3 of it, for a solution 3e-8 from
    # the exact one (its residual, rounded to float64: the same 1.5e-3). One more
    # refinement step's size estimates that error (5e-8 there), as the forward's error
    # estimate does: an element is solved where either is small.
    step = torch.where(exact[:, None, None], torch.linalg.lu_solve(LU2, piv2, rhs - K @ u),
                       torch.linalg.lu_solve(LU, piv, rhs - K @ u))
    step = row_inf(step[..., 0]) / row_inf(u[..., 0]).clamp_min(torch.finfo(K.dtype).tiny)
    res = torch.where(bad | ((info != 0) & ~exact), torch.inf, torch.minimum(res, step))  # (NaN: not solved)
    error = _forward_error(K, rhs, u, (LU, piv), (LU2, piv2), exact, res, D) if with_error else None
    u = D[:, :, None] * u
    x, zE, zh = u[:, :n], u[:, n:n + z0], u[:, n + z0:]
    return x, torch.cat([zE, W.apply_inv(zh)], 1), res, error


def _balance(K: torch.Tensor, sweeps: int = 8) -> torch.Tensor:
    """``(k, N)`` powers of 2 ``D`` with the rows and columns of :math:`D K D` near unit max-norm (symmetric
    Ruiz sweeps, :math:`d_i \\leftarrow d_i / \\sqrt{\\max(\\lVert (DKD)_{i,:} \\rVert_\\infty,
    \\lVert (DKD)_{:,i} \\rVert_\\infty)}`).

    The limit system's scalings weigh its rows by up to ~1e6 where a variable's own size is ~1e6 times another's
    (the epigraph variable of u³ at u* = 1e3: its derivative 2e6 times u's): an LU is backward stable relative
    to the largest entries, and K's normwise condition (2e21 there) left its answer 2.5e6 times too small
    with a residual of 5e-7 of the right-hand side; :math:`D K D`'s is 1.5e11, and the answer 4e-8 off the
    exact solve of the same (rounded) matrix. Powers of 2: the scaling itself rounds nothing."""
    d = torch.ones(K.shape[:2], dtype=K.dtype, device=K.device)
    mag = K.abs()
    for _ in range(sweeps):
        s = d[:, :, None] * mag * d[:, None, :]
        r = torch.maximum(s.amax(2), s.amax(1))
        d = d / torch.where(r > 0, r, 1.0).sqrt()
    return pow2_round(d)


def _forward_error(K, rhs, u, regularised, limit, exact, res, D) -> torch.Tensor:
    """(k,) the forward error of ``u`` relative to ``‖u‖∞`` estimated as :math:`|K^{-1} e|`, ``e``
    the residual's size plus eps of :math:`|K||u| + |rhs|` in each row (its backward error, where
    rounding leaves more than the residual shows), with three sign patterns (the generic vector's
    two and an alternating one: rows 1e-7 apart, next to each other, cancel under one sign).
    Equality rows 1e-7 apart in a QP: 6e-2 estimated, 4.9e-2 off the exact solve of the same
    matrix (its residual 3.8e-9: the LU is not accurate beyond ~κ eps, κ = 1.5e15); the same rows
    in an LP's vertex: 3.6e-9 and 1e-8; u^1.005 at u = 6e3: 3e-7."""
    N = K.shape[-1]
    eps = torch.finfo(K.dtype).eps
    g = generic_vector(2 * N, K.dtype, K.device).view(2, N)
    alt = torch.arange(N, device=K.device) % 2 == 0
    sign = torch.where(torch.stack([g[0] >= 0, g[1] >= 0, alt], -1), 1.0, -1.0)[None]
    e = sign * (eps * (K.abs() @ u.abs() + rhs.abs()) + (rhs - K @ u).abs())
    solved = torch.where(exact[:, None, None], torch.linalg.lu_solve(*limit, e), torch.linalg.lu_solve(*regularised, e))
    for _ in range(0 if bool(exact.all()) else _REFINE):  # (the regularised factors: refined to K's inverse)
        solved = torch.where(exact[:, None, None], solved, solved + torch.linalg.lu_solve(*regularised, e - K @ solved))
    solved, u = D[:, :, None] * solved, D[:, :, None] * u  # (balanced, D K D (D⁻¹u) = D rhs: the error in u's units)
    error = solved.abs().amax((1, 2)) / row_inf(u[..., 0]).clamp_min(torch.finfo(K.dtype).tiny)
    return torch.where(torch.isfinite(res) & torch.isfinite(error), error, torch.inf)


def _residual(K: torch.Tensor, u: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(k,) relative residual ‖rhs − K u‖∞ / ‖rhs‖∞ of each element."""
    return row_inf((rhs - K @ u)[..., 0]) / row_inf(rhs[..., 0]).clamp_min(torch.finfo(K.dtype).tiny)
