"""The iterative solvers' condition estimate at a point (:func:`~convexddn.convex.iterative.solver_condition`):
a lower bound of the condition of ``M`` on the complement of its null direction ``z``, checked against
matrices built with known singular values (the bound: their largest over their smallest nonzero)."""
from __future__ import annotations

import numpy as np
import pytest

from convexddn.convex.iterative import solver_condition


class _Dense:
    """diffcp's operator interface (``matvec``, ``rmatvec``, ``transpose``) on an array."""

    def __init__(self, M: np.ndarray) -> None:
        self.M = M

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return self.M @ x

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self.M.T @ y

    def transpose(self) -> _Dense:
        return _Dense(self.M.T)


def _singular_along_z(sigma: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(M, z)``: ``M = U diag(sigma, 0) Vᵀ`` (random orthogonal ``U``, ``V``), ``z`` its null direction."""
    rng = np.random.default_rng(seed)
    N = sigma.size + 1
    U, V = (np.linalg.qr(rng.standard_normal((N, N)))[0] for _ in range(2))
    return (U * np.append(sigma, 0.0)) @ V.T, V[:, -1] * 3.0


@pytest.mark.parametrize("lsqr", [False, True])
def test_well_conditioned_reads_below_its_condition(lsqr):
    sigma = np.geomspace(1.0, 1e-2, 119)  # (condition on z⊥: 100)
    M, z = _singular_along_z(sigma, 0)
    cond = solver_condition(_Dense(M), z, lsqr)
    assert cond <= 100.0 * (1 + 1e-6)  # (a lower bound: never more than the condition)


@pytest.mark.parametrize("lsqr", [False, True])
def test_ill_conditioned_reads_above_the_doubt(lsqr):
    """Singular values down to 1e-13 of the largest (the badly scaled QP's unequilibrated derivative:
    4e10 and 1.2e13): the solvers stop with those directions unresolved, and the estimate says so,
    above :data:`~convexddn.convex.cone.ILL_CONDITIONED` (where the per-element result is in doubt)."""
    from convexddn.convex.cone import ILL_CONDITIONED

    sigma = np.append(np.geomspace(1.0, 1e-2, 117), [1e-11, 1e-13])
    M, z = _singular_along_z(sigma, 1)
    assert ILL_CONDITIONED < solver_condition(_Dense(M), z, lsqr) <= 1e13 * (1 + 1e-6)
