"""The limit system's tests of a batched solution (:mod:`convexddn.convex.uniqueness`).

Redundant equality rows: with ``E[3] = comb @ E[:3]`` and ``f`` consistent, moving ``f[3]``
alone makes the program infeasible on both sides (checked with Clarabel below), so no
derivative in ``E`` or ``f`` exists, whatever the solution's uniqueness.
"""
from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

import convexddn as cddn
from convexddn.errors import GradientWarning

F64 = torch.float64


def _redundant(kind: str, seed: int):
    n, p = 3, 4
    E, f, c, y = cp.Parameter((p, n)), cp.Parameter(p), cp.Parameter(n), cp.Variable(n)
    obj = cp.sum_squares(y) + c @ y if kind == "qp" else c @ y
    prob = cp.Problem(cp.Minimize(obj), [E @ y == f] + ([y >= -10] if kind == "lp" else []))
    rng = np.random.default_rng(seed)
    U, S, Vt = np.linalg.svd(rng.standard_normal((n, n)))
    S[-1] = S[0] / 3000
    E3 = U @ np.diag(S) @ Vt
    Et = np.vstack([E3, rng.standard_normal(n) @ E3])
    y0 = rng.standard_normal(n)
    values = [Et, Et @ y0, rng.standard_normal(n)]
    return prob, (E, f, c, y), values, torch.tensor(rng.standard_normal(n))


