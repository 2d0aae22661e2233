"""Closed-form Euclidean projections (L2, L∞) and their vector–Jacobian products
(autograd Functions); the range helpers every projection shares are in :mod:`.ranges`.

Each ``*_forward`` computes one projection over dim ``d`` (batched, any device); each
Function adds the hand-written backward (Gould et al. Table 2 for the sphere, §5.2 for
the ball), and its subclass the forward mode (``jvp``, the same Jacobian applied to a
tangent; the base, without it, is what torch.compile traces). The L1 and simplex
projections are in :mod:`.simplex`; :mod:`.node` validates the options and picks one.
"""
from __future__ import annotations

import math

import torch

from ..._autograd import bind_fast, may_carry_tangents, save_plain
from ..._compile import may_break_graph
from ..._anchor import graph_anchor
from ..._first_order import first_order, with_forward_mode
from ..._checks import check_finite
from ..._warn import warn
from ...errors import GradientWarning
from .._overflow import gain_limit, warn_gradient_overflow
from .ranges import _may_underflow, _small_norm, _sum_to, row_pow2, warn_unrepresentable


def needs_graph(x: torch.Tensor, r: float | torch.Tensor) -> bool:
    """Whether autograd will record the call (else the Function wrapper is skipped)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or (isinstance(r, torch.Tensor) and r.requires_grad)
    )


def carries_tangents(x: torch.Tensor, r: float | torch.Tensor) -> bool:
    """Whether forward mode may track x or r (a dual level open, torch.func.jvp): then the
    Function's ``jvp`` must run (torch's derivatives of the forward's ops passed ẋ at
    |x_i| = r for p=inf, where Dy is 0), eagerly under torch.compile, which sees only a dual
    level (a guarded test; without one the closed forms stay one graph, fullgraph=True)."""
    if torch.compiler.is_compiling():
        return torch.autograd.forward_ad._current_level >= 0
    return may_carry_tangents(x, r)


# --------------------------------------------------------------------------- L2


def _norm2(x: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    """‖x‖₂ along ``d`` (kept), in ``dtype``: ``(*, n, *) -> (*, 1, *)``. Long float64 rows (n > 1024)
    sum their squares with torch.sum's cascade summation: vector_norm accumulates float64 in a few
    sequential lanes, 301 eps off at n = 1e5 (entries 1 + 1e-6·randn), the sum 0.3 eps, at twice the
    time and a temporary of x's size. Narrower rows accumulate in float64 once n > 1024 (read in their
    own dtype, no float64 copy; rounded to ``dtype`` once): vector_norm's float32 accumulation grows
    with n, 2 eps at n = 4096 but 3000 eps at n = 1e7, which put projections 3000 ulp outside the ball
    and judged a row with ‖x‖ = 1.0002 inside. Up to 1024 it stays ≤ 1.5 eps (the callers decide rows
    within 16 ulp of the boundary in float64). Squares that overflow or underflow give a norm the
    callers' range test sends to the rescaled path."""
    n = x.shape[d]
    if dtype == torch.float64 and n > 1024:
        return x.to(dtype).square().sum(d, keepdim=True).sqrt()
    if n > 1024 and dtype != torch.float64:
        return torch.linalg.vector_norm(x, dim=d, keepdim=True, dtype=torch.float64).to(dtype)
    return torch.linalg.vector_norm(x, dim=d, keepdim=True, dtype=dtype)


