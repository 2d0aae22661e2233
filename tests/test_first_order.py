"""The first-order guard of :mod:`convexddn._first_order` around a region whose backward
cuts the graph (ConvexLayer's per-element path: numpy, ``once_differentiable``), and the
guard's memory: it keeps no input alive outside the saved tensors."""
import gc
import weakref

import cvxpy as cp
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import convexddn as cddn
from convexddn import _first_order
from convexddn.errors import DoubleBackwardError

F64 = torch.float64


class _Numpy(torch.autograd.Function):
    """y = 2 x, a toy whose backward runs outside autograd, as a numpy solver's."""

    @staticmethod
    def forward(x):
        return torch.from_numpy(2 * x.detach().numpy())

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return torch.from_numpy(2 * g.numpy())


def _guarded(x):
    (x,), close = _first_order.first_order_region("toy", [x])
    (y,) = close([_Numpy.apply(x)])
    return y


def test_first_order_region_refuses_the_double_vjp():
    """The gradient differentiated with respect to the incoming gradient (what
    torch.autograd.functional.jvp does) reached only once_differentiable's fake leaves:
    None, and jvp gave zeros where the product is 2 v. Now DoubleBackwardError."""
    x, v = torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)
    with pytest.raises(DoubleBackwardError, match="toy does not support double backward"):
        torch.autograd.functional.jvp(_guarded, x, v)
    # first_order_only (no region end) still refuses with respect to the inputs
    X = x.clone().requires_grad_()
    (Xg,) = _first_order.first_order_only("toy", [X])
    (g,) = torch.autograd.grad(_Numpy.apply(Xg).pow(2).sum(), X, create_graph=True)
    torch.testing.assert_close(g.detach(), 8 * x)
    with pytest.raises(DoubleBackwardError):
        torch.autograd.grad(g.sum(), X)


def test_first_order_region_is_the_identity_to_first_order():
    X = torch.randn(3, dtype=F64, requires_grad=True)
    W = torch.randn(3, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(_guarded(X), X, W, create_graph=True)
    torch.testing.assert_close(g.detach(), 2 * W.detach())
    with pytest.raises(DoubleBackwardError):
        torch.autograd.grad(g.sum(), W)
    assert _first_order.first_order_region("toy", [X.detach()])[1]([X]) == [X]  # nothing requires grad: no guard


def _entropy():
    x, p = cp.Variable(3), cp.Parameter(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(-p @ x - cp.sum(cp.entr(x))), [cp.sum(x) == 1]), [p], [x])
    return layer, torch.tensor([0.3, -0.5, 0.1], dtype=F64)


def _psd():
    X, P = cp.Variable((2, 2), symmetric=True), cp.Parameter((2, 2))
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(X - P)), [X >> 0]), [P], [X])
    return (lambda S: layer((S + S.mT) / 2)), torch.tensor([[2.0, 2.5], [2.5, -2.0]], dtype=F64)


def _ot():
    layer = cddn.layer("ot_entropic", m=2, n=3, backend="cvxpy")
    a, b = torch.tensor([0.4, 0.6], dtype=F64), torch.tensor([0.3, 0.3, 0.4], dtype=F64)
    return (lambda C: layer(C, a, b)), torch.tensor([[0.2, 0.7, 0.4], [0.9, 0.1, 0.5]], dtype=F64)


def _qp():
    x, q = cp.Variable(3), cp.Parameter(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [x >= -0.5]), [q], [x])
    return layer, torch.tensor([0.3, 0.9, -0.2], dtype=F64)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


PER_ELEMENT = [("exp cone", _entropy), ("PSD cone", _psd), ("ot_entropic cvxpy", _ot)]


@pytest.mark.parametrize("name,make", PER_ELEMENT, ids=[c[0] for c in PER_ELEMENT])
def test_convex_layer_autograd_functional_jvp_is_refused_on_the_per_element_path(name, make):
    """The per-element path (Clarabel through diffcp, gradients in numpy) gave zeros to
    torch.autograd.functional.jvp, silently (the batched path and every node raised); the
    true product, by central differences, is nonzero. Now DoubleBackwardError."""
    layer, x = make()
    f = lambda z: _first(layer(z))  # noqa: E731
    v = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fd = (f(x + 1e-6 * v) - f(x - 1e-6 * v)) / 2e-6
    assert fd.abs().max() > 1e-2
    with pytest.raises(DoubleBackwardError, match="ConvexLayer does not support double backward"):
        torch.autograd.functional.jvp(f, x, v)
    X = x.clone().requires_grad_()
    y = f(X)
    W = torch.ones_like(y).requires_grad_()
    (g,) = torch.autograd.grad(y, X, W, create_graph=True)
    with pytest.raises(DoubleBackwardError):
        torch.autograd.grad((g * v).sum(), W, allow_unused=True)


CHECKPOINTED = [("batched QP", _qp), ("per-element exp cone", _entropy)]


@pytest.mark.parametrize("name,make", CHECKPOINTED, ids=[c[0] for c in CHECKPOINTED])
@pytest.mark.parametrize("how", ["checkpoint", "copying hooks"])
def test_convex_layer_keeps_no_input_alive_outside_saved_tensors(name, make, how):
    """The guard kept ConvexLayer's inputs as ctx attributes: after a checkpointed forward
    (or under saved_tensors_hooks that copy) the activation fed to the layer stayed alive,
    as it does not for torch's own ops. Now it dies; the gradient is the plain one."""
    layer, x = make()
    X = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(_first(layer(X)).pow(2).sum(), X)
    refs = []

    def block(z):
        mid = z * 1.0
        refs.append(weakref.ref(mid))
        return _first(layer(mid))

    if how == "checkpoint":
        y = checkpoint(block, X, use_reentrant=False)
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            y = block(X)
    gc.collect()
    assert refs[0]() is None
    (g,) = torch.autograd.grad(y.pow(2).sum(), X)
    torch.testing.assert_close(g, plain, rtol=0, atol=0)
    # (the same gradient as central differences, not only as the unguarded one)
    e = torch.eye(x.numel(), dtype=F64).view(-1, *x.shape)
    with torch.no_grad():
        fd = torch.stack([(_first(layer(x + 1e-6 * d)).pow(2).sum() - _first(layer(x - 1e-6 * d)).pow(2).sum()) / 2e-6
                          for d in e]).view_as(x)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-6)
