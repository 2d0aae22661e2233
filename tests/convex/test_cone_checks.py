"""Certificates of the per-element path (:func:`convexddn.convex.cone_checks.verify_certificate`)."""
from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffcp import cones as cone_lib

import convexddn as cddn
from convexddn.convex.cone_checks import verify_certificate
from convexddn.errors import InfeasibleError


def test_a_valid_ray_whose_small_entries_balance_other_rows_verifies():
    """g·y <= -1 and -g·y <= -1 (infeasible) beside equality rows, data of order 1:
    Clarabel's ray has entries of ~1e-7 on rows it uses; dropped as noise, its columns were
    3e-6 off and the certificate was called unverified ("the data may be badly scaled")."""
    rng = np.random.default_rng(3)
    n, p, mi = 4, 2, 3
    L, q = cp.Parameter((n, n)), cp.Parameter(n)
    E, f, G, h = cp.Parameter((p, n)), cp.Parameter(p), cp.Parameter((mi, n)), cp.Parameter(mi)
    y = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ y) + q @ y), [E @ y == f, G @ y <= h])
    Lt, qt = torch.tensor(rng.standard_normal((2, 3, n, n))), torch.tensor(rng.standard_normal((2, 3, n)))
    Et, ft = torch.tensor(rng.standard_normal((2, 3, p, n))), torch.tensor(rng.standard_normal((2, 3, p)))
    Gt, ht = torch.tensor(rng.standard_normal((2, 3, mi, n))), torch.tensor(rng.random((2, 3, mi)))
    Gt[1, 0, 1] = -Gt[1, 0, 0]
    ht[1, 0, :2] = -1.0
    values = [t[1, 0] for t in (Lt, qt, Et, ft, Gt, ht)]
    layer = cddn.ConvexLayer(prob, parameters=[L, q, E, f, G, h], variables=[y], solver="Clarabel", fallback=None)
    with pytest.raises(InfeasibleError, match="Clarabel: Infeasible.*certificate verified") as err:
        layer(*values)
    assert "does not verify" not in str(err.value)


def _head_alone_program():
    """``x >= 1``, ``x <= 0`` (infeasible) beside ``‖w‖ <= t`` (w ∈ R²), variables (x, t, w),
    in diffcp's form ``Ax + s = b``: the cone's rows ``-I``, so t meets the cone's head alone.
    y = (1, 1, 0, 0, 0) has Aᵀy = 0 and bᵀy = −1."""
    A = np.zeros((5, 4))
    A[0, 0], A[1, 0] = -1.0, 1.0
    A[2:, 1:] = -np.eye(3)
    return sp.csc_matrix(A), np.array([-1.0, 0.0, 0.0, 0.0, 0.0]), np.ones(4), [("l", 2), ("q", [3])]


def test_a_head_at_rounding_level_does_not_fail_its_column():
    """The solvers return the ray's head at 1e-12 (Clarabel, with the tails at 0 or 1e-13):
    alone in t's column it left |(Aᵀy)_t| = (|A|ᵀ|y|)_t, in the ray as it came and in the
    cleaned one (the heads were kept), and a valid certificate did not verify. A head of
    noise is lowered to its tail's norm (the least head in K*)."""
    A, b, c, cones = _head_alone_program()
    for size in (1e-8, 1.0, 1e8):
        for head, tail in ((1e-12, 0.0), (1e-10, 1e-12), (0.0, 0.0)):
            y = size * np.array([1.0, 1.0, head, tail, -tail])
            assert verify_certificate(A, b, c, cones, np.zeros(4), y, "infeasible"), (size, head, tail)
    # a head the ray uses (t's column 1e-3 off), a ray outside K* (t < ‖u‖), x's column off
    for y in ([1.0, 1.0, 1e-3, 0.0, 0.0], [1.0, 1.0, 1e-12, 1e-3, 0.0], [1.0, 0.5, 1e-12, 0.0, 0.0]):
        assert not verify_certificate(A, b, c, cones, np.zeros(4), np.array(y), "infeasible"), y


