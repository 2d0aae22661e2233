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


@pytest.mark.parametrize("make", [_box, _soc, _qp], ids=["box", "soc", "qp"])
def test_layer_built_under_inference_mode_then_training(make):
    # A layer constructed under inference mode (a lazily built server module) holds its
    # maps as inference tensors; a .to() that changes nothing returns them as they are, so
    # the caches copy them. The gradient is checked against finite differences (float64).
    with torch.inference_mode():
        layer, values = make()
    values = [v.clone().requires_grad_(True) for v in values]
    y = layer(*values)
    g = torch.linspace(0.5, 1.5, y.numel(), dtype=F64).reshape(y.shape)
    (y * g).sum().backward()
    h = 1e-6
    for i, v in enumerate(values):
        d = torch.randn(v.shape, dtype=F64, generator=torch.Generator().manual_seed(i))
        plus = [w.detach() + h * d if j == i else w.detach() for j, w in enumerate(values)]
        minus = [w.detach() - h * d if j == i else w.detach() for j, w in enumerate(values)]
        fd = ((layer(*plus) - layer(*minus)) * g).sum() / (2 * h)
        torch.testing.assert_close((v.grad * d).sum(), fd, rtol=1e-5, atol=1e-6)


def test_cached_copies_inference_tensors_inside_containers():
    with torch.inference_mode():
        made = torch.arange(3.0)
    out = cached({}, "k", lambda: (made, [made]))
    assert not out[0].is_inference() and not out[1][0].is_inference()
    torch.testing.assert_close(out[0], made.clone())
