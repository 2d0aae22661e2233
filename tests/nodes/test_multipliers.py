"""Activity and multipliers (convexddn/nodes/multipliers.py) at magnitudes where products overflow."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from convexddn.errors import GradientWarning
from convexddn.nodes.declarative import DeclarativeNode
from convexddn.nodes.multipliers import inactive_mask, relative_slack

DT = torch.float64


class _SlackBound(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. −S·y₁ <= 0, as an interior point method returns it: y₁ = r·x₀
    (a bound approached, not reached) for x₁ < 0, where the exact solution is y₁ = 0."""

    def __init__(self, S: float, r: float = 3e-5, **kw):
        super().__init__(**kw)
        self.S, self.r = S, r

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return -self.S * y[:, 1:]

    def solve(self, x):
        return torch.stack([x[:, 0], self.r * x[:, 0]], -1)


def test_relative_slack_where_the_scale_overflows():
    # ‖∇g‖ ℓ = 1e154 · 1e156 is beyond float64; the ratio −g / (‖∇g‖ ℓ) = 3e305 / 1e310 = 3e-5 is not.
    g = torch.tensor([[-3e305, 0.0, -1.0]], dtype=DT)
    A = torch.tensor([[[0.0, -1e154], [0.0, -1e154], [0.0, 0.0]]], dtype=DT)
    length = torch.tensor([1e156], dtype=DT)
    slack = relative_slack(g, A, length)
    torch.testing.assert_close(slack[:, :2], torch.tensor([[3e-5, 0.0]], dtype=DT), rtol=1e-15, atol=0)
    assert slack[0, 2] == torch.inf  # (a zero gradient, g < 0: slack at any scale)
    assert inactive_mask(g, A, length, 1e-6, DT).tolist() == [[True, False, True]]
    assert inactive_mask(g, A, length, 1e-4, DT).tolist() == [[False, False, True]]


@pytest.mark.parametrize("scale, S, x1", [(1.0, 1.0, -1e-3), (1e156, 1e154, -1e153)])
def test_near_active_report_at_huge_magnitudes(scale, S, x1):
    """The report of bounds slack within a larger active_tol recomputed the slack as
    −g / (‖∇g‖ ℓ) with the product overflowing (1e154 · 1e156): "slack by only 0.0e+00", and
    the residual's reduction as before / after with after = 0: "inf-fold". Closed form: the
    slack is y₁ / ‖y‖ = 3e-5 / √(1 + 9e-10), which active_tol = 1e-4 counts active, and with it
    the gradient of Σy is (1, 0)."""
    x = torch.tensor([[scale, x1]], dtype=DT)
    with pytest.warns(GradientWarning, match="only approximately") as caught:
        _SlackBound(S)(x.clone().requires_grad_(True)).sum().backward()
    message = next(str(w.message) for w in caught if "only approximately" in str(w.message))
    found = re.search(r"slack by only (\S+) of the solution's scale.*residual to (\S+) of its value.*"
                      r"pass active_tol=(\S+) or larger", message)
    assert found is not None, message
    assert [float(v) for v in found.groups()] == [3.0e-5, 0.0, 1e-4]
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _SlackBound(S, active_tol=float(found.group(3)))(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.tensor([[1.0, 0.0]], dtype=DT), rtol=0, atol=1e-12)
