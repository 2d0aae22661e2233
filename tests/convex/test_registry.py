"""The problem registry and its catalog: every problem against an independent answer.

Solutions are compared with closed forms (projections, the mean) or with an
independent solve (CVXPY's own Clarabel call, or a 1-D root find for pooling);
gradients with closed forms where they exist and with central finite differences
in float64 for every parameter.
"""
from __future__ import annotations

import decimal
import math
import pickle
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn import registry
from convexddn.errors import NonconvexError, OptionError, ProblemError

F64 = torch.float64


def fd_check(layer, params, k, gen, eps=1e-5, tol=1e-5):
    """Directional central finite difference of ⟨w, layer(params)⟩ in parameter k."""
    args = [p.clone().requires_grad_(i == k) for i, p in enumerate(params)]
    out = layer(*args)
    w = torch.randn(out.shape, dtype=F64, generator=gen)
    (grad,) = torch.autograd.grad(out, args[k], w)
    d = torch.randn(params[k].shape, dtype=F64, generator=gen)
    with torch.no_grad():
        plus = layer(*[p + eps * d if i == k else p for i, p in enumerate(params)])
        minus = layer(*[p - eps * d if i == k else p for i, p in enumerate(params)])
    fd = float(((plus - minus) * w).sum() / (2 * eps))
    analytic = float((grad * d).sum())
    assert abs(analytic - fd) <= tol * (1 + abs(fd)), (k, analytic, fd)


# ----------------------------------------------------------------------------- machinery


def test_names_lists_catalog():
    assert registry.names() == ["birkhoff", "entmax", "lp_ball", "ot_entropic", "ot_lp", "qp", "robust_pool",
                              "simplex", "sparsemax", "tv1d"]


def test_build_returns_spec():
    spec = registry.build("lp_ball", n=5, p=1)
    assert isinstance(spec, cddn.ProblemSpec)
    assert spec.parameter_shapes == {"x": (5,)}
    assert spec.variable_shapes == {"y": (5,)}
    assert spec.options == {"n": 5, "p": 1, "radius": 1.0}
    assert spec.problem.is_dpp() and "Lp ball" in spec.description


def test_layer_shortcut_builds_convex_layer():
    layer = cddn.layer("simplex", n=3, backend="cvxpy")
    assert isinstance(layer, cddn.ConvexLayer)
    y = layer(torch.tensor([0.1, 0.2, 5.0], dtype=F64))
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 1.0], dtype=F64), atol=1e-8)


def test_describe_lists_options():
    assert "options: n=…, penalty='quadratic', alpha=1.0" in registry.describe("robust_pool")


def test_build_invalid_name_lists_valid():
    with pytest.raises(OptionError, match=r"unknown problem 'lasso'.*\['birkhoff', 'entmax', 'lp_ball', 'ot_entropic'"):
        registry.build("lasso", n=3)


def test_build_invalid_option_lists_valid():
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['radious'\].*valid options are \['n', 'p', 'radius'\]"):
        registry.build("lp_ball", n=3, radious=2.0)
    with pytest.raises(OptionError, match=r"needs option\(s\) \['n'\]"):
        registry.build("simplex")
    with pytest.raises(OptionError, match="n must be an integer >= 1 and <= 2147483647, got 0"):
        registry.build("simplex", n=0)
    with pytest.raises(OptionError, match=r"p must be one of \[1, 2, inf, 'inf'\], got 3"):
        registry.build("lp_ball", n=3, p=3)
    with pytest.raises(OptionError, match="radius must be finite and > 0"):
        registry.build("lp_ball", n=3, radius=-1.0)


def test_layer_unknown_option_lists_problem_and_layer_options():
    # The message was build()'s, "valid options are ['n']", though layer() also takes
    # ConvexLayer's options: a misspelt solver= read as if it were no option at all.
    layer_opts = r"\['solver', 'solver_args', 'fallback', 'adjoint', 'tol', 'refine', 'workers', 'gp', 'on_failure'\]"
    with pytest.raises(OptionError, match=r"unknown option\(s\) \['solvr'\] for layer\('birkhoff'\); valid options "
                       r"are the problem's \['n'\] and ConvexLayer's " + layer_opts + "$"):
        cddn.layer("birkhoff", n=3, solvr="SCS")
    # A problem with a native node: the layer options need backend='cvxpy' ...
    with pytest.raises(OptionError, match=r"the problem's \['n', 'p', 'radius'\] and, with backend='cvxpy' .*"
                       r"native node.*ConvexLayer's " + layer_opts):
        cddn.layer("lp_ball", n=3, radious=2.0)
    # ... and backend='native' takes none of them.
    with pytest.raises(OptionError, match=r"the problem's \['n'\] \(ConvexLayer's options " + layer_opts
                       + r" configure the cone program: not with backend='native'\)"):
        cddn.layer("simplex", n=3, backend="native", tool=1e-6)
    with pytest.raises(OptionError, match=r"for layer\('simplex'\); valid options are the problem's \['n'\] and "
                       r"ConvexLayer's \['solver'"):
        cddn.layer("simplex", n=3, backend="cvxpy", solvr="SCS")
    # A builder's own option of a layer option's name is the problem's, not listed twice.
    @registry.register("test_own_tol", "argmin ‖u − x‖² s.t. u ≤ tol")
    def own_tol(n: int, tol: float = 1.0):
        x = cp.Parameter(n, name="x")
        u = cp.Variable(n, name="u")
        return cp.Problem(cp.Minimize(cp.sum_squares(u - x)), [u <= tol]), [x], [u]

    try:
        with pytest.raises(OptionError, match=r"the problem's \['n', 'tol'\] and ConvexLayer's \['solver', "
                           r"'solver_args', 'fallback', 'adjoint', 'refine',"):
            cddn.layer("test_own_tol", n=3, tl=0.5)
    finally:
        registry._REGISTRY.pop("test_own_tol")


