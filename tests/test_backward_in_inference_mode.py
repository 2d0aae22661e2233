"""``loss.backward()`` called inside ``torch.inference_mode()`` on a graph built outside it (an
evaluation wrapper around the step): torch's own ops give the gradient they give outside; so must
every node, whose backwards re-evaluate the problem with autograd. A DeclarativeNode raised a
ProblemError blaming a correct constraint ("does not depend on y through autograd"), pnp torch's raw
"element 0 of tensors does not require grad"."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import convexddn as cddn

sys.path.insert(0, str(Path(__file__).parent))
from test_autograd import FORWARD_OVER_REVERSE  # noqa: E402

F64 = torch.float64


class UnitSphere(cddn.DeclarativeNode):
    """y = argmin ½‖y − x‖² subject to w·(y ⊙ y) = 1, w a buffer; with w = 1, y = x / ‖x‖."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return (self.w * y * y).sum(-1, keepdim=True) - 1.0

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True)


def _backward_in_inference_mode(node, x, weights):
    """x.grad of ``(node(x) * weights).pow(2).sum()``, built outside inference mode, its backward inside
    (the node's incoming gradient is then an inference tensor, made by the engine there)."""
    X = x.clone().requires_grad_()
    loss = (node(X) * weights).pow(2).sum()
    with torch.inference_mode():
        loss.backward()
    return X.grad


@pytest.mark.parametrize("name,x,node", FORWARD_OVER_REVERSE, ids=[c[0] for c in FORWARD_OVER_REVERSE])
def test_backward_inside_inference_mode_gives_the_gradient_of_outside(name, x, node):
    """Each node and ConvexLayer: the gradient of the same composition with its backward outside
    inference mode (torch's own ops give the same in both)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = node(x)
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=F64).view_as(out)
        X = x.clone().requires_grad_()
        (want,) = torch.autograd.grad((node(X) * w).pow(2).sum(), X)
        got = _backward_in_inference_mode(node, x, w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_declarative_node_with_a_constraint_backward_inside_inference_mode_closed_form():
    """The tester's case: a constrained DeclarativeNode (the unit sphere, w = 1 a buffer). Its
    gradient in closed form: dy/dx = (I − y yᵀ) / ‖x‖, so x.grad = (I − y yᵀ) v / ‖x‖ with
    v = 2 (y ⊙ weights) ⊙ weights."""
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2
    weights = torch.linspace(0.5, 1.5, 4, dtype=F64)
    node = UnitSphere(torch.ones(4, dtype=F64))
    got = _backward_in_inference_mode(node, x, weights)
    r = x.norm(dim=-1, keepdim=True)
    y = x / r
    v = 2 * y * weights ** 2
    want = (v - y * (y * v).sum(-1, keepdim=True)) / r
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
