"""Tests of convexddn.nodes.lagrangian: the user's constraints at a DeclarativeNode's solution.

Expected values are closed forms written out here, never the code's own output.
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from convexddn.errors import DTypeError, GradientWarning, ProblemError
from convexddn.nodes.declarative import DeclarativeNode

DT = torch.float64


class _Bound(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. y ≤ sqrt(s): y = min(x, sqrt(s))."""

    def objective(self, x, s, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, s, y):
        return y - torch.sqrt(s)

    def solve(self, x, s):
        return torch.minimum(x, torch.sqrt(s).nan_to_num(1e300))


class _LogPlane(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. Σy = log s."""

    def objective(self, x, s, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, s, y):
        return y.sum(-1, keepdim=True) - torch.log(s)

    def solve(self, x, s):
        return x - (x.sum(-1, keepdim=True) - torch.log(s).clamp_min(-1e300)) / x.shape[-1]


class _Ball(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. ‖y‖² ≤ r², solved without overflow."""

    def objective(self, x, r, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, r, y):
        return (y * y).sum(-1, keepdim=True) - r ** 2

    def solve(self, x, r):
        top = x.abs().amax(-1, keepdim=True)
        n = (x / top).norm(dim=-1, keepdim=True) * top
        return torch.where(n > r, r * (x / top) / (x / top).norm(dim=-1, keepdim=True), x)


def test_a_nan_constraint_value_raises_naming_the_element():
    # sqrt(-1) for element 1 (its Jacobian in y finite): NaN compares as active, and the
    # element's gradient came back as zeros under warnings about a zero multiplier and
    # derivatives that are not twice differentiable.
    x = torch.tensor([[0.5, 3.0], [0.5, 3.0]], dtype=DT, requires_grad=True)
    s = torch.tensor([[4.0, 4.0], [-1.0, 4.0]], dtype=DT, requires_grad=True)
    y = _Bound()(x, s)
    with pytest.raises(ProblemError, match=r"inequality_constraints return NaN or Inf.*\[0\].*\[\(1,\)\]"):
        y.sum().backward()


def test_an_infinite_equality_value_raises():
    x = torch.tensor([[0.5, 3.0]], dtype=DT, requires_grad=True)
    s = torch.zeros(1, 1, dtype=DT, requires_grad=True)  # log 0 = -inf
    y = _LogPlane()(x, s)
    with pytest.raises(ProblemError, match="equality_constraints return NaN or Inf"):
        y.sum().backward()


def test_an_overflowing_constraint_value_raises():
    # ‖y‖² − r² at r = 1e160 is inf − inf: the gradient was the unconstrained one (x.grad
    # = v where the exact one is v(I − yyᵀ)/|x|·r), silently.
    x = torch.tensor([[3e160, 4e160]], dtype=DT, requires_grad=True)
    r = torch.tensor([[1e160]], dtype=DT, requires_grad=True)
    y = _Ball()(x, r)
    with pytest.raises(ProblemError, match="overflows"):
        y[:, 0].sum().backward()


class _Upper(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. y ≤ (1, +inf) (the second entry unbounded): y = min(x, u)."""

    upper = torch.tensor([1.0, float("inf")], dtype=DT)

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y - self.upper

    def solve(self, x):
        return torch.minimum(x, self.upper)


def test_an_inequality_at_minus_infinity_is_a_bound_at_infinity():
    # y₁ ≤ +inf is never active: dy/dx = diag(0, 1) at x = (3, 5); no error, no warning.
    x = torch.tensor([[3.0, 5.0]], dtype=DT, requires_grad=True)
    v = torch.tensor([[0.3, -2.0]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        _Upper()(x).backward(v)
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, -2.0]], dtype=DT))


class _ShiftedBound(DeclarativeNode):
    """argmin ½‖y − (x − x₀)‖² s.t. y ≥ 0: y = max(x − x₀, 0), a problem of x − x₀ only."""

    def __init__(self, err: float = 0.0, **kw):
        super().__init__(**kw)
        self.err = err

    def objective(self, x, x0, y):
        return 0.5 * ((y - (x - x0)) ** 2).sum(-1)

    def inequality_constraints(self, x, x0, y):
        return -y

    def solve(self, x, x0):
        return torch.clamp(x - x0, min=0) + self.err


@pytest.mark.parametrize("offset", [0.0, 1e6, 1e7])
@pytest.mark.parametrize("slack", [1e-2, 1e-3])
def test_activity_does_not_depend_on_an_offset_the_problem_does_not_see(offset, slack):
    # A common offset of x and x₀ entered the activity length through ‖B‖‖x‖: at 1e6
    # (slack 1e-3) or 1e7 (slack 1e-2) the slack bound y₀ ≥ 0 counted as active, x.grad
    # [0, 1, 0] under a "kink" warning. Reference: max's Jacobian diag(x − x₀ > 0).
    d = torch.tensor([[slack, 0.5, -0.3]], dtype=DT)
    x0 = torch.full((1, 3), offset, dtype=DT, requires_grad=True)
    x = (x0.detach() + d).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        _ShiftedBound()(x, x0).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0]], dtype=DT), rtol=0, atol=1e-9)
    torch.testing.assert_close(x0.grad, -x.grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_bounds_at_a_solution_near_zero_stay_active_under_an_offset(offset):
    # The activity length's floor (a projection solved to 1e-12 at y* = 0) comes from
    # ∇_y f alone now: it must still class those bounds active, offset or not.
    d = torch.tensor([[-1.0, -2.0, 0.5]], dtype=DT)
    x0 = torch.full((1, 3), offset, dtype=DT)
    x = (x0 + d).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        _ShiftedBound(1e-12)(x, x0).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0, 1.0]], dtype=DT), rtol=0, atol=1e-9)


class _SoftplusNoGrad(torch.autograd.Function):
    """softplus whose backward runs under no_grad: first-order only, silently."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return torch.nn.functional.softplus(z)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        with torch.no_grad():
            return g * torch.sigmoid(z)


class _SoftplusOnce(_SoftplusNoGrad):
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * torch.sigmoid(z)


class _SoftplusTwice(_SoftplusNoGrad):
    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * torch.sigmoid(z)


def _softplus_node(fn):
    class Softplus(DeclarativeNode):
        """argmin ½‖y − x‖² + Σ softplus(y): dy/dx = 1 / (1 + s(1 − s)), s = σ(y)."""

        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1) + fn(y).sum(-1)

        def solve(self, x):
            y = x.clone()
            for _ in range(60):
                s = torch.sigmoid(y)
                y = y - (y - x + s) / (1 + s * (1 - s))
            return y
    return Softplus()


@pytest.mark.parametrize("fn", [_SoftplusNoGrad.apply, _SoftplusOnce.apply])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_a_first_order_backward_in_the_objective_is_refused(fn, mode):
    """A term whose backward is not differentiable lost its curvature from H, silently: the
    gradient was that of H = I, 20 % off the closed form (the incoming gradient of ∇_y L
    did not require grad, so neither a no_grad backward nor @once_differentiable showed)."""
    x = 2 * torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    node = _softplus_node(fn)
    with pytest.raises(ProblemError, match="backward is not itself differentiable"):
        if mode == "reverse":
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(node(xr).sum(), xr)
        else:
            with torch.autograd.forward_ad.dual_level():
                torch.autograd.forward_ad.unpack_dual(node(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))))


