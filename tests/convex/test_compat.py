"""CvxpyLayer: cvxpylayers' interface on ConvexLayer, tested with cvxpylayers' own usage
patterns (its README examples and its torch test file) against closed forms, CVXPY's own
solves and cvxpylayers itself."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import cvxpy as cp
import numpy as np
import pytest
import torch
from cvxpylayers.interfaces.base import SolverInterface
from cvxpylayers.torch import CvxpyLayer as Reference

from convexddn import ConvexLayer
from convexddn.convex.compat import APPLIED_SOLVER_ARGS, IGNORED_SOLVER_ARGS, CvxpyLayer
from convexddn.errors import (
    ConvexDDNWarning,
    InfeasibleError,
    NonFiniteError,
    OptionError,
    ProblemError,
    ShapeError,
    SolverWarning,
    UnboundedError,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_per_element import _simplex_projection  # noqa: E402  (the closed form, by one sort)

F64 = torch.float64


def directional_fd_check(fn, params, gen, eps=1e-5, tol=1e-5):
    """⟨w, J d⟩ by autograd against a central finite difference along one random
    direction d in every parameter at once (three solves instead of gradcheck's 2N)."""
    args = [p.clone().requires_grad_() for p in params]
    out = fn(*args)
    w = torch.randn(out.shape, dtype=F64, generator=gen)
    grads = torch.autograd.grad(out, args, w)
    d = [torch.randn(p.shape, dtype=F64, generator=gen) for p in params]
    with torch.no_grad():
        plus = fn(*[p + eps * di for p, di in zip(params, d)])
        minus = fn(*[p - eps * di for p, di in zip(params, d)])
    fd = float(((plus - minus) * w).sum() / (2 * eps))
    analytic = float(sum((g * di).sum() for g, di in zip(grads, d)))
    assert abs(analytic - fd) <= tol * (1 + abs(fd)), (analytic, fd)


def readme_problem():
    """cvxpylayers' README example: argmin_{x >= 0} ½‖Ax − b‖₁ (an LP)."""
    n, m = 2, 3
    x = cp.Variable(n)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    return problem, A, b, x


def ridge_problem(m: int = 6, n: int = 3):
    """cvxpylayers' test_least_squares: argmin ‖Ax − b‖² + ‖x‖² = (AᵀA + I)⁻¹Aᵀb."""
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    x = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b) + cp.sum_squares(x)))
    return problem, A, b, x


def ridge_closed_form(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = A.shape[-1]
    lhs = A.transpose(-1, -2) @ A + torch.eye(n, dtype=A.dtype)
    return torch.linalg.solve(lhs, (A.transpose(-1, -2) @ b.unsqueeze(-1))).squeeze(-1)


# ---------------------------------------------------------------- README patterns


def test_cvxpy_layer_readme_example_tuple_and_objective():
    """The README's torch example, written as there: `(solution,) = layer(A, b)`; the
    LP may have several minimisers, so its optimal value is compared with CVXPY's."""
    problem, A, b, x = readme_problem()
    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])
    gen = torch.Generator().manual_seed(0)
    A_tch = torch.randn(3, 2, generator=gen, requires_grad=True)
    b_tch = torch.randn(3, generator=gen, requires_grad=True)
    out = layer(A_tch, b_tch)
    assert isinstance(out, tuple) and len(out) == 1
    (solution,) = out
    assert solution.shape == (2,) and solution.dtype == torch.float32
    solution.sum().backward()
    assert A_tch.grad.shape == (3, 2) and b_tch.grad.shape == (3,)

    A.value, b.value = A_tch.detach().double().numpy(), b_tch.detach().double().numpy()
    best = problem.solve(solver="CLARABEL")
    sol = solution.detach().double().numpy()
    assert (sol >= -1e-6).all()
    assert abs(0.5 * np.abs(A.value @ sol - b.value).sum() - best) < 1e-5


def test_cvxpy_layer_one_variable_index_zero_is_the_solution_not_a_row():
    """`layer(A, b)[0]` is the whole batched solution (with a bare tensor it would be
    the first batch row, the silent bug of a literal class swap)."""
    problem, A, b, x = ridge_problem()
    layer = CvxpyLayer(problem, parameters=[A, b], variables=[x])
    gen = torch.Generator().manual_seed(1)
    At = torch.randn(4, 6, 3, dtype=F64, generator=gen)
    bt = torch.randn(4, 6, dtype=F64, generator=gen)
    first = layer(At, bt)[0]
    (unpacked,) = layer(At, bt)
    assert first.shape == (4, 3) and torch.equal(first, unpacked)
    assert torch.allclose(first, ridge_closed_form(At, bt), atol=1e-8)


def test_cvxpy_layer_least_squares_eps_pattern_and_gradients():
    """cvxpylayers' test_least_squares: `layer(A, b, solver_args={"eps": 1e-10})[0]`,
    solution and both gradients against the closed form differentiated by torch."""
    problem, A, b, x = ridge_problem(m=8, n=4)
    layer = CvxpyLayer(problem, [A, b], [x])
    gen = torch.Generator().manual_seed(2)
    A_th = torch.randn(8, 4, dtype=F64, generator=gen, requires_grad=True)
    b_th = torch.randn(8, dtype=F64, generator=gen, requires_grad=True)
    with pytest.warns(ConvexDDNWarning, match=r"ignores \['eps'\]"):
        sol = layer(A_th, b_th, solver_args={"eps": 1e-10})[0]
    ref = ridge_closed_form(A_th, b_th)
    assert torch.allclose(sol, ref, atol=1e-9)
    got = torch.autograd.grad(sol.sum(), [A_th, b_th])
    want = torch.autograd.grad(ref.sum(), [A_th, b_th])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-7)


def test_cvxpy_layer_broadcasting_unbatched_and_batched():
    """cvxpylayers' test_broadcasting: an unbatched A shared by a batch of b."""
    problem, A, b, x = ridge_problem()
    layer = CvxpyLayer(problem, [A, b], [x])
    gen = torch.Generator().manual_seed(3)
    A_th = torch.randn(6, 3, dtype=F64, generator=gen, requires_grad=True)
    b_th = torch.randn(2, 6, dtype=F64, generator=gen, requires_grad=True)
    (sol,) = layer(A_th, b_th)
    ref = ridge_closed_form(A_th.expand(2, 6, 3), b_th)
    assert sol.shape == (2, 3) and torch.allclose(sol, ref, atol=1e-9)
    got = torch.autograd.grad(sol.sum(), [A_th, b_th])
    want = torch.autograd.grad(ref.sum(), [A_th, b_th])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-7)


