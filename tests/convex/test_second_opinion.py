"""The second opinion: Clarabel on the batched program, certified by the batched path.

Expected values are closed forms or Clarabel through its own Python API (the test
module of the interior point), never the code under test.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

from convexddn.convex.interior_point import solve_cone_batch
from convexddn.convex.second_opinion import clarabel_points
from convexddn.errors import SolverWarning

sys.path.insert(0, str(Path(__file__).parent))
from test_interior_point import LAYOUTS, clarabel_solve, random_program  # noqa: E402
from test_reliability import _scaled_qp  # noqa: E402

SOLVED = 0


@pytest.mark.parametrize("kind", ["qp", "socp", "lp"])
def test_clarabel_points_match_clarabel(kind):
    layout, n, lp = LAYOUTS[kind]
    P, q, A, b = random_program(layout, n, 4, seed=5, lp=lp)
    x, s, z, usable = clarabel_points(P, q, A, b, layout)
    assert usable.all() and x.dtype == q.dtype and x.shape == q.shape and s.shape == z.shape == b.shape
    for i in range(4):
        want, status = clarabel_solve(P[i], q[i], A[i], b[i], layout)
        assert status in ("Solved", "AlmostSolved")
        # Interior-point points err by ~μ (QP) to ~√μ (second-order cones); the polish fixes that.
        torch.testing.assert_close(x[i], torch.from_numpy(want), atol=1e-5 if layout.soc else 1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["qp", "socp"])
def test_start_is_polished_and_certified(kind):
    """A start at the solution is kept (no iterations); one with x off by 1e-2 but the
    right active set is repaired by the polish; without polish it is rejected, not
    returned as solved."""
    layout, n, lp = LAYOUTS[kind]
    P, q, A, b = random_program(layout, n, 3, seed=2, lp=lp)
    x, s, z, _ = clarabel_points(P, q, A, b, layout)
    want = torch.stack([torch.from_numpy(clarabel_solve(P[i], q[i], A[i], b[i], layout)[0]) for i in range(3)])
    atol = 1e-5 if layout.soc else 1e-8  # Clarabel's own points err by ~√μ on cones
    iterated = solve_cone_batch(P, q, A, b, layout)  # the usual batched iterations
    assert iterated.status.tolist() == [SOLVED] * 3
    sol = solve_cone_batch(P, q, A, b, layout, start=(x, s, z))
    assert sol.status.tolist() == [SOLVED] * 3 and sol.iterations.tolist() == [0] * 3
    torch.testing.assert_close(sol.x, want, atol=atol, rtol=0)
    torch.testing.assert_close(sol.x, iterated.x, atol=1e-9, rtol=0)
    off = (x + 1e-2, s, z)
    sol = solve_cone_batch(P, q, A, b, layout, start=off, polish="always")
    assert sol.status.tolist() == [SOLVED] * 3
    torch.testing.assert_close(sol.x, iterated.x, atol=1e-9, rtol=0)
    sol = solve_cone_batch(P, q, A, b, layout, start=off, polish="never")
    assert SOLVED not in sol.status.tolist()


@pytest.mark.parametrize("scale", [1e7, 3e7])
def test_default_layer_solves_badly_scaled_qp_by_second_opinion(scale):
    """min ½‖s·y‖² + s²y₁ − s²y₂ + y₃ s.t. y₁ ≤ s², y₃ ≤ 1: the batched iterations do not
    certify it at s = 1e7 and the per-element path (second-order-cone form, entries s⁴)
    called it unbounded (UnboundedError before this stage existed). Clarabel on the
    batched program solves it; y* = (−1, 1, −1/s²) and dy/dq = −I/s² (constraints
    inactive)."""
    layer, data, want = _scaled_qp(scale)
    q = data[1].clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        y = layer(data[0], q, data[2], data[3])
    info = layer.last_solve
    assert info.solvers == ["Clarabel (batched form)"] and info.backend == ["batched"]
    assert info.statuses == ["solved"]
    torch.testing.assert_close(y, want, atol=1e-9, rtol=0)
    w = torch.tensor([0.3, -1.2, 2.0], dtype=y.dtype)
    (g,) = torch.autograd.grad(y @ w, q)
    torch.testing.assert_close(g * scale ** 2, -w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("wrong", [False, True])
def test_second_opinion_point_is_checked_not_trusted(wrong, monkeypatch):
    """With the batched iterations cut to one (so they fail) and no polish, Clarabel's
    own point is certified as it is; a wrong one (x + 1) is rejected by the same checks
    and the element goes on to the per-element path, which solves it."""
    import convexddn.convex.batched as batched

    def off(P, q, A, b, layout):
        x, s, z, ok = clarabel_points(P, q, A, b, layout)
        return x + 1.0, s, z, ok

    if wrong:
        monkeypatch.setattr(batched, "clarabel_points", off)
    layer, data, want = _scaled_qp(10.0)
    layer._batched.max_iter, layer._batched.polish = 1, "never"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        y = layer(*data)
    info = layer.last_solve
    if wrong:
        assert info.backend == ["per_element"] and info.solvers == ["Clarabel"]
    else:
        assert info.backend == ["batched"] and info.solvers == ["Clarabel (batched form)"]
    torch.testing.assert_close(y, want, atol=1e-8, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_second_opinion_on_cuda():
    """Clarabel runs on the host; the point, the checks and the gradient come back to
    the parameters' device and agree with the closed form."""
    layer, data, want = _scaled_qp(1e7)
    q = data[1].cuda().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        y = layer(data[0].cuda(), q, data[2].cuda(), data[3].cuda())
    assert y.device.type == "cuda" and layer.last_solve.solvers == ["Clarabel (batched form)"]
    torch.testing.assert_close(y.cpu(), want, atol=1e-9, rtol=0)
    (g,) = torch.autograd.grad(y.sum(), q)
    torch.testing.assert_close(g.cpu() * 1e14, -torch.ones(3, dtype=y.dtype), atol=1e-9, rtol=1e-9)


