"""Lorentz boosts of second-order-cone blocks (:mod:`convexddn.convex.edge_boost`): a symmetric cone
automorphism with B_k⁻¹ = B_{1/k}, computed without cancellation, and chosen to balance a block that
a point stretches along an edge (CVXPY's epigraph ``(1 + t, 1 − t, 2u)`` of ``t >= ‖u‖²``)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from diffcp import cones as cone_lib

from convexddn.convex.edge_boost import Boost, edge_boost

CONES = cone_lib.parse_cone_dict({"l": 2, "q": [5, 3], "ep": 1})
M = 2 + 5 + 3 + 3


def _matrix(boost: Boost, inverse: bool = False) -> np.ndarray:
    return np.column_stack([boost.rows(col, inverse) for col in np.eye(M)])


def _lorentz(e: np.ndarray, k: float) -> np.ndarray:
    # The boost of rapidity log k along e, from its textbook form [[c, s eᵀ], [s e, I + (c − 1) e eᵀ]].
    c, s = (k + 1 / k) / 2, (k - 1 / k) / 2
    return np.block([[np.array([[c]]), s * e[None, :]], [s * e[:, None], np.eye(e.size) + (c - 1) * np.outer(e, e)]])


@pytest.mark.parametrize("k", [1e-2, 3.0, 1e3])
def test_boost_is_a_symmetric_automorphism_of_the_cone(k):
    rng = np.random.default_rng(0)
    e5 = rng.normal(size=4)
    e5 /= np.linalg.norm(e5)
    e3 = np.array([0.6, 0.8])
    boost = Boost([(2, 5, e5, k), (7, 3, e3, 1 / k)])
    B = _matrix(boost)
    expected = np.eye(M)
    expected[2:7, 2:7] = _lorentz(e5, k)
    expected[7:10, 7:10] = _lorentz(e3, 1 / k)
    np.testing.assert_allclose(B, expected, rtol=0, atol=1e-12 * max(k, 1 / k))
    np.testing.assert_allclose(B, B.T, rtol=0, atol=1e-12 * max(k, 1 / k))
    np.testing.assert_allclose(_matrix(boost, inverse=True) @ B, np.eye(M), rtol=0, atol=1e-9)
    # v₀² − ‖v̄‖² of each block is invariant: the cone (and its boundary) is mapped onto itself.
    v = rng.normal(size=M)
    w = B @ v
    for at, q in ((2, 5), (7, 3)):
        before = v[at] ** 2 - v[at + 1:at + q] @ v[at + 1:at + q]
        after = w[at] ** 2 - w[at + 1:at + q] @ w[at + 1:at + q]
        assert after == pytest.approx(before, rel=1e-9, abs=1e-9 * max(k, 1 / k) ** 2)
    # The sparse path agrees with the dense one.
    A = sp.random(M, 6, density=0.5, random_state=1, format="csc")
    np.testing.assert_allclose(boost.rows(A).toarray(), B @ A.toarray(), rtol=0, atol=1e-12 * np.abs(B).max())


def test_boost_maps_an_edge_column_without_cancellation():
    # cosh and sinh of log k are both 3.9e5 at k = 7.7e5: the matrix product maps the column (−1, 1)
    # of t to (−1/k, 1/k) with five digits lost; in light-cone coordinates it is exact.
    k = 7.7e5
    boost = Boost([(0, 5, np.array([1.0, 0.0, 0.0, 0.0]), k)])
    col = np.array([-1.0, 1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(boost.rows(col), [-1 / k, 1 / k, 0, 0, 0], rtol=1e-15, atol=0)
    np.testing.assert_allclose(boost.rows(np.array([1.0, 1.0, 3.0, 0.0, 0.0])), [k, k, 3.0, 0, 0], rtol=1e-15)


def test_back_maps_the_boosted_solution_to_the_program_frame():
    # y = B y', s = B⁻¹ s': Aᵀy = (B A)ᵀy' and yᵀs = y'ᵀs'.
    rng = np.random.default_rng(1)
    A = sp.random(M, 4, density=0.6, random_state=2, format="csc")
    e = rng.normal(size=4)
    boost = Boost([(2, 5, e / np.linalg.norm(e), 50.0)])
    y2, s2 = rng.normal(size=M), rng.normal(size=M)
    y, s = boost.back(y2, s2)
    np.testing.assert_allclose(A.T @ y, boost.rows(A).T @ y2, rtol=1e-12, atol=1e-12)
    assert y @ s == pytest.approx(y2 @ s2, rel=1e-10)


def test_edge_boost_balances_the_epigraph_of_a_square():
    # t >= ‖u‖² as (1 + t, 1 − t, 2u) ∈ Q: at t = R the light-cone coordinates are p = 2, m = 2R; the
    # boost by √(m/p) = √R makes them √(4R) both.
    cones = cone_lib.parse_cone_dict({"q": [4]})
    A = sp.csc_matrix(np.array([[-1.0, 0, 0], [1, 0, 0], [0, -2, 0], [0, 0, -2]]))
    b = np.array([1.0, 1.0, 4.0, -6.0])
    R = 6e11
    boost = edge_boost(A, b, cones, np.array([R, 0.0, 0.0]))
    assert boost is not None and len(boost.blocks) == 1
    at, q, e, k = boost.blocks[0]
    assert (at, q) == (0, 4)
    np.testing.assert_array_equal(e, [1.0, 0.0, 0.0])
    assert k == pytest.approx(np.sqrt(R), rel=1e-15)
    s = boost.rows(b - A @ np.array([R, 0.0, 0.0]))
    assert s[0] + s[1] == pytest.approx(s[0] - s[1], rel=1e-12)
    assert "7.7e+05" in boost.label
    assert boost.touches(A).tolist() == [True, True, True]
    # Not stretched enough (m/p = 100 < 1e4), or not along an edge (the column (−1, 0.5) moves inside Q): none.
    assert edge_boost(A, b, cones, np.array([100.0, 0.0, 0.0])) is None
    A2 = sp.csc_matrix(np.array([[-1.0, 0, 0], [0.5, 0, 0], [0, -2, 0], [0, 0, -2]]))
    assert edge_boost(A2, b, cones, np.array([R, 0.0, 0.0])) is None
    assert edge_boost(A, b, cones, np.zeros(3)) is None
