"""The layers' tensor caches (index arrays and maps on a device), filled by a first call
under ``torch.inference_mode()`` (an evaluation pass, a server's warm-up).

Before the fix the cache kept inference tensors, and every later call with autograd
failed with torch's "Inference tensors cannot be saved for backward".
"""
from __future__ import annotations

import cvxpy as cp
import pytest
import torch

import convexddn as cddn
from convexddn.convex.tensor_cache import cached

F64 = torch.float64


def _box() -> tuple[cddn.ConvexLayer, list[torch.Tensor]]:
    """A diagonal structure (one variable per cone row): its gather columns are cached."""
    x = cp.Parameter(4, name="x")
    y = cp.Variable(4)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0, y <= 1]), [x], [y])
    return layer, [torch.tensor([[-0.5, 0.3, 0.7, 2.0]], dtype=F64)]


def _soc() -> tuple[cddn.ConvexLayer, list[torch.Tensor]]:
    """A second-order cone: the layout's cone index tensors are cached."""
    x = cp.Parameter(3, name="x")
    y = cp.Variable(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [cp.norm(y) <= 1, y[0] >= -0.5])
    return cddn.ConvexLayer(prob, [x], [y]), [torch.tensor([[2.0, 1.0, -0.5]], dtype=F64)]


def _qp() -> tuple[cddn.ConvexLayer, list[torch.Tensor]]:
    """Parameters in the quadratic term: the maps' gathered columns are cached."""
    L = cp.Parameter((2, 2), name="L")
    q = cp.Parameter(2, name="q")
    y = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ y) + q @ y), [y >= -1, y <= 1, cp.sum(y) == 0.5])
    return cddn.ConvexLayer(prob, [L, q], [y]), [2 * torch.eye(2, dtype=F64).unsqueeze(0),
                                                   torch.tensor([[1.0, -1.0]], dtype=F64)]


@pytest.mark.parametrize("make", [_box, _soc, _qp], ids=["box", "soc", "qp"])
def test_first_call_under_inference_mode_then_training(make):
    layer, values = make()
    with torch.inference_mode():
        expected = layer(*values)
    values = [v.clone().requires_grad_(True) for v in values]
    y = layer(*values)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), expected.clone())
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in values)


def test_cached_builds_normal_tensors_once():
    store: dict = {}
    calls = []

    def build():
        calls.append(1)
        return torch.arange(3)

    with torch.inference_mode():
        first = cached(store, "k", build)
    assert not first.is_inference()
    assert cached(store, "k", build) is first and len(calls) == 1
