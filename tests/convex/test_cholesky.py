"""The KKT factorisation's retry (:func:`convexddn.convex.cholesky.proportional_retry`): a
pivot that rounding made negative is factorised again with a regularisation proportional
to the matrix's scale; a matrix that is indefinite beyond rounding still fails.

(The LP with an edge of optima in test_batched.py reaches this at its solution on some
CPUs; the matrices here fail on every CPU.) And the refinement of a solve (``until=``): each
element stops by its own rule, whatever its batch.
"""
from __future__ import annotations

import torch

from convexddn.convex.cholesky import proportional_retry

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
    L2, still = proportional_retry(S, L, failed)
    assert still.tolist() == [False, False, True]
    assert torch.equal(L2[0], L[0])  # the factor that succeeded is kept as it was
    # The retried factor is of S plus a bump of a few eps times its scale.
    gap = (L2[1] @ L2[1].T - S[1]).abs().max() / S[1].diagonal().abs().max()
    assert gap < 1e-13


def _near_parallel_system(ds):
    """H = I, P = I, equality rows (1, 0, 0), (1, d, 0) and one cone row per element: the
    refinement contracts by δ/(λ + δ) per step with λ ~ d² (slowly for d ~ 1e-5)."""
    from convexddn.convex.kkt import DENSE, DataOps, KKTSystem, constant_part
    from convexddn.convex.symmetric_cones import ConeLayout

    B, F = len(ds), torch.float64
    A = torch.zeros(B, 3, 3, dtype=F)
    A[:, 0, 0] = A[:, 1, 0] = A[:, 2, 2] = 1.0
    A[:, 1, 1], A[:, 2, 1] = torch.tensor(ds, dtype=F), 0.5
    P, layout = torch.eye(3, dtype=F).expand(B, 3, 3), ConeLayout(2, 1)
    kkt = KKTSystem(DataOps(P, A, layout, DENSE), None, constant_part(P, A, layout))
    rx, rz = torch.ones(B, 3, 1, dtype=F), torch.tensor([1.0, 2.0, 0.3], dtype=F).expand(B, 3)[..., None]
    return kkt, rx, rz


def test_refinement_until_a_residual_stops_each_element_as_alone():
    """``until=``: the refinement went on for every element while any still gained, so an
    element whose own refinement had stalled (rows 3e-5 apart: alone, residual ∞, a stall
    flagged for the backward) took the steps a faster neighbour (rows 1e-4 apart) needed and
    came back 104 % away from its answer alone, its stall unflagged (residual 1e-5). Each
    stops by its own rule now."""
    kkt, rx, rz = _near_parallel_system([3e-5])
    alone = kkt.solve(rx, rz, 1, until=1e-14)
    residual, error = kkt.solve_residual, kkt.solve_error
    assert residual[0] == torch.inf and error[0] > 0
    for ds in ([3e-5, 1e-4], [3e-5, 1e-4, 1e-6, 1.0]):
        kkt, rx, rz = _near_parallel_system(ds)
        out = kkt.solve(rx, rz, 1, until=1e-14)
        for v, w in zip(out, alone):
            torch.testing.assert_close(v[0], w[0], atol=1e-12, rtol=1e-12)
        assert kkt.solve_residual[0] == residual[0]
        torch.testing.assert_close(kkt.solve_error[0], error[0], atol=0, rtol=1e-12)
