"""The Newton-step check of a solution's error (convexddn/nodes/step_error.py) at magnitudes
whose squares leave float64's range."""
from __future__ import annotations

import pytest
import torch

from convexddn.errors import SolverError
from convexddn.nodes.declarative import DeclarativeNode

DT = torch.float64


class _Bound(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. −S·y₁ <= 0, with solve returning y₁ = 3e-5·x₀, off the true
    y₁ = 0 for x₁ < 0 by 0.5‖x‖ (the bound left inactive: no multiplier can help)."""

    def __init__(self, S: float):
        super().__init__()
        self.S = S

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return -self.S * y[:, 1:]

    def solve(self, x):
        return torch.stack([x[:, 0], 3e-5 * x[:, 0]], -1)


@pytest.mark.parametrize("scale, S", [(1.0, 1.0), (1e155, 1.0), (1e155, 1e155)])
def test_a_wrong_solution_is_rejected_at_huge_magnitudes(scale, S):
    """At x ~ 1e155 the Newton step's norm (5e154) overflowed in its squares, the error's
    score was inf / inf = NaN, NaN passed the check, and the gradient of a point 0.5‖y‖ from
    the solution came back, (1, 1), without a word. Closed form: H = I, so the step is the
    residual y − x = (0, 0.5 + 3e-5)·x₀, and its size relative to ‖y‖ is 0.50003 / √(1 + 9e-10)."""
    x = torch.tensor([[scale, -0.5 * scale]], dtype=DT, requires_grad=True)
    with pytest.raises(SolverError, match=r"not a KKT point .*relative stationarity residual 5\.00e-01"):
        _Bound(S)(x).sum().backward()
    assert x.grad is None
