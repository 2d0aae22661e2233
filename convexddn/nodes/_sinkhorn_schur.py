"""The Newton system of the entropic-OT solver and its implicit derivatives
(:mod:`convexddn.nodes._sinkhorn`, :mod:`convexddn.nodes._sinkhorn_function`): the Schur
complement S = diag(Pᵀ1) − Pᵀ diag(1/r) P of the marginal constraints, solved by Cholesky
with one column held at 0 (the redundant constraint): the heaviest one of the solver's b
(:func:`held_columns`, the one rule of the forward's Newton steps, the backward and the jvp,
with or without padding: the same problem padded or not holds the same column).

Which one is held matters in floating point, though not in exact arithmetic: with a column
j of mass c_j held, S's solved block has an eigenvalue of about c_j (in units of D =
diag(Pᵀ1): D^(-1/2) S D^(-1/2) is I − (the ones' direction) plus c_j along it), so a
light column held (a marginal entry of 1e-13 of the total, last) left the others' common
offset against it to rounding over 1e-13: its gradient 6.7e-3 off. The heaviest one
keeps that eigenvalue at 1/N at least."""
from __future__ import annotations

import math

import torch

__all__ = ["back_substitute", "flush", "held_columns", "lambda_min_lower", "lambda_min_upper", "polish", "refine",
           "relative_error", "row_sums", "schur_rhs", "schur_solve"]


def flush(P: torch.Tensor, below: float) -> torch.Tensor:
    """P with its entries below ``below`` set to 0 (their products would be denormal)."""
    # One reduction decides whether the masked copy is needed at all (rarely, at small ε).
    return P.masked_fill(P < below, 0.0) if float(P.amin()) < below else P


def row_sums(P: torch.Tensor, pad_r: torch.Tensor | None) -> torch.Tensor:
    """r = P1, with the padding's ``pad_r`` (1 on dead rows) added where given."""
    return P.sum(-1) if pad_r is None else P.sum(-1).add_(pad_r)