def test_cvxpy_layer_refuses_batch_shapes_that_broadcast_into_a_grid():
    """A batched scalar given as (B, 1) beside a (B, n) parameter: cvxpylayers raises, and
    broadcasting would solve a (B, B) grid of problems (a (B, B, n) output a loss against
    (B, n) targets broadcasts again, silently); a ShapeError naming the shapes and the fix.
    A batch broadcast into one parameter's own batch shape stays accepted."""
    x, p, r = cp.Variable(3), cp.Parameter(3), cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [cp.norm(x, 2) <= r])
    layer = CvxpyLayer(problem, parameters=[p, r], variables=[x])
    gen = torch.Generator().manual_seed(0)
    P = 3 * torch.randn(5, 3, dtype=F64, generator=gen)
    R = torch.rand(5, dtype=F64, generator=gen) + 0.5
    with pytest.raises(ValueError, match="dimensionality"):  # cvxpylayers itself
        Reference(problem, parameters=[p, r], variables=[x])(P, R[:, None])
    with pytest.raises(ShapeError, match=r"\(5,\).*\(5, 1\).*broadcast to \(5, 5\).*pass it as \(B,\)"):
        layer(P, R[:, None])
    # The same values with r as (B,): each row of P projected onto its own ball.
    (sol,) = layer(P, R)
    want = P * torch.clamp(R / P.norm(dim=1), max=1.0)[:, None]
    assert sol.shape == (5, 3) and torch.allclose(sol, want, atol=1e-9)
    # Broadcast into one parameter's shape: a shared radius, a (1,) one, a (2, 5) batch of p.
    for radius, points in ((R[0], P), (R[:1], P), (R, P.expand(2, 5, 3))):
        (sol,) = layer(points, radius)
        assert sol.shape == points.shape
        want = points * torch.clamp(radius[..., None] / points.norm(dim=-1, keepdim=True), max=1.0)
        assert torch.allclose(sol, want, atol=1e-9)
    # ConvexLayer broadcasts as torch does: the grid, each (i, j) projecting P[j] onto R[i]'s ball.
    grid = ConvexLayer(problem, [p, r], [x])(P, R[:, None])
    assert grid.shape == (5, 5, 3)
    assert torch.allclose(grid, P * torch.clamp(R[:, None, None] / P.norm(dim=1)[None, :, None], max=1.0),
                          atol=1e-9)


def test_cvxpy_layer_compiles_without_warnings_to_the_eager_result():
    """torch.compile of a model holding a CvxpyLayer: dynamo traced into the call's
    solver_args checks (an lru_cache) and warned; the call is a graph break, as
    ConvexLayer's is, and gives the eager result."""
    problem, A, b, x = ridge_problem()
    layer = CvxpyLayer(problem, [A, b], [x])
    gen = torch.Generator().manual_seed(4)
    A_t, b_t = torch.randn(4, 6, 3, dtype=F64, generator=gen), torch.randn(4, 6, dtype=F64, generator=gen)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (sol,) = torch.compile(layer)(A_t, b_t)
    # (torch's own DeprecationWarnings from its compiler's internals are not ours)
    assert [str(w.message)[:160] for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    assert torch.allclose(sol, ridge_closed_form(A_t, b_t), atol=1e-9)


def test_cvxpy_layer_batched_socp_matches_cvxpylayers_and_finite_differences():
    """cvxpylayers' test_simple_batch_socp: the same solutions as cvxpylayers (run with
    SCS at eps 1e-10, its accuracy) and gradients against central finite differences
    (cvxpylayers runs gradcheck: 2N solves, too slow for a unit test)."""
    n, m, batch = 4, 1, 3
    P_sqrt = cp.Parameter((n, n), name="P_sqrt")
    q = cp.Parameter((n, 1), name="q")
    A = cp.Parameter((m, n), name="A")
    b = cp.Parameter((m, 1), name="b")
    x = cp.Variable((n, 1), name="x")
    objective = 0.5 * cp.sum_squares(P_sqrt @ x) + q.T @ x
    prob = cp.Problem(cp.Minimize(objective), [A @ x == b, cp.norm(x) <= 1])
    ours = CvxpyLayer(prob, [P_sqrt, q, A, b], [x])
    reference = Reference(prob, [P_sqrt, q, A, b], [x])
    gen = torch.Generator().manual_seed(243)
    data = [torch.randn(batch, n, n, dtype=F64, generator=gen) + 2 * torch.eye(n, dtype=F64),
            torch.randn(batch, n, 1, dtype=F64, generator=gen),
            torch.randn(batch, m, n, dtype=F64, generator=gen),
            0.1 * torch.randn(batch, m, 1, dtype=F64, generator=gen)]
    (ref,) = reference(*data, solver_args={"solve_method": "SCS", "eps": 1e-10, "max_iters": 100_000})
    (sol,) = ours(*data)
    assert sol.shape == (batch, n, 1)
    assert (sol - ref).abs().max() < 1e-6
    for _ in range(2):
        directional_fd_check(lambda *t: ours(*t)[0], data, gen)


def test_cvxpy_layer_shared_parameter_solver_args_pattern():
    """cvxpylayers' test_shared_parameter: two layers share A, called with SCS's
    recommended solver_args; minimum-norm least squares has a closed form (pinv)."""
    gen = np.random.default_rng(243)
    A = cp.Parameter((6, 3))
    x = cp.Variable(3)
    b1, b2 = gen.standard_normal(6), gen.standard_normal(6)
    layer1 = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b1))), parameters=[A], variables=[x])
    layer2 = CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b2))), parameters=[A], variables=[x])
    solver_args = {"eps": 1e-10, "acceleration_lookback": 0, "max_iters": 10000}
    A_tch = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvexDDNWarning)  # eps, acceleration_lookback
        out = torch.cat([layer1(A_tch, solver_args=solver_args)[0], layer2(A_tch, solver_args=solver_args)[0]])
    ref = torch.cat([torch.linalg.lstsq(A_tch, torch.from_numpy(b).unsqueeze(-1)).solution.squeeze(-1)
                     for b in (b1, b2)])
    assert torch.allclose(out, ref, atol=1e-9)
    g = torch.linspace(-1, 1, 6, dtype=F64)
    (got,) = torch.autograd.grad(out, A_tch, g)
    (want,) = torch.autograd.grad(ref, A_tch, g)
    assert torch.allclose(got, want, atol=1e-7)


# ---------------------------------------------------------------- gp=True


def readme_gp_problem():
    x, y, z = cp.Variable(pos=True), cp.Variable(pos=True), cp.Variable(pos=True)
    a = cp.Parameter(pos=True, value=2.0)
    b = cp.Parameter(pos=True, value=1.0)
    c = cp.Parameter(value=0.5)
    problem = cp.Problem(cp.Minimize(1 / (x * y * z)), [a * (x * y + x * z + y * z) <= b, x >= y ** c])
    return problem, (a, b, c), (x, y, z)


def test_cvxpy_layer_gp_readme_example():
    """cvxpylayers' README LLCP, as written there: three outputs, backward, values that
    match cvxpylayers and CVXPY; the solution depends on b/a only, so the exact identity
    a ∂x/∂a + b ∂x/∂b = 0 checks the gradients."""
    problem, (a, b, c), (x, y, z) = readme_gp_problem()
    assert problem.is_dgp(dpp=True)
    layer = CvxpyLayer(problem, parameters=[a, b, c], variables=[x, y, z], gp=True)
    a_tch = torch.tensor(a.value, requires_grad=True)
    b_tch = torch.tensor(b.value, requires_grad=True)
    c_tch = torch.tensor(c.value, requires_grad=True)
    x_star, y_star, z_star = layer(a_tch, b_tch, c_tch)
    sum_of_solution = x_star + y_star + z_star
    sum_of_solution.backward()
    assert x_star.shape == () and a_tch.grad is not None

    # The same in float64, checked.
    a_tch, b_tch, c_tch = (torch.tensor(v, dtype=F64, requires_grad=True) for v in (2.0, 1.0, 0.5))
    x_star, y_star, z_star = layer(a_tch, b_tch, c_tch)
    (x_star + y_star + z_star).backward()
    problem.solve(gp=True, solver="CLARABEL")
    ours = np.array([x_star.item(), y_star.item(), z_star.item()])
    assert np.abs(ours - np.array([x.value, y.value, z.value])).max() < 1e-6
    ref = Reference(problem, parameters=[a, b, c], variables=[x, y, z], gp=True)
    with torch.no_grad():
        ref_out = ref(torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64), torch.tensor(0.5, dtype=F64))
    assert np.abs(ours - np.array([r.item() for r in ref_out])).max() < 1e-5
    assert abs(x_star.item() - y_star.item() ** 0.5) < 1e-8  # x ≥ √y is active
    assert abs(a_tch.item() * a_tch.grad.item() + b_tch.item() * b_tch.grad.item()) < 1e-7