def l2_forward(
    x: torch.Tensor, r: float | torch.Tensor, d: int, sphere: bool
) -> tuple[torch.Tensor, torch.Tensor, bool, bool, int, bool]:
    """Returns ``(y, scale, overflow, steep, zeros, small)``: ``scale = r/‖x‖`` (ball:
    ``min(1, ·)``) per row, whether it overflowed (then ``Dy`` cannot be represented),
    whether it exceeds :func:`~convexddn.nodes._overflow.gain_limit` (sphere only: the
    backward checks its gradient), on the sphere the number of rows ``x = 0`` (where
    ``Dy`` does not exist), and whether some r is below tiny/eps (:func:`_unit`). For 16-bit x
    the norm and scale are float64's (y rounded once): float16 [1, 2^-12], ‖x‖ = 1 + 2^-25, is
    outside r = 1 (its rounded norm, 1, gave Dy = I, not the exact projection's (r/‖x‖)(I − ûûᵀ))."""
    sdt = torch.float64 if x.dtype.itemsize < 4 else x.dtype
    norm = _norm2(x, d, sdt)
    # (A true division: torch's float / tensor is r · (1/‖x‖), rounded twice, and a point
    # exactly on the ball's boundary got scale 1 − ulp, y = x(1 − ulp) and the outside
    # Jacobian where the docs promise the identity.)
    rt = torch.full_like(norm, r) if not isinstance(r, torch.Tensor) else r
    scale = rt / norm
    compiling = torch.compiler.is_compiling()
    # The sphere's gain is r/‖x‖; the ball's is at most 1 (never checked).
    limit = gain_limit(x.dtype) if sphere else torch.finfo(x.dtype).max
    # One host sync covers NaN/Inf input, norm overflow or underflow (or a norm whose squares lost
    # bits to subnormals), zero rows and a steep sphere. Compiled, no sync (but the finite check's where
    # the graph may break): the rescaled path runs for every row, without the data-dependent warnings.
    # (A subnormal scale r/‖x‖ has lost bits: x·scale 30 % off in float32 at 2e-45, silently, and a float r
    # rounded to float16 at 1e-6, 1.3 %. The rescaled path takes r and r/‖x‖ in float64, rounds y once.)
    tiny, low = torch.finfo(x.dtype).tiny, torch.finfo(x.dtype).tiny / torch.finfo(x.dtype).eps
    fast = (scale >= tiny) & (rt >= low) & (scale <= limit) & (norm >= _small_norm(x.dtype))
    if not sphere and x.dtype == torch.float32:
        # A float32 norm is a few ulp off: rows within 16 ulp of the boundary decide their side in float64
        # below (squares exact there). [1.8951797485351562, 3.7903594970703125, 3.7903594970703125] has
        # ‖x‖ = r = 5.685539245605469 exactly; float32's norm put it outside, J − I = 0.44.
        fast &= (scale - 1).abs() > 16 * torch.finfo(x.dtype).eps
    if not sphere:
        scale = scale.clamp(max=1.0)
    if compiling or not bool(fast.all()):
        check_finite("x", x, in_graph=not may_break_graph())  # (fullgraph=True: an assert)
        # A power of two per row, in float64: x/a is exact. (x/max|x| rounded, and put rows exactly on the
        # boundary outside: float16 [0.0234375, -0.0703125, -0.10546875], r = 0.12890625, got J − I = 0.67.)
        a = row_pow2(x.abs(), d)
        xs = x.double() / a
        nw = _norm2(xs, d, torch.float64)
        rd = r.double() if isinstance(r, torch.Tensor) else torch.full_like(nw, r)
        ratio = rd / nw  # = a·r/‖x‖
        zero = nw == 0  # (not ratio == inf: a subnormal row under a radius of 1e300 overflows it, x ≠ 0)
        if sphere:
            # r·(xs/‖xs‖): the unit vector first, which no radius overflows (xs·ratio took x = [3e-320, 4e-320]
            # at r = 1e300 for 0 and returned r·e₀, where r·(0.6, 0.8) is exact)
            y = xs / torch.where(zero, torch.ones_like(nw), nw) * torch.where(zero, torch.zeros_like(rd), rd)
            # Every sphere point is nearest to 0; take r·e₀ (first coordinate).
            e0 = torch.zeros_like(xs).narrow(d, 0, 1).fill_(1.0)
            y.narrow(d, 0, 1).add_(torch.where(zero, e0 * r, torch.zeros_like(e0)))
            y = y.to(x.dtype)
            wide = torch.where(zero, torch.zeros_like(ratio), ratio / a)
        else:
            # Inside the ball (ratio >= a) the answer is x: (x/a)·a was 1 ulp off (float32 x = 1e-3, r = 3e38).
            inside = ratio >= a
            y = torch.where(inside, x, (xs * ratio).to(x.dtype))
            # An outside row's scale stays below 1 in the saved dtype: the backward reads its side from
            # scale < 1 (float32 rows 7e-9 outside rounded ratio/a to 1.0 and got the inside J = I).
            wide = torch.where(inside, torch.ones_like(ratio), (ratio / a).clamp(max=1 - torch.finfo(sdt).eps / 2))
        # Each row's answer from its own values: rows the one-pass test accepts keep its result. (One tiny
        # row sent the whole batch here, and float32's and float64's norms may put a row near the boundary
        # on different sides: the same float64 row got J = I alone, the outside J beside [1e-200, 0, 0].)
        y = torch.where(fast, (x * scale).to(x.dtype), y)
        scale = torch.where(fast, scale, wide.to(sdt))
        if not compiling and sphere and _may_underflow(r, x.shape[d], x.dtype):
            warn_unrepresentable(y, d, "project_lp(p=2, mode='sphere')")
        if compiling and not may_break_graph():  # fullgraph=True, export: no read (small where it may be)
            return y, scale, False, False, 0, isinstance(r, torch.Tensor) or r < low
        # (Compiled where the graph may break, the eager read: sphere rows at x = 0 got a zero gradient
        # with no GradientWarning.)
        flags = [(scale > torch.finfo(x.dtype).max).any(), (scale > limit).any(),
                 zero.sum() if sphere else zero.new_zeros(()), (rt < low).any()]
        overflow, steep, zeros, small = torch.stack(flags).tolist()
        return y, scale, bool(overflow), bool(steep), int(zeros), bool(small)
    return (x * scale).to(x.dtype), scale, False, False, 0, False


