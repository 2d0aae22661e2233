"""Degenerate eigenvalues in the eigen decomposition's backward: detection and warnings.

Where eigenvalues are equal (within ``gap_tol`` relative to the largest), eigenvectors
inside their eigenspace are not unique and the k-th eigenvalue may split a cluster: the
exact gradient of the eigenvectors, or of individual eigenvalues, does not exist there.
:mod:`.eigen` drops the pairs' eigenvector terms; these functions say so, naming the batch
elements, whenever the loss actually depends on what does not exist.
"""
from __future__ import annotations

import math

import torch

from .._warn import warn
from ..errors import GradientWarning
from .degeneracy import shown_indices

__all__ = ["sign_ties", "warn_degenerate_pairs", "warn_degenerate_tangent", "warn_degenerate_values",
           "warn_sign_ties", "warn_unchecked"]

# A dropped pair is reported only when the term it drops is above rounding noise: a
# loss that does not depend on the basis inside a degenerate eigenspace (a projector
# V Vᵀ, a sum of eigenvalues) has an exactly zero dropped term.
_NUMERATOR_RTOL = 1e-8


def _rounding_rtol(W: torch.Tensor) -> float:
    """Relative size below which an entry of ``W = Vᵀ G`` (``(…, N, k)``) is rounding:
    8 √N eps of its dtype (a sum of N products rounds like √N eps; 4 N eps hid dropped
    terms of 7e-5 in float32 at N = 300), at least ``_NUMERATOR_RTOL``."""
    return max(_NUMERATOR_RTOL, 8 * math.sqrt(W.shape[-2]) * torch.finfo(W.dtype).eps)


def warn_degenerate_pairs(W: torch.Tensor, degenerate: torch.Tensor, sel: slice, gap_tol: float,
                          uses_values: bool = False) -> None:
    """Warn (naming the batch elements) when a dropped degenerate pair carried gradient.

    For a pair of selected eigenvectors i, j the symmetrised VJP depends on
    ``W_ji − W_ij`` only; for a selected i and an unselected j on ``W_ji``. Where the
    loss reads the eigenvalues too (``uses_values``), a pair that carries any weight
    counts: a loss through both, such as a matrix function V f(Λ) Vᵀ, has
    ``W_ji − W_ij = (f_i − f_j) S_ij``, which vanishes at the tie although its term, that
    over the gap, tends to f′ S_ij (at X = I the gradient of sum(V Λ Vᵀ) lost its
    off-diagonal ones, silently); a loss through the vectors alone is exact there only
    when it does not depend on the basis inside the eigenspace (a projector).
    """
    if uses_values:
        num = W.abs()
        num[..., sel, :] = torch.maximum(num[..., sel, :], num[..., sel, :].mT)
    else:
        num = W.clone()
        num[..., sel, :] -= W[..., sel, :].mT
    # (W's own rounding: in float32 a projector loss's exact zeros came out ~1e-7 and
    # warned in 13 of 20 cases.)
    limit = _rounding_rtol(W) * W.abs().amax((-2, -1), keepdim=True)
    # ``degenerate`` excludes j = i (the caller set those gaps to inf), which is no pair.
    dropped = degenerate & (num.abs() > limit)
    bad = dropped.flatten(-2).any(-1)
    if bool(bad.any()):
        warn(
            f"eigen_decomposition: eigenvalues closer than gap_tol={gap_tol:.3g} (relative "
            f"to max |λ|) make the eigenvector gradient undefined for {shown_indices(bad, bad.shape)}; "
            f"the terms of those eigenvalue pairs are set to zero (the gradient of a loss "
            f"through the eigenvectors alone that depends only on the spanned subspace stays "
            f"exact; one that reads the eigenvalues too, e.g. V f(Λ) Vᵀ, loses its part there)",
            GradientWarning,
        )