def _warned(layer, values, weights, requires):
    ts = [torch.tensor(v, requires_grad=r) for v, r in zip(values, requires)]
    out = layer(*ts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (out * weights).sum().backward()
    return [w for w in caught if issubclass(w.category, GradientWarning)]


@pytest.mark.parametrize("kind, seed", [("qp", 1), ("qp", 3), ("lp", 4)])
def test_redundant_equality_rows_moved_apart_are_warned(kind, seed):
    """The batched backward gave a gradient in f without a warning (29 of 96 such QP
    elements, 36 LP): the probe's blow-up (~1/δ) was relative to a right-hand side whose
    stationarity part dAᵀz was 1e3 times larger (gain 7e5 < PROBE_GAIN), and the limit
    test checks the primal solution only. solver='Clarabel' and forward mode warn."""
    prob, (E, f, c, y), values, weights = _redundant(kind, seed)
    for shift in (1e-3, -1e-3):  # moving f[3] alone: infeasible on both sides
        E.value, f.value, c.value = values[0], values[1] + np.array([0, 0, 0, shift]), values[2]
        prob.solve(solver="CLARABEL")
        assert prob.status in ("infeasible", "infeasible_inaccurate")
    layer = cddn.ConvexLayer(prob, parameters=[E, f, c], variables=[y])
    assert _warned(layer, values, weights, (True, True, True))
    assert layer.last_solve.solvers == ["batched"]


@pytest.mark.parametrize("kind, seed", [("qp", 1), ("qp", 2), ("lp", 4)])
def test_redundant_equality_rows_not_moved_are_not_warned(kind, seed):
    """Only c requires a gradient: the rows do not move, and the derivative in c exists.
    (The backward's probe moved all parameters, those without a gradient too: ("qp", 2)
    was warned about.)"""
    prob, (E, f, c, y), values, weights = _redundant(kind, seed)
    layer = cddn.ConvexLayer(prob, parameters=[E, f, c], variables=[y])
    assert not _warned(layer, values, weights, (False, False, True))
    assert layer.last_solve.solvers == ["batched"]


@pytest.mark.parametrize("d", [1e-6, 1e-7])
def test_nearly_parallel_equality_rows_at_a_unique_vertex_have_their_gradient(d):
    """min cᵀx s.t. Ex = f, x >= 0 with rows 0 and 1 of E d apart and a unique vertex
    (basis 0, 1, 2): d sum(x)/df = E_B⁻ᵀ 1, 1.2e6 and 1.2e7. The limit test formed CᵀC, whose
    eigenvalue d² it read as a null direction ("not unique", gradient zeroed); at 1e-7 the
    probe's least-norm amplification 4.4e7, a conditioning, was read as rows moved apart."""
    n, p = 6, 3
    E, f, c, x = cp.Parameter((p, n)), cp.Parameter(p), cp.Parameter(n), cp.Variable(n)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(c @ x), [E @ x == f, x >= 0]), [E, f, c], [x])
    rng = np.random.default_rng(3)
    Et = rng.standard_normal((p, n))
    Et[1] = Et[0] + d * rng.standard_normal(n)
    xs = np.array([1.0, 2.0, 1.5, 0, 0, 0])
    ct = Et.T @ rng.standard_normal(p) + np.array([0, 0, 0, 1.0, 1.0, 1.0])  # (dual feasible, strictly)
    exact = np.linalg.solve(Et[:, :3].T, np.ones(3))
    F = torch.tensor(Et @ xs, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(torch.tensor(Et), F, torch.tensor(ct))
        (g,) = torch.autograd.grad(out.sum(), F)
    assert layer.last_solve.solvers == ["batched"]
    assert not [w for w in caught if issubclass(w.category, GradientWarning)]
    torch.testing.assert_close(g, torch.tensor(exact), rtol=1e-6, atol=0)


def _entmax_closed_form(x: np.ndarray, alpha: float) -> np.ndarray:
    """α-entmax by bisection on τ in p_i = [(α − 1) x_i − τ]_+^{1/(α − 1)}, Σ p = 1 (Peters et
    al. 2019), in the shifted form x − max x (so the powers stay in range): the reference."""
    z = (alpha - 1.0) * (x - x.max())
    lo, hi = -1.0, 0.0  # Σ p(τ) ≥ 1 at τ = -1 (the maximum's own term is 1), ≤ 1 at τ = 0
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        if (np.clip(z - tau, 0, None) ** (1.0 / (alpha - 1.0))).sum() >= 1.0:
            lo = tau
        else:
            hi = tau
    p = np.clip(z - lo, 0, None) ** (1.0 / (alpha - 1.0))
    return p / p.sum()


@pytest.mark.parametrize("alpha", [20.0, 50.0, 200.0])
def test_entmax_cone_form_on_a_tie_is_warned_undetermined(alpha):
    """α-entmax's cone form at a large α with a tie at the maximum: its curvature along the
    tie, ~p^(α−2), lives in multipliers far below the program's scale, so float64 does not
    determine the split of the tied mass. It came back 5e-4 (α = 20), 2.4e-2 (α = 50) and
    0.1 (α = 200) from the closed form (1/3, 1/3, 0, 0, 1/3), residual and error estimate at
    rounding, without a warning. Now a SolverWarning names that element and no other (the
    untied one is right); the warned element is the only one allowed off."""
    from convexddn.errors import SolverWarning

    x = np.array([[0.3, 0.3, 0.1, -2.0, 0.3], [0.5, 0.1, 0.1, -2.0, 0.3]])
    ref = np.stack([_entmax_closed_form(v, alpha) for v in x])
    np.testing.assert_allclose(ref[0], [1 / 3, 1 / 3, 0, 0, 1 / 3], atol=1e-15)
    layer = cddn.layer("entmax", n=5, alpha=alpha, backend="cvxpy")
    X = torch.tensor(x, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Y = layer(X)
        y = Y.detach().numpy()
    named = {e for w in caught if issubclass(w.category, SolverWarning) for e in getattr(w.message, "elements", [])}
    # (the tied element warned, or solved within the untied one's 2e-7: at α = 20 its pairs
    # p_i >= 0 at 2e-9 are open in their own units, and Clarabel's point, polished, is 1e-8 off)
    assert named == {(0,)} or (not named and np.abs(y[0] - ref[0]).max() <= 2e-7), [str(w.message) for w in caught]
    assert layer.last_solve.solvers[1] == "batched"
    if not named:  # unwarned, its Jacobian is entmax's: diag(s) − s sᵀ/Σs, s = p^(2−α) on the support
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            J = np.stack([torch.autograd.grad(Y[0, i], X, retain_graph=True)[0][0].numpy() for i in range(5)])
        sv = np.where(ref[0] > 0, ref[0] ** (2.0 - alpha), 0.0)
        np.testing.assert_allclose(J, np.diag(sv) - np.outer(sv, sv) / sv.sum(), atol=1e-5 * sv.max())
    # (the cone form rounds α to a fraction exact to 1e-7 of the solution)
    np.testing.assert_allclose(y[1], ref[1], atol=2e-7)


def test_face_of_optima_is_not_warned_undetermined():
    """A program with a face of optima (two equal costs) whose columns are all resolved:
    any point of the face is a solution, the forward does not warn."""
    from convexddn.errors import SolverWarning

    c, y = cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(c @ y), [y >= 0, cp.sum(y) == 1])
    layer = cddn.ConvexLayer(prob, parameters=[c], variables=[y])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        out = layer(torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    assert abs(float(out.sum()) - 1.0) < 1e-9 and float(out.min()) >= -1e-9


def test_huber_threshold_far_below_the_data_is_warned_undetermined():
    """``cp.huber(r, M)`` at M = 1e-10 beside data of 1 (the registry's robust pool, cone
    form): the ``2M|s|`` terms that pick the median are far below the program's scale, and
    medians came back up to 0.24 off (n = 9, odd: the median is the solution to ~M), 6 of 7
    such elements without a warning (the 7th: a per-element result the batched path did not
    confirm). Each element off by more than 1e-6 is now named by a SolverWarning."""
    from convexddn.errors import SolverWarning

    x = torch.randn(8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    layer = cddn.layer("robust_pool", n=9, penalty="huber", alpha=1e-10, backend="cvxpy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x).reshape(-1)
    # (the per-element path's warning for a result the batched path did not confirm names
    # its elements in its text only)
    texts = " ".join(str(w.message) for w in caught if issubclass(w.category, SolverWarning))
    off = {(i,) for i in torch.nonzero((y - x.median(1).values).abs() > 1e-6).flatten().tolist()}
    assert off and all(str(e) in texts for e in off), (off, texts)


def test_mpc_rows_that_hold_are_shown_consistent_without_an_svd(monkeypatch):
    """The bench's MPC at batch 1: 284 rows hold, the solution is unique and differentiable,
    but its derivative system misses the refinement's target, so the test for dependent rows
    moved apart runs. One QR of the rows certifies them consistent (its bound, from a
    solution and its residual, is at most INCONSISTENT_AMPLIFICATION); an SVD of all the rows
    (37 of the backward's 55 ms) ran on every such element before. The gradient's agreement
    with finite differences: test_batched's MPC test."""
    import convexddn.convex.uniqueness as uniqueness
    from convexddn.bench.cases.convex import CONVEX_PROBLEMS

    prob, params, variables, data = CONVEX_PROBLEMS["mpc30"][1](1, torch.Generator().manual_seed(0))
    layer = cddn.ConvexLayer(prob, params, variables)
    tested, inside = [], []
    real_test, real_svd = uniqueness.limit_inconsistency, torch.linalg.svd

    def test(*args):
        tested.append(args[-1].shape[0])
        monkeypatch.setattr(torch.linalg, "svd", lambda M, *a, **k: inside.append(M.shape) or real_svd(M, *a, **k))
        try:
            return real_test(*args)
        finally:
            monkeypatch.setattr(torch.linalg, "svd", real_svd)

    monkeypatch.setattr(uniqueness, "limit_inconsistency", test)
    x0 = data[0].clone().requires_grad_(True)
    out = layer(x0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out.sum().backward()
    assert layer.last_solve.solvers == ["batched"]
    assert not [w for w in caught if issubclass(w.category, GradientWarning)]
    assert tested == [1] and not inside, (tested, inside)


def _svd_amplification(U: np.ndarray, r: np.ndarray, floor: float) -> float:
    """The reference: max_i |(Vᵀr)_i| / max(σ_i, floor) from numpy's full SVD (σ_i = 0 beyond
    min(k, n)), relative to max |r|."""
    V, sv, _ = np.linalg.svd(U)
    sv = np.concatenate([sv, np.zeros(U.shape[0] - sv.size)])
    return float((np.abs(V.T @ r) / np.maximum(sv, floor)).max() / max(np.abs(r).max(), 1e-300))


def _unit(M: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(M, axis=1, keepdims=True)
    return np.where(norm > 0, M / np.where(norm > 0, norm, 1.0), 0.0)


def test_inconsistency_bounds_are_upper_bounds_of_the_svd_amplification():
    """The bounds limit_inconsistency tries before its SVD, against numpy's SVD on one padded
    batch of unit rows: from the rows' least-norm solution (one QR) and from any other
    solution (numpy's least squares, perturbed): neither falls below the SVD's amplification
    (so neither can clear rows the SVD finds moved apart), and the first decides (at most
    INCONSISTENT_AMPLIFICATION) where the rows are independent. Rows: independent (30 of
    50), one row a combination of others with r consistent and moved apart, rows 1e-6 and
    1e-8 apart, a zero row moved, absent rows between the others, more rows than columns."""
    from convexddn.convex.uniqueness import INCONSISTENT_AMPLIFICATION, _EPS, _least_norm_bound, _residual_bound

    rng = np.random.default_rng(0)
    k, n = 56, 50
    cases, decide = [], []

    def add(M, r, decides):
        pad = np.zeros((k - M.shape[0], n))
        cases.append((np.vstack([_unit(M), pad]), np.concatenate([r, np.zeros(k - r.size)])))
        decide.append(decides)

    M = rng.standard_normal((30, n))
    add(M, _unit(M) @ rng.standard_normal(n), True)  # independent, consistent
    add(M, rng.standard_normal(30), True)  # independent: any r is consistent
    D = M.copy()
    D[5] = D[:3].T @ np.array([0.5, -1.0, 2.0])
    D = _unit(D)
    add(D, D @ rng.standard_normal(n), None)  # dependent, r consistent (a pivot at rounding: the SVD decides)
    r = D @ rng.standard_normal(n)
    r[5] += 1e-3
    add(D, r, False)  # dependent, moved apart
    for gap in (1e-6, 1e-8):
        N = M.copy()
        N[1] = N[0] + gap * rng.standard_normal(n)
        add(N, rng.standard_normal(30), None)
    Z = M.copy()
    Z[7] = 0.0
    r = _unit(Z) @ rng.standard_normal(n)
    r[7] = 1e-2
    add(Z, r, False)  # a zero row moved
    W = rng.standard_normal((k, n))
    add(W, _unit(W) @ rng.standard_normal(n), None)  # more rows than columns
    U = torch.tensor(np.stack([c[0] for c in cases]))
    R = torch.tensor(np.stack([c[1] for c in cases]))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))  # (absent rows between the others)
    U, R = U[:, perm], R[:, perm]
    floor = max(k, n) * _EPS
    got = (_least_norm_bound(U, R, floor) / R.abs().amax(1)).tolist()
    dx = torch.tensor(np.stack([np.linalg.lstsq(Ui, ri, rcond=None)[0]
                                for Ui, ri in zip(U.numpy(), R.numpy())]))
    dx = dx * (1 + 1e-9 * torch.randn(dx.shape, dtype=dx.dtype, generator=torch.Generator().manual_seed(2)))
    other = (_residual_bound(U, R.unsqueeze(-1), dx.unsqueeze(-1), floor) / R.abs().amax(1)).tolist()
    for (Ui, ri), g, o, want in zip(zip(U.numpy(), R.numpy()), got, other, decide):
        ref = _svd_amplification(Ui, ri, floor)
        assert g >= ref * (1 - 1e-9) and o >= ref * (1 - 1e-9), (g, o, ref)
        if want is not None:
            assert (g <= INCONSISTENT_AMPLIFICATION) == want, (g, ref)
    assert got[-1] == float("inf")


def _box_lp(fixed: bool):
    """min cᵀy s.t. (-y₂ = b₀ | y₂ = 2), y₀ - y₁ + y₂ = b₁, 0 <= y <= 3 (A, b parameters; y₂'s
    row a constant in the ``fixed`` form)."""
    y, c, b = cp.Variable(3), cp.Parameter(3), cp.Parameter(2 - fixed)
    A = cp.Parameter((2 - fixed, 3))
    rows = [y[2] == 2, A @ y == b] if fixed else [A @ y == b]
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(c @ y), rows + [y >= 0, y <= 3]), [c, A, b], [y])
    A_t = [[1.0, -1.0, 1.0]] if fixed else [[0.0, 0.0, -1.0], [1.0, -1.0, 1.0]]
    return layer, torch.tensor([[-2.0, 1.0, 0.0]], dtype=F64), torch.tensor([A_t], dtype=F64)


def _named(caught) -> set:
    return {e[0] for w in caught if issubclass(w.category, GradientWarning) for e in (w.message.elements or [])}


def _grad_and_sides(f, b: torch.Tensor, h: float = 1e-6):
    """The backward's gradient of the scalar ``f(b)`` (``b`` ``(1, p)``), the names its warnings
    give, and one-sided finite differences ``(right, left)`` ``(p,)``."""
    bb = b.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (g,) = torch.autograd.grad(f(bb), bb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f0, eye = f(b).item(), torch.eye(b.shape[1], dtype=b.dtype)
        right = torch.tensor([(f(b + h * e).item() - f0) / h for e in eye], dtype=b.dtype)
        left = torch.tensor([(f0 - f(b - h * e).item()) / h for e in eye], dtype=b.dtype)
    return g[0], _named(caught), right, left


@pytest.mark.parametrize("fixed", [False, True])
def test_degenerate_vertex_with_a_row_at_its_kink_is_warned(fixed):
    """At y = (3, 3, 2) four rows hold in R³ (y₀ <= 3, y₁ <= 3 and both equalities) and b moves
    them apart: one-sided derivatives differ by 0.3. The error estimate at the interior point
    (a singular limit system) sent the element to the active-set steps, which ended with y₁ <= 3
    at (s, z) = (0, 0); read as decided (ratio 0/0), neither the kink test nor the vertex test
    ran (the pair's lift kept the probe from blowing up), and the right-hand derivative came
    back without a warning, in both modes. (The same LP without y₂'s bounds, or with y₂
    substituted, was warned about.)"""
    layer, c, A = _box_lp(fixed)
    b = torch.tensor([[2.0]] if fixed else [[-2.0, 2.0]], dtype=F64)
    w = torch.tensor([1.0, -0.7, 1.2], dtype=F64)
    g, named, right, left = _grad_and_sides(lambda bb: (layer(c, A, bb) * w).sum(), b)
    assert layer.last_solve.solvers == ["batched"]
    assert ((right - left).abs() > 0.1).all()  # (no derivative in any entry of b)
    assert named == {0}
    with warnings.catch_warnings(record=True) as caught:  # forward mode
        warnings.simplefilter("always")
        torch.func.jvp(lambda bb: layer(c, A, bb), (b,), (torch.ones_like(b),))
    assert _named(caught) == {0}


def test_nondegenerate_vertex_beside_it_is_not_warned():
    """b₁ = 2.5: y = (3, 2.5, 2), three rows hold, the derivative exists (central differences)."""
    layer, c, A = _box_lp(False)
    w = torch.tensor([1.0, -0.7, 1.2], dtype=F64)
    g, named, right, left = _grad_and_sides(lambda bb: (layer(c, A, bb) * w).sum(),
                                            torch.tensor([[-2.0, 2.5]], dtype=F64))
    assert layer.last_solve.solvers == ["batched"]
    assert not named
    torch.testing.assert_close(g, (right + left) / 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, torch.tensor([-0.5, 0.7], dtype=F64), rtol=1e-9, atol=1e-9)


def test_transport_plan_with_coinciding_marginal_sums_is_warned():
    """ot_lp with a = (0.2, 0.3, 0.5), b = (0.5, 0.2, 0.3): a₀ = b₁, a₀ + a₁ = b₀, a degenerate
    vertex for every cost. The active-set steps released x₀₀ >= 0 at z = 0 with s = 6e-17 (its
    residual's rounding), decided inactive by the ratio: elements 3 to 5 of this batch got a
    one-sided gradient without a warning (element 3: 4.6334 returned, right 4.6334, left 2.5117
    along a₀ + b₂)."""
    layer = cddn.layer("ot_lp", m=3, n=3)
    torch.manual_seed(1)
    C, W = torch.rand(6, 3, 3, dtype=F64), torch.randn(6, 3, 3, dtype=F64)
    a = torch.tensor([[0.2, 0.3, 0.5]] * 6, dtype=F64, requires_grad=True)
    b = torch.tensor([[0.5, 0.2, 0.3]] * 6, dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (layer(C, a, b) * W).sum().backward()
    assert {3, 4, 5} <= _named(caught)
    move = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 1.0]], dtype=F64)  # (a₀ and b₂ together: the mass kept)
    ab = torch.cat([a.detach()[3:4], b.detach()[3:4]], 1)
    _, _, right, left = _grad_and_sides(lambda t: (layer(C[3:4], *(ab + t * move).split(3, 1)) * W[3]).sum(),
                                        torch.zeros(1, 1, dtype=F64))
    assert (right - left).abs().item() > 1.0
