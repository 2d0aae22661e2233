"""Nodes defined by their constraints alone: ``min 0 s.t. h(x, y) = 0`` (graph.check_graph).

An objective with no graph to ``y`` (``torch.zeros(B)``) was refused, "every derivative of the
solution would be zero", also where the equality constraints read ``x`` and ``y`` and determine
``y`` (an implicit function, derivative ``-A⁻¹ D_x h``); ``0.0 * y.sum(-1)``, the same values, was
accepted and exact. The refusals that are right stay: no constraint, constraints that read no
data (``y`` a constant: a zero derivative), or fewer constraint rows than entries of ``y`` (the
KKT matrix [[0, Aᵀ], [A, 0]] is singular: a ``y.detach()`` objective beside one constraint).
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from convexddn.errors import ProblemError
from convexddn.nodes.declarative import DeclarativeNode

DT = torch.float64


class _Root(DeclarativeNode):
    """y solves y³ + y = x entrywise (an implicit function: dy/dx = 1/(3y² + 1))."""

    def objective(self, x, y):
        return torch.zeros(y.shape[0], dtype=y.dtype)  # a feasibility problem: min 0 s.t. h = 0

    def equality_constraints(self, x, y):
        return y ** 3 + y - x

    def solve(self, x):
        y = torch.zeros_like(x)
        for _ in range(100):
            y = y - (y ** 3 + y - x) / (3 * y ** 2 + 1)
        return y


class _Coupled(DeclarativeNode):
    """(y₀, y₁) solves y₀ + sin(y₁)/2 = x₀, y₁ + tanh(y₀)/2 = a x₁ (a a parameter), with an
    objective that reads x but not y."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.5, dtype=DT))

    def objective(self, x, y):
        return (x * x).sum(-1)

    def equality_constraints(self, x, y):
        return torch.stack([y[:, 0] + torch.sin(y[:, 1]) / 2 - x[:, 0], y[:, 1] + torch.tanh(y[:, 0]) / 2
                            - self.a * x[:, 1]], -1)

    def solve(self, x):
        y = torch.zeros_like(x)
        for _ in range(60):  # Newton on the 2x2 system
            with torch.enable_grad():
                yy = y.clone().requires_grad_(True)
                h = self.equality_constraints(x, yy)
                J = torch.stack([torch.autograd.grad(h[:, i].sum(), yy, retain_graph=True)[0] for i in range(2)], 1)
            y = y - torch.linalg.solve(J, h.detach())
        return y


def test_constant_objective_implicit_function_grad():
    """y³ + y = x with objective torch.zeros(B): the gradient is 1/(3y² + 1) (closed form)."""
    x = torch.tensor([[0.5, 2.0, -1.0], [3.0, -0.2, 0.0]], dtype=DT, requires_grad=True)
    v = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.5]], dtype=DT)
    y = _Root()(x)
    torch.testing.assert_close(y ** 3 + y, x.detach(), rtol=0, atol=1e-12)
    (y * v).sum().backward()
    torch.testing.assert_close(x.grad, v / (3 * y.detach() ** 2 + 1), rtol=1e-10, atol=1e-12)


def test_constant_objective_implicit_function_tangent():
    """Forward mode through the same node: ẏ = ẋ / (3y² + 1)."""
    x = torch.tensor([[0.5, 2.0, -1.0]], dtype=DT)
    dx = torch.tensor([[1.0, -0.5, 2.0]], dtype=DT)
    with fwAD.dual_level():
        out = _Root()(fwAD.make_dual(x, dx))
        y, dy = fwAD.unpack_dual(out)
    torch.testing.assert_close(dy, dx / (3 * y ** 2 + 1), rtol=1e-10, atol=1e-12)


def test_coupled_implicit_function_grad():
    """Two coupled equalities, an objective that reads x only: the gradient in x and in the
    parameter a against central finite differences of the solution (float64)."""
    node = _Coupled()
    x = torch.tensor([[0.7, -0.4], [-1.2, 0.9]], dtype=DT, requires_grad=True)
    v = torch.tensor([[1.0, 2.0], [-0.5, 0.7]], dtype=DT)
    y = node(x)
    torch.testing.assert_close(node.equality_constraints(x.detach(), y.detach()), torch.zeros_like(y),
                               rtol=0, atol=1e-12)
    (y * v).sum().backward()
    eps = 1e-6
    with torch.no_grad():
        fd = torch.zeros_like(x)
        for i in range(2):
            for j in range(2):
                d = torch.zeros_like(x)
                d[i, j] = eps
                fd[i, j] = ((node.solve(x + d) - node.solve(x - d)) * v).sum() / (2 * eps)
        a0 = node.a.item()
        node.a.fill_(a0 + eps)
        up = (node.solve(x) * v).sum()
        node.a.fill_(a0 - eps)
        down = (node.solve(x) * v).sum()
        node.a.fill_(a0)
    torch.testing.assert_close(x.grad, fd, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(node.a.grad, (up - down) / (2 * eps), rtol=1e-7, atol=1e-8)


def test_objective_free_of_y_still_refused_where_no_derivative_exists():
    """The refusals that are right: constraints that read no data (y = 1: every derivative
    zero), and a y.detach() objective beside fewer constraint rows than entries of y."""
    class Constant(_Root):
        def equality_constraints(self, x, y):
            return y - 1.0

        def solve(self, x):
            return torch.ones_like(x)

    class DetachedSphere(DeclarativeNode):
        def objective(self, x, y):
            return ((y.detach() - x) ** 2).sum(-1)

        def equality_constraints(self, x, y):
            return (y * y).sum(-1, keepdim=True) - (x * x).sum(-1, keepdim=True)

        def solve(self, x):
            return x.clone()

    x = torch.tensor([[0.5, 2.0, -1.0]], dtype=DT, requires_grad=True)
    for node in (Constant(), DetachedSphere()):
        with pytest.raises(ProblemError, match=r"objective does not depend on y.*zero or undefined"):
            node(x)