def schur_rhs(P: torch.Tensor, r: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w − Pᵀ(u/r): the Schur complement's right-hand side for K (λ, μ) = (u, w)."""
    return torch.baddbmm(w.unsqueeze(-2), (u / r).unsqueeze(-2), P, alpha=-1).squeeze(-2)


def back_substitute(P: torch.Tensor, r: torch.Tensor, u: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """λ = (u − Pμ)/r, K's first block row given μ."""
    return torch.baddbmm(u.unsqueeze(-2), mu.unsqueeze(-2), P.transpose(-1, -2), alpha=-1).squeeze(-2).div_(r)


def held_columns(b: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: the columns whose μ is held at 0: each element's heaviest column of the
    solver's column marginal b (the first of equal ones), and the ``dead`` ones (b = 0, the
    padding's, :class:`~._sinkhorn_padding.Padding`) where given. Dead columns have b = 0
    and every marginal a live entry, so the heaviest is live. (From b, not from the plan's
    column sums Pᵀ1 ≈ b: those broke b's ties by rounding, so a padded and an unpadded run
    of one problem held different columns.)"""
    held = torch.zeros_like(b, dtype=torch.bool) if dead is None else dead.clone()
    return held.scatter_(-1, b.argmax(-1, keepdim=True), True)


def schur_solve(
    P: torch.Tensor, r: torch.Tensor, rhs: torch.Tensor, fixed: torch.Tensor, probe: torch.Tensor | None = None,
    keep: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x with S x = rhs and x = 0 on the held columns, for S = diag(Pᵀ1) − Pᵀ diag(1/r) P
    and r = P1.

    ``fixed`` (B, N) bool: the held columns (:func:`held_columns`: each element's heaviest
    column of b, and the padding's dead ones). Their rows and columns of S become the
    identity's, the rest is the system with those columns dropped.

    S is the Laplacian of the weights W = Pᵀ diag(1/r) P (S1 = 0), so its leading
    (N−1)×(N−1) block is positive definite whenever the support of P connects every row
    and column, and the dropped equation holds automatically when 1ᵀrhs = 0. The
    diagonal is formed as the sum of the off-diagonal weights, not as Pᵀ1 − diag(W),
    which cancels catastrophically when rows concentrate on one column (small eps).
    Entries of P below √tiny are left out here (their products would be denormal; their
    relative weight is under 1e-150). Returns x, the mask of batch elements whose
    Cholesky failed, which are solved by pseudo-inverse (least norm) instead, and with
    ``probe``, P's column sums c = Pᵀ1 (B, N), y = S⁻¹c (0 on the held columns, c on the solved ones):
    :func:`lambda_min_lower` and :func:`lambda_min_upper` bracket with it the smallest
    eigenvalue λ_min of the solved block of the scaled D^(-1/2) S D^(-1/2), D = diag(c),
    and 1/max y is ‖S⁻¹D‖∞, the amplification of relative marginal errors; else None. ``keep``: a
    list, to which the Cholesky factor is appended (for :func:`polish` and :func:`refine`).
    """
    Pf = flush(P, torch.finfo(P.dtype).tiny ** 0.5)
    W = torch.bmm(Pf.transpose(-1, -2), Pf / r.unsqueeze(-1))
    diag = W.diagonal(dim1=-2, dim2=-1)
    diag.zero_()
    # S = diag(W1) − W, formed in W's memory (no second (B, N, N) tensor).
    d = W.sum(-1)
    S = W.neg_()
    diag.copy_(d)
    Sk = S.masked_fill_(fixed.unsqueeze(-1) | fixed.unsqueeze(-2), 0.0)
    Sk.diagonal(dim1=-2, dim2=-1).add_(fixed.to(S.dtype))
    rk = rhs.masked_fill(fixed, 0.0).unsqueeze(-1)
    L, info = torch.linalg.cholesky_ex(Sk)
    # Singular also where a pivot is at the rounding of its own diagonal entry: a
    # Laplacian block of a disconnected support left a pivot of ~1e-17 of its degree and
    # passed, the solve returned garbage silently (a jvp moving mass between blocks).
    piv = L.diagonal(dim1=-2, dim2=-1)
    level = Sk.diagonal(dim1=-2, dim2=-1) * (P.shape[-1] * torch.finfo(S.dtype).eps)
    bad = (info != 0) | (piv * piv <= level).any(-1)
    if keep is not None:
        keep.append(L)
    # Two triangular solves: 11 µs against cholesky_solve's 14 µs at (2, 99, 99).
    yp = None
    if probe is not None:  # (one more column: the triangular solves take both at once)
        rk = torch.cat([rk, probe.masked_fill(fixed, 0.0).unsqueeze(-1)], -1)
    x = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rk, upper=False), upper=True)
    if probe is not None:
        x, yp = x[..., :1], x[..., 1]
    if bool(bad.any()):
        x[bad] = torch.linalg.pinv(Sk[bad], hermitian=True) @ rk[bad][..., :1]
    return x.squeeze(-1).masked_fill_(fixed, 0.0), bad, yp


def lambda_min_lower(y: torch.Tensor) -> torch.Tensor:
    """(B,): lo ≤ λ_min of the scaled solved block D^(-1/2) S D^(-1/2) (D = diag(c), c =
    Pᵀ1), from the probe y = S⁻¹c of :func:`schur_solve` (inf where no column is solved).

    S is a Stieltjes matrix (a Laplacian's positive definite block: off-diagonal ≤ 0), so
    S⁻¹D ≥ 0 entrywise and Collatz–Wielandt bounds its spectral radius 1/λ_min (it is
    similar to the scaled block's inverse) by max_i (S⁻¹D1)_i: lo = 1/max_i y_i, a lower
    bound (up to the solve's rounding), and 1/lo = ‖S⁻¹D‖_∞ exactly: relative errors η of
    the marginals move the solution by at most η/lo. In these units a heavy column's mass
    is no small eigenvalue: only a nearly disconnected support is (1/N ≤ λ_min ≤ 2
    otherwise, the scaled Laplacian's range). (The unscaled S, probed before with v = 1,
    has an eigenvalue ~b_j for a light column j: a false alarm at any b_j below 1e-8.)"""
    top = y.amax(-1) if y.shape[-1] else y.new_zeros(y.shape[:-1])
    return torch.where(top > 0, 1.0 / top, math.inf)


def lambda_min_upper(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(B,): hi ≥ λ_min from the same probe and the column sums c: y's Rayleigh quotient
    yᵀSy/yᵀDy = cᵀy/Σ c y² (Sy = c on the solved columns, y = 0 off them); inf where none
    is left."""
    return torch.where(y.ne(0).any(-1), (c * y).sum(-1) / (c * y.square()).sum(-1), math.inf)


def polish(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pad_r: torch.Tensor | None,
           fixed: torch.Tensor, L: torch.Tensor, steps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(P', η'): P' = diag(e^δα) P diag(e^δβ) (the plan of the same cost with other
    potentials) after up to ``steps`` Newton steps on P'1 = a, P'ᵀ1 = b, its rows then
    scaled to a exactly, the one of smallest ‖P'1 − a‖₁ + ‖P'ᵀ1 − b‖₁ reached (P itself
    if no step lowers it); η' its :func:`relative_error`, but at least √M rounding units
    (that of the column sums). (B, M, N), (B, M), (B, N); ``pad_r`` is 1 on dead rows
    (a_i = 0), ``fixed`` the held columns (:func:`held_columns`), L the Cholesky factor of
    P's Schur complement (``keep``).

    For the backward of a nearly disconnected plan: its marginals' derivatives move by
    about η/λ_min. Each step solves K (δα, δβ) = (a − P1, b − Pᵀ1) through the Schur
    complement, first with P's factor L (no new factorisation: the error falls by about
    err/λ_min per step, at once where that is small), then, where that stalls (a ratio
    near 1), with the current plan's own (quadratic). Steps are clipped to ±1 (a trust
    region: the exponentials stay finite however far the start is)."""
    best, err = P, _error(P, a, b)
    floor = P.shape[-2] ** 0.5 * torch.finfo(P.dtype).eps / 2
    for _ in range(steps):
        rows = row_sums(P, pad_r)
        ra, rb = a - P.sum(-1), b - P.sum(-2)
        rhs = schur_rhs(P, rows, ra, rb)
        if L is None:
            db, bad, _ = schur_solve(P, rows, rhs, fixed)
        else:
            db, bad = _apply(L, rhs, fixed), torch.zeros_like(err, dtype=torch.bool)
        da = back_substitute(P, rows, ra, db)
        step = (da.unsqueeze(-1) + db.unsqueeze(-2)).clamp_(-1.0, 1.0).masked_fill_(bad[:, None, None], 0.0)
        P = P * step.exp_()
        rows = row_sums(P, pad_r)
        P = P * (a / rows).unsqueeze(-1)  # (rows exact: 0 on dead ones)
        new = _error(P, a, b)
        if L is not None and bool(((new > 0.01 * err) & (err > floor)).any()):
            L = None  # (stalled: the plan's own factor from now on)
        better = new < err
        best, err = torch.where(better[:, None, None], P, best), torch.where(better, new, err)
        if not bool(better.any() & (err > floor).any()):
            break
    # (the measured error is itself rounded: at least that of the M-term column sums)
    return best, relative_error(best, a, b).clamp_min(floor)


def refine(P: torch.Tensor, r: torch.Tensor, rhs: torch.Tensor, fixed: torch.Tensor,
           L: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """:func:`schur_solve`'s x for the plan P by ``steps`` of iterative refinement with the
    Cholesky factor L of a nearby plan's Schur complement, S x formed as
    Σ_i P_ij (x_j − (Px)_i / r_i) (the Laplacian's form, O(MN)). For a plan polished from
    L's (:func:`polish`): S's change over L's is about twice the polished ratio η/λ_min,
    and so is the error's contraction per step (below 2e-3 where the caller uses it: 1e-11
    after three, beside the solve's own rounding)."""
    x = _apply(L, rhs, fixed)
    for _ in range(steps):
        m = torch.bmm(P, x.unsqueeze(-1)).squeeze(-1) / r
        x = x + _apply(L, rhs - (P * (x.unsqueeze(-2) - m.unsqueeze(-1))).sum(-2), fixed)
    return x


def _apply(L: torch.Tensor, rhs: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """x with L Lᵀ x = rhs on the solved columns and 0 on the held ones (as in :func:`schur_solve`)."""
    rk = rhs.masked_fill(fixed, 0.0).unsqueeze(-1)
    x = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rk, upper=False), upper=True).squeeze(-1)
    return x.masked_fill_(fixed, 0.0)


def _error(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁: both (the forward makes the rows or the columns exact)."""
    return (P.sum(-1) - a).abs_().sum(-1) + (P.sum(-2) - b).abs_().sum(-1)


def relative_error(P: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """(B,): max_i |(P1)_i − a_i|/a_i and max_j |(Pᵀ1)_j − b_j|/b_j, the larger, over the
    live entries (zero ones are padding, exact). P is the exact plan of marginals off by
    these relative amounts, which the backward's solution feels through S⁻¹D (a row's
    error reaches the columns as Pᵀ diag(1/r) of it, no larger relatively). ``c``: Pᵀ1
    where the caller has it."""
    rows = ((P.sum(-1) - a).abs_() / a).masked_fill_(a == 0, 0.0)
    cols = ((P.sum(-2) if c is None else c) - b).abs_().div_(b).masked_fill_(b == 0, 0.0)
    return torch.maximum(rows.amax(-1), cols.amax(-1))
