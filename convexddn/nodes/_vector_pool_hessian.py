r"""Robust vector pooling's derivatives: the Hessian's terms at the solution, its solve, and the
verdict at a degenerate minimum.

:math:`v = H^{-1}\,\mathrm{rhs}` per pooled set, zero with a GradientWarning where H is
singular (:func:`~._vector_pool_solvers.hess_solve_checked`: no inliers, a non-isolated
minimiser) or where its smallest eigenvalue is not resolved above y's own uncertainty
(:func:`_unresolved`). The second is the scalar pooling's test
(:func:`convexddn.nodes.pooling.backward.unresolved_over`) on the curvature along H's
flattest direction: Welsch at alpha = 0.5 with two clusters exactly 2 alpha apart has its
minimiser at their midpoint with H singular along their axis (a quartic minimum), and the
solver stops anywhere within its noise of it, where that eigenvalue is as small as the
distance allows and no better known. Until 2026-12-06, x = {(0, 0), (1, 0), (10, 0)} in
float64 with ``starts=0`` stopped 4.6e-6 off the midpoint (the forward said so with a
SolverWarning) and the backward returned dy/dx = 1.1e5 silently; the same problem started
on the midpoint got zero and the GradientWarning.
"""
from __future__ import annotations

import math

import torch

from .._warn import warn
from ..errors import GradientWarning
from .degeneracy import shown_indices
from ._vector_pool_rare import gradient_noise, lowest
from ._vector_pool_solvers import _hessian, geometry, hess_solve_checked, kappa, unit
from ._vector_pool_sums import gradient_parts, hessian_sums, point_chunks
from .pooling.backward import _CANCELLED, unresolved_over
from .pooling.penalties import Penalty, TruncatedQuadratic
from .pooling.rounding import grid

__all__ = ["gradient_rows", "hessian_solve_warned", "hessian_terms"]


def hessian_terms(pen: Penalty, x: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor):
    """The derivatives' pieces at the solution: ``(a, z, n, κ, c)`` with z_i = ‖y − x_i‖,
    n_i the unit vectors, κ_i = φ'(z_i)/z_i and c_i = φ''(z_i) − κ_i, so that
    H = (Σ κ_i) I + Σ c_i n_i n_iᵀ."""
    a = alpha.unsqueeze(-1) if alpha.dim() > 0 else alpha
    k1, d2, z, n = _terms(pen, x, a, y)
    return a, z, n, k1, d2 - k1


def _terms(pen: Penalty, x: torch.Tensor, a: torch.Tensor, u: torch.Tensor):
    """κ_i, φ''(z_i), z_i and n_i at ``u (r, C)``, ``a`` (r, 1) or 0-d."""
    d, z = geometry(x, u)
    return kappa(pen, z, a), pen.d2phi(z, a), z, unit(d, z)


def gradient_rows(pen: Penalty, x: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor, gy: torch.Tensor,
                  need_x: bool, need_a: bool, batch: tuple[int, ...], idx: torch.Tensor | None = None):
    """The backward's ``(x̄ (R, N, C) or None, ᾱ (R,) or None)`` of the sets ``x`` at their solution
    ``y`` for the cotangent ``gy`` (R, C): x̄_i = κ_i v + c_i (n_iᵀ v) n_i, ᾱ = −Σ_i ∂_α φ'(z_i) n_iᵀ v,
    v = H⁻¹ ȳ (:func:`hessian_solve_warned`; ``batch``, ``idx`` as there). A set too large for the
    block budget forms its terms a chunk of the points at a time (:mod:`._vector_pool_sums`): the
    one-pass terms (n, κ, c and their products) are each the size of the input."""
    chunks = point_chunks(x)
    if chunks is None:
        a, z, n, k1, c = hessian_terms(pen, x, alpha, y)
        v = hessian_solve_warned(pen, (x, a, y), k1, n, c, gy, "gradient", batch, idx)
        nv = (n @ v.unsqueeze(-1)).squeeze(-1)  # n_iᵀ v, (R, N)
        gx = k1.unsqueeze(-1) * v.unsqueeze(-2) + (c * nv).unsqueeze(-1) * n if need_x else None
        return gx, -(pen.d2phi_dalpha(z, a) * nv).sum(-1) if need_a else None
    a = alpha.unsqueeze(-1) if alpha.dim() > 0 else alpha
    v = hessian_solve_warned(pen, (x, a, y), None, None, None, gy, "gradient", batch, idx,
                             formed=hessian_sums(pen, x, a, y, chunks))
    return gradient_parts(pen, x, a, y, v, chunks, need_x, need_a)