def _l2_saved(inputs: tuple, output: tuple) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the backward and jvp save besides y and the scale: a tensor r, and x where some r is
    below tiny/eps (``small``), where y = r·û keeps a few bits (float16 r = 1e-6: 4.9 % off)."""
    return (inputs[1] if isinstance(inputs[1], torch.Tensor) else None), (inputs[0] if output[5] else None)


def _unit(y: torch.Tensor, x: torch.Tensor | None, r: float | torch.Tensor, d: int, sphere: bool) -> torch.Tensor:
    """û outside the ball: y/r where x was not saved (y normal), else x/‖x‖ (e₀ at sphere rows x = 0),
    formed in float64 from x/2^k (exact) and rounded once (x is saved only for radii below tiny/eps)."""
    if x is None:
        return y / r
    t = torch.where((x == 0).all(d, keepdim=True), y, x) if sphere else x
    ts = t.double() / row_pow2(t.abs(), d)
    return (ts / _norm2(ts, d, torch.float64).clamp_min(torch.finfo(ts.dtype).tiny)).to(t.dtype)


def _warn_l2(ctx, y: torch.Tensor, wrt_x: bool, what: str) -> None:
    """The L2 Function's warnings (backward and jvp): sphere rows at x = 0, where no
    derivative exists (only when the derivative in x is asked for: ``wrt_x``), and a
    gain r/‖x‖ beyond the dtype's range (flagged by the forward, no host read here)."""
    if ctx.zeros and wrt_x:
        warn(
            f"project_lp(p=2, mode='sphere'): {ctx.zeros} row(s) are x = 0, where every "
            "sphere point is nearest and the projection has no derivative (r/‖x‖ → ∞): "
            f"their {what} is set to zero",
            GradientWarning,
        )
    if ctx.overflow:
        warn(
            "project_lp(p=2): the gradient r/‖x‖·(I − ûûᵀ) overflows "
            f"{y.dtype} where ‖x‖ < r / {torch.finfo(y.dtype).max:.1e}: it "
            "is Inf (NaN where the projected gradient is 0)",
            GradientWarning,
        )


