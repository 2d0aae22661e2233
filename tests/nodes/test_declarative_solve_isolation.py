"""A DeclarativeNode's ``solve`` that runs autograd of its own, and options reassigned after
construction (:mod:`convexddn.nodes._kept_grads`, ``DeclarativeNode._check_options``).

A ``solve`` minimising the objective with ``torch.optim.LBFGS`` and ``f.backward()`` (the DDN
reference's pooling nodes do) added its inner gradients to the node's parameters' and the inputs'
``.grad``, and the implicit gradient came on top: ``d(sum y)/d alpha`` 23.3 for 0.127, silently."""
from __future__ import annotations

import pytest
import torch

import convexddn as cddn
from convexddn.errors import OptionError

F64 = torch.float64


class PseudoHuberPool(cddn.DeclarativeNode):
    """y = argmin_u Σ α²(√(1 + (u − x_i)²/α²) − 1), solved by LBFGS on the objective."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor(alpha, dtype=F64))

    def objective(self, x, y):
        a2 = self.alpha ** 2
        return (a2 * (torch.sqrt(1.0 + (y - x) ** 2 / a2) - 1.0)).sum(-1)

    def solve(self, x):
        y = x.mean(-1, keepdim=True).clone().requires_grad_()
        with torch.enable_grad():
            opt = torch.optim.LBFGS([y], max_iter=100, tolerance_grad=1e-13, tolerance_change=1e-16,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                f = self.objective(x, y).sum()
                f.backward()
                return f
            opt.step(closure)
        return y.detach()


def _x():
    return torch.randn(2, 9, dtype=F64, generator=torch.Generator().manual_seed(0))


def test_inner_backward_reaches_neither_parameters_nor_inputs():
    x = _x().requires_grad_()
    node = PseudoHuberPool(0.7)
    node(x).sum().backward()
    h = 1e-6
    with torch.no_grad():
        x0 = x.detach()
        fd = (PseudoHuberPool(0.7 + h).solve(x0).sum() - PseudoHuberPool(0.7 - h).solve(x0).sum()) / (2 * h)
    assert float(node.alpha.grad) == pytest.approx(float(fd), rel=1e-5)
    # y(x + c) = y(x) + c: each row of dy/dx sums to 1.
    torch.testing.assert_close(x.grad.sum(-1), torch.ones(2, dtype=F64), rtol=0, atol=1e-8)


def test_existing_gradients_are_kept_as_they_were():
    node = PseudoHuberPool(0.7)
    g = torch.tensor(5.0, dtype=F64)
    node.alpha.grad = g
    y = node(_x())  # (a forward alone: the solve's backward ran, nothing of it stays)
    assert node.alpha.grad is g and float(g) == 5.0
    y.sum().backward()
    fresh = PseudoHuberPool(0.7)
    fresh(_x()).sum().backward()
    assert float(node.alpha.grad) == pytest.approx(5.0 + float(fresh.alpha.grad), rel=1e-12)
    # A parameter without a gradient keeps None through a forward.
    other = PseudoHuberPool(0.7)
    other(_x())
    assert other.alpha.grad is None


class _Mean(cddn.DeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x.clone()


@pytest.mark.parametrize("name, value", [("batch_dims", -1), ("batch_dims", True), ("batch_dims", 1.5),
                                         ("batch_dims", "1"), ("implicit_dtype", torch.float16),
                                         ("active_tol", -1.0)])
def test_options_reassigned_after_construction_are_checked_at_the_call(name, value):
    node = _Mean()
    setattr(node, name, value)
    with pytest.raises(OptionError, match=name):
        node(torch.randn(2, 3, 4, dtype=F64))