def test_register_duplicate_name_rejected():
    with pytest.raises(OptionError, match="already registered"):
        registry.register("qp", "another")(lambda n: None)


def test_register_checks_name_and_builder_contract():
    # A non-string name was accepted and then broke names() and every unknown-name
    # lookup (sorting int with str); a builder returning two items raised a raw unpack error.
    for bad in (7, "", None):
        with pytest.raises(OptionError, match="name must be a non-empty string"):
            registry.register(bad, "x")
    assert "qp" in registry.names()

    @registry.register("test_two_items", "returns too little")
    def two(n: int = 2):
        x = cp.Parameter(n, name="x")
        return cp.Problem(cp.Minimize(cp.sum_squares(cp.Variable(n) - x))), [x]

    try:
        with pytest.raises(ProblemError, match=r"'test_two_items' must return .* got a 2-tuple"):
            registry.build("test_two_items")
    finally:
        registry._REGISTRY.pop("test_two_items")


@pytest.mark.parametrize("kind", ["bare parameter", "expressions", "bare variable"])
def test_build_checks_the_parameters_and_variables_a_builder_returns(kind):
    """A builder returning one cp.Parameter as `parameters` was accepted: tuple() iterated it
    into x[0], x[1] (spec.parameter_shapes {'x[0]': (), 'x[1]': ()}), and layer() failed
    naming neither the builder nor its contract."""
    @registry.register("test_bad_sequences", "returns a bare parameter")
    def bad(n: int = 2):
        x = cp.Parameter(n, name="x")
        y = cp.Variable(n, name="y")
        problem = cp.Problem(cp.Minimize(cp.sum_squares(y - x)))
        return {"bare parameter": (problem, x, [y]), "expressions": (problem, [x[0], x[1]], [y]),
                "bare variable": (problem, [x], y)}[kind]

    what, got = {"bare parameter": ("parameters", "a Parameter"),
                 "expressions": ("parameters", r"a list holding \['index', 'index'\]"),
                 "bare variable": ("variables", "a Variable")}[kind]
    try:
        for call in (lambda: registry.build("test_bad_sequences"), lambda: cddn.layer("test_bad_sequences")):
            with pytest.raises(ProblemError, match=rf"^registry builder 'test_bad_sequences' must return \(problem, "
                                                   rf"parameters, variables\[, learned\]\) with {what} a list or "
                                                   rf"tuple of cvxpy\.\w+, got {got} as {what}$"):
                call()
    finally:
        registry._REGISTRY.pop("test_bad_sequences")


def test_register_refuses_builders_with_unnamed_options():
    # A **kwargs builder registered and then could never be built: build() read
    # **extra as a required option named "extra" ("needs option(s) ['extra']").
    def with_kwargs(n: int, **extra):
        raise AssertionError("not called")

    def with_args(n: int, *sizes, c: float = 1.0):
        raise AssertionError("not called")

    def positional_only(n: int, /, c: float = 1.0):
        raise AssertionError("not called")

    for builder, got in ((with_kwargs, r"\*\*extra"), (with_args, r"\*sizes"),
                         (positional_only, r"n \(positional-only\)")):
        with pytest.raises(OptionError, match=rf"register\('test_unnamed'\): builder .*{builder.__name__} must "
                           rf"take each option as a named keyword parameter .*got {got};"):
            registry.register("test_unnamed", "never registered")(builder)
        assert "test_unnamed" not in registry.names()

    # Keyword-only options are named: accepted, and built by name.
    @registry.register("test_keyword_only", "argmin ‖u − x‖² s.t. |u| ≤ c")
    def keyword_only(*, n: int, c: float = 0.5):
        x = cp.Parameter(n, name="x")
        u = cp.Variable(n, name="u")
        return cp.Problem(cp.Minimize(cp.sum_squares(u - x)), [cp.abs(u) <= c]), [x], [u]

    try:
        assert registry.build("test_keyword_only", n=3).options == {"n": 3, "c": 0.5}
        assert "options: n=…, c=0.5" in registry.describe("test_keyword_only")
    finally:
        registry._REGISTRY.pop("test_keyword_only")
    # Every catalog builder passes the check (they are registered on import).
    assert all(registry.option_names(name) for name in registry.names())