@bind_fast
class L2ReverseFn(torch.autograd.Function):
    """y = x·min(1, r/‖x‖) (ball) or r·x/‖x‖ (sphere) with the Table 2 / §5.2 VJP only: what
    torch.compile traces (dynamo refuses a Function with a jvp, "Unsupported custom jvp";
    this one compiles with fullgraph=True). Forward mode: :class:`L2ProjectionFn`."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return l2_forward(x, r, d, sphere)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, r, d, sphere = inputs
        y, scale, overflow, steep, zeros, _small = output
        ctx.mark_non_differentiable(scale)
        save_plain(ctx, y, scale, *_l2_saved(inputs, output))
        ctx.r_float = None if isinstance(r, torch.Tensor) else r
        ctx.d, ctx.sphere, ctx.overflow, ctx.steep, ctx.zeros = d, sphere, overflow, steep, zeros
        ctx.anchors = graph_anchor(*inputs[:2])  # (their graph, not them: see first_order)

    @staticmethod
    @first_order("project_lp")
    def backward(ctx, grad_y, _grad_scale, _grad_overflow, _grad_steep, _grad_zeros, _grad_small):  # type: ignore
        y, scale, r_t, x = ctx.saved_tensors
        if grad_y is None:  # undefined (the jvp's subclass does not materialise it): zeros, as before
            grad_y = torch.zeros_like(y)
        r = ctx.r_float if r_t is None else r_t
        _warn_l2(ctx, y, ctx.needs_input_grad[0], "gradient with respect to x")
        # Dy = (r/‖x‖)(I − ûûᵀ) outside the ball (û = x/‖x‖ = y/r), I inside:
        # v ↦ s·(v − û(ûᵀv)).
        u = _unit(y, x, r, ctx.d, ctx.sphere)
        coef = (u * grad_y).sum(ctx.d, keepdim=True)
        if not ctx.sphere:
            # A select, not a product with the mask: ûᵀv may overflow (v near the
            # largest float), and Inf·0 made the inside gradient v NaN.
            coef = torch.where(scale < 1, coef, torch.zeros_like(coef))
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(grad_y, u, coef, value=-1.0).mul_(scale)
        if ctx.needs_input_grad[1]:
            # dy/dr = û outside the ball (zero inside): ûᵀv.
            grad_r = _sum_to(coef, r_t)
        if ctx.steep and not ctx.overflow:
            # A sphere whose gain r/‖x‖ is finite but within the margin of the largest
            # float (flagged by the forward's host read): (r/‖x‖)·v may overflow. Other
            # rows have gain ≤ 1 on the ball and below gain_limit on the sphere: their
            # backward reads nothing (Inf from an incoming gradient near the largest
            # float is torch's ordinary overflow).
            warn_gradient_overflow("project_lp(p=2)", grad_y, [("x", grad_x), ("radius", grad_r)],
                                   (ctx.d - y.ndim,))  # (x's own layout: named in it)
        return grad_x, grad_r, None, None


def _l2_jvp(ctx, x_t: torch.Tensor | None, r_t: torch.Tensor | None,
        _d_t: None, _sphere_t: None) -> tuple[torch.Tensor, None, None, None, None, None]:
    r"""Forward mode, the backward's Jacobian (symmetric in x): with û = x/‖x‖ and
    s = r/‖x‖, outside the ball (every sphere row)

    .. math:: \dot y = s\,(\dot x - \hat u\,\hat u^\top \dot x) + \hat u\,\dot r

    and ẏ = ẋ inside the ball (boundary included); zero in x at sphere rows x = 0.
    The backward's warnings, for the same rows."""
    y, scale, r_saved, x = ctx.saved_tensors
    r = ctx.r_float if r_saved is None else r_saved
    _warn_l2(ctx, y, x_t is not None, "tangent from x")
    u = _unit(y, x, r, ctx.d, ctx.sphere)
    outside = None if ctx.sphere else scale < 1
    out = None
    if x_t is not None:
        coef = (u * x_t).sum(ctx.d, keepdim=True)
        if outside is not None:  # a select, as in the backward (Inf·0 is NaN)
            coef = torch.where(outside, coef, torch.zeros_like(coef))
        out = torch.addcmul(x_t, u, coef, value=-1.0).mul_(scale)
    if r_t is not None:
        dr = r_t if outside is None else torch.where(outside, r_t, torch.zeros_like(r_t))
        # (Out of place: vmap, in torch.func.jacfwd, has no batching rule for addcmul_.)
        out = u * dr if out is None else torch.addcmul(out, u, dr)
    assert out is not None  # torch calls jvp only where some input has a tangent
    if ctx.steep and not ctx.overflow:  # as in the backward: only where flagged
        # A non-finite input tangent explains a non-finite output one: pass their sum.
        incoming = sum((t for t in (x_t, r_t) if t is not None), torch.zeros_like(out))
        warn_gradient_overflow("project_lp(p=2), forward mode", incoming,
                               [("x (the Jacobian-vector product)", out)], (ctx.d - y.ndim,))
    return out, None, None, None, None, None


L2ProjectionFn = with_forward_mode(
    L2ReverseFn, "project_lp", lambda inputs, output: (*output[:2], *_l2_saved(inputs, output)), _l2_jvp)


# --------------------------------------------------------------------------- L∞


