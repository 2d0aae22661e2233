"""The caller-unit measures (:func:`convexddn.convex.measures.caller_measures`): row by
row, forgiving a row's (column's) residual only the rounding of the solution's own size.

The program is the projection ``min ½‖x − c‖² s.t. x ≥ 0`` in cone form (``P = I``,
``q = −c``, ``A = −I``, ``b = 0``) at ``c = (0, S)``, whose solution ``x = (0, S)`` meets
its first bound at 0: every term of that row and column is 0 there, so a residual of a
few rounding units of ``S`` (what a float solve of the element leaves) was measured
absolutely and failed from ``S ~ 1e7`` on.
"""
from __future__ import annotations

import torch

from convexddn.convex.measures import caller_measures
from convexddn.convex.symmetric_cones import ConeLayout

F64 = torch.float64
EPS = torch.finfo(F64).eps
TOL = 1e-8


def _program(S: float, bound: float | None = None):
    """(P, q, A, b, layout) of the projection, with an inactive row ``x₀ <= bound`` if given."""
    rows = [[-1.0, 0.0], [0.0, -1.0]] + ([[1.0, 0.0]] if bound is not None else [])
    A = torch.tensor([rows], dtype=F64)
    b = torch.tensor([[0.0, 0.0] + ([bound] if bound is not None else [])], dtype=F64)
    return torch.eye(2, dtype=F64)[None], torch.tensor([[0.0, -S]], dtype=F64), A, b, ConeLayout(0, A.shape[1])


def _residual(S: float, x0: float, s0: float, bound: float | None = None) -> float:
    P, q, A, b, layout = _program(S, bound)
    x = torch.tensor([[x0, S]], dtype=F64)
    s = torch.tensor([[s0, S] + ([bound - x0] if bound is not None else [])], dtype=F64)
    z = torch.zeros_like(s)
    residual, _ = caller_measures(P, q, A, b, layout, x, s, z, TOL)
    return float(residual)


def test_caller_measures_forgive_the_rounding_of_the_solution_size():
    for S in (1.0, 1e8, 1e12):
        off = 4 * EPS * S  # a few rounding units of the solution's size
        # dual column 0: x₀ − c₀ = off (its terms: |x₀| only); primal row 0: −x₀ + s₀ = −off
        assert _residual(S, off, off) <= TOL, S
        assert _residual(S, -off, 0.0) <= TOL, S
        assert _residual(S, 0.0, off) <= TOL, S


def test_caller_measures_still_see_a_violation_beyond_rounding():
    """x₀ = −1e-4 at S = 1e8 (1e-12 of the solution, 450 rounding units) violates x₀ >= 0
    by 1e-4, also beside an inactive bound with a slack of 1e12 (which does not widen the
    rows' allowance: the solution's size sets it, not the slack's)."""
    for bound in (None, 1e12):
        assert _residual(1e8, -1e-4, 0.0, bound) >= 5e-5, bound
        assert _residual(1e8, 0.0, 1e-4, bound) >= 5e-5, bound
        assert _residual(1.0, 1e-7, 1e-7, bound) >= 5e-8, bound
