"""A DeclarativeNode whose parameters carry ``torch.nn.utils.parametrize`` parametrizations, called
inside ``parametrize.cached()`` (:mod:`convexddn.nodes._parametrize_cache`).

Within ``cached()`` a parametrized ``w = exp(raw)`` was read from torch's cache, computed from the
real ``raw`` (or, first read in ``solve``, without a graph), not from the stand-ins the probe and the
backward differentiate through: ``d loss / d raw`` was 0, silently, and the first call warned ``raw``
unused. Expected values: central finite differences in ``raw`` (float64, no parametrization at all),
and torch's own composition for ``weight_norm``."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fw
import torch.nn.utils.parametrize as P

import convexddn as cddn
from convexddn.errors import GradientWarning

F64 = torch.float64


class _Shrink(cddn.DeclarativeNode):
    """y = argmin_u ½ Σ w_i (u_i − x_i)² + ½ Σ u_i²  =>  y = w x / (w + 1)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def objective(self, x, y):
        return 0.5 * (self.w * (y - x) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1)

    def solve(self, x):
        return self.w * x / (self.w + 1)


class _Exp(torch.nn.Module):
    def forward(self, z):
        return torch.exp(z)

    def right_inverse(self, w):
        return torch.log(w)


_W = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, dtype=F64, generator=g), torch.randn(3, 4, dtype=F64, generator=g)


def _fd_raw(x, g):
    """d Σ g·y / d raw with w = exp(raw), by central differences on a node without parametrization."""
    raw, h = torch.log(_W), 1e-6

    def loss(r):
        with torch.no_grad():
            return float((_Shrink(torch.exp(r))(x) * g).sum())
    return torch.tensor([(loss(raw + h * e) - loss(raw - h * e)) / (2 * h) for e in torch.eye(4, dtype=F64)],
                        dtype=F64)


def _parametrized():
    node = _Shrink(_W.clone())
    P.register_parametrization(node, "w", _Exp())
    return node, node.parametrizations.w.original


@pytest.mark.parametrize("warm", [False, True])
def test_gradient_reaches_raw_inside_cached(warm):
    x, g = _data()
    node, raw = _parametrized()
    if warm:  # (probed outside cached() first: the backward alone)
        node(x.clone().requires_grad_())
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)  # (the first call warned raw unused)
        with P.cached():
            (grad,) = torch.autograd.grad((node(x) * g).sum(), raw)
    torch.testing.assert_close(grad, _fd_raw(x, g), rtol=1e-6, atol=1e-8)


def test_cached_value_read_after_the_call_keeps_its_graph():
    # solve read w first, under no_grad: the cache kept a w without a graph, and the caller's
    # own term in w after the call (a regulariser) got no gradient. d/d raw Σ w = exp(raw).
    x, _ = _data()
    node, raw = _parametrized()
    with P.cached():
        node(x)
        (grad,) = torch.autograd.grad(node.w.sum(), raw)
    torch.testing.assert_close(grad, _W, rtol=1e-12, atol=0)


def test_forward_mode_inside_cached():
    # (the jvp's leaves for raw, read through the cache, as the backward's)
    # d y / d raw along t: y = w x / (w + 1), dy/dw = x / (w + 1)², dw = w t.
    x, _ = _data()
    node, raw = _parametrized()
    t = torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(2))
    with fw.dual_level(), P.cached():
        dual = fw.make_dual(raw.detach(), t)
        y = torch.func.functional_call(node, {"parametrizations.w.original": dual}, (x,))
        tangent = fw.unpack_dual(y).tangent
    torch.testing.assert_close(tangent, x / (_W + 1) ** 2 * _W * t, rtol=1e-10, atol=1e-12)


class _Linear(cddn.DeclarativeNode):
    """y = argmin_u ½‖u − W x‖² + ½‖u‖²  =>  y = W x / 2, W under weight_norm."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, bias=False).double()

    def objective(self, x, y):
        return 0.5 * ((y - self.lin(x)) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1)

    def solve(self, x):
        return self.lin(x) / 2


def test_weight_norm_submodule_inside_cached():
    x, g = _data()
    torch.manual_seed(1)
    node = _Linear()
    torch.nn.utils.parametrizations.weight_norm(node.lin)
    torch.manual_seed(1)
    ref = torch.nn.Linear(4, 4, bias=False).double()
    torch.nn.utils.parametrizations.weight_norm(ref)
    with P.cached():  # torch's own composition: y = lin(x) / 2
        expected = torch.autograd.grad((ref(x) / 2 * g).sum(), list(ref.parameters()))
        got = torch.autograd.grad((node(x) * g).sum(), list(node.parameters()))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