def test_cvxpy_layer_gp_closed_form_gradients():
    """argmin a x + b y s.t. x y ≥ c (a GP): x = √(bc/a), y = √(ac/b); batched."""
    x, y = cp.Variable(pos=True), cp.Variable(pos=True)
    a, b, c = cp.Parameter(pos=True), cp.Parameter(pos=True), cp.Parameter(pos=True)
    problem = cp.Problem(cp.Minimize(a * x + b * y), [c / (x * y) <= 1])
    layer = CvxpyLayer(problem, parameters=[a, b, c], variables=[x, y], gp=True)
    gen = torch.Generator().manual_seed(5)
    vals = [(torch.rand(3, dtype=F64, generator=gen) + 0.5).requires_grad_() for _ in range(3)]
    xs, ys = layer(*vals)
    A, B, C = vals
    want_x, want_y = torch.sqrt(B * C / A), torch.sqrt(A * C / B)
    assert torch.allclose(xs, want_x, atol=1e-8) and torch.allclose(ys, want_y, atol=1e-8)
    v = torch.randn(2, 3, dtype=F64, generator=gen)
    got = torch.autograd.grad(xs @ v[0] + ys @ v[1], vals)
    want = torch.autograd.grad(want_x @ v[0] + want_y @ v[1], vals)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)


# ---------------------------------------------------------------- solver_args


def test_cvxpy_layer_solver_args_solve_method_and_max_iters_applied():
    problem, A, b, x = ridge_problem()
    layer = CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "SCS", "max_iters": 50_000})
    assert layer.convex_layer.solver == "SCS" and layer.convex_layer.solver_args == {"max_iters": 50_000}
    assert layer.convex_layer.fallback == "Clarabel"
    gen = torch.Generator().manual_seed(6)
    At, bt = torch.randn(2, 6, 3, dtype=F64, generator=gen), torch.randn(2, 6, dtype=F64, generator=gen)
    (sol,) = layer(At, bt)
    assert layer.convex_layer.last_solve.solvers == ["SCS", "SCS"]
    assert torch.allclose(sol, ridge_closed_form(At, bt), atol=1e-8)
    # A per-call solve_method picks the solver of that call.
    (sol,) = layer(At, bt, solver_args={"solve_method": "ecos"})
    assert layer.layers["ECOS"].last_solve.solvers == ["ECOS", "ECOS"]
    assert torch.allclose(sol, ridge_closed_form(At, bt), atol=1e-8)
    # max_iters reaches Clarabel as max_iter: one iteration does not solve it.
    layer(At, bt, solver_args={"solve_method": "Clarabel"})
    assert layer.layers["Clarabel"].last_solve.statuses == ["Solved", "Solved"]
    layer(At, bt, solver_args={"solve_method": "Clarabel", "max_iters": 1})
    assert "Solved" not in layer.layers["Clarabel"].last_solve.statuses
    assert APPLIED_SOLVER_ARGS["max_iters"]["Clarabel"] == "max_iter"


def test_cvxpy_layer_ignored_solver_args_warn_once_per_layer_and_key():
    problem, A, b, x = ridge_problem()
    At, bt = torch.randn(6, 3, dtype=F64), torch.randn(6, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = CvxpyLayer(problem, [A, b], [x], solver_args={"eps": 1e-8, "mode": "dense"})
        layer(At, bt, solver_args={"acceleration_lookback": 0, "n_jobs_forward": 4})
        layer(At, bt, solver_args={"eps": 1e-12})
        other = CvxpyLayer(problem, [A, b], [x])
        other(At, bt, solver_args={"n_jobs_backward": 2, "eps_abs": 1e-9})
        other(At, bt, solver_args={"eps": 1e-9})
    ours = [str(w.message) for w in caught if issubclass(w.category, ConvexDDNWarning)]
    # Each key named once per layer: a call's keys not named yet, each layer anew.
    assert [m.split(" (")[0] for m in ours] == [
        "CvxpyLayer ignores ['eps', 'mode']", "CvxpyLayer ignores ['acceleration_lookback', 'n_jobs_forward']",
        "CvxpyLayer ignores ['n_jobs_backward', 'eps_abs']", "CvxpyLayer ignores ['eps']"], ours
    assert all(m.endswith("Each key is named once per layer.") for m in ours)
    for key in ("eps", "acceleration_lookback", "n_jobs_forward", "n_jobs_backward", "mode"):
        assert key in IGNORED_SOLVER_ARGS


def test_cvxpy_layer_unknown_solver_args_raise():
    problem, A, b, x = ridge_problem()
    with pytest.raises(OptionError, match=r"unknown key\(s\) \['bogus'\]; valid keys are \[.*'eps'.*'solve_method'"):
        CvxpyLayer(problem, [A, b], [x], solver_args={"bogus": 1})
    layer = CvxpyLayer(problem, [A, b], [x])
    At, bt = torch.randn(6, 3), torch.randn(6)
    with pytest.raises(OptionError, match=r"unknown key\(s\) \['max_iterations'\]"):
        layer(At, bt, solver_args={"max_iterations": 3})
    with pytest.raises(OptionError, match="solver_args must be a dict or None, got list"):
        layer(At, bt, solver_args=["eps"])
    with pytest.raises(OptionError, match=r"solve_method'\] must be None or one of \['Clarabel', 'ECOS', 'SCS'\], "
                                          r"got 'OSQP'"):
        layer(At, bt, solver_args={"solve_method": "OSQP"})
    with pytest.raises(OptionError, match="both max_iters and max_iter"):
        layer(At, bt, solver_args={"max_iters": 3, "max_iter": 3})


def test_cvxpy_layer_passes_the_chosen_solvers_own_settings():
    """Settings cvxpylayers 1.2 hands to the chosen solver through diffcp were refused as
    'unknown key(s)': Clarabel's direct_solve_method, equilibrate_enable, presolve_enable,
    static_regularization_constant; ECOS's nitref; SCS's log_csv_filename; and
    solve_method=None (diffcp's default). Each now reaches that solver, checked as
    ConvexLayer checks it; a setting of another solver is refused naming that solver.
    Reference: the ridge closed form (AᵀA + I)⁻¹Aᵀb."""
    problem, A, b, x = ridge_problem()
    gen = torch.Generator().manual_seed(12)
    At, bt = torch.randn(2, 6, 3, dtype=F64, generator=gen), torch.randn(2, 6, dtype=F64, generator=gen)
    expected = ridge_closed_form(At, bt)
    clarabel = {"direct_solve_method": "qdldl", "equilibrate_enable": False, "presolve_enable": False,
                "static_regularization_constant": 1e-8}
    layer = CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "Clarabel", **clarabel})
    assert layer.convex_layer.solver_args == clarabel
    torch.testing.assert_close(layer(At, bt)[0], expected, atol=1e-8, rtol=0)
    assert layer.convex_layer.last_solve.statuses == ["Solved", "Solved"]
    # Per call, for each solver; None is the layer's own solver.
    layer = CvxpyLayer(problem, [A, b], [x])
    for args in ({"solve_method": "ECOS", "nitref": 9}, {"solve_method": "SCS", "log_csv_filename": "/dev/null"},
                 {"solve_method": None}, {"solve_method": "clarabel", "equilibrate_enable": False}):
        torch.testing.assert_close(layer(At, bt, solver_args=args)[0], expected, atol=1e-7, rtol=0)
    assert CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": None}).convex_layer.solver == "auto"
    # With the default solver Clarabel's settings reach its per-element solver, Clarabel (the notice says so).
    with pytest.warns(ConvexDDNWarning, match=r"\['presolve_enable'\] reach only the per-element solver"):
        layer = CvxpyLayer(problem, [A, b], [x], solver_args={"presolve_enable": False})
    assert layer.convex_layer.solver_args == {"presolve_enable": False}
    # SCS's own settings: SCS is cvxpylayers' default solver and does not run under ours (ignored, said).
    with pytest.warns(ConvexDDNWarning, match=r"ignores \['write_data_filename'\] .*SCS's setting"):
        layer = CvxpyLayer(problem, [A, b], [x], solver_args={"write_data_filename": "/dev/null"})
    assert layer.convex_layer.solver_args == {}
    # Values checked as ConvexLayer checks them, named as written.
    with pytest.raises(OptionError, match=r"solver_args\['equilibrate_enable'\] must be True or False, got 'no'"):
        CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "Clarabel", "equilibrate_enable": "no"})
    with pytest.raises(OptionError, match=r"solver_args\['nitref'\] must be an integer >= 0, got -1"):
        layer(At, bt, solver_args={"solve_method": "ECOS", "nitref": -1})
    with pytest.raises(OptionError, match=r"'direct_solve_method': 'nope'\} are not accepted by Clarabel"):
        layer(At, bt, solver_args={"direct_solve_method": "nope"})
    # Another solver's setting: refused naming its solver (cvxpylayers: the solver's TypeError or AttributeError).
    with pytest.raises(OptionError, match=r"solver_args\['nitref'\] is a setting of ECOS, not of the default solver"):
        layer(At, bt, solver_args={"nitref": 3})
    with pytest.raises(OptionError, match=r"solver_args\['direct_solve_method'\] is a setting of Clarabel, not of "
                                          r"SCS .*pass solve_method='Clarabel'"):
        layer(At, bt, solver_args={"solve_method": "SCS", "direct_solve_method": "qdldl"})
    # (cvxpylayers 1.2 hands them on, as the docstring says: SCS raises a TypeError, Clarabel an AttributeError)
    reference = Reference(problem, [A, b], [x])
    with pytest.raises(TypeError, match="direct_solve_method"):
        reference(At, bt, solver_args={"solve_method": "SCS", "direct_solve_method": "qdldl"})
    with pytest.raises(AttributeError, match="nitref"):
        reference(At, bt, solver_args={"solve_method": "Clarabel", "nitref": 3})
    # The constructor's settings reach each solver a call picks, as cvxpylayers merges them.
    layer = CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "Clarabel", "presolve_enable": False})
    with pytest.raises(OptionError, match=r"\['presolve_enable'\] is a setting of Clarabel, not of ECOS"):
        layer(At, bt, solver_args={"solve_method": "ECOS"})
    with pytest.raises(OptionError, match=r"unknown key\(s\) \['bogus'\]; .* and Clarabel's own settings \[.*"
                                          r"'direct_solve_method'"):
        layer(At, bt, solver_args={"bogus": 1})


