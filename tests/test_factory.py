"""``convexddn.layer``'s two backends of one registry problem take the same calls:
the same binding of the input (and its errors), the same masked scores."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import InputError, ShapeError

F64 = torch.float64
NEG_INF = float("-inf")


@pytest.mark.parametrize("backend", ["auto", "cvxpy"])
def test_registry_layer_binds_its_input_like_the_cone_layer(backend):
    # The native node (RegistryNode) raised a raw TypeError ("forward() takes 2
    # positional arguments but 3 were given") where the ConvexLayer names its parameters.
    layer = cddn.layer("lp_ball", n=3, backend=backend)
    x = torch.tensor([3.0, 0.0, 4.0], dtype=F64)
    with pytest.raises(ShapeError, match=r"^expected 1 tensor\(s\), one per parameter \['x'\], got 2$"):
        layer(x, x)
    with pytest.raises(ShapeError, match=r"got 0; missing \['x'\]"):
        layer()
    with pytest.raises(ShapeError, match=r"unknown parameter name 'y'; the parameters are \['x'\]"):
        layer(y=x)
    with pytest.raises(ShapeError, match=r"parameter 'x' was given both by position \(0\) and by name"):
        layer(x, x=x)
    # By position or by name: the projection onto the unit ball, x / ‖x‖ = (0.6, 0, 0.8).
    want = torch.tensor([0.6, 0.0, 0.8], dtype=F64)
    assert torch.allclose(layer(x), want, atol=1e-7) and torch.allclose(layer(x=x), want, atol=1e-7)


@pytest.mark.parametrize("backend", ["auto", "cvxpy"])
def test_entmax_masks_neg_inf_scores_on_both_backends(backend):
    """The native node masks -inf (probability 0); the cone program refused it with a
    NonFiniteError. Closed forms on the finite entries {1, 0.5}: sparsemax τ = 0.25,
    p = (0.75, 0, 0.25), Jacobian I − 11ᵀ/2 on the support; 1.5-entmax p_i = (x_i/2 − τ)²
    with (a)² + (a − 1/4)² = 1, a = 1/2 − τ = (1/2 + √7.75)/4."""
    x = torch.tensor([[1.0, NEG_INF, 0.5], [NEG_INF, 0.5, 1.0]], dtype=F64, requires_grad=True)
    p = cddn.layer("sparsemax", n=3, backend=backend)(x)
    assert torch.allclose(p, torch.tensor([[0.75, 0.0, 0.25], [0.0, 0.25, 0.75]], dtype=F64), atol=1e-7)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    (grad,) = torch.autograd.grad((p * w).sum(), x)
    # w_S − mean(w_S) on the support, 0 at the masked entries.
    assert torch.allclose(grad, torch.tensor([[-1.0, 0.0, 1.0], [0.0, -0.5, 0.5]], dtype=F64), atol=1e-6)
    a = (0.5 + 7.75 ** 0.5) / 4
    p = cddn.layer("entmax", n=3, alpha=1.5, backend=backend)(x.detach()[:1])
    assert torch.allclose(p, torch.tensor([[a * a, 0.0, (a - 0.25) ** 2]], dtype=F64), atol=1e-7)
    with pytest.raises(InputError, match=r"1 row\(s\) .*all -inf"):
        cddn.layer("sparsemax", n=3, backend=backend)(torch.tensor([[0.0, 1.0, 2.0], [NEG_INF] * 3]))


@pytest.mark.parametrize("name, options", [("sparsemax", {}), ("entmax", {"alpha": 1.5})])
def test_masked_scores_stay_masked_at_large_float32_scores(name, options):
    """float32 scores of 1e8, whose ulp is 8: the stand-in top - 2/(alpha - 1) rounded back
    to top, and each masked entry got a third of the mass. Expected: the one finite top
    score takes it all (the others are 2e8 below)."""
    layer = cddn.layer(name, n=4, backend="cvxpy", **options)
    p = layer(torch.tensor([[1e8, -math.inf, -1e8, -math.inf]]))
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sparsemax", "entmax"])
@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_masked_scores_layer_checks_its_input_before_masking(name, kind):
    # The -inf masking read x first: a meta tensor raised torch's RuntimeError (.item()).
    layer = cddn.layer(name, n=4, backend="cvxpy")
    x = torch.zeros(3, 4, dtype=torch.float64)
    x = x.to("meta") if kind == "meta" else x.to_sparse()
    with pytest.raises(InputError, match=r"^parameter 0 \(\w+\) (is on the meta device|must be a dense)"):
        layer(x)


def test_ot_entropic_backends_return_the_promoted_dtype():
    """float16 costs with float64 marginals: the native backend returned a float16 plan,
    the cone program a float64 one. Both compute in the promoted dtype now, and agree."""
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(1, 3, 4, dtype=F64, generator=gen).half()
    a, b = torch.tensor([[0.2, 0.3, 0.5]], dtype=F64), torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=F64)
    plans = [cddn.layer("ot_entropic", m=3, n=4, eps=0.5, backend=be)(C, a, b) for be in ("native", "cvxpy")]
    assert [p.dtype for p in plans] == [F64, F64]
    assert torch.allclose(plans[0], plans[1], atol=1e-6)
    # The float64 plan of the float16 costs' values: the float64 native call.
    ref = cddn.layer("ot_entropic", m=3, n=4, eps=0.5, backend="native")(C.double(), a, b)
    assert torch.equal(plans[0], ref)


def test_ot_entropic_float16_costs_gradient_overflow_warns():
    """Cast to the promoted dtype by a plain .to(), a float16 C's gradient beyond float16's
    range came back as Inf with no warning (sinkhorn's own checked cast warned before)."""
    from convexddn.errors import GradientWarning

    lay = cddn.layer("ot_entropic", m=4, n=4, eps=1.0)
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(4, 4, generator=gen).half()
    a, b = torch.full((8, 4), 0.25, dtype=F64), torch.full((8, 4), 0.25, dtype=F64)
    g = torch.randn(8, 4, 4, dtype=F64, generator=gen) * 1e6
    Cx = C.clone().requires_grad_(True)
    with pytest.warns(GradientWarning, match=r"\bC\b"):
        (lay(Cx, a, b) * g).sum().backward()
    C64 = C.double().requires_grad_(True)
    (lay(C64, a, b) * g).sum().backward()
    big = C64.grad.abs() > torch.finfo(torch.float16).max
    assert big.any() and torch.isinf(Cx.grad[big]).all()
    assert torch.allclose(Cx.grad[~big].double(), C64.grad[~big], rtol=1e-3, atol=1.0)


def test_ot_entropic_is_native_and_both_backends_share_one_gradient():
    """layer("ot_entropic") returned the cone program (1.2 s for 16 plans of 8 x 8 against
    1.3 ms for OptimalTransport) and backend="native" said it had no native node. Both
    backends now take (C, a, b) and give the registry's gradient: b's last entry is implied
    (Σa − Σ_{j<n} b_j), so dL/db_n = 0, dL/db_j = dL/dδ along b + δ(e_j − e_n) and
    dL/da_i = dL/dδ along (a + δe_i, b + δe_n): central differences of the plan (float64,
    mass-preserving moves, so the finite difference is of the problem itself)."""
    from convexddn.nodes.transport import sinkhorn

    native = cddn.layer("ot_entropic", m=2, n=3, eps=0.5)
    assert not isinstance(native, cddn.ConvexLayer)
    assert not isinstance(cddn.layer("ot_entropic", m=2, n=3, eps=0.5, backend="native"), cddn.ConvexLayer)
    cone = cddn.layer("ot_entropic", m=2, n=3, eps=0.5, backend="cvxpy")
    gen = torch.Generator().manual_seed(0)
    C, W = torch.rand(2, 3, dtype=F64, generator=gen), torch.randn(2, 3, dtype=F64, generator=gen)
    a0, b0 = torch.tensor([0.4, 0.6], dtype=F64), torch.tensor([0.2, 0.3, 0.5], dtype=F64)

    def loss(a, b):
        return float((sinkhorn(C, a, b, eps=0.5) * W).sum())

    h, want_a, want_b = 1e-6, torch.zeros(2, dtype=F64), torch.zeros(3, dtype=F64)
    e2, e3 = torch.eye(2, dtype=F64), torch.eye(3, dtype=F64)
    for i in range(2):
        want_a[i] = (loss(a0 + h * e2[i], b0 + h * e3[2]) - loss(a0 - h * e2[i], b0 - h * e3[2])) / (2 * h)
    for j in range(2):
        want_b[j] = (loss(a0, b0 + h * (e3[j] - e3[2])) - loss(a0, b0 - h * (e3[j] - e3[2]))) / (2 * h)
    plans = []
    for layer in (native, cone):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        P = layer(C, a=a, b=b)
        ga, gb = torch.autograd.grad((P * W).sum(), (a, b))
        torch.testing.assert_close(ga, want_a, atol=1e-6, rtol=0)
        torch.testing.assert_close(gb, want_b, atol=1e-6, rtol=0)
        plans.append(P.detach())
    torch.testing.assert_close(plans[0], plans[1], atol=1e-8, rtol=0)
    torch.testing.assert_close(plans[0].sum(-1), a0, atol=1e-12, rtol=0)
    with pytest.raises(InputError, match=r"equal mass"):
        native(C, a0, b0 * 2)


@pytest.mark.parametrize("name, options", [("sparsemax", {}), ("entmax", {"alpha": 1.5})])
def test_masked_scores_stand_in_does_not_overflow(name, options):
    """The stand-in top − 2/(alpha − 1) − 4 eps |top| was computed in the scores' dtype: for
    float16 scores of −65504 it became −inf and the cone program refused the caller's legal
    input (NonFiniteError); float32 −3.3e38 and float64 −1.7e308 failed in the solver.
    Closed forms: two equal finite scores share the mass, p = (1/2, 0, 1/2), Jacobian
    diag(s) − ssᵀ/Σs on the support, s_i = p_i^(2 − alpha) (Peters et al. 2019); a finite
    score 2·big below the top one gets p = 0."""
    layer = cddn.layer(name, n=3, backend="cvxpy", **options)
    s = 0.5 ** (2.0 - options.get("alpha", 2.0))
    want = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]], dtype=F64)
    w = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=F64)
    for dtype, big in [(torch.float16, 65504.0), (torch.float32, 3.3e38), (F64, 1.7e308)]:
        x = torch.tensor([[-big, NEG_INF, -big], [big, NEG_INF, -big]], dtype=dtype, requires_grad=True)
        p = layer(x)
        assert p.dtype == dtype
        torch.testing.assert_close(p, want.to(dtype), atol=1e-6, rtol=0)
        (grad,) = torch.autograd.grad((p * w.to(dtype)).sum(), x)
        torch.testing.assert_close(grad, torch.tensor([[-s, 0.0, s], [0.0, 0.0, 0.0]], dtype=dtype), atol=1e-3, rtol=0)


