"""The registry's transport and sparse problems agree with the native nodes.

Each problem of ``problems/transport.py`` and ``problems/sparse.py`` is built by name,
wrapped in a :class:`convexddn.ConvexLayer` (the cone-program path) and compared with
the native node (solution and gradient) on a few small rows: the cone path is slow.
"""
from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn import ConvexLayer
from convexddn.convex import registry
from convexddn.errors import InputError, OptionError
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
    return ConvexLayer(spec.problem, list(spec.parameters), list(spec.variables), check=spec.check)


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


@pytest.mark.parametrize("name, options", [("ot_lp", {}), ("ot_entropic", {"eps": 0.5})])
def test_ot_refuses_marginals_of_unequal_mass(name, options):
    """The CVXPY form leaves the last column sum implied by the others: marginals of
    unequal mass are feasible there, with a plan whose last column does not sum to b
    (before the check: [0.2, 0.4] against b = [0.5, 0.5] for ot_lp). Both the layer
    from convexddn.layer and one built with spec.check refuse them, naming the batch
    index and both masses."""
    C = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    a = torch.tensor([[0.5, 0.5], [0.3, 0.3]], dtype=F64)  # element 1: mass 0.6
    b = torch.tensor([0.5, 0.5], dtype=F64)
    for layer in (_layer(name, m=2, n=2, **options), cddn.layer(name, m=2, n=2, **options)):
        with pytest.raises(InputError, match=r"equal mass.*1 of 2 batch element.*index \(1,\).*Σa = 0\.6, Σb = 1"):
            layer(C, a, b)
        # Costs batched (3,), marginals not: all three elements differ, counted in the
        # call's batch shape (was "1 of 1 batch element(s) ... index ()").
        with pytest.raises(InputError, match=r"equal mass.*3 of 3 batch element.*index \(0,\).*Σa = 0\.6"):
            layer(C.expand(3, 2, 2), a[1], b)
        P = layer(C, a[0], b)  # equal masses: the plan's marginals are a and b
        torch.testing.assert_close(P.sum(-1), a[0], atol=1e-7, rtol=0)
        torch.testing.assert_close(P.sum(-2), b, atol=1e-7, rtol=0)
    # Without the check the same input is "solved" into a plan that breaks b.
    spec = registry.build(name, m=2, n=2, **options)
    P = ConvexLayer(spec.problem, list(spec.parameters), list(spec.variables))(C, a[1], b)
    assert abs(float(P.sum(-2)[-1]) - 0.5) > 0.3


def test_ot_mass_check_tolerates_rounding_only():
    """float32 marginals normalised to 1 pass (their sums differ from 1 by rounding);
    a relative difference of 1e-4 in float64 does not."""
    gen = torch.Generator().manual_seed(11)
    a = torch.softmax(torch.randn(8, 50, generator=gen), -1)
    b = torch.softmax(torch.randn(8, 60, generator=gen), -1)
    check = registry.build("ot_lp", m=50, n=60).check
    check([None, a, b])  # float32: accepted
    a64 = a.double() / a.double().sum(-1, keepdim=True)
    b64 = b.double() / b.double().sum(-1, keepdim=True)
    check([None, a64, b64])
    with pytest.raises(InputError, match=r"1 of 8 batch element"):
        check([None, a64, torch.cat([b64[:3], b64[3:4] * (1 + 1e-4), b64[4:]])])