def linf_forward(
    x: torch.Tensor, r: float | torch.Tensor, d: int, sphere: bool
) -> torch.Tensor:
    if isinstance(r, torch.Tensor):
        y = torch.clamp(x, -r, r)
    else:
        y = x.clamp(-r, r)
    if not sphere:
        check_finite("x", x, in_graph=not may_break_graph())  # (one reduction; counts only on failure)
        return y
    top, k = x.abs().max(d, keepdim=True)  # first index among ties
    if torch.compiler.is_compiling() or not bool(torch.isfinite(top).all()):
        check_finite("x", x, in_graph=not may_break_graph())
    # Outside the ball the clamp already sets that coordinate to ±r; inside, pushing it
    # out to the nearest face {u_k = ±r} is the projection. Ties in sign go to +r.
    xk = x.gather(d, k)
    rk = r if isinstance(r, torch.Tensor) else torch.full_like(xk, r)
    # Out of place: an in-place write into the clamp's result is saved for the backward
    # as the pre-write tensor by AOTAutograd in torch 2.11 (wrong gradients under
    # torch.compile, seen with fullgraph=True).
    y = y.scatter(d, k, torch.where(xk < 0, -rk, rk).expand_as(xk))
    if not torch.compiler.is_compiling() and _may_underflow(r, 1, x.dtype):
        # (a radius below the dtype's range rounds the pushed coordinate to 0, as p = 1, 2)
        warn_unrepresentable(y, d, "project_lp(p=inf, mode='sphere')")
    return y


@bind_fast
class LinfReverseFn(torch.autograd.Function):
    """Clamp (ball) / clamp-and-push (sphere) with the VJP that zeroes pinned coordinates,
    reverse mode only: the Function torch.compile traces (as :class:`L2ReverseFn`).
    Forward mode: :class:`LinfProjectionFn`."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return linf_forward(x, r, d, sphere)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, r, d, _sphere = inputs
        save_plain(ctx, output, r if isinstance(r, torch.Tensor) else None)
        ctx.r_float = None if isinstance(r, torch.Tensor) else r
        ctx.d = d
        ctx.anchors = graph_anchor(*inputs[:2])  # (their graph, not them: see first_order)

    @staticmethod
    @first_order("project_lp")
    def backward(ctx, grad_y):  # type: ignore[override]
        y, r_t = ctx.saved_tensors
        if grad_y is None:  # undefined (the jvp's subclass does not materialise it): zeros, as before
            grad_y = torch.zeros_like(y)
        r = ctx.r_float if r_t is None else r_t
        # Coordinates at ±r are pinned (dy/dx = 0, dy/dr = ±1); the others pass through. The slack
        # r − |y| ≥ 0 is 0 exactly there. Selects, not products with a 0/1 mask: an Inf incoming gradient
        # on a pinned coordinate made grad_x NaN (Inf·0; torch.clamp's is 0), one on a free coordinate
        # grad_r NaN. (relu's backward, a fused select: as fast as the product; torch.where's bool mask
        # took twice as long on CPU.)
        slack = torch.sub(r, y.abs())
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.threshold_backward(grad_y, slack, 0)
        if ctx.needs_input_grad[1]:
            pinned_grad = torch.where(slack > 0, 0.0, y.sign() * grad_y)
            # grad_x is v or 0 and grad_r a sum of ±v over the row: no gain to check.
            grad_r = _sum_to(pinned_grad.sum(ctx.d, keepdim=True), r_t)
        return grad_x, grad_r, None, None


def _linf_jvp(ctx, x_t: torch.Tensor | None, r_t: torch.Tensor | None,
        _d_t: None, _sphere_t: None) -> torch.Tensor:
    r"""Forward mode, the backward's (diagonal) Jacobian: with f = [|y| < r] the free
    coordinates,

    .. math:: \dot y = f \circ \dot x + (1 - f) \circ \operatorname{sign}(y)\,\dot r

    so a coordinate exactly at |x_i| = r is pinned (tangent 0 in x), as in the
    backward, where the clamp's own derivative passes ẋ_i."""
    y, r_saved = ctx.saved_tensors
    slack = torch.sub(ctx.r_float if r_saved is None else r_saved, y.abs())  # (selects, as the backward)
    out = None if x_t is None else torch.ops.aten.threshold_backward(x_t, slack, 0)
    if r_t is not None:
        pinned = torch.where(slack > 0, 0.0, y.sign() * r_t)
        out = pinned if out is None else out.add_(pinned)
    assert out is not None  # torch calls jvp only where some input has a tangent
    return out


LinfProjectionFn = with_forward_mode(LinfReverseFn, "project_lp", lambda inputs, output: (
    output, inputs[1] if isinstance(inputs[1], torch.Tensor) else None), _linf_jvp)
