"""The registry's transport and sparse problems agree with the native nodes.

Each problem of ``problems/transport.py`` and ``problems/sparse.py`` is built by name,
wrapped in a :class:`convexddn.ConvexLayer` (the cone-program path) and compared with
the native node (solution and gradient) on a few small rows: the cone path is slow.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import convexddn as cddn
from convexddn import ConvexLayer
from convexddn.convex import registry
from convexddn.errors import OptionError
from convexddn.nodes.entmax import entmax
from convexddn.nodes.total_variation import tv_denoise
from convexddn.nodes.transport import sinkhorn

F64 = torch.float64
NAMES = ["ot_lp", "ot_entropic", "sparsemax", "entmax", "tv1d"]


@pytest.fixture(scope="module", autouse=True)
def _catalog_modules():
    """Register the two catalog modules for these tests, then restore the registry.

    (Importing them registers their problems; other tests check the exact catalog.)
    """
    registry.names()  # load the standing catalog first, so that it is what is restored
    saved = dict(registry._REGISTRY)
    modules = {"convexddn.problems.sparse": ("sparsemax", "entmax", "tv1d"),
               "convexddn.problems.transport": ("ot_lp", "ot_entropic")}
    for module, names in modules.items():
        loaded = importlib.import_module(module)
        if not set(names) <= set(registry._REGISTRY):
            importlib.reload(loaded)  # imported earlier and its entries since removed
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def _layer(name: str, **options) -> ConvexLayer:
    spec = registry.build(name, **options)
    return ConvexLayer(spec.problem, list(spec.parameters), list(spec.variables))


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _grads(y: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int) -> tuple:
    w = _rand(*y.shape, seed=seed)
    return torch.autograd.grad((y * w).sum(), inputs, retain_graph=True)


def test_catalog_names_and_options():
    assert set(NAMES) <= set(registry.names())
    for name in NAMES:
        assert registry.describe(name)
    bad = [("tv1d", {"n": 4, "lam": -1.0}), ("entmax", {"n": 4, "alpha": 1.0}),
           ("ot_entropic", {"m": 2, "n": 2, "eps": 0.0}), ("ot_lp", {"m": 0, "n": 2}),
           ("sparsemax", {"n": 2.5})]
    for name, options in bad:
        with pytest.raises(OptionError):
            registry.build(name, **options)


def test_tv1d_native_matches_cone_program():
    x = _rand(3, 8, seed=1).requires_grad_()
    y_cone = _layer("tv1d", n=8, lam=0.7)(x)
    y_native = tv_denoise(x, 0.7)
    assert torch.allclose(y_cone, y_native, atol=1e-7)
    for g_cone, g_native in zip(_grads(y_cone, (x,), 2), _grads(y_native, (x,), 2)):
        assert torch.allclose(g_cone, g_native, atol=1e-6)


@pytest.mark.parametrize("name,options,alpha", [("sparsemax", {}, 2.0), ("entmax", {"alpha": 1.5}, 1.5)])
def test_entmax_native_matches_cone_program(name, options, alpha):
    x = _rand(3, 6, seed=3).requires_grad_()
    p_cone = _layer(name, n=6, **options)(x)
    p_native = entmax(x, alpha)
    assert torch.allclose(p_cone, p_native, atol=1e-7)
    for g_cone, g_native in zip(_grads(p_cone, (x,), 4), _grads(p_native, (x,), 4)):
        assert torch.allclose(g_cone, g_native, atol=1e-6)


def test_ot_entropic_native_matches_cone_program():
    # Marginals as softmaxes: both paths differentiate along mass-preserving directions,
    # where the gradient with respect to (a, b) is unique.
    C = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(5), dtype=F64).requires_grad_()
    s = _rand(3, seed=7).requires_grad_()
    t = _rand(2, 4, seed=8).requires_grad_()
    a, b = torch.softmax(s, -1), torch.softmax(t, -1)
    P_cone = _layer("ot_entropic", m=3, n=4, eps=0.5)(C, a, b)
    P_native = sinkhorn(C, a, b, eps=0.5)
    assert torch.allclose(P_cone, P_native, atol=1e-7)
    for g_cone, g_native in zip(_grads(P_cone, (C, s, t), 6), _grads(P_native, (C, s, t), 6)):
        assert torch.allclose(g_cone, g_native, atol=1e-6)


def test_ot_lp_is_the_small_eps_limit():
    # A cost with a unique optimal assignment: the entropic plan tends to the LP vertex.
    C = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.1, 1.0], [2.0, 1.0, 0.3]], dtype=F64)
    a = torch.full((3,), 1 / 3, dtype=F64)
    P_lp = _layer("ot_lp", m=3, n=3)(C, a, a)
    assert torch.allclose(P_lp, torch.eye(3, dtype=F64) / 3, atol=1e-7)
    assert torch.allclose(sinkhorn(C, a, a, eps=0.01), P_lp, atol=1e-7)


@pytest.mark.parametrize("name, options", [("sparsemax", {}), ("entmax", {"alpha": 1.5}), ("tv1d", {"lam": 0.3})])
def test_layer_auto_returns_the_native_node_and_agrees(name, options):
    """convexddn.layer gives the native node for these registry problems; the cone
    program (backend='cvxpy') gives the same solution."""
    native = cddn.layer(name, n=8, **options)
    cone = cddn.layer(name, n=8, backend="cvxpy", **options)
    assert not isinstance(native, cddn.ConvexLayer) and isinstance(cone, cddn.ConvexLayer)
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(native(x), cone(x), atol=1e-6, rtol=0)