# ---------------------------------------------------------------- constructor, dtype, errors


def test_cvxpy_layer_keeps_dtype():
    """cvxpylayers 1.2 returns float64 whatever comes in; we return the inputs' dtype."""
    problem, A, b, x = ridge_problem()
    layer = CvxpyLayer(problem, [A, b], [x])
    reference = Reference(problem, [A, b], [x])
    At, bt = torch.randn(2, 6, 3), torch.randn(2, 6)
    assert reference(At, bt)[0].dtype == torch.float64
    (sol32,) = layer(At, bt)
    (sol64,) = layer(At.double(), bt.double())
    assert sol32.dtype == torch.float32 and sol64.dtype == torch.float64
    assert torch.allclose(sol64, ridge_closed_form(At.double(), bt.double()), atol=1e-9)
    assert torch.allclose(sol32, sol64.float(), atol=1e-6)


@pytest.mark.parametrize("solver", [None, "DIFFCP", cp.CUCLARABEL, "diffcp"])
def test_cvxpy_layer_backends_map_to_auto(solver):
    problem, A, b, x = ridge_problem()
    layer = CvxpyLayer(problem, [A, b], [x], solver=solver)
    assert layer.convex_layer.solver == "auto"


def test_cvxpy_layer_replaced_backend_and_canon_backend_warn():
    problem, A, b, x = ridge_problem()
    with pytest.warns(ConvexDDNWarning, match=r"ignores \[\"solver='MOREAU'\"\]"):
        layer = CvxpyLayer(problem, [A, b], [x], solver="MOREAU")
    assert layer.convex_layer.solver == "auto"
    with pytest.warns(ConvexDDNWarning, match="canon_backend"):
        CvxpyLayer(problem, [A, b], [x], canon_backend="SCIPY")
    layer = CvxpyLayer(problem, [A, b], [x], solver="ECOS", verbose=True)
    assert layer.convex_layer.solver == "ECOS" and layer.convex_layer.solver_args == {"verbose": True}


def test_cvxpy_layer_invalid():
    problem, A, b, x = ridge_problem()
    with pytest.raises(OptionError, match="solver must be None or one of .*got 'OSQP'"):
        CvxpyLayer(problem, [A, b], [x], solver="OSQP")
    custom = SolverInterface.from_functions(lambda *args: None, lambda *args: None)
    with pytest.raises(OptionError, match="custom SolverInterface cannot be used"):
        CvxpyLayer(problem, [A, b], [x], solver=custom)
    # cvxpylayers' test_not_enough_parameters / test_too_many_variables: ValueError.
    with pytest.raises(ValueError):
        CvxpyLayer(problem, [A], [x])
    with pytest.raises(ProblemError):
        CvxpyLayer(problem, [A, b], [x, cp.Variable(1)])
    layer = CvxpyLayer(problem, [A, b], [x])
    with pytest.raises(ValueError):  # cvxpylayers' test_not_enough_parameters_at_call_time
        layer(torch.randn(6, 3))
    with pytest.raises(ValueError):  # test_incorrect_parameter_shape
        layer(torch.randn(4, 6, 3), torch.randn(4, 12))
    with pytest.raises(OptionError, match="warm_start=True is not supported"):
        layer(torch.randn(6, 3), torch.randn(6), warm_start=True)


def test_cvxpy_layer_infeasible_and_unbounded():
    """cvxpylayers' test_infeasible / test_unbounded; ours raise RuntimeError subclasses
    naming the status (cvxpylayers raises diffcp.SolverError)."""
    x = cp.Variable(1)
    param = cp.Parameter(1)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(param), [x >= 1, x <= -1]), [param], [x])
    with pytest.raises(InfeasibleError):
        layer(torch.ones(1))
    layer = CvxpyLayer(cp.Problem(cp.Minimize(x), [x <= param]), [param], [x])
    with pytest.raises(UnboundedError):
        layer(torch.ones(1))
    assert issubclass(InfeasibleError, RuntimeError)