def _ball_projection(x: torch.Tensor, p: float, r: float) -> torch.Tensor:
    """Closed forms: p = 2 scales, p = ∞ clips, p = 1 soft-thresholds at τ with Σ(|x| − τ)_+ = r."""
    if p == 2:
        return r * x / x.norm()
    if math.isinf(p):
        return x.clamp(-r, r)
    u = x.abs().sort(descending=True).values
    c = u.cumsum(0)
    k = max(i for i in range(len(u)) if u[i] > (c[i] - r) / (i + 1))
    return x.sign() * (x.abs() - (c[k] - r) / (k + 1)).clamp(min=0)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_ball_cone_program_keeps_relative_accuracy_at_small_radius(p):
    """The cone program of radius 1e-10 lost all relative accuracy (errors 0.2 to 0.9 of r, a
    p = 2 Jacobian of 0 for r/|x| (I − uuᵀ) ≈ 4e-11), silently: the solvers' tolerances are
    absolute. Now it is solved at radius 1 on x / r (exact for a norm ball). Where |x|/r itself
    passes tol/eps (here 2e10) a SolverWarning says that float64 fixes the projection to about
    eps |x|/r of r only (4.4e-6; the result is still 8e-8 here); not for p = ∞ (a clamp: exact)."""
    import warnings

    base = torch.tensor([0.3, -1.2, 2.0, 0.5], dtype=F64)
    r = 1e-10
    for x, warns in ((1e-9 * base, False), (base, True)):
        layer = cddn.layer("lp_ball", n=4, p=p, radius=r, backend="cvxpy")
        xx = x.clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(xx)
        assert [w.category for w in caught] == ([cddn.errors.SolverWarning] if warns and p != math.inf else [])
        assert float((y.detach() - _ball_projection(x, p, r)).abs().max()) <= 1e-6 * r
        if p == 2:  # J = r/|x| (I − uuᵀ), u = x/|x|
            u = x / x.norm()
            want = r / x.norm() * (torch.eye(4, dtype=F64) - torch.outer(u, u))
            J = torch.stack([torch.autograd.grad(y[i], xx, retain_graph=True)[0] for i in range(4)])
            assert float((J - want).abs().max()) <= 1e-6 * float(want.abs().max())


