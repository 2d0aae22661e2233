"""The KKT factorisation's retry (:func:`convexddn.convex.kkt._proportional_retry`): a
pivot that rounding made negative is factorised again with a regularisation proportional
to the matrix's scale; a matrix that is indefinite beyond rounding still fails.

(The LP with an edge of optima in test_batched.py reaches this at its solution on some
CPUs; the matrices here fail on every CPU.)
"""
from __future__ import annotations

import torch

from convexddn.convex.kkt import _proportional_retry

F64 = torch.float64


def test_rounding_sized_negative_pivot_is_retried_and_others_untouched():
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0)))
    # Eigenvalues 4e12 (three) and -5e-3: below the bump 4·4·eps·4e12 ≈ 1.4e-2 and above
    # the rounding of forming the matrix (~1e-3), so its Cholesky fails on every CPU.
    rounded = Q @ torch.diag(torch.tensor([4e12, 4e12, 4e12, -5e-3], dtype=F64)) @ Q.T
    healthy = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64))
    broken = Q @ torch.diag(torch.tensor([4e12, 4e12, 4e12, -1.0], dtype=F64)) @ Q.T  # beyond rounding
    S = torch.stack([healthy, rounded, broken])
    S = 0.5 * (S + S.mT)
    L, info = torch.linalg.cholesky_ex(S)
    failed = info != 0
    assert failed.tolist() == [False, True, True]
    L2, still = _proportional_retry(S, L, failed)
    assert still.tolist() == [False, False, True]
    assert torch.equal(L2[0], L[0])  # the factor that succeeded is kept as it was
    # The retried factor is of S plus a bump of a few eps times its scale.
    gap = (L2[1] @ L2[1].T - S[1]).abs().max() / S[1].diagonal().abs().max()
    assert gap < 1e-13