def warn_unchecked(near: torch.Tensor, ties: torch.Tensor | None, gap_tol: float, what: str) -> None:
    """Warn for the degenerate pairs and sign ties of a batched cotangent or tangent
    (torch.func.jacrev or jacfwd, ``is_grads_batched``): whether the loss reaches them is
    per direction, which no host read can see; the checks above ran into the vmap
    ("data-dependent control flow"). ``near`` (…, N − 1): the degenerate consecutive
    gaps; ``ties`` (…, k): :func:`sign_ties`, or None."""
    bad = near.any(-1) if ties is None else near.any(-1) | ties.any(-1)
    if bool(bad.any()):
        warn(
            f"eigen_decomposition: for {shown_indices(bad, bad.shape)} eigenvalues closer than "
            f"gap_tol={gap_tol:.3g} (relative to max |λ|), or an eigenvector at a tie of its "
            f"sign convention, leave the {what} undefined along some directions; with batched "
            f"directions (torch.func.jacrev/jacfwd, is_grads_batched) the terms of those pairs "
            f"are set to zero without checking which directions reach them",
            GradientWarning,
        )


def warn_degenerate_tangent(M: torch.Tensor, diag: torch.Tensor, degenerate: torch.Tensor, sel: slice,
                            gap_tol: float) -> None:
    r"""Forward mode: warn (naming the batch elements) where the tangent does not exist.

    ``M`` (…, N, k) holds :math:`v_j^\top \mathrm{sym}(\dot X) v_i` for the selected
    i, ``diag`` (…, N) every :math:`v_j^\top \mathrm{sym}(\dot X) v_j`. For a degenerate
    pair (j, i) the direction rotates inside the eigenspace (:math:`M_{ji} \ne 0`) or
    splits it (:math:`M_{ii} \ne M_{jj}`, the order of the pair then flips with the
    sign of the step): either way the eigenvectors and the individual eigenvalues have
    no derivative along it, only one-sided limits. A direction that keeps the tie (a
    multiple of the identity on it) has its exact tangent and no warning.
    """
    # M's own rounding too: in float32 a tie-keeping direction's M_ii − M_jj is one ulp
    # (6e-8 relative), above 1e-8 (30 of 40 random ties warned).
    limit = _rounding_rtol(M) * M.abs().amax((-2, -1), keepdim=True)
    split = (diag[..., :, None] - diag[..., None, sel]).abs()
    # ``degenerate`` excludes j = i (the caller set those gaps to inf), which is no pair.
    dropped = degenerate & ((M.abs() > limit) | (split > limit))
    bad = dropped.flatten(-2).any(-1)
    if bool(bad.any()):
        warn(
            f"eigen_decomposition: eigenvalues closer than gap_tol={gap_tol:.3g} (relative "
            f"to max |λ|) make the forward-mode tangent undefined for {shown_indices(bad, bad.shape)} "
            f"(the direction rotates or splits a repeated eigenvalue); the terms of those "
            f"eigenvalue pairs are set to zero",
            GradientWarning,
        )


