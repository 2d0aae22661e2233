"""Closed-form Euclidean projections and their vector–Jacobian products (autograd Functions).

Each ``_*_forward`` computes one projection over dim ``d`` (batched, any device); each
Function adds the hand-written backward (Gould et al. Table 2 for the sphere, §5.2 for
the ball). :mod:`.node` validates the options and picks one.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch.autograd.function import once_differentiable

from ..._checks import check_finite

def _along(values: torch.Tensor, d: int, ndim: int) -> torch.Tensor:
    """Reshape a 1-D tensor so it lies along dim d of an ndim-dimensional tensor."""
    shape = [1] * ndim
    shape[d] = values.numel()
    return values.view(shape)


def _sum_to(grad: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return grad.sum_to_size(r.shape) if grad.shape != r.shape else grad


def _row_scale(ax: torch.Tensor, d: int) -> torch.Tensor:
    """Per-row max of |x| (1 for all-zero rows): dividing by it keeps reductions finite."""
    a = ax.amax(d, keepdim=True)
    return torch.where(a > 0, a, torch.ones_like(a))


def _bind_fast(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Precompute ``forward``'s signature, which ``Function.apply`` re-derives on every call.

    With ``setup_context``, ``apply`` binds its arguments through ``inspect.signature``;
    that honours a stored ``__signature__`` and otherwise costs about as much as a
    (256, 512) clamp, so caching it matters for the cheap projections.
    """
    cls.forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
    return cls


def needs_graph(x: torch.Tensor, r: float | torch.Tensor) -> bool:
    """Whether autograd will record the call (else the Function wrapper is skipped)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or (isinstance(r, torch.Tensor) and r.requires_grad)
    )


# --------------------------------------------------------------------------- L2


def l2_forward(
    x: torch.Tensor, r: float | torch.Tensor, d: int, sphere: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    norm = torch.linalg.vector_norm(x, dim=d, keepdim=True)
    scale = r / norm
    # One host sync covers NaN/Inf input, norm overflow or underflow, and zero rows.
    if not bool(((scale > 0) & (scale < math.inf)).all()):
        check_finite("x", x)
        a = _row_scale(x.abs(), d)
        xs = x / a
        ratio = r / torch.linalg.vector_norm(xs, dim=d, keepdim=True)  # = a·r/‖x‖
        zero = ratio == math.inf
        if sphere:
            y = xs * torch.where(zero, torch.zeros_like(ratio), ratio)
            # Every sphere point is nearest to 0; take r·e₀ (first coordinate).
            e0 = torch.zeros_like(x).narrow(d, 0, 1).fill_(1.0)
            y.narrow(d, 0, 1).add_(torch.where(zero, e0 * r, torch.zeros_like(e0)))
            scale = torch.where(zero, torch.zeros_like(ratio), ratio / a)
        else:
            factor = torch.minimum(a, ratio)
            y = xs * factor
            scale = factor / a
        return y, scale
    if not sphere:
        scale = scale.clamp(max=1.0)
    return x * scale, scale


@_bind_fast
class L2ProjectionFn(torch.autograd.Function):
    """y = x·min(1, r/‖x‖) (ball) or r·x/‖x‖ (sphere) with the Table 2 / §5.2 VJP."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return l2_forward(x, r, d, sphere)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, r, d, sphere = inputs
        y, scale = output
        ctx.mark_non_differentiable(scale)
        ctx.save_for_backward(y, scale, r if isinstance(r, torch.Tensor) else None)
        ctx.r_float = None if isinstance(r, torch.Tensor) else r
        ctx.d, ctx.sphere = d, sphere

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_scale):  # type: ignore[override]
        y, scale, r_t = ctx.saved_tensors
        r = ctx.r_float if r_t is None else r_t
        # Dy = (r/‖x‖)(I − y yᵀ/r²) outside the ball, I inside: v ↦ s·(v − y (yᵀv)/r²).
        coef = (y * grad_y).sum(ctx.d, keepdim=True) / (r * r)
        if not ctx.sphere:
            coef = coef * (scale < 1)
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(grad_y, y, coef, value=-1.0).mul_(scale)
        if ctx.needs_input_grad[1]:
            # dy/dr = y/r outside the ball (zero inside): yᵀv / r.
            grad_r = _sum_to(coef * r, r_t)
        return grad_x, grad_r, None, None


