"""Tests of convexddn._anchor: the native nodes whose backward does not read an input
(tridiagonal_solve's four, eigen_decomposition's X, tv_denoise's x) hold none of it past the
forward, so torch.utils.checkpoint frees it and saved-tensor hooks see it as for torch's own ops,
while a second differentiation still raises DoubleBackwardError. Gradients against the same
composition without checkpointing (torch's own rule: they must be equal), in float64."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from convexddn.errors import DoubleBackwardError
from convexddn.functional import eigen_decomposition, tridiagonal_solve, tv_denoise

F64 = torch.float64


def _sym(gen):
    a = torch.randn(2, 4, 4, dtype=F64, generator=gen)
    return a + a.mT


# name -> (node on the block's activations, inputs (float64))
CASES = {
    "tridiagonal_solve": (tridiagonal_solve, lambda g: [4 + torch.rand(2, 6, dtype=F64, generator=g),
                                                        torch.randn(2, 5, dtype=F64, generator=g),
                                                        torch.randn(2, 5, dtype=F64, generator=g),
                                                        torch.randn(2, 6, dtype=F64, generator=g)]),
    "eigen_decomposition": (lambda s: eigen_decomposition(s, 2).eigenvectors, lambda g: [_sym(g)]),
    "tv_denoise": (lambda x: tv_denoise(x, 0.4), lambda g: [torch.randn(2, 8, dtype=F64, generator=g)]),
}


def _run(name, wrap):
    """The node on activations ``l * 1`` of fresh leaves, through ``wrap(block, *leaves)``: (weak
    references to the activations, after the forward and a collection; the leaves' gradients
    of a fixed random weighting of the output)."""
    node, make = CASES[name]
    gen = torch.Generator().manual_seed(5)
    leaves = [t.requires_grad_() for t in make(gen)]
    refs = []

    def block(*ls):
        mids = [t * 1.0 for t in ls]
        refs.extend(weakref.ref(m) for m in mids)
        return node(*mids)

    y = wrap(block, *leaves)
    gc.collect()
    alive = [r() is not None for r in refs[:len(leaves)]]
    w = torch.randn(y.shape, dtype=F64, generator=gen)
    return alive, torch.autograd.grad((y * w).sum(), leaves)


def _assert_freed_with_the_same_gradients(name: str, wrap) -> None:
    """Under ``wrap``, every input of the node is freed after the forward, and the gradients are
    those of a plain call, bit for bit."""
    alive, got = _run(name, wrap)
    assert alive == [False] * len(alive)
    _, want = _run(name, lambda f, *xs: f(*xs))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpointed_forward_frees_the_inputs(name):
    # The inputs were kept as ctx attributes for the double-backward guard: alive after a
    # checkpoint(use_reentrant=False) forward (torch.sin's are freed), so checkpointing saved nothing.
    _assert_freed_with_the_same_gradients(name, lambda f, *xs: checkpoint(f, *xs, use_reentrant=False))


@pytest.mark.parametrize("name", sorted(CASES))
def test_copying_saved_tensor_hooks_leave_the_inputs_to_the_hooks(name):
    # A hook that packs a copy (save_on_cpu on a GPU): the node's inputs were held besides the
    # copies (memory doubled, nothing offloaded).
    def wrap(f, *xs):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            return f(*xs)

    _assert_freed_with_the_same_gradients(name, wrap)


@pytest.mark.parametrize("name", sorted(CASES))
def test_second_differentiation_raises_for_every_input(name):
    # The anchor stands in for the inputs the guard tied the gradients to: differentiating a
    # gradient again with respect to any input still reaches the refusal (not None, zeros or
    # torch's "does not require grad"). A loss linear in the output, with constant weights: a
    # squared one's incoming gradient leads back to the inputs by itself, and the test passed
    # with the anchors removed.
    node, make = CASES[name]
    for k in range(len(make(torch.Generator()))):
        leaves = [t.requires_grad_() for t in make(torch.Generator().manual_seed(6))]
        out = node(*(t * 1.0 for t in leaves))
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
        grads = torch.autograd.grad((out * weights).sum(), leaves, create_graph=True)
        with pytest.raises(DoubleBackwardError):
            torch.autograd.grad(grads[0].sum(), leaves[k])


def test_forward_over_reverse_with_the_tangent_on_an_input_without_grad_raises():
    # x carries a tangent but does not require grad; lam's gradient is then a mixed second
    # derivative (its tangent would be dropped): the anchor carries x's tangent, so the guard sees it.
    x = torch.randn(2, 8, dtype=F64, generator=torch.Generator().manual_seed(7))
    lam = torch.tensor(0.4, dtype=F64, requires_grad=True)
    with torch.autograd.forward_ad.dual_level():
        y = tv_denoise(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)), lam)
        with pytest.raises(DoubleBackwardError):
            torch.autograd.grad(y.sum(), lam)
