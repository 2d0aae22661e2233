"""The active constraints' Jacobian ``A`` ``(B, r, m)`` as the implicit systems use it: its Gram
matrix's pseudo-inverse (:func:`constraint_gram`, for projected CG) and an equivalent set of
independent rows (:func:`independent_rows`, for the dense KKT solve and the degeneracy test).

Both equilibrate ``A``'s rows, so that a constraint written in large (or small) units is judged
by its direction, not its size; the rows are brought to max-norm 1 before ``A Aᵀ`` is formed
(:func:`_row_prescale`), whose entries overflow beyond ~1e154 and underflow below ~1e-162.
"""
from __future__ import annotations

import torch

__all__ = ["constraint_gram", "independent_rows"]

Tensor = torch.Tensor


def _row_prescale(A: Tensor) -> Tensor:
    """``(B, r)``: ``1 / max_j |A_ij|`` per row; 1 on zero rows, on rows with an Inf or NaN
    (whose reciprocal 0 made 0·Inf = NaN of an Inf), and where that reciprocal overflows: a row
    whose largest entry is below 1 / the dtype's max (~5.6e-309 in float64) keeps its size, its
    Gram entries underflow to 0 and it counts as a null row (its equilibration 1 / max, which
    the callers apply, is beyond the dtype too). The Gram matrix of a row of −1e160
    (−1e160·y ≤ 0) was Inf: the row was called null, and the gradient came out as the
    unconstrained problem's, silently."""
    top = A.abs().amax(-1)
    ok = (top > 0) & torch.isfinite(top)
    inv = 1.0 / torch.where(ok, top, 1.0)
    return torch.where(ok & torch.isfinite(inv), inv, 1.0)


def _prescaled_gram(A: Tensor) -> tuple[Tensor, Tensor]:
    """``(P A Aᵀ P, p)`` with ``p`` = :func:`_row_prescale` (``P = diag(p)``)."""
    p = _row_prescale(A)
    Ap = p.unsqueeze(-1) * A
    return Ap @ Ap.transpose(1, 2), p


