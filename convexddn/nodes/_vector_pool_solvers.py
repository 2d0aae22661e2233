"""Solvers of robust vector pooling: the maths (IRLS weights, Hessian solves); the nonconvex
penalties' start search is :mod:`._vector_pool_starts`, the polish (Newton/IRLS and its stopping
rule; the truncated quadratic's IRLS) :mod:`._vector_pool_polish`.

Rows are pooled sets ``x (R, N, C)`` of N vectors in C dimensions; ``alpha`` is ``(R, 1)``
or 0-d; every function is batched torch code (CPU or CUDA) with one host sync per
iteration to decide when to stop. See :mod:`convexddn.nodes.vector_pool` for the maths.
"""
from __future__ import annotations

import math

import torch

from .._autograd import any_batched
from .._linalg import solve_ex
from .dense import checked_solve, default_rcond
from .pooling.backward import _CANCELLED
from .pooling.penalties import Penalty


# --------------------------------------------------------------------------- maths


def kappa(pen: Penalty, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """IRLS weight φ'(z)/z (its limit φ''(0) at z = 0): the penalty's own ``irls_weight``,
    which the built-ins evaluate in one pass (Welsch: one exp instead of two)."""
    return pen.irls_weight(z, a)


def geometry(x: torch.Tensor, u: torch.Tensor):
    """Differences d (R, N, C), distances z (R, N) from each x_i to u."""
    d = u.unsqueeze(-2) - x
    return d, torch.linalg.vector_norm(d, dim=-1)


def unit(d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """n_i = d_i / z_i, and 0 where z_i = 0 (where every term it enters vanishes)."""
    return d / torch.where(z > 0, z, 1.0).unsqueeze(-1)


def _hessian(s: torch.Tensor, n: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
    """H = s I + Σ_i c_i n_i n_iᵀ (R, C, C) where C <= N (else None: see :func:`hess_solve`),
    the sum over N > 1024 points accumulated in float64 by blocks of points and rounded once
    to n's dtype: a float32 sgemm's reduction over N erred like N eps (the gradient of one set of
    1e6 float32 3-vectors 9e-5 off, where scalar pooling's is 4e-7)."""
    N, C = n.shape[-2:]
    if C > N:
        return None
    nc, f64 = n * c.unsqueeze(-1), torch.float64
    if n.dtype == f64 or N <= 1024:  # (short sets: within a few eps in float32, at 1/3 of the time)
        H = nc.mT @ n
    else:
        step = max(1, 2 ** 20 // (n.numel() // N))  # (float64 copies of 8 MB at a time)
        H = sum(nc[..., i:i + step, :].to(f64).mT @ n[..., i:i + step, :].to(f64) for i in range(0, N, step))
    H.diagonal(dim1=-2, dim2=-1).add_(s.unsqueeze(-1))
    return H.to(n.dtype)


def _woodbury(solve, s, n, c, rhs):
    """The C > N form: (sI + U D Uᵀ)⁻¹ = (I − U (sI + D UᵀU)⁻¹ D Uᵀ)/s, an N×N solve."""
    M = c.unsqueeze(-1) * (n @ n.mT)
    M.diagonal(dim1=-2, dim2=-1).add_(s.unsqueeze(-1))
    y, good = solve(M, c * (n @ rhs.unsqueeze(-1)).squeeze(-1))
    return (rhs - (y.unsqueeze(-2) @ n).squeeze(-2)) / s.unsqueeze(-1), good


def _masked(v: torch.Tensor, good: torch.Tensor, s: torch.Tensor,
            rhs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` zero, and ``ok`` False, in the rows that are not ``good``, have ``s <= 0`` or
    a non-finite ``v`` (the solver's Newton steps: no step). Given the derivatives'
    ``rhs``, one that holds NaN or Inf (an incoming gradient or tangent: a fault upstream)
    says nothing about H: its rows keep their non-finite ``v``, propagated as torch does."""
    finite = torch.isfinite(v).all(-1)
    if rhs is not None:
        finite = finite | ~torch.isfinite(rhs).all(-1)
    ok = good & finite & (s > 0)
    return torch.where(ok.unsqueeze(-1), v, torch.zeros_like(v)), ok


def hess_solve(s: torch.Tensor, n: torch.Tensor, c: torch.Tensor, rhs: torch.Tensor):
    """Solve (s I + Σ_i c_i n_i n_iᵀ) v = rhs per row; return v and a mask of good rows.

    s (R,), n (R, N, C), c (R, N), rhs (R, C). C×C when C <= N; otherwise Woodbury,
    an N×N solve.
    """
    H = _hessian(s, n, c)
    v, good = _plain(H, rhs) if H is not None else _woodbury(_plain, s, n, c, rhs)
    return _masked(v, good, s)


def forming_noise(s: torch.Tensor, n: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(R,) the rounding of forming H = s I + Σ_i c_i n_i n_iᵀ (unit n_i), 2-norm: about
    C √(N + 1) eps (|s| + Σ_i |c_i|) (see :func:`hess_solve_checked`)."""
    N, C = n.shape[-2:]
    return _forming_noise(s, c.abs().sum(-1), N, C)


def _forming_noise(s: torch.Tensor, cabs: torch.Tensor, N: int, C: int) -> torch.Tensor:
    """:func:`forming_noise` from ``cabs`` = Σ_i |c_i| (R,)."""
    return (s.abs() + cabs) * (C * math.sqrt(N + 1) * torch.finfo(s.dtype).eps)


def hess_solve_checked(s: torch.Tensor, n: torch.Tensor | None, c: torch.Tensor | None, rhs: torch.Tensor,
                       mixed: torch.Tensor | None = None, formed: tuple | None = None):
    r""":func:`hess_solve` for the derivatives: ``(v, ok, all ok, flat)``, one host read where
    every row is clear-cut. ``flat``: of the rows ``mixed`` (R,) (given: those with a term
    of negative curvature), the ``ok`` ones whose smallest eigenvalue may be below
    :data:`~.pooling.backward._CANCELLED` of the absolute sum of H's terms (a cancellation,
    for :mod:`._vector_pool_hessian` to check), or None where there are none. ``formed``: ``(H,
    Σ_i |c_i|, N)`` where the caller summed them (a set's points in chunks, C <= N), and ``n``, ``c``
    None.
    Rows whose matrix is singular to working precision count as bad: a minimiser that is
    not isolated (Huber with two points 3.2 α apart: a segment of minimisers) is only
    *nearly* singular after rounding, and a solve returns an arbitrary finite step there
    (±1 where the derivative of the solver's own choice is 0.5).

    Singular to working precision means below the rounding of forming H: its entries
    sum N + 1 terms of sizes up to :math:`|s|` and :math:`|c_i|` (unit :math:`n_i`), so
    the computed H is within about :math:`C \sqrt{N+1}\,\varepsilon\,(|s| + \sum_i
    |c_i|)` (2-norm; rounding errors add up like a random walk, the worst case's N + 1
    called float32 Hessians of condition 1.01 singular at N = 8192, C = 256) of the
    exact one, whose smallest eigenvalue may be 0 however large the terms that
    cancelled; an equilibrated condition number, relative to H's own size, missed such
    rows (6e13 against a threshold of 2e14).

    At a strict minimum the C×C H is positive definite; with H = LLᵀ,
    :math:`\lambda_{\min} \ge 1/\|L^{-1}\|_F^2` and κ₂(H) ≤ ‖H‖_F ‖L⁻¹‖_F²
    (equilibration improves κ by at most the factor n, van der Sluis): rows where both
    clear their thresholds take the Cholesky solve. The others (and, in the Woodbury
    form, rows :func:`~.dense.checked_solve` finds ill-conditioned) are decided by their
    eigenvalues.

    Right-hand sides batched by a vmap (torch.func.jacfwd's tangents, which share the
    primal's H) cannot be read on the host: H's rows are decided on a zero right-hand side
    (the same host reads, none of the batched values), then every direction is solved by
    LU and set to zero in the rows found singular, as in the unbatched call (a NaN or Inf
    in a tangent propagates there too).
    """
    if any_batched(rhs):
        zero = torch.zeros(rhs.shape, dtype=rhs.dtype, device=rhs.device)
        _, ok, all_ok, flat = hess_solve_checked(s, n, c, zero, mixed, formed)
        H = _hessian(s, n, c) if formed is None else formed[0]
        v = _plain(H, rhs)[0] if H is not None else _woodbury(_plain, s, n, c, rhs)[0]
        return torch.where(ok.unsqueeze(-1), v, torch.zeros_like(v)), ok, all_ok, flat
    if formed is None:
        N, C = n.shape[-2:]
        H, cabs = _hessian(s, n, c), c.abs().sum(-1)
    else:
        (H, cabs, N), C = formed, formed[0].shape[-1]
    noise = _forming_noise(s, cabs, N, C)
    if H is not None:
        L, info = torch.linalg.cholesky_ex(H)
        inv = torch.linalg.solve_triangular(L, torch.eye(C, dtype=H.dtype, device=H.device).expand_as(L),
                                            upper=False)
        inv2 = inv.square().sum((-2, -1))  # ‖L⁻¹‖_F² ≥ 1 / λ_min
        clear = (info == 0) & (torch.linalg.matrix_norm(H) * inv2 * (C * default_rcond(C, H.dtype)) < 1) \
            & (noise * inv2 < 1)
        v, ok = _masked(torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1), clear, s, rhs)
        flat = _cancelled(s, n, c, H, ok, mixed, cabs)
        bad, some_flat = torch.stack([~ok.all(), flat.any()]).tolist()
        if not bad:
            return v, ok, True, flat if some_flat else None
        # Only the rows the bounds did not clear get the careful solve.
        idx = (~ok).nonzero().squeeze(-1)
        v_idx, good_idx = _checked(H.index_select(0, idx), rhs.index_select(0, idx), noise.index_select(0, idx),
                                   symmetric=True)
        v, good = v.index_copy(0, idx, v_idx), ok.index_copy(0, idx, good_idx)
    else:
        # M = sI + D UᵀU has H's eigenvalues (and s): the same test applies to it.
        v, good = _woodbury(lambda M, r: _checked(M, r, noise, symmetric=False), s, n, c, rhs)
    v, ok = _masked(v, good, s, rhs)
    flat = _cancelled(s, n, c, H, ok, mixed, cabs)
    bad, some_flat = torch.stack([~ok.all(), flat.any()]).tolist()
    return v, ok, not bad, flat if some_flat else None


def _cancelled(s: torch.Tensor, n: torch.Tensor | None, c: torch.Tensor | None, H: torch.Tensor | None,
               ok: torch.Tensor, mixed: torch.Tensor | None, cabs: torch.Tensor) -> torch.Tensor:
    """(R,) the ``ok`` and ``mixed`` rows of H = s I + Σ_i c_i n_i n_iᵀ whose smallest
    eigenvalue λ is not shown to exceed t = :data:`~.pooling.backward._CANCELLED` of its
    terms' absolute sum |s| + Σ_i |c_i| (the scalar pooling's test of its curvature sum,
    which never applies where every term's curvature is >= 0) by a Cholesky factorisation
    of H − t I (C <= N), or, C > N, of K − t I with K = s I − |c|^½ G |c|^½ (G = n nᵀ; with
    every c_i <= 0, as φ'(z)/z non-increasing gives, λ = min(s, λ_min(K))); rows with a c_i > 0
    there, or s <= t, are kept. ``cabs``: Σ_i |c_i|."""
    if mixed is None:
        return torch.zeros_like(ok)
    t = _CANCELLED * (s.abs() + cabs)
    if H is None:
        root = c.clamp(max=0).neg().sqrt()
        A = -(root.unsqueeze(-1) * (n @ n.mT) * root.unsqueeze(-2))
        A.diagonal(dim1=-2, dim2=-1).add_((s - t).unsqueeze(-1))
        clear = (c <= 0).all(-1) & (s > t)
    else:
        A, clear = H - t.view(-1, 1, 1) * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device), True
    return ok & mixed & ~(clear & (torch.linalg.cholesky_ex(A)[1] == 0))


def _plain(H: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v, info = solve_ex(H, rhs)  # (torch's batched solve_ex can hang beyond 128 × 128: see _linalg)
    return v, info == 0


def _checked(H: torch.Tensor, rhs: torch.Tensor, noise: torch.Tensor,
             symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """checked_solve, and a smallest |eigenvalue| above ``noise`` (every row of a
    symmetric H; the ill-conditioned rows of the Woodbury form's M, whose eigenvalues
    are real: D UᵀU is similar to a symmetric matrix)."""
    v, singular, ill, _ = checked_solve(H, rhs)
    good = ~singular
    rows = torch.arange(H.shape[0], device=H.device) if symmetric else ill.nonzero().squeeze(-1)
    if rows.numel():
        Hr = H.index_select(0, rows)
        finite = torch.isfinite(Hr).all(-1).all(-1)
        Hr = torch.where(finite[:, None, None], Hr, torch.eye(H.shape[-1], dtype=H.dtype, device=H.device))
        lam = torch.linalg.eigvalsh(Hr) if symmetric else torch.linalg.eigvals(Hr).real
        small = ~finite | (lam.abs().amin(-1) <= noise.index_select(0, rows))
        good = good.index_put((rows,), good.index_select(0, rows) & ~small)
    return torch.where(good.unsqueeze(-1), v, torch.zeros_like(v)), good


# --------------------------------------------------------------------------- solvers


def irls_point(k1: torch.Tensor | None, s1: torch.Tensor, x: torch.Tensor | None, u: torch.Tensor,
               kx: torch.Tensor | None = None) -> torch.Tensor:
    """The IRLS (majorise–minimise) point Σ_i κ_i x_i / Σ_i κ_i (R, C) of the weights
    ``k1`` (R, N), ``s1`` their sums (R,), and u where s1 = 0 (no inliers); ``kx``: Σ_i κ_i x_i
    (R, C) if summed already (a set's points in chunks), else formed from ``k1`` and ``x``."""
    ok = (s1 > 0).unsqueeze(-1)
    kx = (k1.unsqueeze(-2) @ x).squeeze(-2) if kx is None else kx
    return torch.where(ok, kx / torch.where(ok, s1.unsqueeze(-1), 1.0), u)
