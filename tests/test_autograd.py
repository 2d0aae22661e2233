"""convexddn._autograd: every first-order-only node refuses second derivatives clearly."""
from __future__ import annotations

import pytest
import torch

from convexddn.errors import DoubleBackwardError
from convexddn.functional import (
    eigen_decomposition,
    entmax,
    least_squares,
    pnp,
    project_lp,
    project_simplex,
    robust_pool,
    robust_vector_pool,
    sinkhorn,
    tv_denoise,
)

F64 = torch.float64


def _pnp_points():
    g = torch.Generator().manual_seed(0)
    xy = 2 * torch.rand(1, 8, 2, generator=g, dtype=F64) - 1
    z = 2 * torch.rand(1, 8, 1, generator=g, dtype=F64) + 2
    return xy, torch.cat([z * xy, z], -1) + 0.01 * torch.randn(1, 8, 3, generator=g, dtype=F64)


def _sym(n):
    a = torch.randn(2, n, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    return a + a.mT


# (name, input, node as a function of it); each output is a differentiable tensor.
CASES = [
    ("robust_pool", torch.randn(2, 8, dtype=F64), lambda x: robust_pool(x, "huber", 1.0)),
    ("project_lp L2 sphere", torch.randn(2, 5, dtype=F64), lambda x: project_lp(x, 2, "sphere", 1.0)),
    ("project_lp L1 ball", 3 * torch.randn(2, 5, dtype=F64), lambda x: project_lp(x, 1, "ball", 1.0)),
    ("project_lp Linf ball", 3 * torch.randn(2, 5, dtype=F64), lambda x: project_lp(x, "inf", "ball", 1.0)),
    ("project_simplex", torch.randn(2, 5, dtype=F64), project_simplex),
    ("entmax", torch.randn(2, 6, dtype=F64), lambda x: entmax(x, 1.5)),
    ("sinkhorn", torch.rand(1, 4, 4, dtype=F64), lambda c: sinkhorn(c, eps=0.5)),
    ("tv_denoise", torch.randn(2, 9, dtype=F64), lambda x: tv_denoise(x, 0.5)),
    ("least_squares", torch.randn(2, 6, 3, dtype=F64), lambda a: least_squares(a, torch.ones(2, 6, dtype=F64))),
    ("robust_vector_pool", torch.randn(1, 3, 5, dtype=F64), lambda x: robust_vector_pool(x, "huber", 1.0)),
    ("eigen_decomposition", _sym(4), lambda s: eigen_decomposition(s).eigenvectors),
    ("pnp", _pnp_points()[1], lambda p: pnp(_pnp_points()[0], p)),
]


@pytest.mark.parametrize("name,x,node", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("loss", ["square", "linear"])
def test_second_derivative_raises_double_backward_error(name, x, node, loss):
    # torch's once_differentiable raised a generic RuntimeError, and where the incoming
    # gradient is a constant (a loss linear in the output) it attached nothing: the
    # second derivative came back as None, or zeros behind another op.
    X = x.clone().requires_grad_()
    out = node(X)
    value = (out * out).sum() if loss == "square" else (out * torch.linspace(1, 2, out.shape[-1], dtype=F64)).sum()
    (g,) = torch.autograd.grad(value, X, create_graph=True)
    # The first-order gradient is the plain one.
    (plain,) = torch.autograd.grad((lambda o: (o * o).sum() if loss == "square" else
                                    (o * torch.linspace(1, 2, o.shape[-1], dtype=F64)).sum())(node(X)), X)
    torch.testing.assert_close(g.detach(), plain)
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.autograd.grad((g * g).sum(), X, allow_unused=True)


def test_inputs_changed_in_place_after_the_forward_still_differentiate():
    # The guard's anchors are not saved tensors: an input changed in place after the
    # forward (which these nodes do not need in their backward) must not fail it.
    a = torch.randn(4, 4, dtype=F64, requires_grad=True)
    s = a @ a.mT
    lam, vec = eigen_decomposition(s, 2)
    s.add_(1.0)
    (lam.sum() + vec.abs().sum()).backward()
    h = torch.randn(2, 9, dtype=F64, requires_grad=True) * 2
    y = tv_denoise(h, 0.3)
    h.add_(1.0)
    y.sum().backward()


def test_bind_fast_skips_argument_binding_for_positional_calls(monkeypatch):
    """Function.apply binds every call's arguments through inspect (~20 µs) to fill in
    defaults; the library's Functions, called with every argument positionally, skip it
    (and give the same result); a call with keywords still takes torch's path."""
    import inspect

    from convexddn._autograd import bind_fast

    @bind_fast
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(x, k=2.0):
            return x * k

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.k = inputs[1]

        @staticmethod
        def backward(ctx, g):
            return g * ctx.k, None

    x = torch.tensor([1.0, -3.0], requires_grad=True)
    calls = []
    original = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda *a, **k: calls.append(1) or original(*a, **k))
    y = Scale.apply(x, 3.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert calls == [] and y.tolist() == [3.0, -9.0] and g.tolist() == [3.0, 3.0]
    assert Scale.apply(x).tolist() == [2.0, -6.0] and calls == [1]  # a default to fill in
    assert Scale.apply(x, k=0.5).tolist() == [0.5, -1.5] and calls == [1, 1]
