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
    # a region not closed still refuses with respect to the inputs
    X = x.clone().requires_grad_()
    (Xg,) = _first_order.first_order_region("toy", [X])[0]
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


# ---------------------------------------------------------------- under torch.utils.checkpoint

def _autograd_cases():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_autograd import CASES  # noqa: E402  (every native node, seeded float64 inputs)

    return CASES


NODE_CASES = _autograd_cases()


def _weighted(out, loss):
    w = torch.linspace(1, 2, out.shape[-1], dtype=F64)
    return (out * w).sum() if loss == "linear" else (out * out * w).sum()


@pytest.mark.parametrize("loss", ["linear", "square"])
@pytest.mark.parametrize("name,x,node", NODE_CASES, ids=[c[0] for c in NODE_CASES])
def test_checkpointed_node_create_graph_gradient_then_double_backward_error(name, x, node, loss):
    """A native node inside a non-reentrant checkpoint: the first create_graph=True gradient
    (a user may need it for other parts of a model) is the un-checkpointed one, and
    differentiating it again raises DoubleBackwardError, as without checkpoint. first_order
    read ctx.saved_tensors a second time for its anchors: torch's CheckpointError ("Unpack
    is being triggered for a tensor that was already unpacked once") at the first gradient."""
    X = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(_weighted(node(X), loss), X)  # torch's rule: the same value
    (g,) = torch.autograd.grad(_weighted(checkpoint(node, X, use_reentrant=False), loss), X, create_graph=True)
    torch.testing.assert_close(g.detach(), plain, rtol=1e-10, atol=1e-12)
    with pytest.raises(DoubleBackwardError, match="does not support double backward"):
        torch.autograd.grad((g * g).sum(), X, allow_unused=True)


def _multi_input_cases():
    from convexddn.functional import (least_squares, pnp, project_lp, project_simplex, robust_pool, sinkhorn,
                                      tridiagonal_solve, tv_denoise)

    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, dtype=F64, generator=g)

    xy = 2 * torch.rand(1, 8, 2, generator=g, dtype=F64) - 1
    z = 2 * torch.rand(1, 8, 1, generator=g, dtype=F64) + 2
    p3d = torch.cat([z * xy, z], -1) + 0.01 * r(1, 8, 3)
    return [  # (name, inputs, node): every input differentiable; its radius, weight or marginal too
        ("robust_pool", (r(2, 8), torch.tensor([0.7, 1.3], dtype=F64)), lambda x, a: robust_pool(x, "huber", a)),
        ("project_lp", (r(2, 5), torch.tensor(0.8, dtype=F64)), lambda x, t: project_lp(x, 2, "sphere", t)),
        ("project_lp L1", (3 * r(2, 5), torch.tensor(1.5, dtype=F64)), lambda x, t: project_lp(x, 1, "ball", t)),
        ("project_simplex", (r(2, 5), torch.tensor(2.0, dtype=F64)), lambda x, t: project_simplex(x, -1, t)),
        ("tv_denoise", (r(2, 9), torch.tensor(0.5, dtype=F64)), tv_denoise),
        ("least_squares", (r(2, 6, 3), r(2, 6)), least_squares),
        ("sinkhorn", (torch.rand(2, 4, 5, dtype=F64, generator=g), torch.softmax(r(2, 4), -1),
                      torch.softmax(r(2, 5), -1)), lambda C, a, b: sinkhorn(C, a, b, eps=0.5)),
        ("tridiagonal_solve", (4 + torch.rand(2, 6, dtype=F64, generator=g), r(2, 5), r(2, 5), r(2, 6)),
         tridiagonal_solve),
        ("pnp", (xy, p3d), pnp),
    ]


MULTI_INPUT = _multi_input_cases()


@pytest.mark.parametrize("name,inputs,node", MULTI_INPUT, ids=[c[0] for c in MULTI_INPUT])
def test_checkpointed_node_refuses_second_derivatives_in_every_input(name, inputs, node):
    """With respect to each input on its own, the incoming gradient a constant (a loss linear
    in the output): the guard reaches every input through ctx.anchors (graph_anchor), not
    through the saved tensors, which a checkpoint recomputes detached."""
    for i in range(len(inputs)):
        xs = [t.clone().requires_grad_() for t in inputs]
        plain = torch.autograd.grad(_weighted(node(*xs), "linear"), xs)
        out = checkpoint(node, *xs, use_reentrant=False)
        grads = torch.autograd.grad(_weighted(out, "linear"), xs, create_graph=True)
        for got, want in zip(grads, plain):
            torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
        with pytest.raises(DoubleBackwardError, match="does not support double backward"):
            torch.autograd.grad(sum((q * q).sum() for q in grads), xs[i], allow_unused=True)


# (pnp apart: its forward inside a dual level is recomputed by the checkpoint with other saved
# tensors, torch's CheckpointError "different metadata", before any backward of the node runs)
FORWARD_CASES = [c for c in NODE_CASES if c[0] != "pnp"]


@pytest.mark.parametrize("name,x,node", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_checkpointed_node_forward_over_reverse_is_refused(name, x, node):
    """A backward inside a forward-AD dual level whose input carries a tangent, the incoming
    gradient a constant: refused from the anchor's tangent (the saved tensors are not read)."""
    import torch.autograd.forward_ad as fw

    with fw.dual_level():
        X = fw.make_dual(x.clone().requires_grad_(), torch.ones_like(x))
        out = checkpoint(node, X, use_reentrant=False)
        with pytest.raises(DoubleBackwardError, match="does not support double backward in forward mode"):
            torch.autograd.grad(_weighted(out, "linear"), X)
