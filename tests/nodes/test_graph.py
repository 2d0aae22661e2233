"""check_graph (convexddn/nodes/graph.py): what a DeclarativeNode's problem reads through autograd."""
from __future__ import annotations

import pytest
import torch

from convexddn.errors import InputError
from convexddn.nodes.declarative import DeclarativeNode

DT = torch.float64


class _Ball(DeclarativeNode):
    """y = argmin_{‖u‖ <= r} ½‖u − x‖² (x scaled onto the ball of radius ``self.r``), with
    ``self.r`` a tensor attribute; ``own=True``: solve sets it from the node's parameter
    log_s, keeping its graph (r = e^{log_s} + 1)."""

    def __init__(self, own: bool = False):
        super().__init__()
        self.own = own
        if own:
            self.log_s = torch.nn.Parameter(torch.zeros((), dtype=DT))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - self.r ** 2

    def solve(self, x):
        if self.own:
            with torch.enable_grad():
                self.r = self.log_s.exp() + 1.0
        return x * torch.clamp(self.r.detach() / x.norm(dim=-1, keepdim=True), max=1.0)


def _points() -> torch.Tensor:
    # Rows 0 and 2 outside the ball of radius 2 (projected), row 1 inside (kept).
    return torch.tensor([[3.0, -1.0, 2.0], [0.5, 0.2, -0.3], [-1.0, 4.0, 0.5]], dtype=DT)


@pytest.mark.parametrize("grad_x", [False, True])
def test_constraint_reading_a_foreign_graph_through_an_attribute_invalid(grad_x):
    """self.r = w.exp() + 1 with w outside the node: the constraint's graph walk stopped at w
    before reaching y, and the node said "inequality_constraints does not depend on y". It
    now names the method and the tensor, and what to do."""
    w = torch.zeros((), dtype=DT, requires_grad=True)
    node = _Ball()
    node.r = w.exp() + 1.0
    with pytest.raises(InputError, match=r"_Ball\.inequality_constraints reads a tensor of shape \(\) and dtype "
                                         r"torch\.float64 that requires grad but is neither an input nor a parameter"
                                         r".*self\.r = w\.exp\(\).*Pass it as an input.*detach it"):
        node(_points().requires_grad_(grad_x))
    assert w.grad is None


def test_attribute_carrying_the_nodes_parameter_graph_grad():
    """A tensor attribute computed (with its graph) from the node's own parameter is
    differentiated: d(Σ c·y)/d(log_s) against a central finite difference in float64."""
    node = _Ball(own=True)
    x = _points()
    c = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1], [2.0, 1.0, -0.4]], dtype=DT)
    (g,) = torch.autograd.grad((node(x) * c).sum(), node.log_s)
    h = 1e-6
    with torch.no_grad():
        values = []
        for step in (h, -h):
            node.log_s.fill_(step)
            values.append(float((node(x) * c).sum()))
    fd = (values[0] - values[1]) / (2 * h)
    assert abs(float(g) - fd) <= 1e-7 * (1 + abs(fd)), (float(g), fd)
    assert abs(fd) > 0.1  # (rows outside the ball: the radius matters)
