"""A NaN or Inf in the incoming gradient: both paths zero those elements' gradients and name them."""
from __future__ import annotations

import math
import warnings

import cvxpy as cp
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

F64 = torch.float64


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("solver", ["batched", "Clarabel"])
def test_nonfinite_cotangent_zeroes_that_element_and_names_it_on_both_paths(solver, bad):
    # The per-element path returned NaN gradients silently (an Inf: numpy's RuntimeWarning),
    # the batched one zero under a warning that blamed an ill-conditioned derivative system.
    # y = min(q, c): dy/dq = [q < c], dy/dc (c shared by the batch) = the count of q > c.
    q, c = cp.Parameter(3), cp.Parameter(1)
    y = cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - q)), [y <= c]), [q, c], [y], solver=solver)
    Q = torch.tensor([[0.2, 1.5, -0.4], [0.9, -1.0, 2.0], [1.7, 0.1, 0.3]], dtype=F64, requires_grad=True)
    C = torch.tensor([1.0], dtype=F64, requires_grad=True)
    out = layer(Q, C)
    w = torch.ones_like(out)
    w[1, 2] = bad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out.backward(w)
    below = (Q.detach() < 1.0).to(F64)
    below[1] = 0.0
    torch.testing.assert_close(Q.grad, below, atol=1e-7, rtol=0)
    torch.testing.assert_close(C.grad, torch.tensor([2.0], dtype=F64), atol=1e-7, rtol=0)  # elements 0 and 2
    assert [w.category for w in caught] == [GradientWarning], [str(w.message) for w in caught]
    assert "incoming gradient" in str(caught[0].message) and "NaN or Inf" in str(caught[0].message)
    assert caught[0].message.elements == [(1,)]
