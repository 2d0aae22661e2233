"""Dual rays of the batched path (:func:`convexddn.convex.rays.verified_rays`) on programs
infeasible by construction, a second-order cone's head alone in its column."""
from __future__ import annotations

import pytest
import torch

from convexddn.convex.rays import verified_rays
from convexddn.convex.symmetric_cones import ConeLayout

F64 = torch.float64


def _program(k: float):
    """``x >= 1``, ``x <= 0`` (infeasible) beside ``‖w‖ <= t`` (w ∈ R²), variables (x, t, w),
    the cone's rows ``k (t, w) ∈ K``: ``-k I`` in A, so t meets the cone's head row alone.
    y = (1, 1, 0, 0, 0) has Aᵀy = 0 and bᵀy = −1."""
    A = torch.zeros(1, 5, 4, dtype=F64)
    A[0, 0, 0], A[0, 1, 0] = -1.0, 1.0
    A[0, 2:, 1:] = -k * torch.eye(3, dtype=F64)
    b = torch.tensor([[-1.0, 0.0, 0.0, 0.0, 0.0]], dtype=F64)
    return torch.zeros(1, 4, 4, dtype=F64), torch.ones(1, 4, dtype=F64), A, b, ConeLayout(0, 2, (3,))


def _infeasible(k: float, y: list[float]) -> bool:
    P, q, A, b, layout = _program(k)
    return verified_rays(P, q, A, b, layout, torch.zeros(1, 4, dtype=F64), torch.tensor([y], dtype=F64))[0].item()


@pytest.mark.parametrize("k", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("size", [1e-8, 1.0, 1e8])
def test_a_head_at_rounding_level_does_not_fail_its_column(k, size):
    """The solvers return the ray's head at 1e-10 (tails at 1e-12): alone in t's column, the
    head left |(Aᵀy)_t| = k·1e-10 = (|A|ᵀ|y|)_t and the certificate failed, with or without
    the tails. A head of noise is lowered to its tail's norm (here 0): y stays in K*, and the
    test holds at any scale of the cone's rows and of the ray."""
    for head, tail in ((1e-10, 0.0), (1e-10, 1e-12), (1e-12, 1e-13), (0.0, 0.0)):
        y = [size, size, size * head / k, size * tail / k, -size * tail / k]
        assert _infeasible(k, y), (head, tail)


def test_a_head_the_ray_uses_or_a_ray_outside_the_dual_cone_is_rejected():
    """A head above the noise (1e-3) leaves t's column 1e-3 off: no certificate. A head of
    noise beside a tail that is not (1e-3) is outside K* (t < ‖u‖) and stays so: no
    certificate either; nor is a ray whose head is negative beyond the noise."""
    assert not _infeasible(1.0, [1.0, 1.0, 1e-3, 0.0, 0.0])
    assert not _infeasible(1.0, [1.0, 1.0, 1e-10, 1e-3, 0.0])
    assert not _infeasible(1.0, [1.0, 1.0, -1e-3, 0.0, 0.0])
    assert not _infeasible(1.0, [1.0, 0.5, 1e-10, 0.0, 0.0])  # x's column 0.5 off



def test_a_row_without_data_is_not_taken_for_noise():
    """0·x <= −1 beside x <= 1 is infeasible, y = (0, 1) its ray (Aᵀy = 0, bᵀy = −1). Its
    weight |y_i|·‖A_i‖∞ is 0 (no data in the row), and the batched path zeroed it as noise,
    refusing the certificate the per-element path (cone_checks) accepts."""
    import numpy as np
    import scipy.sparse as sp

    from convexddn.convex.cone_checks import verify_certificate

    A = torch.tensor([[[1.0], [0.0]]], dtype=F64)
    b = torch.tensor([[1.0, -1.0]], dtype=F64)
    y = torch.tensor([[0.0, 1.0]], dtype=F64)
    P, q = torch.zeros(1, 1, 1, dtype=F64), torch.zeros(1, 1, dtype=F64)
    assert verified_rays(P, q, A, b, ConeLayout(0, 2), torch.zeros(1, 1, dtype=F64), y)[0].item()
    assert verify_certificate(sp.csc_matrix(A[0].numpy()), b[0].numpy(), np.zeros(1), [("l", 2)],
                              np.zeros(1), y[0].numpy(), "infeasible")
