"""Tests of convexddn.convex.polish: Newton steps on the exact complementarity, against
closed forms and finite differences, and its pieces against the Jordan product's
definition, one unit vector at a time."""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.convex.certify import _by_sign
from convexddn.convex.polish import _DELTA, _arrow_into, _soc_limit_rows, better, natural_residual, rounding_level
from convexddn.convex.symmetric_cones import ConeLayout

F64 = torch.float64


def tiny_mass_transport(e: float, M: int = 4, seed: int = 0):
    """``(C, a, b, P)``: costs ``C (M, M)``, a = (1 − (M−1)e, e, …, e), b uniform, and the
    optimal plan in closed form. Row 0 keeps mass in every column (the duals v_j = C_0j,
    u_0 = 0), so row i >= 1 sends its e to argmin_j (C_ij − C_0j), where its reduced cost
    C_ij − u_i − v_j is 0 (u_i = that minimum); every other reduced cost is positive (the
    argmins are unique): a nondegenerate vertex, hence the unique solution."""
    C = np.random.default_rng(seed).uniform(0, 1, (M, M))
    a = np.array([1 - (M - 1) * e] + [e] * (M - 1))
    b = np.full(M, 1 / M)
    P = np.zeros((M, M))
    for i in range(1, M):
        j = int(np.argmin(C[i] - C[0]))
        P[i, j] = e
        P[0, j] -= e
    P[0] += b
    return C, a, b, P


def test_newton_polish_resolves_a_transport_marginal_of_1e_9():
    """ot_lp with a = (1 − 3e, e, e, e), e = 1e-9: the interior point ends with the plan's
    entries of ~2e-9 beside multipliers ~0.02 (μ ~ 1e-11), no pair decided right. Newton
    steps regularised by an absolute δ = 1e-10 beside L(s) kept 5 % of such a multiplier
    each step, the batched path left the element unsolved, and Clarabel's "Solved" was
    refused as "nearly linearly dependent" rows. The regularisation relative to each
    pair's size converges in two steps: the closed-form plan to rounding, on the batched path."""
    C, a, b, P = tiny_mass_transport(1e-9)
    layer = cddn.layer("ot_lp", m=4, n=4)
    out = layer(*(torch.tensor(v) for v in (C, a, b)))
    assert layer.last_solve.solvers == ["batched"]
    assert np.abs(out.numpy() - P).max() < 1e-14


def test_tiny_mass_transport_gradient_matches_central_differences():
    """At that nondegenerate vertex the plan is affine in (a, b) while every entry stays
    positive (row i >= 1 sends a_i to its column j_i, row 0 fills b minus those), so the
    loss Σ W ∘ P has the directional derivative Σ_i (W[i, j_i] − W[0, j_i]) da_i +
    Σ_j W[0, j] db_j along a direction that keeps Σa = Σb, and central differences with
    steps of 4e-10 (the entries stay above 6e-10) see the same, up to the plan's rounding
    (~1e-16 on entries of 0.25, over 8e-10)."""
    C, a, b, P = tiny_mass_transport(1e-9, seed=1)
    layer = cddn.layer("ot_lp", m=4, n=4)
    rng = np.random.default_rng(2)
    W = rng.standard_normal((4, 4))
    da, db = rng.uniform(-1, 1, 4), rng.uniform(-1, 1, 4)
    db += (da.sum() - db.sum()) / 4
    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    out = layer(torch.tensor(C), at, bt)
    assert layer.last_solve.solvers == ["batched"]
    ga, gb = torch.autograd.grad((torch.tensor(W) * out).sum(), (at, bt))
    analytic = float(ga @ torch.tensor(da) + gb @ torch.tensor(db))
    cols = P[1:].argmax(1)
    closed = sum((W[i, j] - W[0, j]) * da[i] for i, j in zip(range(1, 4), cols)) + W[0] @ db
    assert analytic == pytest.approx(closed, rel=1e-9, abs=1e-12)
    h = 4e-10

    def loss(sign: float) -> float:
        with torch.no_grad():
            plan = layer(torch.tensor(C), torch.tensor(a + sign * h * da), torch.tensor(b + sign * h * db))
        return float((W * plan.numpy()).sum())

    numeric = (loss(1.0) - loss(-1.0)) / (2 * h)
    assert abs(numeric) > 0.1  # (a direction the plan moves along)
    assert analytic == pytest.approx(numeric, rel=1e-5)