def test_cvxpy_layer_several_variables_in_order():
    """argmin ‖u − p‖² + ‖v − 2p‖² s.t. u ≥ 0: (max(p, 0), 2p), returned in the
    constructor's order, whatever order is asked."""
    p = cp.Parameter(3)
    u, v = cp.Variable(3), cp.Variable(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(u - p) + cp.sum_squares(v - 2 * p)), [u >= 0])
    layer = CvxpyLayer(problem, [p], [v, u])
    pt = torch.tensor([[1.0, -2.0, 0.5]], dtype=F64)
    vs, us = layer(pt)
    assert torch.allclose(us, pt.clamp(min=0), atol=1e-8) and torch.allclose(vs, 2 * pt, atol=1e-8)


def test_cvxpy_layer_dual_variables_readme_example():
    """cvxpylayers' README: `variables=[x, eq_con.dual_variables[0]]` returns the
    multiplier too; against CVXPY's own dual value."""
    x = cp.Variable(2)
    c = cp.Parameter(2)
    b = cp.Parameter()
    eq_con = cp.sum(x) == b
    prob = cp.Problem(cp.Minimize(c @ x + 0.5 * cp.sum_squares(x)), [eq_con, x >= -5])
    layer = CvxpyLayer(prob, parameters=[c, b], variables=[x, eq_con.dual_variables[0]])
    c_tch = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    b_tch = torch.tensor(1.0, dtype=F64, requires_grad=True)
    x_star, eq_dual = layer(c_tch, b_tch)
    c.value, b.value = c_tch.detach().numpy(), 1.0
    prob.solve(solver="CLARABEL")
    assert np.abs(x_star.detach().numpy() - x.value).max() < 1e-7
    assert abs(eq_dual.item() - eq_con.dual_value) < 1e-7


def test_cvxpy_layer_solver_args_values_checked():
    # A wrong value used to pass construction and raise a raw TypeError from the solver.
    problem, A, b, x = ridge_problem()
    with pytest.raises(OptionError, match=r"solver_args\['max_iters'\] must be an integer, got '100'"):
        CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "SCS", "max_iters": "100"})
    with pytest.raises(OptionError, match=r"solver_args\['max_iters'\] must be an integer >= 1, got -5"):
        CvxpyLayer(problem, [A, b], [x], solver_args={"max_iters": -5})
    with pytest.raises(OptionError, match=r"solver_args\['verbose'\] must be True or False"):
        CvxpyLayer(problem, [A, b], [x], solver_args={"verbose": "yes"})
    layer = CvxpyLayer(problem, [A, b], [x])
    gen = torch.Generator().manual_seed(7)
    At, bt = torch.randn(6, 3, dtype=F64, generator=gen), torch.randn(6, dtype=F64, generator=gen)
    with pytest.raises(OptionError, match=r"solver_args\['max_iters'\] must be an integer"):
        layer(At, bt, solver_args={"solve_method": "ECOS", "max_iters": "100"})


_BAD_IGNORED = [  # (key, value, what the message says is expected): one key of each kind ignored here
    ("eps", -1, "a finite number >= 0"), ("eps", "1e-8", "a finite number >= 0"), ("eps", float("nan"), ">= 0"),
    ("eps", float("inf"), "a finite number >= 0"), ("eps_abs", -1e-9, ">= 0"), ("abstol", 0.0, "> 0"),
    ("tol_gap_abs", -1.0, ">= 0"), ("alpha", 2.5, r"in \(0, 2\)"), ("scale", -1, "> 0"),
    ("acceleration_lookback", 1.5, "an integer"), ("normalize", "yes", "True or False"),
    ("mode", "fast", r"one of \['dense'"), ("n_jobs_forward", 0, r"an integer >= 1, or -1"),
    ("n_jobs_backward", -2, r"an integer >= 1, or -1"), ("raise_on_error", "no", "True or False"),
    ("warm_starts", 3, "None or a list"), ("derivative_kwargs", 1, "a dict"), ("log_csv_filename", 3, "a string")]


@pytest.fixture(scope="module")
def nonneg_projection():
    """argmin_{y >= 0} ‖y − x‖² as a CvxpyLayer with no solver_args."""
    x, y = cp.Parameter(2), cp.Variable(2)
    return CvxpyLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0]), [x], [y])


@pytest.mark.parametrize("key, value, expected", _BAD_IGNORED)
def test_cvxpy_layer_ignored_solver_args_values_checked_invalid(key, value, expected, nonneg_projection):
    """solver_args CvxpyLayer accepts and ignores (SCS's eps, diffcp's mode, ...) took any
    value: eps=-1 or eps="1e-8" passed with the ignore warning. Each is now checked as the
    solver (or diffcp) that takes it would, at construction and per call."""
    x, y = cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    message = rf"solver_args\['{key}'\] must be .*{expected}.*, got {re.escape(repr(value))}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the ignore warning
        with pytest.raises(OptionError, match=message):
            CvxpyLayer(prob, [x], [y], solver_args={key: value})
        with pytest.raises(OptionError, match=message):
            nonneg_projection(torch.ones(2, dtype=F64), solver_args={key: value})


def test_cvxpy_layer_ignored_solver_args_valid_values_taken():
    """The values cvxpylayers' users pass to those keys are still taken (with the warning)."""
    x, y = cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    args = {"eps": 1e-10, "eps_abs": 0, "acceleration_lookback": -10, "normalize": False, "alpha": 1.5,
            "mode": "dense", "n_jobs_forward": -1, "n_jobs_backward": 4, "derivative_kwargs": {},
            "warm_starts": None, "raise_on_error": False}
    with pytest.warns(ConvexDDNWarning, match="ignores"):
        (sol,) = CvxpyLayer(prob, [x], [y], solver_args=args)(torch.tensor([1.0, -2.0], dtype=F64))
    assert torch.allclose(sol, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-9)


def test_cvxpylayer_verbose_must_be_a_bool():
    """verbose="yes" was taken as True (only its truthiness was read)."""
    x, y = cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    with pytest.raises(OptionError, match="verbose"):
        CvxpyLayer(prob, parameters=[x], variables=[y], verbose="yes")


def test_cvxpylayer_verbose_takes_what_cvxpylayers_takes():
    """The drop-in takes bools, NumPy bools and 0/1 as cvxpylayers does (a strict bool
    check refused them); only other values are errors."""
    x, y = cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    for v in (False, 0, 1, np.False_):
        CvxpyLayer(prob, parameters=[x], variables=[y], verbose=v)