def test_register_user_problem():
    @registry.register("test_scaled_box", "argmin ½‖u − x‖² s.t. |u| ≤ c")
    def scaled_box(n: int, c: float = 0.5):
        x = cp.Parameter(n, name="x")
        u = cp.Variable(n, name="u")
        return cp.Problem(cp.Minimize(cp.sum_squares(u - x)), [cp.abs(u) <= c]), [x], [u]

    try:
        layer = cddn.layer("test_scaled_box", n=3, c=0.5)
        x = torch.tensor([1.0, -0.2, -3.0], dtype=F64)
        assert torch.allclose(layer(x), x.clamp(-0.5, 0.5), atol=1e-8)
    finally:
        registry._REGISTRY.pop("test_scaled_box")


def test_register_learned_parameter_with_a_dot_in_its_name():
    # CVXPY allows "." in a name, torch's ParameterDict refused it with a bare
    # KeyError('parameter name can't contain "."') from convexddn.layer.
    @registry.register("test_dotted_learned", "argmin ||u - x||^2 s.t. u <= b.1")
    def dotted(n: int = 3, pname: str = "b.1"):
        x = cp.Parameter(n, name="x")
        b = cp.Parameter(n, name=pname)
        u = cp.Variable(n, name="u")
        return cp.Problem(cp.Minimize(cp.sum_squares(u - x)), [u <= b]), [x, b], [u], {pname: np.ones(n)}

    try:
        layer = cddn.layer("test_dotted_learned", n=3)
        assert list(layer.learned) == ["b.1"] and list(layer.state_dict()) == ["learned.b%2E1"]
        x = torch.tensor([[2.0, -1.0, 0.5]], dtype=F64)
        y = layer(x)
        torch.testing.assert_close(y, x.clamp(max=1.0).to(y.dtype), atol=1e-6, rtol=0)
        y.sum().backward()
        torch.testing.assert_close(layer.learned["b.1"].grad, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
        # The state_dict round trip and pickling keep the name and the value.
        with torch.no_grad():
            layer.learned["b.1"].fill_(0.25)
        fresh = cddn.layer("test_dotted_learned", n=3)
        fresh.load_state_dict(layer.state_dict())
        for clone in (fresh, pickle.loads(pickle.dumps(layer))):
            assert list(clone.learned) == ["b.1"] and torch.equal(clone.learned["b.1"], layer.learned["b.1"])
            assert torch.equal(clone(x), layer(x))
        # A "%" in a name is escaped too, so that escaped names cannot collide.
        other = cddn.layer("test_dotted_learned", n=3, pname="b%2E1")
        assert list(other.state_dict()) == ["learned.b%252E1"]
        # What no escaping makes a torch parameter name: refused naming the parameter.
        with pytest.raises(ProblemError, match=r"learned parameter 'keys' cannot be a torch parameter.*rename"):
            cddn.layer("test_dotted_learned", n=3, pname="keys")
    finally:
        registry._REGISTRY.pop("test_dotted_learned")


# ----------------------------------------------------------------------------- lp_ball


def l1_ball_sort(v: torch.Tensor, r: float) -> torch.Tensor:
    a = v.abs()
    inside = a.sum(-1, keepdim=True) <= r
    s, _ = a.sort(-1, descending=True)
    cs = s.cumsum(-1) - r
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = (s - cs / k > 0).sum(-1, keepdim=True)
    theta = cs.gather(-1, rho - 1) / rho
    return torch.where(inside, v, v.sign() * (a - theta).clamp(min=0))


CLOSED_FORMS = {
    1: l1_ball_sort,
    2: lambda v, r: v * (r / v.norm(dim=-1, keepdim=True)).clamp(max=1.0),
    math.inf: lambda v, r: v.clamp(-r, r),
}


@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_lp_ball_closed_form(p, batch):
    r = 1.5
    layer = cddn.layer("lp_ball", n=6, p=p, radius=r, backend="cvxpy")
    gen = torch.Generator().manual_seed(11)
    x = (2 * torch.randn(*batch, 6, dtype=F64, generator=gen)).requires_grad_()
    y = layer(x)
    ref = CLOSED_FORMS[p](x, r)
    assert y.shape == batch + (6,)
    assert torch.allclose(y, ref, atol=1e-7)
    g = torch.randn(y.shape, dtype=F64, generator=gen)
    (gy,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gy, gr, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_ball_finite_differences(p):
    layer = cddn.layer("lp_ball", n=5, p=p, backend="cvxpy")
    gen = torch.Generator().manual_seed(5)
    fd_check(layer, [2 * torch.randn(3, 5, dtype=F64, generator=gen)], 0, gen)


# ----------------------------------------------------------------------------- simplex


def sparsemax(v: torch.Tensor) -> torch.Tensor:
    s, _ = v.sort(-1, descending=True)
    cs = s.cumsum(-1) - 1
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = (s - cs / k > 0).sum(-1, keepdim=True)
    tau = cs.gather(-1, rho - 1) / rho
    return (v - tau).clamp(min=0)


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_simplex_closed_form(batch):
    layer = cddn.layer("simplex", n=5, backend="cvxpy")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*batch, 5, dtype=F64, generator=gen).requires_grad_()
    y = layer(x)
    ref = sparsemax(x)
    assert torch.allclose(y, ref, atol=1e-7)
    assert torch.allclose(y.sum(-1), torch.ones(batch, dtype=F64), atol=1e-8)
    g = torch.randn(y.shape, dtype=F64, generator=gen)
    (gy,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gy, gr, atol=1e-6)
    fd_check(layer, [x.detach()], 0, gen)


# ----------------------------------------------------------------------------- birkhoff


def cvxpy_solve(spec, values):
    for prm, val in zip(spec.parameters, values):
        prm.value = np.asarray(val, dtype=np.float64)
    spec.problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return [np.asarray(v.value) for v in spec.variables]


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_birkhoff_independent_solve(batch):
    n = 3
    layer = cddn.layer("birkhoff", n=n)
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(*batch, n, n, dtype=F64, generator=gen)
    Y = layer(X)
    assert Y.shape == batch + (n, n)
    assert torch.allclose(Y.sum(-1), torch.ones(batch + (n,), dtype=F64), atol=1e-7)
    assert torch.allclose(Y.sum(-2), torch.ones(batch + (n,), dtype=F64), atol=1e-7)
    spec = registry.build("birkhoff", n=n)
    flat_X, flat_Y = X.reshape(-1, n, n), Y.reshape(-1, n, n)
    for i in range(flat_X.shape[0]):
        (ref,) = cvxpy_solve(spec, [flat_X[i].numpy()])
        assert np.abs(flat_Y[i].numpy() - ref).max() < 1e-6


def test_birkhoff_finite_differences():
    layer = cddn.layer("birkhoff", n=3)
    gen = torch.Generator().manual_seed(8)
    fd_check(layer, [torch.randn(2, 3, 3, dtype=F64, generator=gen)], 0, gen)


# ----------------------------------------------------------------------------- robust_pool


def pool_reference(x: np.ndarray, penalty: str, alpha: float) -> float:
    """Minimise the 1-D convex objective by bisection on its derivative."""
    dphi = {
        "quadratic": lambda z: z,
        "pseudo_huber": lambda z: z / np.sqrt(1 + (z / alpha) ** 2),
        "huber": lambda z: np.clip(z, -alpha, alpha),
    }[penalty]
    lo, hi = x.min(), x.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if dphi(mid - x).sum() > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def pool_weights(x, y, penalty, alpha):
    """Table 1 of Gould et al.: dy/dxᵢ = φ''(y − xᵢ) / Σⱼ φ''(y − xⱼ)."""
    z = y.unsqueeze(-1) - x
    w = {
        "quadratic": torch.ones_like(z),
        "pseudo_huber": (1 + (z / alpha) ** 2) ** -1.5,
        "huber": (z.abs() <= alpha).to(z.dtype),
    }[penalty]
    return w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("penalty", ["quadratic", "pseudo_huber", "huber"])
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_robust_pool_independent_solve_and_table1_gradient(penalty, batch):
    alpha, n = 1.0, 7
    layer = cddn.layer("robust_pool", n=n, penalty=penalty, alpha=alpha, backend="cvxpy")
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(*batch, n, dtype=F64, generator=gen)
    x[..., 0] += 6.0  # an outlier
    x.requires_grad_()
    y = layer(x)
    assert y.shape == batch
    flat = x.detach().reshape(-1, n).numpy()
    ref = torch.tensor([pool_reference(r, penalty, alpha) for r in flat], dtype=F64).reshape(batch)
    assert torch.allclose(y, ref, atol=1e-7)
    if penalty == "quadratic":
        assert torch.allclose(y, x.mean(-1), atol=1e-8)
    g = torch.randn(batch, dtype=F64, generator=gen)
    (gx,) = torch.autograd.grad(y, x, g)
    want = g.unsqueeze(-1) * pool_weights(x.detach(), ref, penalty, alpha)
    assert torch.allclose(gx, want, atol=1e-6)


@pytest.mark.parametrize("penalty", ["pseudo_huber", "huber"])
def test_robust_pool_finite_differences(penalty):
    layer = cddn.layer("robust_pool", n=6, penalty=penalty, alpha=0.7, backend="cvxpy")
    gen = torch.Generator().manual_seed(1)
    fd_check(layer, [torch.randn(3, 6, dtype=F64, generator=gen)], 0, gen)


@pytest.mark.parametrize("penalty, finds", [("welsch", "a local minimiser \\(not certified global\\)"),
                                             ("trunc_quad", "its global minimiser")])
def test_robust_pool_invalid_nonconvex(penalty, finds):
    # The message promised Welsch's global minimiser too; the native node finds a local one.
    with pytest.raises(NonconvexError, match=rf"'{penalty}' is nonconvex.*convexddn.RobustPool.*finds {finds}"):
        registry.build("robust_pool", n=4, penalty=penalty)


def test_robust_pool_invalid_options():
    with pytest.raises(OptionError, match=r"penalty must be one of \['quadratic', 'pseudo_huber', 'huber'\]"):
        registry.build("robust_pool", n=4, penalty="cauchy")
    with pytest.raises(OptionError, match="alpha must be finite and > 0, got 0"):
        registry.build("robust_pool", n=4, penalty="huber", alpha=0)


# ----------------------------------------------------------------------------- qp


def qp_data(gen, batch, n=4, m=3, p=1):
    L = torch.randn(*batch, n, n, dtype=F64, generator=gen) / 2 + torch.eye(n, dtype=F64)
    q = torch.randn(*batch, n, dtype=F64, generator=gen)
    G = torch.randn(*batch, m, n, dtype=F64, generator=gen)
    h = torch.rand(*batch, m, dtype=F64, generator=gen) * 0.2
    A = torch.randn(*batch, p, n, dtype=F64, generator=gen)
    b = torch.randn(*batch, p, dtype=F64, generator=gen) * 0.2
    return [L, q, G, h, A, b]


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)])
def test_qp_independent_solve(batch):
    layer = cddn.layer("qp", n=4, n_ineq=3, n_eq=1)
    gen = torch.Generator().manual_seed(21)
    data = qp_data(gen, batch)
    y = layer(*data)
    assert y.shape == batch + (4,)
    spec = registry.build("qp", n=4, n_ineq=3, n_eq=1)
    flat = [d.reshape((-1,) + d.shape[len(batch):]) for d in data]
    for i in range(flat[0].shape[0]):
        (ref,) = cvxpy_solve(spec, [d[i].numpy() for d in flat])
        assert np.abs(y.reshape(-1, 4)[i].numpy() - ref).max() < 1e-6