def test_per_element_failures_get_second_opinion_on_registry_problem():
    """Birkhoff n = 4 with data ×1e3 (seed 3): Clarabel on cvxpylayers' form ends
    "Optimal Inaccurate" with KKT residuals 0.16-1.3 on these five elements (and the SCS
    fallback, by default, at its iteration limit with 0.16-0.45), so the per-element path
    alone fails them (all five on one machine, four on another: the failures depend on
    the floating-point details); the batched form solves them, and agrees with the
    default layer."""
    import convexddn as cddn

    gen = torch.Generator().manual_seed(3)
    layer = cddn.layer("birkhoff", n=4, backend="cvxpy", solver="Clarabel", fallback=None)
    params = [1e3 * torch.randn(64, *p.shape, dtype=torch.float64, generator=gen)[[3, 6, 28, 38, 46]]
              for p in layer.parameters_]
    alone = cddn.layer("birkhoff", n=4, backend="cvxpy", solver="Clarabel", fallback=None, on_failure="mask")
    alone._opinion = False  # the per-element path without second opinions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        alone(*params)
    failed = (~alone.last_solve.solved).tolist()
    assert sum(failed) >= 3, failed
    y = layer(*params)
    assert all(b == "batched" for b, f in zip(layer.last_solve.backend, failed) if f), layer.last_solve.backend
    want = cddn.layer("birkhoff", n=4, backend="cvxpy")(*params)
    torch.testing.assert_close(y, want, atol=1e-9 * float(want.abs().max()), rtol=0)


def test_layer_pickled_without_second_opinion_state_still_gives_one():
    """A layer pickled before second opinions existed has no ``_opinion``; it loads,
    and builds the batched form when a per-element result is in doubt."""
    import copy

    layer, data, want = _scaled_qp(1e4, solver="Clarabel")
    state = layer.__getstate__()
    del state["_opinion"]
    old = copy.copy(layer)
    old.__dict__.clear()
    old.__setstate__(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        y = old(*data)
    assert old.last_solve.backend == ["batched"]
    torch.testing.assert_close(y, want, atol=1e-8, rtol=0)
