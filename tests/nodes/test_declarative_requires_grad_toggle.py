"""A DeclarativeNode parameter whose ``requires_grad`` changes between the forward and the
backward (a GAN's or a fine-tuning loop's toggle between the loss and ``backward()``): as torch's
own layers (``nn.Linear``), a parameter frozen since the forward gets no gradient and the inputs
theirs; one that did not require grad at the forward gets none (the graph was built without it).
The frozen case crashed with torch's raw "One of the differentiated Tensors does not require
grad", the inputs' gradient lost with it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import convexddn as cddn
from convexddn.errors import InputError
from convexddn.nodes.implicit import declarative_vjp

F64 = torch.float64


class Scaled(cddn.DeclarativeNode):
    """y = argmin ½‖y − w ⊙ x‖² = w ⊙ x: dy/dx = diag(w), dy/dw = diag(x) (closed form)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def objective(self, x, y):
        return 0.5 * ((y - self.w * x) ** 2).sum(-1)

    def solve(self, x):
        return self.w.detach() * x


def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 4, dtype=F64, generator=g), torch.randn(3, 4, dtype=F64, generator=g),
            torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64))


def _toggled_after_forward(node, x0, g, w0, requires: bool) -> None:
    """Forward, then ``node.w.requires_grad_(requires)``, then backward: w gets no gradient
    either way, x its closed-form one, ``w ⊙ g``."""
    x = x0.clone().requires_grad_()
    y = node(x)
    node.w.requires_grad_(requires)
    y.backward(g)
    assert node.w.grad is None
    torch.testing.assert_close(x.grad, w0 * g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("first_call", [False, True])
def test_a_parameter_frozen_between_forward_and_backward(first_call):
    """w frozen after the forward: w.grad None, x.grad = w ⊙ g (closed form), as torch's layers.
    ``first_call``: the node was called once before (its probe done) or not."""
    x0, g, w0 = _data()
    node = Scaled(w0.clone())
    if first_call:
        node(x0.clone().requires_grad_())
    _toggled_after_forward(node, x0, g, w0, False)


def test_a_frozen_parameter_beside_one_that_still_learns():
    """Two parameters, one frozen after the forward: the other gets its closed-form gradient Σ_b x ⊙ g."""
    x0, g, w0 = _data()

    class TwoScales(cddn.DeclarativeNode):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(w0.clone()), nn.Parameter(torch.ones(4, dtype=F64))

        def objective(self, x, y):
            return 0.5 * ((y - self.a * self.b * x) ** 2).sum(-1)

        def solve(self, x):
            return (self.a * self.b).detach() * x

    node = TwoScales()
    x = x0.clone().requires_grad_()
    y = node(x)
    node.a.requires_grad_(False)
    y.backward(g)
    assert node.a.grad is None
    torch.testing.assert_close(node.b.grad, (w0 * x0 * g).sum(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, w0 * g, rtol=1e-12, atol=1e-14)


def test_a_parameter_that_requires_grad_only_at_the_backward_gets_none():
    """The reverse toggle: w did not require grad at the forward (the graph was built without it),
    requires it at the backward: torch gives it no gradient, nor does the node; no error."""
    x0, g, w0 = _data()
    lin = nn.Linear(4, 4).double()
    lin.weight.requires_grad_(False)
    y = lin(x0.clone().requires_grad_())
    lin.weight.requires_grad_(True)
    y.sum().backward()
    assert lin.weight.grad is None  # (torch's behaviour, matched below)
    node = Scaled(w0.clone())
    node.w.requires_grad_(False)
    _toggled_after_forward(node, x0, g, w0, True)


def test_declarative_vjp_refuses_params_that_do_not_require_grad():
    """The function itself, given a param autograd cannot differentiate: InputError naming it,
    not torch's raw "One of the differentiated Tensors does not require grad"."""
    x0, g, w0 = _data()
    w = w0.clone()  # (does not require grad)
    with pytest.raises(InputError, match=r"params \[0\] do not require grad"):
        declarative_vjp(lambda x, y: 0.5 * ((y - w * x) ** 2).sum(-1), x0, w * x0, g, params=(w,))