def _epigraph_layer(solver: str):
    """min ‖Y − M‖² + t + ‖w − v‖² s.t. Y >= −0.1, the column sums of Y (2 rows) = v/2 and
    ‖w‖ <= t: infeasible where some v_j/2 < −0.2, t's column meeting the cone's head alone."""
    M, v = cp.Parameter((2, 3)), cp.Parameter(3)
    Y, t, w = cp.Variable((2, 3)), cp.Variable(), cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(Y - M) + t + cp.sum_squares(w - v)),
                      [Y >= -0.1, cp.sum(Y, axis=0) == v * 0.5, cp.SOC(t, w)])
    kw = {} if solver in ("auto", "batched") else {"fallback": None}  # each solver's own certificate
    return cddn.ConvexLayer(prob, [M, v], [Y], solver=solver, **kw)


@pytest.mark.parametrize("solver", ["auto", "batched", "Clarabel", "SCS", "ECOS"])
def test_an_infeasible_program_with_an_epigraph_cone_is_called_infeasible(solver):
    """Element 0 asks a column sum of −0.70 of two entries >= −0.1 (infeasible); element 1
    (column sums −0.05 and 0) is feasible. Every solver's ray carried its head at rounding
    level (1e-10, 1e-12), its certificate did not verify and the layer raised SolverError
    ("the data may be badly scaled") instead of InfeasibleError."""
    M = torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]], dtype=torch.float64).expand(2, 2, 3)
    v = torch.tensor([[-0.51, -1.39, -0.51], [-0.1, 0.0, -0.1]], dtype=torch.float64)
    with pytest.raises(InfeasibleError) as err:
        _epigraph_layer(solver)(M, v)
    assert list(err.value.indices) == [(0,)]
    assert "does not verify" not in str(err.value)


def test_infeasible_polyhedra_beside_a_norm_are_called_infeasible():
    """min ‖y − x‖² + 0.1 ‖y‖ s.t. Ay <= b with rows a and −a, both bounds −1 (a·y <= −1 and
    a·y >= 1): infeasible by construction for every a ≠ 0. Two of ten random ones ended in
    SolverError ("the data may be badly scaled"), the norm's epigraph variable alone in its
    column."""
    n, m, B = 4, 3, 10
    x, A, b, y = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m), cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x) + 0.1 * cp.norm(y, 2)), [A @ y <= b])
    gen = torch.Generator().manual_seed(43)
    At = torch.randn(B, m, n, dtype=torch.float64, generator=gen)
    At[:, 1] = -At[:, 0]
    bt = torch.rand(B, m, dtype=torch.float64, generator=gen)
    bt[:, :2] = -1.0
    xt = torch.randn(B, n, dtype=torch.float64, generator=gen)
    with pytest.raises(InfeasibleError) as err:
        cddn.ConvexLayer(prob, [x, A, b], [y])(xt, At, bt)
    assert sorted(err.value.indices) == [(i,) for i in range(B)]


def test_kkt_residual_with_its_parts_given_is_the_same():
    # A polish passes residual_parts(A) once for all its steps: (A^T, |A|, |A|^T, |A|'s row and column
    # maxima), the same number.
    from convexddn.convex.cone_checks import kkt_residual, residual_parts
    from diffcp import cones as cone_lib

    rng = np.random.default_rng(2)
    A = sp.random(6, 4, density=0.6, format="csc", random_state=2)
    A.data -= 0.5
    AT, absA, absAT, row_max, col_max = residual_parts(A)
    np.testing.assert_array_equal(AT.toarray(), A.toarray().T)
    np.testing.assert_array_equal(absA.toarray(), np.abs(A.toarray()))
    np.testing.assert_array_equal(absAT.toarray(), np.abs(A.toarray()).T)
    np.testing.assert_array_equal(row_max, np.abs(A.toarray()).max(1))
    np.testing.assert_array_equal(col_max, np.abs(A.toarray()).max(0))
    b, c, x, y, s = (rng.standard_normal(k) for k in (6, 4, 4, 6, 6))
    cones = [(cone_lib.ZERO, 2), (cone_lib.POS, 4)]
    # (y in K*: a multiplier off its cone is measured against its own size, ~1 for random
    # signs, which would hide the terms that depend on A)
    y[2:] = np.abs(y[2:])
    r = kkt_residual(A, b, c, cones, x, y, s)
    assert r > 0 and kkt_residual(A, b, c, cones, x, y, s, parts=(AT, absA, absAT, row_max, col_max)) == r
    # ... and the parts given are the ones used: another matrix's give another number.
    assert kkt_residual(A, b, c, cones, x, y, s, parts=residual_parts(2.0 * A)) != r


