"""Batched Cholesky factorisations of the KKT systems' Schur complements (:mod:`.kkt`): 1×1
systems elementwise, a proportional retry where rounding alone breaks a factorisation, and
the solve with a factor."""
from __future__ import annotations

import torch

__all__ = ["RETRY", "chol", "chol_solve", "proportional_retry"]


def chol(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor and failure mask; 1×1 systems elementwise (no LAPACK loop)."""
    if M.shape[-1] == 1:
        ok = M[:, 0, 0] > 0
        return torch.sqrt(torch.where(ok, M[:, 0, 0], 1.0))[:, None, None], ~ok
    L, info = torch.linalg.cholesky_ex(M)
    return L, info != 0


def proportional_retry(S: torch.Tensor, L: torch.Tensor, failed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky of the ``failed`` elements of ``S`` again, with ``RETRY·n·eps·max diag`` on
    the diagonal instead of δ alone: where the scalings span 1e21 (an LP with an edge of
    optima at its solution: curvature 1e-9 along the edge, 4e12 across), rounding alone
    makes a pivot negative (λ_min computed as -4e-5), on one CPU and not on another. The
    solves refine against the unregularised system, which removes the added term's effect
    where the system is well posed."""
    idx = torch.nonzero(failed).squeeze(1)
    part = S.index_select(0, idx)
    n = part.shape[-1]
    bump = RETRY * n * torch.finfo(S.dtype).eps * part.diagonal(dim1=1, dim2=2).abs().amax(1)
    L2, info = torch.linalg.cholesky_ex(part + bump[:, None, None] * torch.eye(n, dtype=S.dtype, device=S.device))
    still = (info != 0) | ~torch.isfinite(L2.diagonal(dim1=1, dim2=2)).all(1)
    return L.index_copy(0, idx, L2), failed.index_copy(0, idx, still)


# The proportional regularisation of that retry, in units of n·eps·max diag: the rounding
# of the product AᵀH⁻¹A that forms S is about that size.
RETRY = 4.0


def chol_solve(L: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ v`` for a factor of :func:`chol` ``(B, k, k)`` and ``v (B, k, r)``."""
    if L.shape[-1] == 1:
        return v / (L * L)
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, v, upper=False), upper=True)
