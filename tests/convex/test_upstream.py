"""A NaN or Inf in the incoming gradient (or a tangent): both paths make those elements'
gradients NaN, as torch propagates it (a shared parameter's sum too), silently, and keep
the other elements' exact. Until 2026-12-06 they were zeroed under a GradientWarning, which
hid an fp16 overflow from torch.amp.GradScaler (the step was taken on part of the batch)."""
from __future__ import annotations

import math
import warnings

import cvxpy as cp
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import convexddn as cddn
from convexddn.errors import GradientWarning

F64 = torch.float64
SOLVERS = ["batched", "Clarabel"]  # the batched path and the per-element one


def _min_layer(solver, **kw):
    # y = min(q, c): dy/dq = [q < c], dy/dc = the count of q > c.
    q, c = cp.Parameter(3), cp.Parameter(1)
    y = cp.Variable(3)
    return cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - q)), [y <= c]), [q, c], [y],
                            solver=solver, **kw)


Q0 = [[0.2, 1.5, -0.4], [0.9, -1.0, 2.0], [1.7, 0.1, 0.3]]


def _gradient_warnings(caught) -> list[str]:
    return [str(m.message) for m in caught if issubclass(m.category, GradientWarning)]


def _grads(layer, Q, C, w):
    """The gradients of Q and C, and the GradientWarnings of the backward (none expected:
    the NaN is the caller's, as in torch)."""
    Q = Q.detach().clone().requires_grad_(True)
    C = C.detach().clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(Q, C).backward(w)
    return Q.grad, C.grad, _gradient_warnings(caught)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("solver", SOLVERS)
def test_nonfinite_cotangent_makes_that_elements_gradients_nan_and_keeps_the_others(solver, bad):
    # Zeroed before: the element's own gradient 0, under a GradientWarning.
    layer = _min_layer(solver)
    Q = torch.tensor(Q0, dtype=F64)
    C = torch.tensor([[1.0], [0.5], [1.2]], dtype=F64)  # batched c: per-element gradients
    w = torch.ones(3, 3, dtype=F64)
    w[1, 2] = bad
    gQ, gC, said = _grads(layer, Q, C, w)
    assert torch.isnan(gQ[1]).all() and torch.isnan(gC[1]).all()
    keep = [0, 2]  # the batch without element 1
    rQ, rC, _ = _grads(layer, Q[keep], C[keep], w[keep])
    torch.testing.assert_close(gQ[keep], rQ, atol=0, rtol=0)
    torch.testing.assert_close(gC[keep], rC, atol=0, rtol=0)
    torch.testing.assert_close(rQ, (Q[keep] < C[keep]).to(F64), atol=1e-7, rtol=0)  # (and right)
    assert not said, said


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("solver", SOLVERS)
def test_nonfinite_cotangent_makes_a_shared_parameters_gradient_nan(solver, bad):
    # As torch: the shared c's gradient is a sum over the batch, of which one term is NaN
    # (zeroing gave the other elements' sum: a finite gradient missing part of the batch).
    layer = _min_layer(solver)
    Q = torch.tensor(Q0, dtype=F64)
    C = torch.tensor([1.0], dtype=F64)
    w = torch.ones(3, 3, dtype=F64)
    w[1, 2] = bad
    gQ, gC, said = _grads(layer, Q, C, w)
    assert torch.isnan(gC).all() and torch.isnan(gQ[1]).all()
    rQ, _, _ = _grads(layer, Q[[0, 2]], C, w[[0, 2]])
    torch.testing.assert_close(gQ[[0, 2]], rQ, atol=0, rtol=0)
    assert not said, said


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_tangent_makes_that_elements_output_tangents_nan(bad):
    # Forward mode (the batched path's): zero tangents before, with a false "not unique" warning.
    layer = _min_layer("batched")
    Q = torch.tensor(Q0, dtype=F64)
    C = torch.tensor([1.0], dtype=F64)
    dQ = torch.ones(3, 3, dtype=F64)
    dQ[1, 2] = bad

    said = []

    def tangent(Q, dQ, C, dC=None):
        with warnings.catch_warnings(record=True) as caught, fwAD.dual_level():
            warnings.simplefilter("always")
            out = layer(fwAD.make_dual(Q, dQ), C if dC is None else fwAD.make_dual(C, dC))
            t = fwAD.unpack_dual(out).tangent
        said.extend(_gradient_warnings(caught))
        return t

    t = tangent(Q, dQ, C)
    assert torch.isnan(t[1]).all()
    torch.testing.assert_close(t[[0, 2]], tangent(Q[[0, 2]], dQ[[0, 2]], C), atol=0, rtol=0)
    # A shared parameter's tangent reaches every element.
    assert torch.isnan(tangent(Q, torch.ones_like(Q), C, torch.tensor([bad], dtype=F64))).all()
    assert not said, said


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_masked_element_still_gets_no_gradient_beside_a_nonfinite_cotangent(solver):
    # on_failure="mask": a failed element's outputs are NaN and no gradient reaches it; a
    # NaN cotangent elsewhere does not change that.
    q, lo = cp.Parameter(2), cp.Parameter(1)
    y = cp.Variable(2)
    layer = cddn.ConvexLayer(cp.Problem(cp.Minimize(cp.sum_squares(y - q)), [y <= 1, y >= lo]), [q, lo], [y],
                             solver=solver, on_failure="mask")
    Q = torch.tensor([[0.2, 1.5], [0.3, -2.0], [0.5, 0.1]], dtype=F64, requires_grad=True)
    L = torch.tensor([[0.0], [0.0], [3.0]], dtype=F64, requires_grad=True)  # element 2: infeasible
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(Q, L)
        assert torch.isnan(out[2]).all() and torch.isfinite(out[:2]).all()
        w = torch.ones_like(out)
        w[0, 1] = math.nan
        out.backward(w)
    assert torch.isnan(Q.grad[0]).all() and torch.isnan(L.grad[0]).all()
    torch.testing.assert_close(Q.grad[1:], torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64), atol=1e-7, rtol=0)
    torch.testing.assert_close(L.grad[1:], torch.tensor([[1.0], [0.0]], dtype=F64), atol=1e-7, rtol=0)