@pytest.mark.parametrize("layout", [ConeLayout(zero=1, nonneg=3, soc=(4, 1, 2)), ConeLayout(zero=0, nonneg=2, soc=()),
                                    ConeLayout(zero=0, nonneg=0, soc=(5,))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_arrow_matrix_is_the_jordan_product_column_by_column(layout, dtype):
    """L(u), written straight into the Newton matrix's block (it was formed as L(u) I through
    five (B, mc, mc) temporaries, the polish's peak), is u ∘ e_j in column j, exactly."""
    mc = layout.nonneg + sum(layout.soc)
    u = torch.randn(3, mc, dtype=dtype, generator=torch.Generator().manual_seed(0))
    columns = [layout.jordan(u, torch.eye(mc, dtype=dtype)[j].expand(3, -1)) for j in range(mc)]
    out = torch.zeros(3, mc, mc, dtype=dtype)
    _arrow_into(layout, u, out)
    assert torch.equal(out, torch.stack(columns, -1))


def test_polish_regularisation_does_not_grow_with_a_large_multiplier():
    """A feasible LP with two nearly parallel rows and a far bound (exact optimum by
    rational vertex enumeration): the polish of Clarabel's point has active pairs with s ~
    1e-12 beside z ~ 2.8e7. A regularisation δ(|s| + |z|) there (2.8e-3) swamped L(s), the
    polish stalled at a residual of 1e-7 and the element was left unsolved; the pair's
    scale stops at 1 (δ itself, which converges to 5e-10)."""
    import warnings

    import cvxpy as cp

    from test_second_opinion import _exact_lp_optimum

    from convexddn.convex.batched import BatchedProgram

    G = np.array([[8.97002391427652, 15.169919552614287], [-8.970024012305476, -15.169919170928265],
                  [3.099947819168883, -12.069971733445403]])
    h = np.array([-12.461697080564145, 6.230848540282072, 199007098.74255022])
    c = np.array([0.24875807838434053, -0.9685656500405795])
    exact = _exact_lp_optimum(G, h, c).numpy()
    x = cp.Variable(2)
    Gp, hp, cp_ = cp.Parameter((3, 2)), cp.Parameter(3), cp.Parameter(2)
    program = BatchedProgram(cp.Problem(cp.Minimize(cp_ @ x), [Gp @ x <= hp]), [Gp, hp, cp_], [x])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (sol,), info = program(*(torch.tensor(v) for v in (G, h, c)), second_opinion=True)
    assert info.status_names() == ["solved"]
    assert np.abs(sol[0].numpy() - exact).max() <= 1e-7 * np.abs(exact).max()


def test_at_rounding_level_the_natural_residual_orders_the_points():
    """A weakly active bound (both members 0 at the solution) ends the interior point at
    s_i ≈ z_i ≈ 1e-8, a product at rounding: the residual cannot tell that point from the
    exact one (s_i, z_i ~1e-19), and the polish kept the first. Where both residuals are at
    rounding level and within a factor of 2 of the lowest met, max_i |min(s_i, z_i)|
    decides; otherwise (a badly scaled element's 4e-18 beside 5e-26) the residual alone. On
    second-order cones (where s ∘ z at rounding hides a misalignment that min(s_i, z_i)
    does not see) a tie goes to the newer point, the Newton step's: an interior point of a
    ball r = 1e-6 kept its dy/dx 1.2e-4 off beside the step's exact one."""
    lp = ConeLayout(zero=1, nonneg=2, soc=())
    s_ip = torch.tensor([[0.0, 1.19e-8, 0.5]], dtype=F64)
    z_ip = torch.tensor([[0.3, 1.13e-8, 0.0]], dtype=F64)
    s_ex = torch.tensor([[0.0, 5.9e-19, 0.5]], dtype=F64)
    z_ex = torch.tensor([[0.3, -6e-36, 0.0]], dtype=F64)
    assert natural_residual(lp, s_ip, z_ip).tolist() == [1.13e-8]
    assert natural_residual(lp, s_ex, z_ex).tolist() == [6e-36]
    r = torch.tensor([8.7e-17], dtype=F64)  # the same residual, at rounding level
    assert better(lp, r, s_ex, z_ex, r, s_ip, z_ip, r).tolist() == [True]
    assert better(lp, r, s_ip, z_ip, r, s_ex, z_ex, r).tolist() == [False]
    assert better(lp, r / 2, s_ip, z_ip, r, s_ex, z_ex, r / 2).tolist() == [False]
    assert better(lp, 1.5 * r, s_ex, z_ex, r, s_ip, z_ip, r).tolist() == [True]
    # far above the lowest residual met, or above rounding level: the lower residual
    far, low = torch.tensor([4e-18], dtype=F64), torch.tensor([5e-26], dtype=F64)
    assert better(lp, far, s_ex, z_ex, low, s_ip, z_ip, low).tolist() == [False]
    above = torch.tensor([100 * rounding_level(r)], dtype=F64)
    assert better(lp, above, s_ex, z_ex, above, s_ip, z_ip, above).tolist() == [False]
    assert better(lp, r, s_ip, z_ip, above, s_ex, z_ex, r).tolist() == [True]
    # with a second-order cone: at a tie the newer point (the Newton step), else the residual
    soc = ConeLayout(zero=1, nonneg=2, soc=(1,))
    pad = torch.ones(1, 1, dtype=F64)
    cat = lambda v: torch.cat([v, pad], 1)  # noqa: E731
    assert better(soc, r, cat(s_ex), cat(z_ex), r, cat(s_ip), cat(z_ip), r).tolist() == [True]
    assert better(soc, far, cat(s_ex), cat(z_ex), low, cat(s_ip), cat(z_ip), low).tolist() == [False]


# Programs with variable entries that appear nowhere: min ‖y − x‖² + t₀ s.t. one atom in y
# and t₀, where t is a 3-vector whose t₁, t₂ are in no constraint nor the cost (zero columns
# of P and A, zero cost). y* is unique; the references solve its stationarity conditions
# (t eliminated: t₀ = the atom's bound) at 40 digits.
UNUSED_X = np.array([[0.3, -0.5, 1.2], [1.5, 0.2, -0.7], [-1.1, 2.0, 0.4], [2.5, -1.4, -2.2]])


def sqrt_reference(X: np.ndarray) -> np.ndarray:
    """y* of sum(sqrt(y + 3)) >= -t₀: per entry 2(y − x) = 1 / (2 sqrt(y + 3)), whose root
    lies in (-3, x + 1) (the left side increases, the right decreases)."""
    import mpmath as mp

    with mp.workdps(40):
        root = lambda xi: mp.findroot(lambda u: 2 * (u - xi) - 1 / (2 * mp.sqrt(u + 3)),  # noqa: E731
                                      (mp.mpf(-3) + mp.mpf(10) ** -30, mp.mpf(xi) + 1), solver="anderson")
        return np.array([[float(root(float(xi))) for xi in row] for row in X])


def _geo_mean_reference(X: np.ndarray) -> np.ndarray:
    """y* of geo_mean(y + 3) >= 1 − t₀: 2(y_i − x_i) = g / (3 (y_i + 3)), g = geo_mean(y + 3)."""
    import mpmath as mp

    with mp.workdps(40):
        def one(x):
            def F(*y):
                g = mp.cbrt((y[0] + 3) * (y[1] + 3) * (y[2] + 3))
                return [2 * (y[i] - x[i]) - g / (3 * (y[i] + 3)) for i in range(3)]
            return [float(v) for v in mp.findroot(F, [mp.mpf(float(v)) for v in x])]
        return np.array([one(row) for row in X])


def _rel_entr_quad_reference(X: np.ndarray) -> np.ndarray:
    """y* of RelEntrConeQuad(y₀ + 2, y₁ + 2, t₀, m=3, k=3): the cone is t₀ >= f(a, b) =
    −2³ a Σ_i w_i (u − 1) / (τ_i (u − 1) + 1), u = (b / a)^(1/2³), with the 3-point
    Gauss–Legendre rule (w, τ) on [0, 1] (CVXPY's canonicalisation, each 2×2 PSD block at
    its largest entry), so 2(y_j − x_j) + ∂f/∂y_j = 0 for j = 0, 1 and y₂ = x₂ (agrees with
    CVXPY + SCS at eps 1e-14 to 1e-11)."""
    import mpmath as mp

    with mp.workdps(40):
        r = mp.sqrt(mp.mpf(3) / 5)
        rule = ((mp.mpf(5) / 18, (1 - r) / 2), (mp.mpf(4) / 9, mp.mpf(1) / 2), (mp.mpf(5) / 18, (1 + r) / 2))

        def f(a, b):
            u = (b / a) ** (mp.mpf(1) / 8)
            return -8 * a * sum(w * (u - 1) / (tau * (u - 1) + 1) for w, tau in rule)

        def one(x):
            F = lambda y0, y1: [2 * (y0 - x[0]) + mp.diff(lambda v: f(v + 2, y1 + 2), y0),  # noqa: E731
                                2 * (y1 - x[1]) + mp.diff(lambda v: f(y0 + 2, v + 2), y1)]
            y0, y1 = mp.findroot(F, [mp.mpf(float(x[0])), mp.mpf(float(x[1]))])
            return [float(y0), float(y1), float(x[2])]
        return np.array([one(row) for row in X])


def unused_entries_program(kind: str, scalar: bool = False, **options):
    """``(BatchedProgram, parameter)`` of that problem (``scalar``: t₀ a scalar variable instead)."""
    import cvxpy as cp

    from convexddn.convex.batched import BatchedProgram

    x, y = cp.Parameter(3), cp.Variable(3)
    t0 = cp.Variable() if scalar else cp.Variable(3)[0]
    constraint = {"sqrt": lambda: cp.sum(cp.sqrt(y + 3)) >= -t0, "geo_mean": lambda: cp.geo_mean(y + 3) >= 1 - t0,
                  "rel_entr_quad": lambda: cp.RelEntrConeQuad(y[0] + 2, y[1] + 2, t0, 3, 3)}[kind]()
    return BatchedProgram(cp.Problem(cp.Minimize(cp.sum_squares(y - x) + t0), [constraint]), [x], [y], **options)


@pytest.mark.parametrize("kind, reference", [("sqrt", sqrt_reference), ("geo_mean", _geo_mean_reference),
                                             ("rel_entr_quad", _rel_entr_quad_reference)])
def test_variables_that_appear_nowhere_leave_the_newton_polish_exact(kind, reference):
    """Their zero row and column made every LU Newton step's matrix singular: the polish
    failed on every element and the interior point's √μ error on the cones stayed, 2.5e-7
    to 3e-6 off (|y*| < 3.5), reported solved with a residual of 1e-11, no warning, where a
    scalar t₀ was exact. A unit pivot on such a column (dx_j = −q_j = 0) takes the steps of
    the program without them: the closed forms' y* to rounding, every element solved."""
    program = unused_entries_program(kind)
    (y,), info = program(torch.tensor(UNUSED_X))
    assert info.status_names() == ["solved"] * len(UNUSED_X)
    assert np.abs(y.numpy() - reference(UNUSED_X)).max() < 1e-12


def test_variables_that_appear_nowhere_gradient_matches_central_differences():
    """The sqrt case's gradient of Σ W ∘ y against float64 central differences (step 1e-5)
    of the 40-digit reference, and against its closed form dy_i/dx_i = 1 / (1 + (y_i + 3)^(-3/2) / 8)
    (differentiate 2(y − x) = (y + 3)^(-1/2) / 2): the point 7e-7 off carried its error into
    the derivative."""
    program = unused_entries_program("sqrt")
    X = torch.tensor(UNUSED_X, requires_grad=True)
    W = np.random.default_rng(3).standard_normal(UNUSED_X.shape)
    (y,), _ = program(X)
    (g,) = torch.autograd.grad((torch.tensor(W) * y).sum(), X)
    h = 1e-5
    numeric = W * (sqrt_reference(UNUSED_X + h) - sqrt_reference(UNUSED_X - h)) / (2 * h)  # (separable)
    closed = W / (1 + (sqrt_reference(UNUSED_X) + 3) ** -1.5 / 8)
    assert np.abs(numeric - closed).max() < 1e-9  # (the references agree)
    assert np.abs(g.numpy() - numeric).max() < 1e-9


def soc_projection(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The projection onto the second-order cone {(t, w): ‖w‖ ≤ t} and its Jacobian, closed
    form: v inside, 0 in the polar cone, else ((t + ‖w‖)/2)(1, w/‖w‖) with Jacobian
    ½[[1, uᵀ], [u, (1 + t/‖w‖) I − (t/‖w‖) u uᵀ]], u = w/‖w‖."""
    t, w = v[0], v[1:]
    nw = np.linalg.norm(w)
    if nw <= t:
        return v.copy(), np.eye(len(v))
    if nw <= -t:
        return np.zeros_like(v), np.zeros((len(v), len(v)))
    u = w / nw
    J = np.zeros((len(v), len(v)))
    J[0, 0], J[0, 1:], J[1:, 0] = 1.0, u, u
    J[1:, 1:] = (1 + t / nw) * np.eye(len(w)) - (t / nw) * np.outer(u, u)
    return (t + nw) / 2 * np.concatenate([[1.0], u]), J / 2


@pytest.mark.parametrize("case", ["inside", "polar", "edge"])
def test_soc_limit_rows_are_the_projections_jacobian_and_natural_residual(case):
    """The semismooth rows of a decided cone, against Φ = s − Π(s − z) and the central
    differences of Π at s − z (closed form above), for the three sign patterns of the
    frame pairs; δ I is added beside J except where s is interior (dz = −z)."""
    rng = np.random.default_rng(["inside", "polar", "edge"].index(case))
    layout = ConeLayout(0, 0, (4, 2))
    for _ in range(5):
        s, z = rng.standard_normal(6), rng.standard_normal(6)
        for part in (slice(0, 4), slice(4, 6)):
            ns, nz = np.linalg.norm(s[part][1:]), np.linalg.norm(z[part][1:])
            # s − z strictly inside K, strictly inside −K, or outside both
            s[part.start], z[part.start] = {"inside": (3 * ns + 3 * nz, 0.5 * nz), "polar": (0.5 * ns, 3 * ns + 3 * nz),
                                            "edge": (1.1 * ns, 1.1 * nz)}[case]
        J, phi, rows = _soc_limit_rows(layout, torch.tensor(s)[None], torch.tensor(z)[None], _by_sign)
        assert bool(rows.all())
        h = 1e-6
        for part in (slice(0, 4), slice(4, 6)):
            w = s[part] - z[part]
            num = np.stack([(soc_projection(w + h * e)[0] - soc_projection(w - h * e)[0]) / (2 * h)
                            for e in np.eye(len(w))], 1)
            assert np.abs(num - soc_projection(w)[1]).max() < 1e-8  # (the references agree)
            got = J[0, part, part].numpy() - (0.0 if case == "inside" else _DELTA) * np.eye(len(w))
            assert np.abs(got - num).max() < 1e-8
            assert np.abs(phi[0, part].numpy() - (s[part] - soc_projection(w)[0])).max() < 1e-14
        assert float(J[0, :4, 4:].abs().max()) == 0.0  # (block diagonal)


def _two_entry_cone_layer():
    """Projection onto {y₀ = a, y₁ ≥ 0, |y₃| ≤ y₂}: y₀ = a, y₁ = max(x₁, 0) and (y₂, y₃) the
    projection of (x₂, x₃) onto the 2-entry second-order cone."""
    x, a, y = cp.Parameter(4), cp.Parameter(), cp.Variable(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y[0] == a, y[1] >= 0, cp.SOC(y[2], y[3:4])])
    return cddn.ConvexLayer(prob, parameters=[x, a], variables=[y])


def test_a_second_order_cone_near_its_tip_at_small_scale_has_the_closed_form_gradient():
    """(x₂, x₃) a distance d of 1e-6 to 1e-9 from the tip beside x₁ of 1 to 1000: inside the
    cone, inside its polar or outside both. The interior point ended with s and z ~1e-5
    (equilibrated), both interior with their product at rounding, and the Jordan Newton
    steps only halved both: at d = 1e-7, x₁ = 10 the solution was 1.5e-7 off and the
    gradient 0.29 off, warned about as "not unique or not differentiable"; at d = 1e-6,
    x₁ = 1 the gradient was exact but a warning said the program was "unresolved" (a
    multiplier of 2.6e-10 left beside a slack of 3e-6). The semismooth steps on the cone's
    natural residual decide it in one or two: the closed form to rounding, no warning."""
    rows, refs, jacs = [], [], []
    rng = np.random.default_rng(0)
    for d, x1 in [(1e-6, 1.0), (3e-7, 10.0), (1e-7, 10.0), (1e-7, 1.0), (1e-8, 100.0), (1e-9, 10.0), (1e-8, 1e3)]:
        for v in (np.array([2 * d, 0.5 * d]), np.array([-2 * d, 0.5 * d]), np.array([0.3 * d, -d])):
            rows.append([rng.uniform(-1, 1), x1, *v])
            y, J = soc_projection(v)
            refs.append(y)
            jacs.append(J)
    X = torch.tensor(rows, dtype=F64, requires_grad=True)
    W = torch.tensor(rng.standard_normal((len(rows), 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cddn.errors.GradientWarning)
        out = _two_entry_cone_layer()(X, torch.ones(len(rows), dtype=F64))
        (g,) = torch.autograd.grad((out * W).sum(), X)
    out, g, Wn = out.detach().numpy(), g.numpy(), W.numpy()
    for k, (y, J) in enumerate(zip(refs, jacs)):
        assert np.abs(out[k, 2:] - y).max() < 1e-12 * rows[k][1]
        assert np.abs(g[k] - np.concatenate([[0.0, Wn[k, 1]], J.T @ Wn[k, 2:]])).max() < 1e-9


def test_each_element_stops_polishing_as_alone():
    """The Newton steps went on for every element until all were at rounding level, and an
    element already there took the others' steps and kept whichever point :func:`better`
    preferred: 13 of 16 random SOCPs came back from their points alone by up to 6.8e-14, one
    with a residual of 2.4e-16 in the batch against 3.1e-15 alone. Each stops by its own rule
    now: the same point and residual in any batch."""
    from convexddn.convex.interior_point import kkt_measures, solve_cone_batch
    from convexddn.convex.polish import polish

    gen = torch.Generator().manual_seed(4)
    layout, B, n = ConeLayout(2, 6, (4, 3, 5)), 16, 8
    A = torch.randn(B, layout.m, n, dtype=torch.float64, generator=gen)
    s0 = torch.zeros(B, layout.m, dtype=torch.float64)
    s0[:, 2:] = layout.shift_inside(torch.randn(B, layout.cone_rows, dtype=torch.float64, generator=gen))
    b = (A @ torch.randn(B, n, 1, dtype=torch.float64, generator=gen))[..., 0] + s0
    L = torch.randn(B, n, n, dtype=torch.float64, generator=gen)
    P, q = L @ L.mT / n + 0.1 * torch.eye(n, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64, generator=gen)
    start = solve_cone_batch(P, q, A, b, layout, polish="never", tol=1e-6, tol_accept=1e-6)

    def run(i):
        def residual(x, s, z):
            return torch.stack(kkt_measures(P[i], q[i], A[i], b[i], x, s, z)).amax(0)
        return polish(P[i], q[i], A[i], b[i], layout, start.x[i], start.s[i], start.z[i], residual, steps=6)

    full = run(slice(None))
    assert (full[3] < 1e-14).all()
    for i in range(B):
        one = run(slice(i, i + 1))
        torch.testing.assert_close(one[0][0], full[0][i], atol=1e-14, rtol=0)
        torch.testing.assert_close(one[3][0], full[3][i], atol=0, rtol=1e-2)


@pytest.mark.parametrize("solver", ["auto", "Clarabel"])
@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_polish_resolves_a_bound_whose_terms_are_small_beside_its_multiplier(side, solver):
    """The unit ball written with its cone row scaled, ‖1e-6 y‖₂ <= 1e-6, at x = (1 ± 1e-7) u:
    inside y = x, J = I; outside y = u, J = (I − u uᵀ)/‖x‖ (closed forms). CVXPY's epigraph
    bound t <= 1e-6 has terms of 2e-4 (equilibrated) and, at the interior point's end, a
    slack of 2e-12 beside a multiplier of 0.1: the polish's regularisation, relative to
    the pair's size only (δ·0.1 = 1e-11 beside the slack), removed 15 % of the pair per
    step. Inside, y stayed on the sphere, 3.2e-8 off, its gradient 0.5 off; outside 3e-8
    off; on both paths, without a warning."""
    u = np.array([0.48, -0.6, 0.64])
    xv = (1 + side * 1e-7) * u
    gv = np.array([0.3, 1.0, -0.5])
    x, y = cp.Parameter(3), cp.Variable(3)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x)), [cp.norm(1e-6 * y, 2) <= 1e-6]),
                             [x], [y], solver=solver)
    X = torch.tensor(xv, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y = layer(X)
        (Y * torch.tensor(gv)).sum().backward()
    ref, grad = (xv, gv) if side < 0 else (u, (gv - u * (u @ gv)) / np.linalg.norm(xv))
    assert np.abs(Y.detach().numpy() - ref).max() <= 1e-12
    assert np.abs(X.grad.numpy() - grad).max() <= 1e-8