def test_cvxpy_layer_takes_diffcp_time_limit_raise_on_error_and_warm_starts():
    """solver_args cvxpylayers 1.2 takes with its diffcp backend were refused as unknown:
    SCS's time_limit_secs (applied, as Clarabel's time_limit too), diffcp's
    raise_on_error and warm_starts (ignored, with the one warning)."""
    problem, A, b, x = ridge_problem()
    gen = torch.Generator().manual_seed(11)
    At, bt = torch.randn(2, 6, 3, dtype=F64, generator=gen), torch.randn(2, 6, dtype=F64, generator=gen)
    expected = ridge_closed_form(At, bt)
    # Applied: SCS takes time_limit_secs, Clarabel time_limit (either spelling).
    layer = CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "SCS", "time_limit_secs": 10})
    assert layer.convex_layer.solver == "SCS" and layer.convex_layer.solver_args == {"time_limit_secs": 10.0}
    (sol,) = layer(At, bt)
    assert torch.allclose(sol, expected, atol=1e-8)
    # Per call it reaches Clarabel as time_limit (0 is SCS's "no limit": Clarabel's inf, test below).
    layer(At, bt, solver_args={"solve_method": "Clarabel", "time_limit_secs": 10})
    assert layer.layers["Clarabel"].last_solve.statuses == ["Solved", "Solved"]
    assert APPLIED_SOLVER_ARGS["time_limit_secs"]["Clarabel"] == "time_limit"
    layer = CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "Clarabel", "time_limit": 5})
    assert layer.convex_layer.solver_args == {"time_limit": 5.0}
    assert torch.allclose(layer(At, bt)[0], expected, atol=1e-8)
    with pytest.warns(ConvexDDNWarning, match=r"\['time_limit_secs'\] reach only the per-element solver"):
        layer = CvxpyLayer(problem, [A, b], [x], solver_args={"time_limit_secs": 10})
    assert layer.convex_layer.solver == "auto" and layer.convex_layer.solver_args == {"time_limit": 10.0}
    # ECOS has no time limit (cvxpylayers raises a TypeError there); a bad value is named.
    with pytest.raises(OptionError, match=r"\['time_limit_secs'\] cannot reach solver 'ECOS'"):
        CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "ECOS", "time_limit_secs": 10})
    with pytest.raises(OptionError, match=r"\['time_limit'\] cannot reach solver 'ECOS'"):
        CvxpyLayer(problem, [A, b], [x])(At, bt, solver_args={"solve_method": "ECOS", "time_limit": 10})
    with pytest.raises(OptionError, match=r"solver_args\['time_limit_secs'\] must be a number of seconds >= 0"):
        CvxpyLayer(problem, [A, b], [x], solver_args={"solve_method": "SCS", "time_limit_secs": -1})
    with pytest.raises(OptionError, match="both time_limit_secs and time_limit"):
        CvxpyLayer(problem, [A, b], [x], solver_args={"time_limit_secs": 1, "time_limit": 1})
    # Ignored with the one warning: the same answer as without them.
    plain = CvxpyLayer(problem, [A, b], [x])(At, bt)[0]
    for args in ({"raise_on_error": False}, {"raise_on_error": True}, {"warm_starts": None},
                 {"warm_starts": [None, None]}):
        with pytest.warns(ConvexDDNWarning, match=rf"ignores \['{next(iter(args))}'\]") as caught:
            layer = CvxpyLayer(problem, [A, b], [x], solver_args=args)
        assert len([w for w in caught if issubclass(w.category, ConvexDDNWarning)]) == 1
        (sol,) = layer(At, bt)
        assert torch.equal(sol, plain)
        assert torch.allclose(sol, expected, atol=1e-8)
    with pytest.warns(ConvexDDNWarning, match=r"raise_on_error: .*always raises InfeasibleError"):
        CvxpyLayer(problem, [A, b], [x])(At, bt, solver_args={"raise_on_error": False, "warm_starts": None})
    for key in ("raise_on_error", "warm_starts"):
        assert key in IGNORED_SOLVER_ARGS


def test_cvxpy_layer_zero_size_parameter_invalid():
    """A zero-size parameter was refused with cvxpylayers' bare 'KeyError: 3' (cvxpylayers
    itself raises that KeyError), naming no parameter."""
    q, y = cp.Parameter(2, name="q"), cp.Variable(2)
    G, h = cp.Parameter((0, 2), name="G"), cp.Parameter(0, name="h")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y) + q @ y), [G @ y <= h])
    for solver in (None, "SCS"):
        with pytest.raises(ProblemError, match=r"parameters\[1\] \(G, shape \(0, 2\)\) has no entries \(zero size\)"):
            CvxpyLayer(prob, [q, G, h], [y], solver=solver)