def _ball_reference(x: list[float], p: float, r: float) -> list[float]:
    """The closed forms in Python floats at the data's own scale (math.hypot does not
    overflow at |x| ~ 1e300, nor underflow at 1e-300): no rescaling, unlike the layer."""
    if p == 2:
        norm = math.hypot(*x)
        return list(x) if norm <= r else [r * (v / norm) for v in x]
    if math.isinf(p):
        return [min(max(v, -r), r) for v in x]
    if sum(abs(v) for v in x) <= r:
        return list(x)
    u, c = sorted((abs(v) for v in x), reverse=True), 0.0
    for i, v in enumerate(u):  # τ = (Σ_{j<=k} u_j − r)/(k + 1) for the last k with u_k > τ_k
        c += v
        if v > (c - r) / (i + 1):
            tau = (c - r) / (i + 1)
    return [math.copysign(max(abs(v) - tau, 0.0), v) for v in x]


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_ball_cone_program_at_any_radius(p):
    """Radii of 1e160 and more failed for x inside the ball (p = 2: SolverError 'Clarabel:
    Solved (KKT residual 1.0e+00 > tol)'; r² overflows float64): only radii below 1 were
    rescaled. Now every radius is solved at r / s in [1, 2), s a power of two. Points inside,
    on the boundary side and outside the ball, at the radius' scale, and O(1) points inside
    huge balls, against the closed forms; an x / s below float64's normal range is x, silently."""
    base = [0.3, -1.2, 2.0, 0.5]
    for r in (1e-300, 1e-150, 1e-10, 1.0, 3.0, 1e10, 1e160, 1e300):
        layer = cddn.layer("lp_ball", n=4, p=p, radius=r, backend="cvxpy")
        rows = [[c * r * v for v in base] for c in (0.1, 0.45, 3.0)]
        rows += [base] if r >= 1e10 else []
        got = layer(torch.tensor(rows, dtype=F64))
        for row, y in zip(rows, got.tolist()):
            want = _ball_reference(row, p, r)
            scale = max(abs(v) for v in want)
            assert max(abs(a - b) for a, b in zip(y, want)) <= 1e-7 * scale, (r, row, y, want)
    layer = cddn.layer("lp_ball", n=4, p=p, radius=1e300, backend="cvxpy")
    x = torch.tensor([1e-10 * v for v in base], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(layer(x), x)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_ball_cone_program_returns_points_inside_exactly(p):
    """p = 1, n = 8: x = 0 came back as -1.18e-48 r in every entry (-1.18e252 at r = 1e300,
    -inf in float32 at r = 1e100), silently, and x ~ 1e-30 at r = 1e300 as -1.18e252 with a
    warning about subnormals: the cone program's absolute error (~1e-48 at radius O(1)) was
    scaled by s ~ r. A row inside the ball is x (closed form: P(x) = x, Jacobian I), a row
    outside as before, against the closed forms, with no warning."""
    torch.manual_seed(0)
    tiny = torch.randn(8, dtype=F64) * 1e-30
    for dtype, r in ((F64, 1.0), (F64, 1e100), (F64, 1e300), (torch.float32, 1e100), (torch.float32, 1e300)):
        layer = cddn.layer("lp_ball", n=8, p=p, radius=r, backend="cvxpy")
        x = torch.stack([torch.zeros(8, dtype=F64), tiny]).to(dtype).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = layer(x)
        assert torch.equal(y.detach(), x.detach()), (dtype, r, y)
        (g,) = torch.autograd.grad(y, x, torch.arange(16.0, dtype=dtype).view(2, 8))
        assert torch.equal(g, torch.arange(16.0, dtype=dtype).view(2, 8))
    layer = cddn.layer("lp_ball", n=8, p=p, radius=1e300, backend="cvxpy")
    rows = [[0.0] * 8, tiny.tolist(), [3e299 * (i - 3.5) for i in range(8)]]
    got = layer(torch.tensor(rows, dtype=F64)).tolist()
    assert got[:2] == rows[:2]
    want = _ball_reference(rows[2], p, 1e300)
    assert max(abs(a - b) for a, b in zip(got[2], want)) <= 1e-7 * max(abs(v) for v in want)
    if math.isinf(p):  # on the sphere (|x_3| = r): not inside, the cone program's kink warning
        layer = cddn.layer("lp_ball", n=4, p=p, radius=2.0, backend="cvxpy")
        x = torch.tensor([[0.3, -1.2, 2.0, 0.5]], dtype=F64, requires_grad=True)
        with pytest.warns(cddn.errors.GradientWarning, match="not unique or not differentiable"):
            layer(x).sum().backward()


@pytest.mark.parametrize("name, options", [("robust_pool", {"penalty": "huber"}), ("lp_ball", {"p": 1}),
                                           ("tv1d", {}), ("simplex", {})])
@pytest.mark.parametrize("bad, counts", [(float("nan"), "1 NaN and 0 Inf"), (-float("inf"), "0 NaN and 1 Inf")])
def test_native_registry_layer_names_nonfinite_input_as_the_cone_layer(name, options, bad, counts):
    """The native robust_pool said "x must be finite ... (shape (6, 4))" for an input of shape
    (2, 3, 4) (its solver's rows) where the cone program says "parameter 0 (x) ... (shape
    (2, 3, 4))"."""
    x = torch.zeros(2, 3, 4, dtype=F64)
    x[0, 1, 2] = bad
    want = rf"^parameter 0 \(x\) must be finite, got {counts} value\(s\) among 24 \(shape \(2, 3, 4\)\)$"
    with pytest.raises(cddn.errors.NonFiniteError, match=want):
        cddn.layer(name, n=4, **options)(x)


@pytest.mark.parametrize("name, options, shown", [
    ("entmax", {"n": 4, "alpha": 1.2}, "MaskedScoresLayer(name='entmax', n=4, alpha=1.2, parameters=[x(4,)]"),
    ("entmax", {"n": 4, "alpha": 1.8}, "MaskedScoresLayer(name='entmax', n=4, alpha=1.8, parameters=[x(4,)]"),
    # NumPy scalars in their own precision's shortest digits (np.float32(1.2) showed 1.2000000476837158).
    ("entmax", {"n": np.int64(4), "alpha": np.float32(1.2)},
     "MaskedScoresLayer(name='entmax', n=4, alpha=1.2, parameters=[x(4,)]"),
    ("sparsemax", {"n": 4}, "MaskedScoresLayer(name='sparsemax', n=4, parameters=[x(4,)]"),
    ("tv1d", {"n": 4, "lam": 0.3}, "CentredLayer(name='tv1d', n=4, lam=0.3, parameters=[x(4,)]"),
    ("robust_pool", {"n": 4, "penalty": "huber", "alpha": 0.3},
     "CentredLayer(name='robust_pool', n=4, penalty='huber', alpha=0.3, parameters=[x(4,)]"),
    ("ot_entropic", {"m": 2, "n": 3, "eps": 0.2}, "CentredLayer(name='ot_entropic', m=2, n=3, eps=0.2, parameters="),
    # The radius asked for (solved at 0.7 / 0.5, shown as scale), an array option by its shape.
    ("lp_ball", {"n": 3, "p": 1, "radius": 0.7}, "ScaledBallLayer(name='lp_ball', n=3, p=1, radius=0.7, parameters="),
    ("qp", {"n": 2, "n_ineq": 1, "G": [[1.0, 2.0]]},
     "ConvexLayer(name='qp', n=2, n_ineq=1, n_eq=0, learn='', ridge=0.0, G=array of shape (1, 2), parameters="),
])
def test_cone_program_layer_repr_names_the_problem_and_its_options(name, options, shown):
    """The registry's cone-program layers did not say which problem they solve: entmax with
    alpha 1.2 and 1.8 printed alike (MaskedScoresLayer(parameters=[x(4,)], ...)), and tv1d's
    lam, robust_pool's penalty and alpha, ot_entropic's eps were shown nowhere. A pickled
    copy keeps them; a ConvexLayer built by hand has no problem name to show."""
    import pickle

    layer = cddn.layer(name, backend="cvxpy", **options)
    assert repr(layer).startswith(shown)
    assert repr(pickle.loads(pickle.dumps(layer))) == repr(layer)
    if name == "lp_ball":
        assert repr(layer).endswith("scale=0.5)") and repr(layer).count("radius") == 1
    hand = cddn.ConvexLayer(layer.problem, layer.parameters_, layer.variables_)
    assert repr(hand).startswith("ConvexLayer(parameters=")


def test_learned_layer_repr_names_the_problem():
    layer = cddn.layer("qp", n=2, n_ineq=1, learn="Gh", inputs="q")
    assert "(layer): ConvexLayer(name='qp', n=2, n_ineq=1, n_eq=0, learn='Gh', inputs='q', ridge=0.0, " \
           "parameters=[q(2,), G(1, 2), h(1,)]" in repr(layer)


def test_repr_shows_block_names_given_as_a_tuple():
    """qp takes learn= and inputs= as a string or a tuple of block names; given as a tuple
    they were shown as arrays ("learn=array of shape (2,)"). Reference: the tuple as given."""
    layer = cddn.layer("qp", n=2, n_ineq=1, learn=("G", "h"), inputs=["q"])
    assert "ConvexLayer(name='qp', n=2, n_ineq=1, n_eq=0, learn=('G', 'h'), inputs=['q'], ridge=0.0, " in repr(layer)