# --------------------------------------------------------------------------- L1 / simplex


def _sorted_threshold(
    u: torch.Tensor, c: torch.Tensor, z: float | torch.Tensor, d: int
) -> torch.Tensor:
    """θ with Σᵢ max(vᵢ − θ, 0) = z, from v sorted descending (u) and its cumsum (c).

    Duchi et al. 2008, Fig. 1: ρ = max{j : u_j − (c_j − z)/j > 0} and θ = (c_ρ − z)/ρ.
    The test f_j = j·u_j − c_j + z > 0 is monotone in j, so ρ is the count of its true
    entries (no argmax needed). It is counted in floating point, as sign(max(f, 0)):
    full-size bool tensors are several times slower on CPU. j = 1 passes in exact
    arithmetic; the clamp keeps ρ ≥ 1 when z is below u₁'s ulp.
    """
    j = _along(torch.arange(1, u.shape[d] + 1, dtype=u.dtype, device=u.device), d, u.ndim)
    f = torch.addcmul(z - c, u, j)
    rho = f.clamp_(min=0.0).sign_().sum(d, keepdim=True).clamp_(min=1.0)
    return (c.gather(d, rho.long() - 1) - z) / rho


def l1_forward(
    x: torch.Tensor, r: float | torch.Tensor, d: int, sphere: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    ax = x.abs()
    # y_max = u₁ − θ ≤ r gives θ ≥ u₁ − r, so entries at or below u₁ − r are never in the
    # support; raising them to that floor leaves ρ and θ unchanged, and a sort with many
    # equal keys is several times faster.
    floor = ax.amax(d, keepdim=True) - r
    u = ax.clamp(min=floor).sort(dim=d, descending=True).values
    c = u.cumsum(d)
    if not bool(torch.isfinite(c.narrow(d, c.shape[d] - 1, 1)).all()):
        check_finite("x", x)
        # Finite x whose |x| sums overflow: P_r(x) = a·P_{r/a}(x/a) for any a > 0.
        a = _row_scale(ax, d)
        y, active = l1_forward(x / a, r / a, d, sphere)
        return y * a, active
    theta = _sorted_threshold(u, c, r, d)
    # Inside the ball θ < 0; the ball keeps x (θ = 0), the sphere pushes every coordinate
    # out by −θ along sign(x) — the nearest facet of the cross-polytope.
    if sphere:
        active = torch.ones_like(theta, dtype=torch.bool)
    else:
        theta = theta.clamp(min=0.0)
        active = theta > 0
    t = (ax - theta).clamp_(min=0.0)
    # Zero coordinates go to the + side (the tie rule of the sphere-from-inside case):
    # adding +0.0 turns −0.0 into +0.0, so copysign sees a + sign for every zero.
    return torch.copysign(t, x + 0.0 if sphere else x), active


@_bind_fast
class L1ProjectionFn(torch.autograd.Function):
    """Duchi et al. projection onto the L1 ball/sphere with the Table 2 / §5.2 VJP."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return l1_forward(x, r, d, sphere)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, r, d, _sphere = inputs
        y, active = output
        ctx.mark_non_differentiable(active)
        ctx.save_for_backward(y, active, r if isinstance(r, torch.Tensor) else None)
        ctx.d = d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_active):  # type: ignore[override]
        y, active, r_t = ctx.saved_tensors
        d = ctx.d
        # On the support S (y ≠ 0) with s = sign(y): Dy = diag(1_S) − (s∘1_S)(s∘1_S)ᵀ/|S|;
        # inside the ball (θ = 0) Dy = I.
        s = y.sign()
        m = s.abs()
        k = m.sum(d, keepdim=True).clamp_(min=1.0)
        coef = (s * grad_y).sum(d, keepdim=True) / k * active
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            # Pass-through mask: the support on active rows, everything on inactive ones.
            keep = torch.maximum(m, (~active).to(m.dtype))
            grad_x = torch.addcmul(grad_y * keep, s, coef, value=-1.0)
        if ctx.needs_input_grad[1]:
            # dθ/dr = −1/|S|, so dy/dr = s/|S| on the support: sᵀv / |S|.
            grad_r = _sum_to(coef, r_t)
        return grad_x, grad_r, None, None


def simplex_forward(x: torch.Tensor, d: int) -> torch.Tensor:
    lo, hi = torch.aminmax(x, dim=d, keepdim=True)
    if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
        check_finite("x", x)
    # The projection is shift invariant; shifting by the row max keeps τ's prefix sums at
    # the scale of the answer (no cancellation for large x). y_max ≤ 1 gives τ ≥ max − 1,
    # so entries at or below max − 1 are never in the support: raising them to that floor
    # leaves ρ and τ unchanged, rules out overflow in the cumsum, and speeds up the sort.
    xs = x - hi
    u = xs.clamp(min=-1.0).sort(dim=d, descending=True).values
    tau = _sorted_threshold(u, u.cumsum(d), 1.0, d)
    return (xs - tau).clamp_(min=0.0)


@_bind_fast
class SimplexProjectionFn(torch.autograd.Function):
    """Sparsemax forward and VJP (Martins & Astudillo 2016)."""

    @staticmethod
    def forward(x, d):  # type: ignore[override]
        return simplex_forward(x, d)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.save_for_backward(output)
        ctx.d = inputs[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        # Dy = diag(m) − m mᵀ/|S| with m the support indicator: centre v on the support.
        m = y.sign()  # y ≥ 0, so this is the support indicator (float: faster than bool)
        gm = m * grad_y
        mean = gm.sum(ctx.d, keepdim=True) / m.sum(ctx.d, keepdim=True).clamp_(min=1.0)
        return torch.addcmul(gm, m, mean, value=-1.0), None


# --------------------------------------------------------------------------- L∞


def linf_forward(
    x: torch.Tensor, r: float | torch.Tensor, d: int, sphere: bool
) -> torch.Tensor:
    if isinstance(r, torch.Tensor):
        y = torch.clamp(x, -r, r)
    else:
        y = x.clamp(-r, r)
    if not sphere:
        # A single pass that NaN and Inf both poison; the full count only on failure.
        if not bool(torch.isfinite(x.sum())):
            check_finite("x", x)
        return y
    top, k = x.abs().max(d, keepdim=True)  # first index among ties
    if not bool(torch.isfinite(top).all()):
        check_finite("x", x)
    # Outside the ball the clamp already sets that coordinate to ±r; inside, pushing it
    # out to the nearest face {u_k = ±r} is the projection. Ties in sign go to +r.
    xk = x.gather(d, k)
    rk = r if isinstance(r, torch.Tensor) else torch.full_like(xk, r)
    return y.scatter_(d, k, torch.where(xk < 0, -rk, rk).expand_as(xk))


@_bind_fast
class LinfProjectionFn(torch.autograd.Function):
    """Clamp (ball) / clamp-and-push (sphere) with the VJP that zeroes pinned coordinates."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return linf_forward(x, r, d, sphere)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, r, d, _sphere = inputs
        ctx.save_for_backward(output, r if isinstance(r, torch.Tensor) else None)
        ctx.r_float = None if isinstance(r, torch.Tensor) else r
        ctx.d = d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        y, r_t = ctx.saved_tensors
        r = ctx.r_float if r_t is None else r_t
        # Coordinates at ±r are pinned (dy/dx = 0, dy/dr = ±1); the others pass through.
        # |y| ≤ r, so sign(r − |y|) is the pass-through indicator, built in floating point
        # because full-size bool masks are several times slower on CPU.
        free = torch.sub(r, y.abs()).sign_()
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y * free
        if ctx.needs_input_grad[1]:
            pinned_grad = (y.sign() * grad_y).mul_(1.0 - free)
            grad_r = _sum_to(pinned_grad.sum(ctx.d, keepdim=True), r_t)
        return grad_x, grad_r, None, None


# --------------------------------------------------------------------------- cvxpy path