def test_cvxpy_layer_complex_parameter_scs_invalid_imag_works():
    """complex=True is refused at construction whatever the solver (SCS included), naming
    the parameter; imag=True works, also when one problem is compiled again for a
    per-call solve_method or a second layer (CVXPY's cached compilation failed there with
    'Invalid dimensions () for Parameter value')."""
    y = cp.Variable(2)
    c = cp.Parameter(2, complex=True, name="c")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - cp.real(c))))
    for solver in (None, "SCS"):
        with pytest.raises(ProblemError, match=r"parameters\[0\] \(c, shape \(2,\)\) is declared complex=True: "
                                               r"ConvexLayer takes real parameters only"):
            CvxpyLayer(prob, [c], [y], solver=solver)
    p = cp.Parameter(2, imag=True, name="p")
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - 2 * cp.imag(p))), [y <= 3])
    value = torch.tensor([[1.0, -2.0], [2.0, 5.0]], dtype=F64)
    expected = torch.tensor([[2.0, -4.0], [3.0, 3.0]], dtype=F64)
    layer = CvxpyLayer(prob, [p], [y], solver="SCS")
    for args in (None, {"solve_method": "Clarabel"}, {"solve_method": "ECOS"}):
        torch.testing.assert_close(layer(value, solver_args=args)[0], expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(CvxpyLayer(prob, [p], [y], solver="SCS")(value)[0], expected, atol=1e-7, rtol=0)


def test_cvxpy_layer_solver_args_errors_name_the_key_as_passed():
    """A bad value of a translated key was reported under the key it became and with
    ConvexLayer's internal wording: solver_args={'max_iters': 0} raised
    "solver_args (per call)['max_iter'] must be an integer >= 1, got 0". Every translated
    key is now named as the user wrote it, per call and in the constructor."""
    problem, A, b, x = ridge_problem()
    gen = torch.Generator().manual_seed(3)
    At, bt = torch.randn(6, 3, dtype=F64, generator=gen), torch.randn(6, dtype=F64, generator=gen)
    layer = CvxpyLayer(problem, [A, b], [x])
    cases = [  # (solver_args, message): each key reaches its solver under another spelling
        ({"max_iters": 0}, r"solver_args\['max_iters'\] must be an integer >= 1, got 0$"),
        ({"max_iters": 2.5}, r"solver_args\['max_iters'\] must be an integer, got 2\.5$"),
        ({"solve_method": "Clarabel", "max_iters": 0}, r"solver_args\['max_iters'\] must be an integer >= 1, got 0$"),
        ({"solve_method": "SCS", "max_iter": 0}, r"solver_args\['max_iter'\] must be an integer >= 1, got 0$"),
        ({"solve_method": "ECOS", "max_iter": "9"}, r"solver_args\['max_iter'\] must be an integer, got '9'$"),
        ({"time_limit_secs": -1}, r"solver_args\['time_limit_secs'\] must be a number of seconds >= 0"),
        ({"solve_method": "Clarabel", "time_limit_secs": float("nan")},
         r"solver_args\['time_limit_secs'\] must be a number of seconds >= 0"),
        ({"solve_method": "SCS", "time_limit": -1}, r"solver_args\['time_limit'\] must be a number of seconds >= 0"),
        ({"max_iters": 2**40}, r"solver_args \{'max_iters': 1099511627776\} are not accepted by Clarabel"),
    ]
    for args, message in cases:
        with pytest.raises(OptionError, match=message) as per_call:
            layer(At, bt, solver_args=args)
        assert "per call" not in str(per_call.value)
        with pytest.raises(OptionError, match=message):
            CvxpyLayer(problem, [A, b], [x], solver_args=args)
    # The translated keys still reach the solver (values checked as it takes them).
    with pytest.warns(ConvexDDNWarning, match="reach only the per-element solver"):
        layer = CvxpyLayer(problem, [A, b], [x], solver_args={"max_iters": 7})
    assert layer.convex_layer.solver_args == {"max_iter": 7}


def _ridge_layer(seed: int):
    """A CvxpyLayer of the ridge problem and random data for it."""
    problem, A, b, x = ridge_problem()
    gen = torch.Generator().manual_seed(seed)
    return (CvxpyLayer(problem, [A, b], [x]), torch.randn(6, 3, dtype=F64, generator=gen),
            torch.randn(6, dtype=F64, generator=gen))


def test_cvxpy_layer_notices_not_used_up_by_a_refused_call():
    """The once-per-layer notices (keys that reach only the per-element solver under the
    default solver; keys ignored) were issued before the call's solver_args were checked:
    a call refused for max_iters=0 used them up, and the next, valid, call said nothing."""
    layer, At, bt = _ridge_layer(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(OptionError, match=r"must be an integer >= 1, got 0"):
            layer(At, bt, solver_args={"max_iters": 0, "eps": 1e-9})
        with pytest.raises(OptionError, match=r"\['time_limit'\] cannot reach solver 'ECOS'"):
            layer(At, bt, solver_args={"solve_method": "ECOS", "time_limit": 1, "eps": 1e-9})
        assert not [w for w in caught if issubclass(w.category, ConvexDDNWarning)]
        (sol,) = layer(At, bt, solver_args={"max_iters": 50, "eps": 1e-9})
        torch.testing.assert_close(sol, ridge_closed_form(At, bt), atol=1e-7, rtol=0)
        layer(At, bt, solver_args={"max_iters": 50, "eps": 1e-9})
    notices = [str(w.message) for w in caught if issubclass(w.category, ConvexDDNWarning)]
    assert len(notices) == 2, notices
    assert any("CvxpyLayer ignores ['eps']" in m for m in notices), notices
    assert any("['max_iters'] reach only the per-element solver" in m for m in notices), notices
    assert all(w.filename == __file__ for w in caught if issubclass(w.category, ConvexDDNWarning))


def test_cvxpy_layer_notices_not_used_up_by_a_call_they_failed():
    """Under simplefilter("error", ConvexDDNWarning) (docs/api/errors.md) a notice raises and the
    call fails; its once-per-layer flag was set before the warning, so the identical second call
    returned silently, ignoring eps (a failed call changed the layer). Now both calls raise,
    for each notice (keys ignored; keys that reach only the per-element solver), and once the
    filter is lifted each notice is given once, the solution the ridge's closed form."""
    layer, At, bt = _ridge_layer(6)
    for args, said in (({"eps": 1e-9}, r"CvxpyLayer ignores \['eps'\]"),
                       ({"max_iters": 50}, r"\['max_iters'\] reach only the per-element solver")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvexDDNWarning)
            for _ in range(2):
                with pytest.raises(ConvexDDNWarning, match=said):
                    layer(At, bt, solver_args=args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (sol,) = layer(At, bt, solver_args=args)
            layer(At, bt, solver_args=args)
        assert len([w for w in caught if issubclass(w.category, ConvexDDNWarning)]) == 1, [str(w) for w in caught]
        torch.testing.assert_close(sol, ridge_closed_form(At, bt), atol=1e-7, rtol=0)


def test_cvxpy_layer_failed_call_leaves_the_module_tree():
    """A per-call solve_method's layer was added to ``layers`` before its call: a call that
    raised (a NaN parameter) left 'layers.SCS' in named_modules() and the repr. It joins
    only once its call succeeds."""
    layer, At, bt = _ridge_layer(7)
    names, text = [n for n, _ in layer.named_modules()], repr(layer)
    for method in ("SCS", "ECOS"):
        with pytest.raises(NonFiniteError):
            layer(At, torch.full_like(bt, float("nan")), solver_args={"solve_method": method})
        assert [n for n, _ in layer.named_modules()] == names and repr(layer) == text
    (sol,) = layer(At, bt, solver_args={"solve_method": "ECOS"})
    torch.testing.assert_close(sol, ridge_closed_form(At, bt), atol=1e-7, rtol=0)
    assert [n for n, _ in layer.named_modules()] == names + ["layers.ECOS"]


def test_cvxpy_layer_notice_names_the_callers_line_however_called():
    """The notices walk out to the caller's frame: a fixed stack level counted the frames
    of nn.Module's call machinery, so calling ``forward`` directly (or through another
    wrapper) attributed the warning to a frame of pytest's instead of this file."""
    layer, At, bt = _ridge_layer(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.forward(At, bt, solver_args={"eps": 1e-9})
    notices = [w for w in caught if issubclass(w.category, ConvexDDNWarning)]
    assert notices and all(w.filename == __file__ for w in notices), [(w.filename, str(w.message)) for w in notices]


@pytest.mark.parametrize("value", [torch.tensor([1.0, 2.0]), torch.tensor(1.0), np.array([1.0]), np.array(1), 0.5,
                                   "yes"])
def test_cvxpylayer_switches_refuse_arrays_and_tensors(value):
    """verbose=np.array([1.]) was taken as True, a two-entry tensor (verbose or the call's
    warm_start) raised torch's "Boolean value of Tensor ... is ambiguous"."""
    x, y = cp.Parameter(2), cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= 0])
    with pytest.raises(OptionError, match=r"^verbose must be True or False \(or 0/1\), got"):
        CvxpyLayer(prob, parameters=[x], variables=[y], verbose=value)
    layer = CvxpyLayer(prob, parameters=[x], variables=[y])
    with pytest.raises(OptionError, match=r"^warm_start must be True or False \(or 0/1\), got"):
        layer(torch.randn(2, dtype=torch.float64), warm_start=value)
    for ok in (False, 0, np.False_, np.int64(0), 0.0):  # what cvxpylayers takes, still taken
        layer(torch.randn(2, dtype=torch.float64), warm_start=ok)


def test_cvxpy_layer_time_limit_zero_means_no_limit():
    """solver_args={'time_limit_secs': 0} is SCS's "no limit" (diffcp's default solver);
    it reached Clarabel as time_limit=0, which stops at once: every per-element Clarabel
    solve failed and SCS rescued it. Now 0 (or inf) reaches each solver as its own "no
    limit": Clarabel's inf, SCS's 0 (SCS refuses inf). Reference: the projection onto
    {X ⪰ 0, tr X = 1}, V diag(Π_simplex(λ)) Vᵀ (a PSD cone: the per-element path)."""
    k = 4
    C, X = cp.Parameter((k, k)), cp.Variable((k, k), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - C)), [X >> 0, cp.trace(X) == 1])
    M = np.random.default_rng(34).standard_normal((2, k, k))
    c = M + M.transpose(0, 2, 1)
    lam, V = np.linalg.eigh(c)
    w = np.stack([_simplex_projection(v) for v in lam])
    expected = torch.tensor(np.einsum("bij,bj,bkj->bik", V, w, V))
    for args in ({"time_limit_secs": 0}, {"time_limit_secs": 0, "solve_method": "Clarabel"},
                 {"time_limit": 0, "solve_method": "Clarabel"}, {"time_limit_secs": float("inf")}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SolverWarning)  # no element rescued by another solver
            warnings.simplefilter("ignore", ConvexDDNWarning)  # (the per-element notice)
            layer = CvxpyLayer(prob, [C], [X], solver_args=args)
            assert layer.convex_layer.solver_args == {"time_limit": float("inf")}
            torch.testing.assert_close(layer(torch.tensor(c))[0], expected, atol=1e-7, rtol=0)
        assert layer.convex_layer.last_solve.solvers == ["Clarabel", "Clarabel"], args
    for value in (0, float("inf")):  # SCS: 0 disables its limit, inf is refused by SCS itself
        layer = CvxpyLayer(prob, [C], [X], solver_args={"solve_method": "SCS", "time_limit_secs": value})
        assert layer.convex_layer.solver_args == {"time_limit_secs": 0.0}
        torch.testing.assert_close(layer(torch.tensor(c))[0], expected, atol=1e-6, rtol=0)
        assert layer.convex_layer.last_solve.solvers == ["SCS", "SCS"]