def test_qp_finite_differences_every_parameter():
    layer = cddn.layer("qp", n=4, n_ineq=3, n_eq=1)
    gen = torch.Generator().manual_seed(22)
    data = qp_data(gen, (3,))
    for k in range(len(data)):
        fd_check(layer, data, k, gen)


def test_qp_unconstrained_closed_form():
    """argmin ½uᵀLLᵀu + qᵀu = −(LLᵀ)⁻¹q, differentiated by torch."""
    layer = cddn.layer("qp", n=3, inputs="Lq")
    gen = torch.Generator().manual_seed(3)
    L = (torch.randn(3, 3, dtype=F64, generator=gen) + 2 * torch.eye(3, dtype=F64)).requires_grad_()
    q = torch.randn(2, 3, dtype=F64, generator=gen).requires_grad_()  # batched q, shared L
    y = layer(L, q)
    ref = -torch.linalg.solve(L @ L.T, q.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(y, ref, atol=1e-8)
    g = torch.randn(2, 3, dtype=F64, generator=gen)
    for got, want in zip(torch.autograd.grad(y, (L, q), g), torch.autograd.grad(ref, (L, q), g)):
        assert torch.allclose(got, want, atol=1e-6)


# (learn=() with every block a constant has no parameter: an OptionError, test_qp_learn.py)
@pytest.mark.parametrize("learn", ["L", "q", "Gh", "Ab", "LqGhAb"])
def test_qp_every_learn_choice_is_dpp(learn):
    G = np.eye(4)[:3]
    spec = registry.build("qp", n=4, n_ineq=3, n_eq=1, learn=learn, ridge=0.1,
                          L=np.eye(4), q=np.ones(4), G=G, h=np.ones(3),
                          A=np.ones((1, 4)), b=np.ones(1))
    assert spec.problem.is_dpp()
    assert [p.name() for p in spec.parameters] == [k for k in "LqGhAb" if k in learn]


def test_qp_invalid_options():
    with pytest.raises(OptionError, match=r"learn must name blocks among .*got \['Z'\]"):
        registry.build("qp", n=3, learn="Z")
    with pytest.raises(OptionError, match=r"G is not learned.*shape \(2, 3\)"):
        registry.build("qp", n=3, n_ineq=2, learn="q")
    with pytest.raises(OptionError, match=r"option h must have shape \(2,\), got \(3,\)"):
        registry.build("qp", n=3, n_ineq=2, learn="q", G=np.ones((2, 3)), h=np.ones(3))
    with pytest.raises(OptionError, match="ridge must be finite and >= 0, got -1"):
        registry.build("qp", n=3, ridge=-1)


def test_qp_block_values_must_be_real_numbers():
    # A tensor that requires grad raised torch's RuntimeError (numpy() of it), strings a
    # ValueError, an object a TypeError, and a complex value lost its imaginary part with
    # a mere ComplexWarning.
    shape = r"option L must be an array of real numbers of shape \(2, 2\)"
    with pytest.raises(OptionError, match=shape + r" \(a constant of the problem\), got a tensor that requires "
                       r"grad.*L.detach\(\).*learn='L'.*inputs='L'"):
        registry.build("qp", n=2, inputs="q", L=torch.eye(2, requires_grad=True))
    with pytest.raises(OptionError, match=shape + r", got strings: \[\['a', 'b'\], \['c', 'd'\]\]"):
        registry.build("qp", n=2, inputs="q", L=[["a", "b"], ["c", "d"]])
    with pytest.raises(OptionError, match=shape + ", got an entry <object.* of type object"):
        registry.build("qp", n=2, inputs="q", L=object())
    with pytest.raises(OptionError, match=shape + ", got an entry None of type NoneType"):
        registry.build("qp", n=2, inputs="q", L=[[1.0, None], [0.0, 1.0]])
    with pytest.raises(OptionError, match=shape + r", got a list that is not one \(.*inhomogeneous"):
        registry.build("qp", n=2, inputs="q", L=[[1.0, 0.0], [1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning on the way to the error
        with pytest.raises(OptionError, match=shape + r", got complex values \(complex128\); pass its real part"):
            registry.build("qp", n=2, inputs="q", L=np.eye(2) * 1j)
        with pytest.raises(OptionError, match=shape + r", got a complex tensor \(torch.complex64\)"):
            registry.build("qp", n=2, inputs="q", L=torch.eye(2) * 1j)
    # Real values of any numeric kind are read; a tensor that needs no gradient is data.
    for value in (torch.eye(2), np.eye(2, dtype=np.int64), [[True, False], [False, True]],
                  [[decimal.Decimal(1), 0], [0, decimal.Decimal('1.5')]],
                  np.array([[1, 0], [0, 1]], dtype=object)):
        spec = registry.build("qp", n=2, inputs="q", L=value)
        assert [p.name() for p in spec.parameters] == ["q"]
    # A learned block's value only initialises its nn.Parameter: a tensor that requires
    # grad (another layer's parameter, say) is detached, not refused.
    start = torch.nn.Parameter(2 * torch.eye(2))
    spec = registry.build("qp", n=2, learn="L", inputs="q", L=start)
    assert np.array_equal(spec.learned["L"], 2 * np.eye(2))
    assert cddn.layer("qp", n=2, learn="L", inputs="q", L=start).learned["L"].data_ptr() != start.data_ptr()


# Issue 9's target: every registry problem on the batched path at batch 1024, no element
# sent to the per-element fallback (ot_entropic's exponential cone is per element by
# design). Birkhoff n = 4 with this seed once sent element 337 to the fallback: a weakly
# active entry left at 1e-6 that LU polishing could not remove, because the redundant
# row/column-sum constraints made its Newton matrix singular.
BATCH_1024 = [
    ("birkhoff", {"n": 4}), ("entmax", {"n": 8}), ("lp_ball", {"n": 16, "p": 1}),
    ("lp_ball", {"n": 16, "p": 2}), ("lp_ball", {"n": 16, "p": math.inf}), ("ot_lp", {"m": 4, "n": 4}),
    ("qp", {"n": 10, "n_ineq": 5, "n_eq": 2}), ("robust_pool", {"n": 16, "penalty": "huber"}),
    ("robust_pool", {"n": 16, "penalty": "pseudo_huber"}), ("simplex", {"n": 16}), ("sparsemax", {"n": 16}), ("tv1d", {"n": 16}),
]


@pytest.mark.parametrize("name, options", BATCH_1024, ids=lambda v: v if isinstance(v, str) else None)
def test_registry_batch_1024_needs_no_fallback(name, options):
    layer = cddn.layer(name, backend="cvxpy", **options)
    gen = torch.Generator().manual_seed(0)  # the default generator's seed-0 stream
    params = [torch.randn(1024, *p.shape, dtype=F64, generator=gen) for p in layer.parameters_]
    if name == "ot_lp":  # marginals: positive, unit mass
        params[1], params[2] = params[1].softmax(-1), params[2].softmax(-1)
    layer(*params)
    solvers = layer.last_solve.solvers  # "batched": the torch iterations themselves
    assert solvers.count("batched") == 1024, [i for i, s in enumerate(solvers) if s != "batched"]


# ----------------------------------------------------------------------------- audit fixes


def test_register_catalog_name_before_the_catalog_loads_is_refused_at_once():
    """A fresh process: registering "simplex" before anything loaded the catalog used to
    be accepted, and then every names()/build()/layer() raised "already registered"."""
    import subprocess
    import sys

    script = """
import cvxpy as cp
import convexddn as cddn
from convexddn import registry
from convexddn.errors import OptionError
try:
    @registry.register("simplex", "my own simplex")
    def my_simplex(n: int):
        x = cp.Parameter(n, name="x"); y = cp.Variable(n)
        return cp.Problem(cp.Minimize(cp.sum_squares(y - x))), [x], [y]
except OptionError as err:
    print("REFUSED", err)
assert "simplex" in registry.names() and "qp" in registry.names()
assert registry.describe("simplex").startswith("Euclidean projection")
print("USABLE", type(cddn.layer("qp", n=2)).__name__)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED problem name 'simplex' is already registered" in run.stdout
    assert "convexddn.problems.projection.simplex" in run.stdout
    assert "USABLE ConvexLayer" in run.stdout


def test_register_same_definition_again_replaces_it():
    # A module run again (importlib.reload) registers a new function object of the
    # same definition: that is not a clash.
    def make():
        def reloaded_box(n: int):
            x = cp.Parameter(n, name="x")
            u = cp.Variable(n, name="u")
            return cp.Problem(cp.Minimize(cp.sum_squares(u - x))), [x], [u]
        return reloaded_box

    try:
        registry.register("test_reloaded_box", "test only")(make())
        second = make()
        registry.register("test_reloaded_box", "test only")(second)
        assert registry._REGISTRY["test_reloaded_box"].builder is second
    finally:
        registry._REGISTRY.pop("test_reloaded_box", None)


def test_layer_entmax_large_alpha_native_without_building_the_cone_form():
    # CVXPY writes p**alpha with a fraction of bounded denominator; with the default
    # (1024) alpha above ~2048 raised ZeroDivisionError, the registry now tries larger
    # ones (up to 2^32), and beyond (1e10) says so. The native node needs no cone form
    # and layer() does not build it.
    node = cddn.layer("entmax", n=3, alpha=1e5)
    assert not isinstance(node, cddn.ConvexLayer)
    x = torch.tensor([0.3, -0.1, 0.2], dtype=F64)
    # Closed form: (alpha - 1)(x_0 - x_2) = 0.1 (1e5 - 1) >= 1, so only x_0 is in the support.
    torch.testing.assert_close(node(x), torch.tensor([1.0, 0.0, 0.0], dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CVXPY's note on its rational approximation
        cone = cddn.layer("entmax", n=3, alpha=1e5, backend="cvxpy")
        torch.testing.assert_close(cone(x), torch.tensor([1.0, 0.0, 0.0], dtype=F64), atol=1e-8, rtol=0)
    spec = registry.build("entmax", n=3, alpha=1e10)  # options checked, problem deferred
    assert spec.parameter_shapes == {"x": (3,)}
    with pytest.raises(OptionError, match=r"alpha = 10000000000.0 has no cone form close enough"):
        spec.problem
    with pytest.raises(OptionError, match=r"alpha = 10000000000.0 has no cone form"):
        cddn.layer("entmax", n=3, alpha=1e10, backend="cvxpy")


def test_registry_deferred_problem_is_built_once():
    spec = registry.build("lp_ball", n=3)
    assert spec.problem is spec.problem and spec.problem.is_dpp()


@pytest.mark.parametrize("name, options, match", [
    ("qp", {"n": 2, "ridge": float("inf")}, r"ridge must be finite and >= 0, got inf"),
    ("qp", {"n": 2, "ridge": float("nan")}, r"ridge must be finite and >= 0, got nan"),
    ("tv1d", {"n": 3, "lam": float("inf")}, r"lam must be finite and >= 0, got inf"),
    ("lp_ball", {"n": 3, "radius": torch.tensor([2.0, 3.0])}, r"radius must be a number .* got a tensor of shape \(2,\)"),
    ("lp_ball", {"n": 3, "radius": torch.tensor(2.0)}, r"radius must be a number .* got a tensor of shape \(\)"),
    ("robust_pool", {"n": 3, "penalty": "huber", "alpha": torch.tensor([1.0, 2.0])}, r"alpha must be a number"),
    ("ot_entropic", {"m": 2, "n": 2, "eps": torch.tensor([1.0, 2.0])}, r"eps must be a number"),
    ("entmax", {"n": 3, "alpha": "2"}, r"alpha must be a number > 1, got '2' \(alpha = 1 is softmax"),
    ("entmax", {"n": 3, "alpha": 1.0}, r"alpha must be finite and > 1, got 1.0"),
    ("lp_ball", {"n": 3, "radius": 10**400}, r"radius must be finite and > 0, got 1000"),  # was OverflowError
])
@pytest.mark.parametrize("backend", ["auto", "cvxpy"])
def test_registry_numeric_options_invalid(name, options, match, backend):
    with pytest.raises(OptionError, match=match):
        cddn.layer(name, backend=backend, **options)


def test_registry_numeric_options_accept_numpy_scalars():
    assert registry.build("qp", n=2, ridge=np.float32(0.5)).options["ridge"] == 0.5
    layer = cddn.layer("qp", n=2, ridge=np.float32(0.5))
    y = layer(torch.eye(2, dtype=F64), torch.ones(2, dtype=F64))  # (L Lᵀ + ρ I) y = −q
    torch.testing.assert_close(y, torch.full((2,), -1 / 1.5, dtype=F64), atol=1e-7, rtol=0)
    for name, opts in (("tv1d", {"n": 3, "lam": np.float32(0.5)}), ("lp_ball", {"n": 3, "radius": np.float64(2)}),
                       ("ot_entropic", {"m": 2, "n": 2, "eps": np.float32(0.5)}), ("entmax", {"n": 3, "alpha": np.float32(1.5)})):
        assert registry.build(name, **opts).problem.is_dpp()


def test_registry_importable_under_its_documented_name():
    # The API page is titled convexddn.registry: both import forms reach the one module
    # (one table of problems), the same object as the package attribute.
    import importlib

    import convexddn

    mod = importlib.import_module("convexddn.registry")
    from convexddn.registry import build, names  # noqa: F401

    assert mod is convexddn.registry is importlib.import_module("convexddn.convex.registry")
    assert build is mod.build and "qp" in names()


def test_register_refuses_options_named_like_build_and_layer_arguments():
    # build(name, **options) and layer(name, backend=..., **options): an option called
    # name or backend was registered, then failed as a raw TypeError ("multiple values for
    # argument 'name'") or as layer's own backend check.
    def with_name(n: int, name: float = 1.0):
        raise AssertionError("not called")

    def with_backend(n: int, backend: float = 1.0):
        raise AssertionError("not called")

    for builder, reserved in ((with_name, "name"), (with_backend, "backend")):
        with pytest.raises(OptionError, match=rf"has option\(s\) \['{reserved}'\], names that build\(\) and "
                           r"convexddn.layer\(\) take themselves"):
            registry.register("test_reserved", "never registered")(builder)
        assert "test_reserved" not in registry.names()


@pytest.mark.parametrize("f", [registry.describe, registry.option_names, registry.build])
@pytest.mark.parametrize("name", [["qp"], ("qp",), None])
def test_registry_name_must_be_a_string(f, name):
    # A list raised a raw TypeError (unhashable) from the registry's lookup.
    with pytest.raises(OptionError, match=r"^name must be a problem name \(a str\) among \[.*'qp'.*\], got"):
        f(name)


@pytest.mark.parametrize("name, options, option", [
    ("birkhoff", {"n": 10**400}, "n"),
    ("qp", {"n": 3, "rank": 10**400}, "rank"),
    ("qp", {"n": 3, "n_ineq": 2**31}, "n_ineq"),
    ("qp", {"n": 3, "n_eq": 2**31}, "n_eq"),
    ("tv1d", {"n": 10**400}, "n"),
    ("simplex", {"n": 10**400}, "n"),
    ("ot_lp", {"m": 10**400, "n": 3}, "m"),
])
@pytest.mark.parametrize("backend", ["cvxpy", "auto"])
def test_registry_sizes_are_bounded_by_an_index(name, options, option, backend):
    # Raw numpy ("Maximum allowed dimension exceeded") or OverflowError before; the native
    # layer("simplex", n=10**400) was built silently.
    with pytest.raises(OptionError, match=rf"^{option} must be an integer >= \d and <= 2147483647, got"):
        cddn.layer(name, backend=backend, **options)


@pytest.mark.parametrize("block", ["G", "q"])
@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_qp_blocks_must_be_dense_tensors_with_data(block, kind):
    shape = {"G": (2, 3), "q": (3,)}[block]
    value = torch.ones(shape, device="meta") if kind == "meta" else torch.ones(shape).to_sparse()
    # .numpy() raised torch's NotImplementedError (meta) or TypeError (sparse).
    with pytest.raises(cddn.errors.InputError, match=rf"^option {block} (is on the meta device|must be a dense)"):
        registry.build("qp", n=3, n_ineq=2, **{block: value})


_SMALL = {"ot_entropic": {"m": 2, "n": 3}, "ot_lp": {"m": 2, "n": 3}, "qp": {"n": 3, "n_ineq": 2},
          "birkhoff": {"n": 3}}


@pytest.mark.parametrize("name", registry.names())
@pytest.mark.parametrize("how", ["context", "set"])
def test_cone_program_layers_build_under_a_meta_default_device(name, how, default_device):
    """Every cone-program layer of the registry builds under torch.device("meta") and
    under torch.set_default_device("meta") (as under a CUDA default device): the
    canonicalisation's host-side index maps followed the default device, and .numpy()
    on them raised torch's TypeError ("can't convert meta device type tensor to numpy")."""
    options = _SMALL.get(name, {"n": 3})
    with default_device("meta", how):
        cddn.layer(name, backend="cvxpy", **options)
