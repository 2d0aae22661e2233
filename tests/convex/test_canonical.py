"""What the batched solver's canonicalisation (convexddn.convex.canonical) refuses, and how it says so."""
from __future__ import annotations

import cvxpy as cp
import pytest

from convexddn import ConvexLayer
from convexddn.errors import NotDPPError, OptionError


def test_batched_refusal_names_the_quad_form_and_what_the_batched_solver_cannot_do():
    """quad_form(v, P) of a PSD parameter P needs the batched solver; with a log (exponential
    cones) or a returned symmetric variable, which it cannot take, no solver takes the
    problem: the error says both, in words (it said only the second, the log case as
    CVXPY's raw cone-dims text: "SOC constraints: [], PSD constraints: [], 3d power cones")."""
    v, P, q = cp.Variable(3, name="v"), cp.Parameter((3, 3), PSD=True, name="P"), cp.Parameter(3, name="q")
    with_log = cp.Problem(cp.Minimize(cp.quad_form(v, P) + q @ v - cp.sum(cp.log(v + 2))))
    with pytest.raises(NotDPPError) as info:
        ConvexLayer(with_log, [P, q], [v])
    msg = str(info.value)
    assert "quad_form(v, P) of parameter P requires the batched solver" in msg
    assert "a per-element solver writes the term as a second-order cone" in msg
    assert "3 exponential cone(s)" in msg
    assert "SOC constraints" not in msg and "power cones [" not in msg
    Y, S = cp.Variable((2, 2), symmetric=True, name="Y"), cp.Parameter((2, 2), symmetric=True, name="S")
    with_sym = cp.Problem(cp.Minimize(cp.quad_form(v, P) + q @ v + cp.sum_squares(Y - S)))
    with pytest.raises(NotDPPError, match=r"quad_form\(v, P\) of parameter P requires the batched solver.*cannot "
                                          r"return variables\[1\] \(Y, declared symmetric or PSD"):
        ConvexLayer(with_sym, [P, q, S], [v, Y])
    # Without the quad_form only the option is wrong: an OptionError, the cones in words.
    x = cp.Parameter(3, name="x")
    with pytest.raises(OptionError, match=r"^solver='batched': the batched solver cannot solve this problem: it "
                                          r"takes zero, nonnegative and second-order cones only, and this "
                                          r"problem's cone program has 3 exponential cone\(s\)"):
        ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(v - x) - cp.sum(cp.log(v + 2)))), [x], [v],
                    solver="batched")