def _equilibrated_eigh(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, evals, V)``: the eigendecomposition of the Gram matrix ``M`` ``(B, r, r)``
    scaled to a unit diagonal, :math:`S M S = V \\Lambda V^\\top` with ``s = diag(M)^(-1/2)``
    (1 on zero rows), so that a constraint written in large units is not called dependent."""
    s = torch.diagonal(M, dim1=-2, dim2=-1)
    s = torch.where(s > 0, s.rsqrt(), torch.ones_like(s))
    evals, V = torch.linalg.eigh(s.unsqueeze(-1) * M * s.unsqueeze(-2))
    return s, evals, V


def constraint_gram(
    A: Tensor, inactive: Tensor | None, rcond: float
) -> tuple[Tensor, Tensor]:
    """``(A A^T + D)^+`` ``(B, r, r)`` and its rank deficit ``(B,)``.

    ``D`` has ones on inactive constraints (whose rows of ``A`` are zero). The Gram
    matrix is equilibrated first, so that a constraint written in large units is not
    called dependent; singular values of the equilibrated ``[A, D]`` below ``rcond``
    times the largest are dropped. As in :func:`independent_rows`, the Gram matrix's
    eigenvalues σ² resolve only σ well above √eps: elements with eigenvalues below
    :data:`_GRAM_RESOLVED` of the largest take σ from an SVD (the cut at σ² ≤ rcond
    dropped one of two constraints 1e-7 from parallel: gradients O(1) off, silently).
    """
    M, p = _prescaled_gram(A)  # (p = 1 on the inactive rows, which are zero)
    if inactive is not None:
        M = M + torch.diag_embed(inactive.to(A.dtype))
    s, evals, evecs = _equilibrated_eigh(M)
    s = s * p  # (S P M P S: the equilibration of A Aᵀ + D itself)
    top = evals.abs().amax(-1, keepdim=True)
    keep = evals.abs() > rcond * top
    unsure = (evals.abs() <= _GRAM_RESOLVED * top).any(-1).nonzero().squeeze(-1)
    if unsure.numel():  # (a host sync; rare: nearly parallel constraints)
        SA = s.index_select(0, unsure).unsqueeze(-1) * A.index_select(0, unsure)
        if inactive is not None:  # S M S = S A Aᵀ S + D (s = 1 on the inactive rows)
            SA = torch.cat([SA, torch.diag_embed(inactive.index_select(0, unsure).to(A.dtype))], -1)
        U, sigma, _ = torch.linalg.svd(SA, full_matrices=SA.shape[-2] > SA.shape[-1])
        if sigma.shape[-1] < U.shape[-1]:  # rank at most the columns: the rest are null
            sigma = torch.cat([sigma, sigma.new_zeros(*sigma.shape[:-1], U.shape[-1] - sigma.shape[-1])], -1)
        k = sigma > rcond * sigma.amax(-1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
        evals = evals.index_copy(0, unsure, torch.where(k, sigma * sigma, 0.0))
        evecs, keep = evecs.index_copy(0, unsure, U), keep.index_copy(0, unsure, k)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), 0.0)
    Minv = s.unsqueeze(-1) * ((evecs * inv.unsqueeze(-2)) @ evecs.transpose(1, 2)) * s.unsqueeze(-2)
    return Minv, (~keep).sum(-1)


def independent_rows(
    A: Tensor, inactive: Tensor | None, rcond: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rewrite the active constraints' Jacobian with independent rows: ``(A', pin, T, dependent)``.

    With the singular value decomposition :math:`S A = U \\Sigma W^\\top` (``S`` the
    diagonal equilibration to unit rows; ``U`` also the eigenvectors of
    :math:`S A A^\\top S`), :math:`A' = U^\\top S A` has the same row space
    as ``A``, with orthogonal rows; the rows of (numerically) zero singular values --
    dependent constraints, and inactive ones, whose rows of ``A`` are zero -- are zeroed
    and pinned (``pin``: ones on the diagonal of the multiplier block), so the KKT matrix
    built from ``A'`` is regular whenever the Hessian is regular on the tangent space.
    Multipliers map back as :math:`\\mu = T \\mu'` with :math:`T = S U` (the
    minimum-norm ones, in the equilibrated metric, when the constraints are dependent).
    ``dependent`` flags the elements with more null rows than inactive constraints.

    A row counts as null where :math:`\\sigma \\le` ``rcond`` :math:`\\sigma_{max}`. The
    eigenvalues :math:`\\sigma^2` of :math:`S A A^\\top S` carry rounding of ``eps`` times
    the largest, so they resolve only :math:`\\sigma` well above :math:`\\sqrt{eps}`: on
    them ``rcond`` cut at :math:`\\sigma \\approx \\sqrt{rcond}` (~1e-7), two constraints
    1e-7 from parallel were called dependent, one direction dropped, and the derivative
    came out O(1) wrong without a warning. Elements with more eigenvalues below
    :data:`_GRAM_RESOLVED` of their largest than inactive constraints are decided by the
    singular values of :math:`SA` itself (an SVD, 2-4x the cost), which resolve
    :math:`\\sigma` to ~eps.
    """
    r, n = A.shape[-2:]
    M, p = _prescaled_gram(A)
    s, evals, V = _equilibrated_eigh(M)
    s = s * p  # (S P A Aᵀ P S: the equilibration of A Aᵀ itself)
    top = evals.amax(-1, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
    keep = evals > rcond * top
    n_inactive = 0 if inactive is None else inactive.sum(-1)
    unsure = ((evals <= _GRAM_RESOLVED * top).sum(-1) > n_inactive).nonzero().squeeze(-1)
    if unsure.numel():  # (a host sync; rare: dependent or nearly parallel constraints)
        Au, su = A.index_select(0, unsure), s.index_select(0, unsure)
        # (Full U only where there are more constraints than variables: W is then n x n, small.)
        U, sigma, _ = torch.linalg.svd(su.unsqueeze(-1) * Au, full_matrices=r > n)
        if sigma.shape[-1] < r:  # rank at most n < r: the rest are null
            sigma = torch.cat([sigma, sigma.new_zeros(*sigma.shape[:-1], r - sigma.shape[-1])], -1)
        V = V.index_copy(0, unsure, U)
        keep = keep.index_copy(0, unsure, sigma > rcond * sigma.amax(-1, keepdim=True).clamp_min(
            torch.finfo(A.dtype).tiny))
    T = s.unsqueeze(-1) * V
    A2 = (T.transpose(1, 2) @ A) * keep.unsqueeze(-1)
    pin = torch.diag_embed((~keep).to(A.dtype))
    n_null = (~keep).sum(-1)
    return A2, pin, T, n_null > n_inactive


# Eigenvalues of the equilibrated Gram matrix above this fraction of the largest (singular
# values above 1e-3 of the largest) are resolved by eigh to ~1e-10 relative: more below it
# than inactive constraints send the element to the SVD.
_GRAM_RESOLVED = 1e-6
