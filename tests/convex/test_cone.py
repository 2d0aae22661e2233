"""The per-element path's Newton polish (:meth:`convexddn.convex.cone.ResidualMap.refine`):
when it takes steps and when it stops.

The residual sequences are scripted (each step's KKT residual is what the test says), so
the tests check the stopping rule itself; the polish's accuracy is checked against
closed forms and finite differences in ``test_layer.py`` and ``test_reliability.py``.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from diffcp import cones as cone_lib

from convexddn.convex import cone
from convexddn.convex.cone import POLISH_ABOVE, ResidualMap


def _program() -> ResidualMap:
    """min -x1 - x2 s.t. x <= 1 (two nonnegative slacks): any small program will do."""
    A = sp.csc_matrix(np.eye(2))
    cones = cone_lib.parse_cone_dict({"l": 2})
    return ResidualMap(A, np.ones(2), -np.ones(2), cones, cone_lib.parse_cone_dict_cpp(cones), "dense")


def _polish(monkeypatch, residuals: list[float], steps: int = 5) -> tuple[int, float]:
    """Run refine where the k-th residual measured is ``residuals[k]`` (the start's first);
    returns (Newton steps taken, residual returned)."""
    program, taken, script = _program(), [], iter(residuals)
    monkeypatch.setattr(cone, "kkt_residual", lambda *_: next(script))

    def step(M, rhs, transpose=False):
        taken.append(1)
        return np.zeros_like(rhs)  # z stays put: only the scripted residuals matter

    monkeypatch.setattr(program, "_solve", step)
    *_, r = program.refine(np.ones(2), np.ones(2), np.zeros(2), steps)
    return len(taken), r


def test_stops_at_the_rounding_floor(monkeypatch):
    # 1e-3 -> 1e-9 -> 5e-12 (below POLISH_ABOVE, still 200x better), then a step that gains
    # nothing: the polish ends there instead of repeating it twice more.
    taken, r = _polish(monkeypatch, [1e-3, 1e-9, 5e-12, 6e-12, 5e-12, 5e-12])
    assert taken == 3 and r == 5e-12


def test_a_worse_step_above_the_threshold_does_not_stop(monkeypatch):
    # A full step may land on another piece of R first and converge from there.
    taken, r = _polish(monkeypatch, [1e-6, 1.0, 1e-16, 1.0])
    assert taken == 2 and r == 1e-16


def test_a_jump_to_another_piece_below_the_threshold_does_not_stop(monkeypatch):
    # At 5e-12 already, a step landing far above (another piece of R) is no rounding floor.
    taken, r = _polish(monkeypatch, [5e-12, 1e-3, 1e-16, 1.0])
    assert taken == 2 and r == 1e-16


def test_keeps_going_while_steps_gain_tenfold(monkeypatch):
    taken, r = _polish(monkeypatch, [5e-12, 1e-13, 9e-15, 1.0])
    assert taken == 2 and r == 9e-15  # 9e-15 is at rounding level: no third step


@pytest.mark.parametrize("start", [1e-15, float("inf")])
def test_no_step_from_a_polished_or_broken_point(monkeypatch, start):
    taken, r = _polish(monkeypatch, [start, 1.0])
    assert taken == 0 and r == start


def test_stall_above_the_threshold_uses_every_step(monkeypatch):
    taken, r = _polish(monkeypatch, [1e-6, 9e-7, 8e-7, 7e-7, 6e-7, 5e-7], steps=5)
    assert taken == 5 and r == 5e-7 and r > POLISH_ABOVE


def test_q_is_the_skew_matrix_of_its_definition():
    # Q = [[0, A^T, c], [-A, 0, b], [-c^T, -b^T, 0]] written out densely; A's stored entries kept
    # (an explicit zero too) and b's and c's zeros not stored, as scipy's bmat of the blocks stores them.
    A = sp.random(5, 4, density=0.5, format="csc", random_state=3)
    A.data[0] = 0.0
    b = np.array([1.0, 0.0, -2.0, 0.0, 0.5])
    c = np.array([0.0, 3.0, 0.0, -1.0])
    Ad = A.toarray()
    want = np.zeros((10, 10))
    want[:4, 4:9], want[:4, 9] = Ad.T, c
    want[4:9, :4], want[4:9, 9] = -Ad, b
    want[9, :4], want[9, 4:9] = -c, -b
    Q = cone._skew(A, b, c)
    assert isinstance(Q, sp.csc_matrix) and Q.has_canonical_format
    np.testing.assert_array_equal(Q.toarray(), want)
    assert Q.nnz == 2 * A.nnz + 2 * 3 + 2 * 2


def test_residual_keeps_a_small_rows_term_beside_a_large_multiplier():
    """R(z) = Q Π(z) − Π(z) + z summed left to right lost an active row's Q-term below the
    rounding of its multiplier (rows of 1e-8, multipliers of 5e7: the row's residual 2e-13
    read as 0, and the polish stalled at 5.6e-6 of the row's size). In v's rows with v > 0,
    R = −A x + b w exactly (Π keeps v): here −1e-8 (1 + 1e-5) + 1e-8 = −1e-13."""
    A = sp.csc_matrix(np.array([[1e-8]]))
    cones = cone_lib.parse_cone_dict({"l": 1})
    program = ResidualMap(A, np.array([1e-8]), np.array([-1.0]), cones, cone_lib.parse_cone_dict_cpp(cones), "dense")
    z = np.array([1.0 + 1e-5, 5e7, 1.0])  # (u, v, w): v the row's multiplier, 5e7
    assert program._residual(z)[1] == pytest.approx(-1e-8 * 1e-5, rel=1e-6, abs=0.0)