def _gradscaler_step(kind):
    # An fp16 loss whose gradient overflows for one element (1024 * 2 * 299 > 65504).
    torch.manual_seed(1)
    n = 4
    lin = torch.nn.Linear(n, n)
    x = cp.Parameter(n)
    y = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x)), [y >= -1, y <= 1])  # = clamp(x, -1, 1)
    layer = {"clamp": None, "CvxpyLayer": lambda: cddn.CvxpyLayer(prob, parameters=[x], variables=[y])}.get(
        kind, lambda: cddn.ConvexLayer(prob, [x], [y], solver=kind))
    layer = layer() if layer else None
    gen = torch.Generator().manual_seed(0)
    X, T = torch.randn(8, n, generator=gen), torch.randn(8, n, generator=gen)
    T[0] = 300.0
    opt = torch.optim.SGD(lin.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    w0 = lin.weight.detach().clone()
    h = lin(X)
    out = h.clamp(-1, 1) if layer is None else layer(h)
    out = out[0] if isinstance(out, tuple) else out
    loss = ((out.float().half() - T.half()) ** 2).sum()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return (not torch.equal(w0, lin.weight.detach()), scaler.get_scale()), _gradient_warnings(caught)


@pytest.mark.parametrize("kind", ["CvxpyLayer"] + SOLVERS)
def test_gradscaler_sees_an_fp16_overflow_and_skips_the_step_as_with_torch(kind):
    # Zeroing the overflowed element hid it: the step was taken on the other elements'
    # gradient and the scale never lowered.
    # (step taken, scale after the update)
    assert _gradscaler_step("clamp") == ((False, 512.0), [])
    got, said = _gradscaler_step(kind)
    assert got == (False, 512.0)
    assert not said, said  # (an overflow step is routine under GradScaler: no warning, as torch gives none)
