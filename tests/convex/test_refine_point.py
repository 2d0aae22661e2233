"""Refining a certified point by its error estimate's Newton step (convexddn.convex.refine_point)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from convexddn.convex.interior_point import SOLVED, solve_cone_batch
from convexddn.convex.kkt import KKTStructure
from convexddn.convex.symmetric_cones import ConeLayout

F64 = torch.float64


def _simplex_projection(Y: np.ndarray) -> np.ndarray:
    """Closed form: the Euclidean projection of each row of ``Y`` onto the unit simplex (sort, threshold)."""
    u = -np.sort(-Y, 1)
    css = np.cumsum(u, 1) - 1.0
    k = np.arange(1, Y.shape[1] + 1)
    rho = (u - css / k > 0).sum(1)
    tau = css[np.arange(len(Y)), rho - 1] / rho
    return np.maximum(Y - tau[:, None], 0.0)


@pytest.mark.parametrize("diagonal", [True, False])
def test_a_point_the_polish_leaves_above_rounding_is_refined_to_it(diagonal):
    """Simplex projections (seed 19): the structured polish's one Newton step left element 7
    estimated 6.5e-11 (diagonal S) or 8.3e-11 off, and 1.0e-10 to 1.3e-10 off the closed form,
    certified (tol_error 1e-7). The estimate's own Newton step puts it where float64 can: every
    element within rounding of the closed form."""
    n, B = 6, 8
    gen = torch.Generator().manual_seed(19)
    A = torch.cat([torch.ones(1, n, dtype=F64), -torch.eye(n, dtype=F64)]).expand(B, -1, -1)
    b = torch.cat([torch.ones(B, 1, dtype=F64), torch.zeros(B, n, dtype=F64)], 1)
    y = torch.randn(B, n, dtype=F64, generator=gen)
    opts = dict(structure=KKTStructure(rho=False, diagonal=True, cols=tuple(range(n)))) if diagonal else {}
    sol = solve_cone_batch(torch.eye(n, dtype=F64).expand(B, -1, -1), -y, A, b, ConeLayout(1, n), **opts)
    assert (sol.status == SOLVED).all()
    off = np.abs(sol.x.numpy() - _simplex_projection(y.numpy())).max(1)
    assert off.max() <= 1e-13, off
