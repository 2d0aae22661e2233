"""Tests of convexddn.convex.saved_state: under saved-tensor hooks (torch.utils.checkpoint,
save_on_cpu, the user's own) the batched solve's kept state (equilibrated data, the KKT
system at the solution) goes through the hooks as torch's own ops' saved tensors do, so a
checkpointed ConvexLayer frees it after the forward; gradients and tangents are those of
the same call without hooks (torch's rule for checkpointing: equal), in float64."""
from __future__ import annotations

import gc
import weakref

import cvxpy as cp
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import convexddn.convex.batched as batched
import convexddn.convex.cone_solve as cone_solve
from convexddn.convex.layer import ConvexLayer
from convexddn.convex.saved_state import hooks_active, join, split
from convexddn.convex.symmetric_cones import ConeLayout

F64 = torch.float64


def _layer_and_data(B=5, n=6, m=8):
    """A QP with a parametrised quadratic term, inequalities and one equality (the batched path)."""
    L, q = cp.Parameter((n, n), name="L"), cp.Parameter(n, name="q")
    G, h = cp.Parameter((m, n), name="G"), cp.Parameter(m, name="h")
    x = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + q @ x), [G @ x <= h, cp.sum(x) == 1])
    gen = torch.Generator().manual_seed(3)
    data = [torch.eye(n, dtype=F64) + 0.3 * torch.randn(B, n, n, dtype=F64, generator=gen),
            torch.randn(B, n, dtype=F64, generator=gen), torch.randn(B, m, n, dtype=F64, generator=gen),
            torch.rand(B, m, dtype=F64, generator=gen) + 0.5]
    return ConvexLayer(prob, [L, q, G, h], [x], solver="batched"), data


@pytest.fixture
def kept(monkeypatch):
    """Weak references to each batched solve's kept equilibrated P and KKT system, and to
    the parameters' copy its backward checks keep (batched._Moves: B x parameters)."""
    refs = []
    original, moves = cone_solve.solve_cone_batch, batched._Moves.__init__

    def solve(*args, **kwargs):
        sol = original(*args, **kwargs)
        if sol.scaled is not None:
            refs.append((weakref.ref(sol.scaled.P), weakref.ref(sol.kkt)))
        return sol

    def init(self, data, p, requires):
        moves(self, data, p, requires)
        refs.append((weakref.ref(p),))

    monkeypatch.setattr(cone_solve, "solve_cone_batch", solve)
    monkeypatch.setattr(batched._Moves, "__init__", init)
    return refs


def _grads(layer, data, wrap, weights):
    leaves = [d.clone().requires_grad_() for d in data]
    x = wrap(lambda *a: layer(*a), *leaves) if wrap else layer(*leaves)
    gc.collect()
    return x, leaves


def test_checkpointed_layer_frees_the_solver_state_with_the_same_gradients(kept):
    # The state was a ctx attribute: alive after a checkpoint(use_reentrant=False) forward
    # (a few times the inputs' memory), so checkpointing saved nothing for a ConvexLayer; then
    # the parameters' copy of the backward's checks stayed (found by a review).
    layer, data = _layer_and_data()
    weights = torch.linspace(-1, 2, 30, dtype=F64).view(5, 6)
    x0, leaves0 = _grads(layer, data, None, weights)
    assert kept and all(r() is not None for pair in kept for r in pair)  # the control: kept without hooks
    want = torch.autograd.grad(x0, leaves0, weights)
    kept.clear()
    x1, leaves1 = _grads(layer, data, lambda f, *a: checkpoint(f, *a, use_reentrant=False), weights)
    assert kept and all(r() is None for pair in kept for r in pair)
    got = torch.autograd.grad(x1, leaves1, weights)
    assert torch.equal(x0, x1)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_copying_hooks_see_the_state_and_a_retained_graph_differentiates_twice(kept):
    # A hook that packs copies (save_on_cpu on a GPU): the state's tensors go through it and the
    # originals are freed; the joined state serves two backward passes (retain_graph).
    layer, data = _layer_and_data()
    weights = torch.linspace(1, -1, 30, dtype=F64).view(5, 6)
    x0, leaves0 = _grads(layer, data, None, weights)
    want = torch.autograd.grad(x0, leaves0, weights)
    packed = []

    def wrap(f, *a):
        def pack(t):
            packed.append(t.numel())
            return t.clone()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return f(*a)

    kept.clear()
    x1, leaves1 = _grads(layer, data, wrap, weights)
    assert kept and all(r() is None for pair in kept for r in pair)
    # (the equilibrated P alone has B n² entries)
    assert sum(packed) >= sum(d.numel() for d in data)
    for _ in range(2):
        got = torch.autograd.grad(x1, leaves1, weights, retain_graph=True)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_forward_mode_under_hooks_gives_the_plain_tangent():
    layer, data = _layer_and_data()
    gen = torch.Generator().manual_seed(9)
    tangents = [torch.randn(d.shape, dtype=F64, generator=gen) for d in data]

    def jvp():
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            x = layer(*(fwAD.make_dual(d, t) for d, t in zip(data, tangents)))
            return fwAD.unpack_dual(x).tangent

    want = jvp()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        assert hooks_active()
        got = jvp()
    assert not hooks_active()
    assert torch.equal(got, want)
    # against central differences of the solution (float64)
    h = 1e-6
    xp = layer(*(d + h * t for d, t in zip(data, tangents)))
    xm = layer(*(d - h * t for d, t in zip(data, tangents)))
    assert torch.allclose(got, (xp - xm) / (2 * h), atol=1e-6, rtol=1e-5)


class _Part:  # stands in for the solver's per-call objects (a __dict__; its module is patched below)
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_split_and_join_keep_sharing_and_leave_the_structure(monkeypatch):
    monkeypatch.setattr(_Part, "__module__", "convexddn.convex.fake")
    layout = ConeLayout(zero=1, nonneg=2, soc=())
    t, u = torch.arange(3.0), torch.ones(2)
    inner = _Part(a=t, layout=layout)
    state = _Part(inner=inner, again=inner, pair=(t, u), items=[u, 4], meta={"k": t[1:]}, name="x")
    skeleton, tensors = split(state)
    assert len(tensors) == 3  # t, u and the view t[1:] (a tensor of its own); t saved once
    new = [v * 2 for v in tensors]
    joined = join(skeleton, new)
    assert joined is not state and joined.inner is joined.again  # sharing kept
    assert joined.inner.layout is layout  # the program's structure by reference
    assert torch.equal(joined.inner.a, 2 * t) and joined.pair[0] is joined.inner.a
    assert torch.equal(joined.pair[1], 2 * u) and joined.items[1] == 4 and joined.name == "x"
    again = join(skeleton, tensors)  # the skeleton is left as it was
    assert again.inner.a is t and again.pair[1] is u