def _small_row_program(scale: float):
    """x in R^3: a nonnegative row ``scale (x0 - 1) <= 0`` beside a second-order cone
    ``(x0, x1, x2)`` of unit rows; at x = (1 + 1e-5, 0.5, 0.5) with s = 0 on the small row
    it is violated by 1e-5 of its own size, whatever ``scale``."""
    A = sp.csc_matrix(np.array([[scale, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]))
    b = np.array([scale, 0.0, 0.0, 0.0])
    cones = cone_lib.parse_cone_dict({"l": 1, "q": [3]})
    x = np.array([1.0 + 1e-5, 0.5, 0.5])
    return A, b, np.zeros(3), cones, x, np.zeros(4), np.concatenate([[0.0], x])


@pytest.mark.parametrize("scale", [1e-8, 1e-4])
def test_kkt_residual_measures_each_row_against_its_own_scale(scale):
    """A row of 1e-8 beside the unit rows of a cone met a floor of 1 (the program's unit):
    violated by 1e-5 of its size it passed at 1e-13, and Clarabel's point on a polyhedron
    G y <= h with G, h ~1e-8 came back 1.5e-5 off, "Solved". Each row's floor is now its own
    scale, up to the program's unit: the residual is the one of the same program with that row
    at unit size (row scaling by any positive number leaves the solutions as they are), ~1e-5 / 3."""
    from convexddn.convex.cone_checks import kkt_residual

    unit = kkt_residual(*_small_row_program(1.0))
    assert 1e-6 < unit < 1e-5
    assert kkt_residual(*_small_row_program(scale)) == pytest.approx(unit, rel=1e-6, abs=0.0)


@pytest.mark.parametrize("scale", [1e-3, 1e-6])
def test_kkt_residual_measures_a_multiplier_against_its_cone_blocks_own_size(scale):
    """A multiplier (0.5 on a nonnegative row; a second-order cone block outside K* by 1e-5 of its
    own size, the rest of the point exact): the same residual, ~5e-6, whatever the block's size.
    Against 1 + ‖y‖∞ it was 3.6e-6 at size 1 and 8.7e-12 at 1e-6, which passed a per-element
    projection onto a second-order cone off by 6.5e-6 of its data (see test_per_element). (Down to
    the rounding of the whole multiplier, 64 eps ‖y‖∞ = 7e-15, which is discounted: at 1e-6 the
    violation, 1.3e-11, loses 5e-4 of itself to it.)"""
    from convexddn.convex.cone_checks import kkt_residual

    cones = cone_lib.parse_cone_dict({"l": 1, "q": [4]})

    def residual(size: float) -> float:
        y = np.concatenate([[0.5], size * np.array([2.6 * (1 - 1e-5), -0.6, 0.8, -2.4])])
        A, zero = sp.csc_matrix((5, 1)), np.zeros(5)
        return kkt_residual(A, zero, np.zeros(1), cones, np.zeros(1), y, zero)

    unit = residual(1.0)
    assert 1e-6 < unit < 1e-5
    assert residual(scale) == pytest.approx(unit, rel=1e-3, abs=0.0)
