"""A model holding a ConvexLayer compiles: the solve is a clean graph break."""
from __future__ import annotations

import cvxpy as cp
import torch

import convexddn as cddn


def test_convex_layer_in_compiled_sequential():
    x = cp.Parameter(3, name="x")
    y = cp.Variable(3, name="y")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0, cp.sum(y) <= 1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), cddn.ConvexLayer(prob, [x], [y]))
    X = torch.randn(5, 3)
    want = model(X)
    (g_want,) = torch.autograd.grad(want.square().sum(), model[0].weight)
    compiled = torch.compile(model)
    out = compiled(X)
    torch.testing.assert_close(out, want)
    (g,) = torch.autograd.grad(out.square().sum(), model[0].weight)
    torch.testing.assert_close(g, g_want)