def test_cvxpy_layer_solver_choice_errors_name_the_option_used():
    """A per-call solve_method='ECOS' on an SDP was refused naming solver='ECOS', which the
    user never passed; quad_form(x, P) of a parameter P with solve_method='SCS' raised
    NotDPPError advising solver='auto' or 'batched', which CvxpyLayer refuses. Both now
    name the option the solver was chosen by, and the advice is what works there."""
    X, C = cp.Variable((2, 2), symmetric=True), cp.Parameter((2, 2))
    sdp = cp.Problem(cp.Minimize(cp.sum_squares(X - C)), [X >> 0])
    layer = CvxpyLayer(sdp, [C], [X])
    with pytest.raises(OptionError, match=r"^solver_args\['solve_method'\]='ECOS' cannot solve semidefinite cones"):
        layer(torch.eye(2, dtype=F64), solver_args={"solve_method": "ECOS"})
    with pytest.raises(OptionError, match=r"^solver_args\['solve_method'\]='ECOS' cannot solve semidefinite cones"):
        CvxpyLayer(sdp, [C], [X], solver_args={"solve_method": "ECOS"})
    with pytest.raises(OptionError, match=r"^solver='ECOS' cannot solve semidefinite cones"):
        CvxpyLayer(sdp, [C], [X], solver="ECOS")
    torch.testing.assert_close(layer(torch.eye(2, dtype=F64))[0], torch.eye(2, dtype=F64), atol=1e-8, rtol=0)
    x, P, q = cp.Variable(2), cp.Parameter((2, 2), PSD=True), cp.Parameter(2)
    qp = cp.Problem(cp.Minimize(cp.quad_form(x, P) + q @ x), [x >= -1])
    layer = CvxpyLayer(qp, [P, q], [x])
    P_t, q_t = torch.eye(2, dtype=F64), torch.ones(2, dtype=F64)
    with pytest.raises(OptionError, match=r"^solver_args\['solve_method'\]='SCS' cannot solve this problem: .*; "
                                          r"drop solve_method: the default solver takes it$"):
        layer(P_t, q_t, solver_args={"solve_method": "SCS"})
    with pytest.raises(OptionError, match=r"^solver='SCS' cannot solve this problem: .*; use solver=None"):
        CvxpyLayer(qp, [P, q], [x], solver="SCS")
    # The advice works: argmin xᵀx + 1ᵀx over x >= -1 is -1/2 per entry.
    torch.testing.assert_close(layer(P_t, q_t)[0], torch.full((2,), -0.5, dtype=F64), atol=1e-8, rtol=0)
    # Outside a wrapper the message names ConvexLayer's own option again.
    with pytest.raises(OptionError, match=r"^solver='ECOS' cannot solve semidefinite cones"):
        ConvexLayer(sdp, [C], [X], solver="ECOS")


def test_cvxpy_layer_symmetric_parameter_gradient_is_the_documented_split():
    """The README's migration section lists every difference from cvxpylayers; it did not
    list this one: the gradient in a symmetric/PSD parameter is the symmetric split
    (G + Gᵀ)/2, where cvxpylayers returns triu(G + Gᵀ − diag G). Reference: for S ≻ 0,
    argmin_{X ⪰ 0} ‖X − S‖² = S, so d⟨W, X⟩/dS along symmetric directions is sym(W)."""
    import pathlib

    n = 3
    X, S = cp.Variable((n, n), symmetric=True), cp.Parameter((n, n), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - S)), [X >> 0])
    gen = torch.Generator().manual_seed(21)
    B = torch.randn(n, n, dtype=F64, generator=gen)
    s = (B @ B.T + torch.eye(n, dtype=F64)).requires_grad_()
    W = torch.randn(n, n, dtype=F64, generator=gen)
    (g,) = torch.autograd.grad((CvxpyLayer(prob, [S], [X])(s)[0] * W).sum(), s)
    sym = (W + W.T) / 2
    torch.testing.assert_close(g, sym, atol=1e-8, rtol=0)
    (g_ref,) = torch.autograd.grad((Reference(prob, [S], [X])(s, solver_args={"eps": 1e-12, "max_iters": 100_000})[0]
                                    * W).sum(), s)
    torch.testing.assert_close(g_ref, torch.triu(2 * sym - torch.diag(torch.diag(sym))), atol=1e-6, rtol=0)
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Migrating from cvxpylayers"):]
    differences = section[section.index("Differences:"):]
    differences = " ".join(differences[:differences.index("\n\n")].split())
    assert "symmetric split `(G + Gᵀ)/2`" in differences and "upper triangle" in differences


def test_cvxpy_layer_refuses_tracing_and_vmap_by_its_own_name():
    """torch.jit.trace of a CvxpyLayer named "ConvexLayer" (the layer inside), after two
    TracerWarnings from the batch-shape check reading the values; it and torch.func.vmap now
    name the caller's layer, before any check runs."""
    problem, A, b, x = ridge_problem()
    layer = CvxpyLayer(problem, [A, b], [x])
    gen = torch.Generator().manual_seed(5)
    A_t, b_t = torch.randn(2, 6, 3, dtype=F64, generator=gen), torch.randn(2, 6, dtype=F64, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        with pytest.raises(ProblemError, match="^CvxpyLayer does not run under torch.jit.trace"):
            torch.jit.trace(lambda a, c: layer(a, c)[0], (A_t, b_t))
    with pytest.raises(ProblemError, match="^CvxpyLayer"):
        torch.func.vmap(lambda a, c: layer(a, c)[0])(A_t, b_t)


def test_cvxpy_layer_names_a_single_parameter_or_variable_as_convex_layer_does():
    """A single cp.Parameter (or Variable) for the list: CvxpyLayer iterated over its entries and
    named an expression the user never wrote ("parameters[0] ... x[0]"), or a scalar's as an empty
    list; the message is ConvexLayer's, with the fix."""
    x, y, lam = cp.Parameter(3, name="x"), cp.Variable(3, name="y"), cp.Parameter(nonneg=True, name="lam")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(y - x) + lam * cp.norm1(y)))
    for parameters, variables, message in (
            (x, [y], r"parameters must be a list of cvxpy.Parameter, got a single cvxpy.Parameter 'x' .*\[x\]"),
            ([x, lam], y, r"variables must be a list of cvxpy.Variable, got a single cvxpy.Variable 'y' .*\[y\]"),
            (lam, [y], r"got a single cvxpy.Parameter 'lam' of shape \(\)"),
            (y, [y], r"parameters must be a list of cvxpy.Parameter, got "),
            (x[:2], [y], r"parameters must be a list of cvxpy.Parameter, got "),
            (None, [y], r"parameters must be a list of cvxpy.Parameter, got None"),
            ([x, lam], None, r"variables must be a list of cvxpy.Variable, got None")):
        with pytest.raises(ProblemError, match=message):
            CvxpyLayer(problem, parameters=parameters, variables=variables)
