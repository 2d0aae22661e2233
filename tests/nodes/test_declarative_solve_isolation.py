"""A DeclarativeNode's ``solve`` that runs autograd of its own, and options reassigned after
construction (:mod:`convexddn.nodes._kept_grads`, ``DeclarativeNode._check_options``), also under
``torch.func.functional_call`` with parameter values that are not leaves.

A ``solve`` minimising the objective with ``torch.optim.LBFGS`` and ``f.backward()`` (the DDN
reference's pooling nodes do) added its inner gradients to the node's parameters' and the inputs'
``.grad``, and the implicit gradient came on top: ``d(sum y)/d alpha`` 23.3 for 0.127, silently."""
from __future__ import annotations

import warnings

import pytest
import torch

import convexddn as cddn
from convexddn.errors import OptionError, ProblemError

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


class _NewtonShrink(cddn.DeclarativeNode):
    """y = argmin_u ½ k ‖u − x‖² + ½ ‖u‖²  =>  y = k x / (k + 1); solve takes ``steps`` Newton steps
    whose gradient is ``f.backward()`` (Hessian (k + 1) I)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))
        self.steps = steps

    def objective(self, x, y):
        return 0.5 * self.k * ((y - x) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1)

    def solve(self, x):
        u = torch.zeros_like(x)
        for _ in range(self.steps):
            u = u.detach().requires_grad_()
            with torch.enable_grad():
                self.objective(x, u).sum().backward()
            u = u - u.grad / (self.k.detach() + 1)
        return u.detach()


@pytest.mark.parametrize("steps, make, dk", [(1, lambda t: t + 1.2, 1.0), (1, lambda t: 2 * t, 2.0),
                                             (2, lambda t: 2 * t, 2.0)])
def test_inner_backward_stays_off_functional_call_fast_weights(steps, make, dk):
    # functional_call with a non-leaf value (MAML's fast weights): the inner backward ran on into
    # theta.grad (6.03 for -0.27) or freed the caller's graph (torch's "backward through the graph a
    # second time"). Closed form, k = make(theta) = 2.4: d Σy / d theta = dk Σx / (k + 1)².
    x = _x()
    node = _NewtonShrink(steps)
    node(x.clone().requires_grad_())  # (probed)
    theta = torch.tensor(1.2, dtype=F64, requires_grad=True)
    y = torch.func.functional_call(node, {"k": make(theta)}, (x,))
    assert theta.grad is None  # (the forward alone)
    y.sum().backward()
    torch.testing.assert_close(theta.grad, dk * (x / 3.4 ** 2).sum(), rtol=1e-10, atol=0)
    assert node.k.grad is None


def test_solve_modifying_a_functional_call_value_in_place_is_refused():
    # The detached value solve sees shares its version counter with the value passed.
    class Writes(_NewtonShrink):
        def solve(self, x):
            self.k.mul_(1.0)
            return self.k * x / (self.k + 1)

    theta = torch.tensor(1.2, dtype=F64, requires_grad=True)
    with pytest.raises(ProblemError, match="'k'"):
        torch.func.functional_call(Writes(1), {"k": 2 * theta}, (_x(),))


def test_non_leaf_functional_call_value_warns_nothing():
    # Only a leaf has a .grad to keep: reading a non-leaf's warned (torch's "The .grad attribute of
    # a Tensor that is not a leaf Tensor is being accessed"), twice a forward. d Σy / d theta as above.
    x = _x().requires_grad_()
    node = _NewtonShrink(1)
    node(x)
    theta = torch.tensor(1.2, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.func.functional_call(node, {"k": 2 * theta}, (x,))
        (grad,) = torch.autograd.grad(y.sum(), theta)
    torch.testing.assert_close(grad, 2 * (x.detach() / 3.4 ** 2).sum(), rtol=1e-10, atol=0)