def test_a_twice_differentiable_custom_function_gets_the_closed_form():
    x = 2 * torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = _softplus_node(_SoftplusTwice.apply)(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    s = torch.sigmoid(y.detach())
    torch.testing.assert_close(g, 1 / (1 + s * (1 - s)), rtol=1e-10, atol=1e-12)


def test_a_compiled_term_is_refused_or_right():
    """torch.compile(backend="aot_eager")'s backward is first-order only: 20 % off, silently.
    Where the compiled graph runs in the backward it is refused; where dynamo falls back to
    eager there (the backward evaluates the objective under the in-place guard's torch
    function mode, which dynamo does not trace), the gradient is the closed form."""
    compiled = torch.compile(torch.nn.functional.softplus, backend="aot_eager")
    x = 2 * torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    # (a refusal comes from lagrangian_gradient, "cannot be differentiated twice", or,
    # depending on what dynamo compiled before, the Hessian-vector probe: "cannot differentiate twice")
    try:
        y = _softplus_node(compiled)(x)
        (g,) = torch.autograd.grad(y.sum(), x)
    except ProblemError as err:
        assert re.search("differentiated? twice", str(err)), err
        return
    s = torch.sigmoid(y.detach())
    torch.testing.assert_close(g, 1 / (1 + s * (1 - s)), rtol=1e-10, atol=1e-12)


class _NonNeg(DeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return -y

    def solve(self, x):
        return x.clamp(min=0)


@pytest.mark.parametrize("s", [1e154, 1e200, 1e300])
def test_the_activity_test_does_not_overflow(s):
    """‖y‖ of (1, 2, −1)·1e154 overflowed float64: every bound counted as active and the
    gradient came back as zeros under a false zero-multiplier warning. Closed form: the
    projection onto y ≥ 0 has dy/dx = diag(x > 0)."""
    x = (s * torch.tensor([[1.0, 2.0, -1.0]], dtype=DT)).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = torch.autograd.grad(_NonNeg()(x).sum(), x)
    torch.testing.assert_close(g, torch.tensor([[1.0, 1.0, 0.0]], dtype=DT), rtol=0, atol=0)


class _ComplexValued(DeclarativeNode):
    """½‖y − x‖² s.t. Σy ≤ 10, one of them returned as a complex tensor."""

    def __init__(self, which):
        super().__init__()
        self.which = which

    def objective(self, x, y):
        f = 0.5 * ((y - x) ** 2).sum(-1)
        return f.to(torch.complex128) if self.which == "objective" else f

    def inequality_constraints(self, x, y):
        g = y.sum(-1, keepdim=True) - 10
        return g.to(torch.complex128) if self.which == "inequality_constraints" else g

    def solve(self, x):
        return x.clone()


@pytest.mark.parametrize("which", ["objective", "inequality_constraints"])
def test_a_complex_valued_objective_or_constraint_is_a_dtype_error(which):
    """A complex objective escaped at backward as torch's raw RuntimeError ("grad can be
    implicitly created only for real scalar outputs"), naming neither method nor remedy."""
    x = torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with pytest.raises(DTypeError, match=rf"_ComplexValued\.{which} must return a real floating-point .*complex128"):
        _ComplexValued(which)(x)


def test_a_compiled_terms_double_backward_error_is_a_problem_error():
    """Whether a torch.compile'd term fails in lagrangian_gradient (above) or only at the
    Hessian-vector probe depends on what dynamo compiled before: in a full suite run the
    probe raised aot_autograd's raw RuntimeError. Both places are in second_derivatives."""
    from convexddn.nodes.graph import second_derivatives

    with pytest.raises(ProblemError, match="cannot differentiate twice"):
        with second_derivatives("Node."):
            raise RuntimeError("torch.compile with aot_autograd does not currently support double backward")
    with pytest.raises(RuntimeError, match="something else"):  # (other faults pass through)
        with second_derivatives("Node."):
            raise RuntimeError("something else")


# ---- the kink probe's rounding floor: the terms' size, not the residual's ------------------


class _Mean(DeclarativeNode):
    """argmin ½‖y − x‖²: y = mean(x), dy/dx_i = 1/n."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x):
        return x.mean(-1, keepdim=True)


class _PseudoHuberPool(DeclarativeNode):
    """argmin Σ sqrt(1 + (y − x_i)²) − 1: smooth everywhere, dy/dx_i = h_i / Σh,
    h = (1 + (y − x)²)^(-3/2). ``error``: the relative error of ``solve``."""

    def __init__(self, error: float = 0.0):
        super().__init__()
        self.error = error

    def objective(self, x, y):
        return (torch.sqrt(1 + (y - x) ** 2) - 1).sum(-1)

    def solve(self, x):
        y = x.median(-1, keepdim=True).values
        for _ in range(60):
            r = y - x
            y = y - (r / torch.sqrt(1 + r * r)).sum(-1, keepdim=True) / ((1 + r * r) ** -1.5).sum(-1, keepdim=True)
        return y * (1 + self.error)


_MEAN_ROW = [-1.5213357963905696, -0.8638365897660122, 1.7062964971334207, 0.4578564723931028,
             0.4772258325276957, 1.999306934137103, -2.57061413378082, 0.12703567325533036]


def test_no_kink_where_the_solution_is_small_beside_the_data():
    """y = mean(x) = -0.0235 beside |x_i| up to 2.6: Σ(y − x_i) is exactly 0 at y, so the
    probe's rounding floor (in units of that residual) was 0, while its step δ = 100 eps |y|
    is below the ulp of the terms y ± δ − x_i: one rounding step (7e-16) read as a jump,
    a "kink" GradientWarning, and the gradient and the tangent came back 0 for 1/8 and 1."""
    import torch.autograd.forward_ad as fwAD

    x = torch.tensor([_MEAN_ROW], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(_Mean()(x).sum(), x)
        with fwAD.dual_level():
            t = fwAD.unpack_dual(_Mean()(fwAD.make_dual(x.detach(), torch.ones_like(x)))).tangent
    torch.testing.assert_close(g, torch.full_like(g, 1 / 8), rtol=0, atol=1e-14)
    torch.testing.assert_close(t, torch.ones_like(t), rtol=0, atol=1e-14)


def test_no_kink_on_a_batch_of_means():
    """4000 randn rows (n = 8, scale 2): 3 were flagged as kinks, gradients zeroed; the
    gradient is 1/n on every row."""
    x = 2 * torch.randn(4000, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(_Mean()(x).sum(), x)
    torch.testing.assert_close(g, torch.full_like(g, 1 / 8), rtol=0, atol=1e-13)


def _bisect_pseudo_huber(x: torch.Tensor) -> float:
    """The minimiser of Σ sqrt(1 + (y − x_i)²) by bisection on its increasing gradient."""
    lo, hi = x.min().item(), x.max().item()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(((mid - x) / torch.sqrt(1 + (mid - x) ** 2)).sum()) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("row", [
    [-0.4996717275953195, 2.198202929921051, -1.3315212098093545, 2.6356703711458316,
     0.46085713730054917, -3.293957405929292, -2.799957046774046, 1.4575058009896424],
    [2.6691087451132307, 0.7958420473287973, -5.166357828415585, 0.06678557103966783,
     -0.5547887209370009, 0.5724571242436904, -4.661255516389305, 0.49422039098078385],
])
def test_no_kink_for_a_smooth_pooling_near_zero(row):
    """Pseudo-Huber pooling (C-infinity) at y ~ ±0.03 beside data ~ 3: flagged as a kink, the
    gradient all zero. Reference: h_i / Σh at an independent bisection solve."""
    x = torch.tensor([row], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(_PseudoHuberPool()(x).sum(), x)
    h = (1 + (_bisect_pseudo_huber(x.detach()[0]) - x.detach()[0]) ** 2) ** -1.5
    torch.testing.assert_close(g[0], h / h.sum(), rtol=0, atol=1e-12)


class _SoftThresholdNode(DeclarativeNode):
    """½‖y − x‖² + ‖y‖₁: y = sign(x) max(|x| − 1, 0), dy/dx = diag(|x| > 1)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + y.abs().sum(-1)

    def solve(self, x):
        return torch.sign(x) * torch.clamp(x.abs() - 1.0, min=0.0)


def test_a_kink_beside_large_data_is_still_found():
    """The floor in the terms' size (here ~3e3) keeps a genuine kink (a jump of 2 in
    |y_0|'s gradient at y_0 = 0, x_0 = 0) visible: warned, that gradient zero."""
    x = torch.tensor([[0.0, 1e3, -3e3]], dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning, match="kink"):
        (g,) = torch.autograd.grad(_SoftThresholdNode()(x).sum(), x)
    assert torch.equal(g, torch.zeros_like(g))


# ---- saturated terms: the checks' rounding floors measured, not built from derivatives ------


def _bisect_pseudo_huber_rows(x: torch.Tensor) -> torch.Tensor:
    """(B,) the minimisers of Σ sqrt(1 + (y − x_i)²) per row of ``x`` (B, n), by bisection
    on the increasing gradient (float64, to the last bit)."""
    lo, hi = x.amin(-1), x.amax(-1)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        r = mid.unsqueeze(-1) - x
        neg = (r / torch.sqrt(1 + r * r)).sum(-1) < 0
        lo, hi = torch.where(neg, mid, lo), torch.where(neg, hi, mid)
    return 0.5 * (lo + hi)


def _saturated_rows(batch: int, seed: int, off: float = 100.0) -> torch.Tensor:
    """Four points near −off and four near +off: pseudo-Huber terms ±(1 − 1/(2 off²)) that
    cancel at y, curvatures h_i ~ off⁻³."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(batch, 4, dtype=DT, generator=g) - off,
                      torch.randn(batch, 4, dtype=DT, generator=g) + off], 1)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_saturated_terms_are_not_taken_for_a_missing_graph(mode):
    """Plain torch pseudo-Huber pooling of points ±100 from y: ∇_y L rounds at eps·Σ|t_i| ~
    1e-15, the second-order check's floor (eps of ‖H‖‖y‖ + ‖B‖‖x‖ ~ 1e-3, curvatures 1e-6)
    at ~2e-16: a ProblemError "backward is not itself differentiable" for 20 of 50 rows.
    Reference: h_i / Σh, h = (1 + (y − x)²)^(-3/2), at an independent bisection solve."""
    import torch.autograd.forward_ad as fwAD

    x = _saturated_rows(50, 2)
    v = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    h = (1 + (_bisect_pseudo_huber_rows(x).unsqueeze(-1) - x) ** 2) ** -1.5
    dy = h / h.sum(-1, keepdim=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        if mode == "reverse":
            xr = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(_PseudoHuberPool()(xr).sum(), xr)
            torch.testing.assert_close(g, dy, rtol=1e-7, atol=0)
        else:
            with fwAD.dual_level():
                t = fwAD.unpack_dual(_PseudoHuberPool()(fwAD.make_dual(x, v))).tangent
            torch.testing.assert_close(t[:, 0], (dy * v).sum(-1), rtol=1e-7, atol=1e-12)


def test_saturated_terms_are_not_taken_for_kinks(monkeypatch):
    """The kink probe's floor (64 eps of the same scale, ~1e-17) missed that rounding too:
    90 of 2000 rows were "kinks" (gradients zeroed) with the second-order check aside."""
    from convexddn.nodes import implicit_system

    monkeypatch.setattr(implicit_system, "check_second_order", lambda *args, **kwargs: None)
    x = _saturated_rows(400, 4).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(_PseudoHuberPool()(x).sum(), x)
    h = (1 + (_bisect_pseudo_huber_rows(x.detach()).unsqueeze(-1) - x.detach()) ** 2) ** -1.5
    torch.testing.assert_close(g, h / h.sum(-1, keepdim=True), rtol=1e-7, atol=0)


class _NoGradPseudoHuber(torch.autograd.Function):
    """sqrt(1 + r²) − 1 with a first-order backward (under no_grad)."""

    @staticmethod
    def forward(ctx, r):
        ctx.save_for_backward(r)
        return torch.sqrt(1 + r * r) - 1

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        with torch.no_grad():
            return g * r / torch.sqrt(1 + r * r)


class _UnseededPseudoHuber(_NoGradPseudoHuber):
    """The same with a differentiable backward that ignores its incoming gradient: right at
    ω = 1, but its gradient is not linear in ω (so ∂/∂ω misses it, as a missing graph)."""

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return r / torch.sqrt(1 + r * r) + 0 * g


def _mixed_objective(fn):
    def objective(x, y):
        r = y - x
        return (torch.sqrt(1 + r[:, :6] ** 2) - 1).sum(-1) + fn(r[:, 6:]).sum(-1)
    return objective


def test_a_missing_graph_among_saturated_terms_is_still_refused():
    """Two of the eight terms through a no_grad backward: its gap (~2) is 1e15 times the
    measured rounding, far beyond the margin of 64."""

    class Mixed(_PseudoHuberPool):
        def objective(self, x, y):
            return _mixed_objective(_NoGradPseudoHuber.apply)(x, y)

    x = _saturated_rows(50, 2).requires_grad_(True)
    with pytest.raises(ProblemError, match="backward is not itself differentiable"):
        torch.autograd.grad(Mixed()(x).sum(), x)


def test_a_backward_ignoring_its_incoming_gradient_is_refused_among_saturated_terms():
    """Such a term is not linear in ω: it leaks |1/c − 1| of itself into the measured
    rounding, which the seeds (within 1.4e-4 of 1) keep 7e3 times below its gap (at c = 3
    it leaked 2/3 and would pass). (Through a node, the batch-coupling probe refuses it
    first; here the second-order check alone.)"""
    from convexddn.nodes.graph import check_second_order, lagrangian_gradient
    from convexddn.nodes.implicit_system import _measured_rounding
    from convexddn.nodes.krylov import pseudo_random_directions
    from convexddn.nodes.lagrangian import lagrangian_probes

    x = _saturated_rows(50, 2).requires_grad_(True)
    y = _bisect_pseudo_huber_rows(x.detach()).unsqueeze(-1).requires_grad_(True)
    lagrangian = _mixed_objective(_UnseededPseudoHuber.apply)(x, y)
    gL, seed = lagrangian_gradient("", lagrangian, y)
    u = pseudo_random_directions(1, 50, DT, y.device)
    *_, d_seed = lagrangian_probes(gL, y, (x,), seed, u)
    scale = torch.ones(50, dtype=DT)
    with pytest.raises(ProblemError, match="backward is not itself differentiable"):
        check_second_order("", gL, u, d_seed, scale, (50,), rounding=lambda: _measured_rounding(lagrangian, y, gL))


# ---- the kink probe: per-entry floors, and a step where y = 0 throughout ---------------


class _Threshold(DeclarativeNode):
    """½‖y − x‖² + λ‖y‖₁: y = sign(x) max(|x| − λ, 0), dy/dx = diag(|x| > λ) for |x_i| ≠ λ."""

    def __init__(self, lam: float, **options):
        super().__init__(**options)
        self.lam = lam

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + self.lam * y.abs().sum(-1)

    def solve(self, x):
        return torch.sign(x) * torch.clamp(x.abs() - self.lam, min=0.0)


@pytest.mark.parametrize("lam", [0.1, 0.01])
def test_a_kink_beside_a_large_float32_entry_is_found(lam):
    """float32 soft-thresholding at x = (0, 10000.3): y_0 = 0 exactly, the kink of |y_0|.
    The float32 solution's residual in the large entry (5e-4, half an ulp of 1e4) set a floor
    of 1e3 times it for the whole row, above the jump 2λ of the other entry: dy_0/dx_0 came
    out 1, silently (closed form: 0, as |x_0| < λ). Now a GradientWarning and a zero row."""
    x = torch.tensor([[0.0, 10000.3]], dtype=torch.float32, requires_grad=True)
    with pytest.warns(GradientWarning, match="kink"):
        (g,) = torch.autograd.grad(_Threshold(lam)(x)[:, 0].sum(), x)
    assert torch.equal(g, torch.zeros_like(g))


def test_kinks_beside_large_float32_entries_are_found_on_every_row():
    """200 float32 rows, x_0 = 0 exactly, the others ~ 100 N(0, 1), λ = 1e-3: 100 of them came
    back with dy_0/dx_0 = 1 and no warning for them (closed form: 0 on every row)."""
    x = 100 * torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0.0
    x.requires_grad_(True)
    with pytest.warns(GradientWarning, match="for 200 of 200"):
        (g,) = torch.autograd.grad(_Threshold(1e-3)(x)[:, 0].sum(), x)
    assert torch.equal(g[:, 0], torch.zeros(200))


class _MeanL1(DeclarativeNode):
    """½ mean_i (y − x_i)² + λ|y|: y = sign(m) max(|m| − λ, 0), m = mean(x); dy/dx = 0 for |m| < λ."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).mean(-1) + 0.5 * y.abs().sum(-1)

    def solve(self, x):
        m = x.mean(-1, keepdim=True)
        return torch.sign(m) * torch.clamp(m.abs() - 0.5, min=0.0)


class _ReluEdge(DeclarativeNode):
    """½(y − x)² + ½ relu(y) at x = ½: y = 0, where the solution map x − ½ (x > ½), 0 (0 ≤ x ≤ ½)
    has one-sided derivatives 1 and 0, and no derivative."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.5 * y.clamp(min=0).sum(-1)

    def solve(self, x):
        return torch.where(x > 0.5, x - 0.5, torch.where(x < 0, x, torch.zeros_like(x)))


@pytest.mark.parametrize("node, x", [
    (_Threshold(0.5), [[0.0, 0.0, 0.0, 0.0]]),  # dy/dx = diag(|x| > λ) = 0; was diag(1, 1, 1, 1)
    (_MeanL1(), [[3.0, -3.0, 1.0, -1.0]]),      # mean 0, |m| < λ: dy/dx = 0; was 1/4 each
    (_ReluEdge(), [[0.5]]),                     # no derivative; was 1 (one side)
])
def test_a_kink_at_an_all_zero_solution_is_found(node, x):
    """y = 0 throughout: the probe's step 100 eps ‖y‖∞ was 0 and the element was skipped, so
    autograd's one-sided choice came back silently. The step now takes its length from the
    terms' size over the curvature (here ‖B‖‖x‖ / ‖H‖), or the dtype's unit where there is
    none (x = 0): a GradientWarning and a zero gradient."""
    x = torch.tensor(x, dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning, match="kink"):
        (g,) = torch.autograd.grad(node(x)[:, 0].sum(), x)
    assert torch.equal(g, torch.zeros_like(g))


def test_no_kink_where_a_smooth_solution_is_zero_throughout():
    """The same step at y = 0 for smooth objectives sees no jump: ½(y − x)² + sqrt(y² + 1e-4)
    at x = 0 (terms that vanish: the dtype's unit), pseudo-Huber pooling of ±1, ±2 (mean 0).
    References: 1 / (1 + 1e2) from the curvature sqrt(1e-4)⁻¹; h_i / Σh, h = (1 + x_i²)^(-3/2)."""

    class Sharp(DeclarativeNode):
        def objective(self, x, y):
            return (0.5 * (y - x) ** 2 + torch.sqrt(y * y + 1e-4)).sum(-1)

        def solve(self, x):
            return torch.zeros_like(x)

    x = torch.zeros(1, 3, dtype=DT, requires_grad=True)
    p = torch.tensor([[1.0, -1.0, 2.0, -2.0]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(Sharp()(x).sum(), x)
        (gp,) = torch.autograd.grad(_PseudoHuberPool()(p).sum(), p)
    torch.testing.assert_close(g, torch.full_like(g, 1 / 101), rtol=0, atol=1e-15)
    h = (1 + p.detach() ** 2) ** -1.5
    torch.testing.assert_close(gp, h / h.sum(), rtol=0, atol=1e-15)


# ---- a backward without a graph where its own gradient vanishes; saturated terms ---------


class _SquareNoGrad(torch.autograd.Function):
    """r ↦ r² with a backward under no_grad: right first derivative, no second."""

    @staticmethod
    def forward(ctx, r):
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        with torch.no_grad():
            return g * 2 * r


class _SquareNumpy(_SquareNoGrad):
    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return g * torch.from_numpy(2 * r.detach().numpy())


class _SquareTwice(_SquareNoGrad):
    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return g * 2 * r


def _anchored(fn):
    class Anchored(DeclarativeNode):
        """argmin ½‖y − x‖² + ‖y − c‖²: y = (x + 2c)/3, dy/dx = 1/3, dy/dc = 2/3."""

        def objective(self, x, c, y):
            return 0.5 * ((y - x) ** 2).sum(-1) + fn(y - c).sum(-1)

        def solve(self, x, c):
            return (x + 2 * c) / 3
    return Anchored()


@pytest.mark.parametrize("fn", [_SquareNoGrad, _SquareNumpy])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_a_first_order_backward_is_refused_where_its_gradient_vanishes(fn, mode):
    """At x = c the term (y − c)² has gradient 0 at the solution, so the check of ∇_y L's
    derivative in its incoming gradient saw nothing: its curvature 2 dropped out of H and
    dy/dx came back as 1 (no_grad) or with a "kink" warning (numpy) for the closed form 1/3."""
    x = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ProblemError, match=f"not itself differentiable in y.*{fn.__name__}"):
        if mode == "reverse":
            xg, cg = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            torch.autograd.grad(_anchored(fn.apply)(xg, cg)[:, 0].sum(), (xg, cg))
        else:
            with torch.autograd.forward_ad.dual_level():
                torch.autograd.forward_ad.unpack_dual(
                    _anchored(fn.apply)(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)), x.clone()))


def test_a_first_order_backward_as_the_only_term_is_refused():
    """‖y − x‖² through the no_grad square alone: ∇_y L has no graph at all (a singular
    system, dy/dx = 0 for the closed form 1, under a warning that blamed the problem)."""

    class Only(DeclarativeNode):
        def objective(self, x, y):
            return _SquareNoGrad.apply(y - x).sum(-1)

        def solve(self, x):
            return x.clone()

    x = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with pytest.raises(ProblemError, match="_SquareNoGrad"):
        torch.autograd.grad(Only()(x).sum(), x)


def test_a_differentiable_custom_square_at_its_minimum_gets_the_closed_form():
    """The curvature probe passes a Function with a differentiable backward: dy/dx = 1/3,
    dy/dc = 2/3 (closed form), x = c and x ≠ c."""
    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    c = torch.cat([x[:2], x[2:] + 1.0])
    xg, cg = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        gx, gc = torch.autograd.grad(_anchored(_SquareTwice.apply)(xg, cg).sum(), (xg, cg))
    torch.testing.assert_close(gx, torch.full_like(gx, 1 / 3), rtol=0, atol=1e-12)
    torch.testing.assert_close(gc, torch.full_like(gc, 2 / 3), rtol=0, atol=1e-12)


def _log_cosh_pool(a: float):
    class LogCoshPool(DeclarativeNode):
        """argmin Σ a² log cosh((y − x_i)/a), plain torch; solved by bisection on Σ tanh."""

        def objective(self, x, y):
            z = (y - x) / a
            return (a * a * (torch.logaddexp(z, -z) - math.log(2))).sum(-1)

        def solve(self, x):
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                neg = torch.tanh((mid - x) / a).sum(-1, keepdim=True) < 0
                lo, hi = torch.where(neg, mid, lo), torch.where(neg, hi, mid)
            return 0.5 * (lo + hi)
    return LogCoshPool()


def _log_cosh_reference(row: list[float], a: float) -> tuple[float, list[float]]:
    """(curvature Σ sech², dy/dx = sech²_i / Σ sech²) at the mpmath root (40 digits)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    xs = [mp.mpf(v) for v in row]
    lo, hi = min(xs), max(xs)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mp.tanh((mid - v) / a) for v in xs) < 0 else (lo, mid)
    w = [mp.sech(((lo + hi) / 2 - v) / a) ** 2 for v in xs]
    return float(sum(w)), [float(t / sum(w)) for t in w]


# Two rows of 8 standard normal points: every point 10 to 60 widths from the minimiser
# (a = 0.03: curvature 5.7e-15), and two points 9.6 widths either side of it (a = 0.01).
_FLAT_ROW = [-1.9551282592221295, -0.9700854624017413, 0.4847021905759555, 0.33649661688134097,
             -0.7741984333440965, 0.4557244988772856, -0.7098594296148351, 0.4162225870438083]
_STEEP_ROW = [-0.4113823639743302, 1.3381484365586305, 1.5197227077785898, 0.5762097203396179,
              -0.1063000098911105, -0.82453526760449, -0.2983585622138141, -1.5389229707506724]


def test_saturated_log_cosh_is_ill_conditioned_not_refused():
    """Terms ±a that cancel exactly at every seed: a measured rounding of 0, and the
    second-order check's gap of 4 ulps of a was a ProblemError "not itself differentiable".
    The curvature 5.7e-15 is below the terms' rounding: y is determined to ~1e-2, the
    gradient 3 % off the mpmath one; the right verdict is a warning saying so."""
    x = torch.tensor([_FLAT_ROW], dtype=DT, requires_grad=True)
    with pytest.warns(GradientWarning, match="near singular"):
        (g,) = torch.autograd.grad(_log_cosh_pool(0.03)(x).sum(), x)
    curvature, dy = _log_cosh_reference(_FLAT_ROW, 0.03)
    assert curvature < 1e-14
    assert (g - torch.tensor([dy], dtype=DT)).abs().max() > 1e-3  # (why it warns)


def test_saturated_log_cosh_with_a_resolved_curvature_is_exact():
    """Curvature 3.7e-8 beside terms ±a = 0.01: the same ProblemError, where the gradient is
    exact (mpmath: 0.5 on the two points 9.6 widths from y) and no warning is due."""
    x = torch.tensor([_STEEP_ROW], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        (g,) = torch.autograd.grad(_log_cosh_pool(0.01)(x).sum(), x)
    curvature, dy = _log_cosh_reference(_STEEP_ROW, 0.01)
    assert 1e-8 < curvature < 1e-7
    torch.testing.assert_close(g, torch.tensor([dy], dtype=DT), rtol=0, atol=1e-9)