def hessian_solve_warned(pen: Penalty, at: tuple, k1: torch.Tensor | None, n: torch.Tensor | None,
                         c: torch.Tensor | None, rhs: torch.Tensor, what: str, batch: tuple[int, ...],
                         idx: torch.Tensor | None = None, formed: tuple | None = None) -> torch.Tensor:
    """H⁻¹ rhs per pooled set, zero with a GradientWarning where H is singular or its
    curvature unresolved (module docstring). ``at``: ``(x (R, N, C), alpha (R, 1) or 0-d,
    y (R, C))``, the sets the terms ``k1, n, c`` were formed at; ``batch``: the caller's
    batch shape of all R sets, to name them in it; ``idx``: which of them these are (a
    refined subset), else all. ``formed``: ``(Σκ_i, H, Σ|c_i|, whether a term has negative
    curvature)`` summed by the caller (:func:`~._vector_pool_sums.hessian_sums`), ``k1, n, c`` None."""
    # Sets with a term of negative curvature (κ_i or φ''_i < 0): never with a convex penalty's
    # or the truncated quadratic's (φ'' is 0 or 1), where no check runs.
    plain = pen.convex or isinstance(pen, TruncatedQuadratic)
    if formed is None:
        mixed = None if plain else ((k1 + c < 0) | (k1 < 0)).any(-1)
        # (s = Σ κ_i accumulated in float64, as _hessian's sum: float32's grew with N)
        v, ok, all_ok, flat = hess_solve_checked(k1.sum(-1, dtype=torch.float64).to(k1.dtype), n, c, rhs, mixed)
    else:
        s, H, cabs, mixed = formed
        v, ok, all_ok, flat = hess_solve_checked(s, None, None, rhs, None if plain else mixed,
                                                 formed=(H, cabs, at[0].shape[-2]))
    if flat is not None:
        j = flat.nonzero().squeeze(-1)
        gone = _unresolved(pen, *at, j)
        if bool(gone.any()):
            ok = ok.index_put((j,), ok.index_select(0, j) & ~gone)
            v, all_ok = torch.where(ok.unsqueeze(-1), v, torch.zeros_like(v)), False
    if not all_ok:
        # Named among all R sets, as the caller indexes them: the subset's own positions
        # (flat, and relative to the coarse sets alone) pointed at other elements.
        bad = ~ok if idx is None else torch.zeros(math.prod(batch), dtype=torch.bool,
                                                  device=ok.device).index_fill(0, idx[~ok], True)
        warn(
            f"robust_vector_pool(penalty={pen.name!r}): the Hessian at the solution is "
            f"singular for {shown_indices(bad, batch)}: no inliers, a non-isolated minimiser, "
            f"or a curvature that vanishes within y's own uncertainty (a degenerate minimum); "
            f"their {what} is set to zero",
            GradientWarning)
    return v


def _unresolved(pen: Penalty, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``(r,)``: which of the sets ``j`` have a smallest Hessian eigenvalue λ that is at most
    :data:`~.pooling.backward._CANCELLED` of the absolute sum of H's terms and not resolved
    above y's own uncertainty, in float64: λ <= 0, or λ at ``y -+ delta v`` (v its
    eigenvector, the direction in which y is least known) differs from λ at y by more than
    half of it (:func:`~.pooling.backward.unresolved_over`). ``delta`` is twice the polish's
    noise model of y along v (:func:`~._vector_pool_polish.gradient_noise` over λ, here in
    float64, where a float32 set the polish cannot resolve is solved again) plus y's grid in
    its own dtype."""
    f64 = torch.float64
    x_j, y_j = x.index_select(0, j).to(f64), y.index_select(0, j).to(f64)
    a_j = (a.index_select(0, j) if a.dim() else a).to(f64)

    k1, d2, z, n = _terms(pen, x_j, a_j, y_j)
    lam = _smallest(k1.sum(-1), n, d2 - k1)
    cancelled = lam <= _CANCELLED * (k1.sum(-1).abs() + (d2 - k1).abs().sum(-1))
    if not bool(cancelled.any()):  # (eigenvalues only: the eigenvectors cost 15 times more)
        return cancelled
    i = cancelled.nonzero().squeeze(-1)
    x_i, y_i, a_i = x_j.index_select(0, i), y_j.index_select(0, i), a_j.index_select(0, i) if a_j.dim() else a_j
    k1, d2, z, n = k1.index_select(0, i), d2.index_select(0, i), z.index_select(0, i), n.index_select(0, i)
    lam, v = lowest(k1.sum(-1), n, d2 - k1)

    def curvature(shift: torch.Tensor) -> torch.Tensor:  # λ at y + shift v
        k, e, _, m = _terms(pen, x_i, a_i, y_i + shift.unsqueeze(-1) * v)
        return _smallest(k.sum(-1), m, e - k)

    own = grid(y.index_select(0, j).index_select(0, i).abs().amax(-1).to(f64), torch.finfo(y.dtype).eps)
    return cancelled.index_put((i,), unresolved_over(curvature, lam, gradient_noise(k1, d2, z), own))


def _smallest(s: torch.Tensor, n: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(r,) the smallest eigenvalue of H = s I + Σ_i c_i n_i n_iᵀ, eigenvalues only: of the
    C×C H where C <= N, else s and those of s I + R D Rᵀ (N×N, nᵀ = QR, D = diag c)."""
    N, C = n.shape[-2:]
    if C <= N:
        return torch.linalg.eigvalsh(_hessian(s, n, c))[:, 0]
    r = torch.linalg.qr(n.mT, mode="r").R  # (r, N, N): U D Uᵀ = Q (R D Rᵀ) Qᵀ
    M = (r * c.unsqueeze(-2)) @ r.mT
    M.diagonal(dim1=-2, dim2=-1).add_(s.unsqueeze(-1))
    return torch.minimum(torch.linalg.eigvalsh(M)[:, 0], s)