def warn_degenerate_values(near: torch.Tensor, rel_gaps: torch.Tensor, g_lam: torch.Tensor, k: int,
                           gap_tol: float) -> None:
    """Warn (naming the batch elements) when the eigenvalue gradient does not exist.

    Within a cluster of equal eigenvalues (consecutive gaps flagged in ``near``, ``(…,
    N − 1)``) only the sum over the whole cluster is differentiable: the selected
    eigenvalues' gradient ``g_lam`` (``(…, k)``) must be equal across a cluster, and zero
    on a cluster that the k-th eigenvalue splits (equal and zero up to 100 times the
    pair's gap ``rel_gaps`` (``(…, N − 1)``, relative to max|λ|): a smooth loss's weights
    differ by that much across a near-tie). Otherwise the gradient returned,
    ``Σ g_i v_i v_iᵀ`` with the basis ``eigh`` happened to pick, is one of many one-sided
    limits (at X = I, λ_max's is e_1 e_1ᵀ, where a finite difference along e_2 e_2ᵀ gives 1
    on one side and 0 on the other)."""
    g = g_lam.to(torch.float64)
    # A smooth loss f(λ) weighs eigenvalues δ apart by f'' δ · max|λ| apart, about δ ·
    # max|g|: below 100 times that the weights count as equal (Σλ² at diag(1, 1 + 1e-6, 3)
    # in float32 was reported, its gradient 2X exact). By each pair's own gap, not by
    # gap_tol: 100 gap_tol ≥ 1 (float16's default, bfloat16 with gap_tol = 0.01) excused
    # every weight at an exact tie, and λ₁ + 0.5 λ₂ at diag(3, 3, 1) was one side's, silently.
    scale = g.abs().amax(-1, keepdim=True)
    tol = (100.0 * rel_gaps.to(torch.float64)).clamp_min(_NUMERATOR_RTOL) * scale  # (…, N − 1)
    bad = torch.zeros(g.shape[:-1], dtype=torch.bool, device=g.device)
    if k > 1:  # tied selected neighbours with different weights
        bad |= (near[..., : k - 1] & ((g[..., 1:] - g[..., :-1]).abs() > tol[..., : k - 1])).any(-1)
    if k < near.shape[-1] + 1:  # a cluster split by the k-th eigenvalue, with weight on it
        cluster = torch.cat([torch.zeros_like(near[..., :1], dtype=torch.long), (~near).long().cumsum(-1)], -1)
        split = cluster[..., k - 1] == cluster[..., k]
        member = cluster[..., :k] == cluster[..., k - 1 : k]
        # (the cluster's span: its gaps from its first member up to the split)
        span = torch.where(member[..., :-1], rel_gaps[..., : k - 1], 0.0).sum(-1, keepdim=True)
        span = span + rel_gaps[..., k - 1 : k]
        bad |= split & (member & (g.abs() > (100.0 * span).clamp_min(_NUMERATOR_RTOL) * scale)).any(-1)
    if bool(bad.any()):
        warn(
            f"eigen_decomposition: eigenvalues closer than gap_tol={gap_tol:.3g} (relative to "
            f"max |λ|) are weighted unequally by the loss, or split by the k-th one, for "
            f"{shown_indices(bad, bad.shape)}: the eigenvalue gradient does not exist there (only a "
            f"cluster's sum is differentiable); the one returned depends on the basis eigh chose",
            GradientWarning,
        )


def sign_ties(Vk: torch.Tensor) -> torch.Tensor:
    """``(…, k)`` the returned eigenvectors ``Vk`` ``(…, N, k)`` whose largest and smallest
    components are equal in magnitude to rounding (that of a float64 ``eigh``, 8 N eps of
    their spread), where the sign convention (the largest |component| positive) flips:
    X = [[2, 1], [1, 2]]'s v₂ = (1, −1)/√2, any symmetric graph's Laplacian. There the
    output jumps (by 2|v| under a perturbation of 1e-9)."""
    hi, lo = Vk.amax(-2), Vk.amin(-2)
    return (hi + lo).abs() <= 8 * Vk.shape[-2] * torch.finfo(torch.float64).eps * (hi - lo)


def warn_sign_ties(ties: torch.Tensor, along: torch.Tensor, what: str) -> None:
    """Warn where a tie of the sign convention (:func:`sign_ties`, ``(…, k)``) is reached by
    ``along`` ``(…, N, k)`` (the cotangent, or the tangent's coefficients): there the
    ``what`` (gradient, tangent) is one side's."""
    reached = (ties & (along != 0).any(-2)).any(-1)
    if not bool(reached.any()):
        return
    warn(
        f"eigen_decomposition: for {shown_indices(reached, reached.shape)} a returned eigenvector has its "
        f"largest and smallest components equal in magnitude, where the sign convention "
        f"(largest |component| positive) flips: the output jumps there and its {what} is one "
        f"side's",
        GradientWarning,
    )