@pytest.mark.parametrize("name, options", [("ot_lp", {}), ("ot_entropic", {"eps": 0.5})])
def test_ot_unequal_mass_check_reads_no_tensor_that_requires_grad(name, options, monkeypatch):
    """With marginals that require grad (a of mass 1, b of 1.5), the InputError came with
    torch's own UserWarning "Converting a tensor with requires_grad=True to a scalar" (the
    message read its masses with float() of tensors in the graph). torch warns of it once per
    process, so the test catches the conversion itself."""
    real = torch.Tensor.__float__

    def strict(self):
        assert not self.requires_grad, "float() of a tensor that requires grad"
        return real(self)

    monkeypatch.setattr(torch.Tensor, "__float__", strict)
    C = torch.rand(2, 3, 3, dtype=F64)
    a = torch.full((2, 3), 1 / 3, dtype=F64, requires_grad=True)
    b = torch.full((2, 3), 0.5, dtype=F64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Converting a tensor")
        with pytest.raises(InputError, match=r"equal mass.*2 of 2 batch element.*Σa = 1, Σb = 1\.5"):
            cddn.layer(name, backend="cvxpy", m=3, n=3, **options)(C, a, b)


def test_check_option_is_validated():
    spec = registry.build("ot_lp", m=2, n=2)
    with pytest.raises(OptionError, match=r"check must be a callable or None, got int"):
        ConvexLayer(spec.problem, list(spec.parameters), list(spec.variables), check=3)
    with pytest.raises(OptionError, match=r"check is set by the registry \(ProblemSpec.check, here 'equal_mass'"):
        cddn.layer("ot_lp", m=2, n=2, check=lambda values: None)
    with pytest.raises(OptionError, match=r"register\('x'\): check must be a callable"):
        registry.register("x", "a problem", check="no")
    assert registry.build("simplex", n=3).check is None
    assert "check=equal_mass" in repr(cddn.layer("ot_lp", m=2, n=2))
    assert "check=" not in repr(cddn.layer("qp", n=2, n_ineq=1))


def _entmax_reference(x: list[float], alpha: float) -> list[float]:
    """α-entmax by bisection on τ in 50-digit arithmetic: p_i = [(α − 1)x_i − τ]_+^(1/(α−1)),
    Σp = 1 (Peters et al. 2019), independent of both solvers."""
    import mpmath as mp

    with mp.workdps(50):
        a = mp.mpf(alpha)
        z = [(a - 1) * mp.mpf(v) for v in x]
        lo, hi = max(z) - 1, max(z)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(max(v - mid, 0) ** (1 / (a - 1)) for v in z) > 1 else (lo, mid)
        return [float(max(v - lo, 0) ** (1 / (a - 1))) for v in z]


@pytest.mark.parametrize("alpha", [1.3333333, 1.5000001, float(np.float32(1.1)), 1.7777])
def test_entmax_cone_form_takes_ordinary_alphas_without_cvxpy_warnings(alpha):
    """Denominators up to 2^20 only: 1.3333333 (nearest fraction 4/3, 1e-7 off in the
    solution), 1.5000001 and float32(1.1) were refused with an OptionError;
    every build warned (CVXPY's UserWarning that p**alpha 'is being approximated', with
    advice to use power cones, which neither solver path takes). The cone form is now
    written with a fraction of denominator up to 2^32, no warning, and matches the
    50-digit reference."""
    x = [0.3, -0.2, 0.25, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = cddn.layer("entmax", n=4, alpha=alpha, backend="cvxpy")
        p = layer(torch.tensor(x, dtype=F64))
    torch.testing.assert_close(p, torch.tensor(_entmax_reference(x, alpha), dtype=F64), atol=1e-7, rtol=0)


def test_entmax_cone_form_warns_where_float64_does_not_resolve_ties():
    """A tie at the maximum is resolved by the cone form only through ~p^(α−2): on [1, 1, 1, -5]
    at α = 50 its split came back 0.327/0.316/0.356 (1/3 each: exact by symmetry, the native node
    gets it) with no warning; at α = 20, 2.2e-7 off. Building the form warns from α = 16 on
    (where ties first come back above ~1e-9); below, no warning and the tie is exact."""
    from convexddn.errors import SolverWarning

    x = torch.tensor([1.0, 1.0, 1.0, -5.0], dtype=F64)
    exact = torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cddn.layer("entmax", n=4, alpha=50.0, backend="cvxpy")(x)  # (its split: 0.327/0.316/0.356, unwarned before)
    texts = [str(w.message) for w in caught if issubclass(w.category, SolverWarning)]
    assert any("alpha = 50.0" in t and "native node" in t for t in texts), texts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = cddn.layer("entmax", n=4, alpha=15.0, backend="cvxpy")(x)
        native = cddn.layer("entmax", n=4, alpha=50.0)(x)  # (the native node builds no cone form)
    torch.testing.assert_close(p, exact, atol=1e-8, rtol=0)
    torch.testing.assert_close(native, exact, atol=1e-15, rtol=0)


def test_entmax_cone_form_refuses_alpha_too_close_to_one_or_too_large():
    for alpha in (1 + 5e-8, 1e10):
        with pytest.raises(OptionError, match=r"no cone form close enough.*alpha - 1 must be >= 1e-07"):
            registry.build("entmax", n=3, alpha=alpha).problem


def test_ot_mass_check_allows_the_less_precise_marginals_rounding():
    """A float16 a (1/3 each: Σ = 0.99976) beside an exactly normalised float64 b is within a's
    own rounding (4 eps16 = 3.9e-3); the wider dtype's eps (float64's, from promote_types)
    refused it, while the same a beside a float16 b passed. A difference beyond float16's
    rounding still fails."""
    check = registry.build("ot_lp", m=3, n=4).check
    a = (torch.ones(3, dtype=torch.float64) / 3).half()
    b = torch.full((4,), 0.25, dtype=torch.float64)
    check([None, a, b])
    check([None, a, b.half()])
    with pytest.raises(InputError, match="equal mass"):
        check([None, a, b * 1.01])
