r"""Euclidean projections by a sorted threshold: the L1 ball/sphere and the simplex, and
their vector–Jacobian products (autograd Functions, with a ``jvp`` for forward mode).

Both reduce to :math:`y_i = \max(x_i - \tau, 0)` (with signs for L1) for the threshold
:math:`\tau` found by one sort and a running sum (Duchi et al. 2008); rows whose
running sums could overflow are solved on a power-of-two-scaled copy and scaled back
(the projections are positively homogeneous). The shared range helpers and the L2/L∞
projections are in :mod:`.kernels`; :mod:`.node` validates the options and picks one.
"""
from __future__ import annotations

import math

import torch

from ..._autograd import bind_fast, save_plain
from ..._anchor import graph_anchor
from ..._first_order import first_order, first_order_jvp, with_forward_mode
from ..._checks import check_finite
from ...errors import SolverError
from .ranges import _along, _may_underflow, _sum_to, warn_unrepresentable

__all__ = ["L1ProjectionFn", "L1ReverseFn", "SimplexProjectionFn", "l1_forward", "simplex_forward"]

# Where the radius is Inf in x's dtype: the public functions widen a radius beyond that
# range first (ranges.wide_dtype), except inside torch.compile (no host read there).
_OVERFLOW = ("{}: the threshold overflows after rescaling ({} is Inf in x's dtype; under "
             "torch.compile a radius beyond that range is not widened: pass x in a wider dtype)")


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype the row sums and counts run in, forward and derivatives: at least float32
    (16-bit sums overflow, and count positions inexactly)."""
    return torch.promote_types(dtype, torch.float32)


def _threshold_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the threshold and the support are found in: float64 for 16-bit x, whose
    differences from the row maximum it holds exactly (float16: multiples of 2^-24 below
    2^17), so that the support (and the L1 ball's inside/outside) is the exact projection's
    of the given x, not the one of x − max rounded to 11 bits; x's own dtype otherwise."""
    return torch.float64 if dtype.itemsize < 4 else dtype


def _support(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the backward and jvp read the support from where ``v`` (``max(t − θ, 0)``, the
    result before its rounding to x's dtype) is wider than x: the indicator ``v > 0`` in
    x's dtype (a subnormal vᵢ that rounds to 0 stays in the support: float16
    [1, 6e-8, -1] has y₂ = 3e-8 → 0, on the support {1, 2}, Dy = I − 11ᵀ/2 there); where it
    is not, an empty tensor (then ``v`` is y itself, read as ``y ≠ 0``)."""
    return v.sign().to(x.dtype) if v.dtype != x.dtype else x.new_empty(0)


def _sorted_threshold(
    u: torch.Tensor, c: torch.Tensor, z: float | torch.Tensor, d: int
) -> torch.Tensor:
    """θ with Σᵢ max(vᵢ − θ, 0) = z, from v sorted descending (u) and its cumsum (c); the
    support's size ρ is counted in float32 at least.

    Duchi et al. 2008, Fig. 1: ρ = max{j : u_j − (c_j − z)/j > 0} and θ = (c_ρ − z)/ρ.
    The test f_j = j·u_j − c_j + z > 0 is monotone in j, so ρ is the count of its true
    entries (no argmax needed). It is counted in floating point, as sign(max(f, 0)):
    full-size bool tensors are several times slower on CPU. j = 1 passes in exact
    arithmetic; the clamp keeps ρ ≥ 1 when z is below u₁'s ulp.

    Only entries u_j > −z can count: θ ≥ −z (see :func:`_shifted_simplex`), so an entry
    at or below −z is never in the support, and one exactly at −z sits exactly at θ = −z
    when the answer is the vertex z·e₁ (u₂ ≤ −z: every entry clamped there, or an input
    already at a vertex). f_j is then 0 in exact arithmetic, but the rounding of c_j
    (sums of j copies of −z) makes it > 0 for some j: counted, they put θ just below −z,
    leaving ulp-sized entries in the answer and a support too large for the backward
    (dy₁/dx₁ = 1 − 1/|S| instead of 0). So f_j counts as min(f_j, u_j + z): u_j + z is
    positive exactly when u_j > −z (a floating-point sum is 0 only for exact opposites).
    """
    # Positions and their count in float32 at least: in float16 they are inexact beyond
    # 2048 and overflow beyond 65504 (a row of 70000 gave an index error).
    dtype = u.dtype
    work = _accumulator(dtype)
    u, c = u.to(work), c.to(work)
    j = _along(torch.arange(1, u.shape[d] + 1, dtype=work, device=u.device), d, u.ndim)
    # In place but for u + z and the cap: on CPU a fresh full-size buffer costs about as
    # much as a pass over it. (The cap out of place: forward mode, which reaches these ops
    # on tensors torch.compile cannot see carry tangents, refuses an out= minimum.)
    f = torch.sub(z, c).addcmul_(u, j)
    f = torch.minimum(f, u + z)
    rho = f.clamp_(min=0.0).sign_().sum(d, keepdim=True).clamp_(min=1.0)
    return ((c.gather(d, rho.long() - 1) - z) / rho).to(dtype)


def _shifted_simplex(
    t: torch.Tensor, z: float | torch.Tensor, d: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Project ``t`` (each row's max 0) onto {v ≥ 0, Σv = z}: ``(t, θ)`` with v = max(t − θ, 0)
    (t clamped at −z in place; the callers form v); None on overflow.

    Working relative to the row maximum keeps every quantity at the scale of z: the
    answer is max(t − θ, 0) with θ ∈ [−z, 0] (y_max ≤ z gives θ ≥ −z), so entries at
    or below −z are never in the support: raising them to −z leaves ρ and θ unchanged
    (in floating point too: :func:`_sorted_threshold` never counts an entry at −z),
    bounds the prefix sums by n·z, and speeds up the sort (many equal keys). Without
    the shift, θ ≈ max|x| cancels against |x| and |x| ≫ z/eps gives zeros.
    """
    # In place: entries below -z stay below θ, so t keeps its use for the answer. A clamp
    # for a tensor z too (as fast): torch.maximum(..., out=t) has no forward-mode formula.
    t = t.clamp_(min=-z)
    u = t.sort(dim=d, descending=True).values
    # Prefix sums in float32 at least: in bfloat16 (8 bits) they stop growing after ~256
    # entries at -z, ρ was over-counted and sparsemax rows summed to 3.6.
    c = u.cumsum(d, dtype=_accumulator(u.dtype))
    # u ≤ 0, so c falls monotonically and z − c_j, c_ρ − z are at most z + |c_n| in size:
    # c_n − 2z finite (2 is margin for the rounding of parallel scans) rules out overflow
    # in the threshold, with the host read that also catches NaN/Inf in the input.
    if not bool(torch.isfinite(torch.sub(c.narrow(d, c.shape[d] - 1, 1), z, alpha=2)).all()):
        return None
    return t, _sorted_threshold(u, c, z, d)


def _float32_answer(a: torch.Tensor, top: torch.Tensor, theta: torch.Tensor, z: float | torch.Tensor,
                    d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, θ)``: v = max(a − top − θ, 0) for float32 ``a`` (x, or |x| for L1; ``top`` its row max),
    formed in float64 and rounded once, θ in float64: Newton steps on
    g(θ) = Σᵢ max(aᵢ − top − θ, 0) − z from the float32 θ₀ of :func:`_sorted_threshold`, exact
    once their support is the answer's (g is linear there; they differ only at ties with the threshold).

    θ₀ is off by ~ε|θ| (the rounded prefix sums; t = a − top is rounded too), and so was
    every aᵢ − top − θ₀ in float32: a small entry lost its relative accuracy (73 ulps at
    1e-3, float32 sparsemax of randn rows), though it was ~1 ulp against the row max.
    aᵢ − top is exact in float64 (short of exponents 29 apart, then within 2^-53
    relative): the result is float64's, rounded once (0.5 ulp in the tests).
    """
    # (a converted first: torch.sub(a, top64) across dtypes took 40× as long on CPU.)
    w = a.to(torch.float64).sub_(top.to(torch.float64))
    theta = theta.to(torch.float64)
    z64 = z.to(torch.float64) if isinstance(z, torch.Tensor) else z
    # Two Newton (Michelot) steps from just below θ₀ (the margin: its float32 rounding), each counting
    # its support in float64: float32's can be wrong, entries within its rounding of the row max rounding
    # onto it in t ([1, 1e-9, 1e-9, 1e-9] gave [1, 0, 0, 0] for [1, 2.5e-10 ×3] from one step with it).
    theta = theta - 4 * torch.finfo(torch.float32).eps * (theta.abs() + z64)
    for _ in range(2):
        v = (w - theta).clamp_(min=0.0)
        count = v.sign().sum(d, keepdim=True).clamp_(min=1.0)
        theta = theta + (v.sum(d, keepdim=True) - z64) / count
    return w.sub_(theta).clamp_(min=0.0), theta


def _answer(out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], a: torch.Tensor, top: torch.Tensor,
            z: float | torch.Tensor, d: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, support, θ)`` from :func:`_shifted_simplex`'s ``(t, θ)``: y = max(a − top − θ, 0) in x's
    dtype (float32: :func:`_float32_answer`'s, and its θ), the support where y is rounded (:func:`_support`)."""
    t, theta = out
    if x.dtype == torch.float32 and x.device.type != "mps":  # (MPS has no float64)
        v, theta = _float32_answer(a, top, theta, z, d)
        # A float64 vᵢ > 0 rounds to 0 only below float32's smallest subnormal: at a tie
        # with the threshold (no derivative; the entry counts as outside), or where z/n
        # itself is that small, where the support is kept as for 16-bit x.
        support = _support(v, x) if _may_underflow(z, x.shape[d], x.dtype) else x.new_empty(0)
        return v.to(x.dtype), support, theta
    v = (t - theta).clamp_(min=0.0)
    return v.to(x.dtype), _support(v, x), theta


def _scaled(
    x: torch.Tensor, z: float | torch.Tensor, d: int
) -> tuple[torch.Tensor, float | torch.Tensor, float | torch.Tensor]:
    """``(x·s, z·s, s)``, s a power of two per row (1 for small z): sums of n entries ~z·s fit.

    P(s·x; s·z) = s·P(x; z), exactly for powers of two (short of subnormals, far below
    ε·z). 2^k ≥ 4(n+1) keeps every partial sum (≤ 3nz·s when rounded) below the largest
    float. (Never for 16-bit x: solved in float64 (:func:`_threshold_dtype`), their sums fit.)
    """
    k = math.ceil(math.log2(4 * (x.shape[d] + 1)))
    big = torch.finfo(x.dtype).max / 2.0**k
    if isinstance(z, torch.Tensor):
        z = z.to(x.dtype)
        s: float | torch.Tensor = torch.where(z > big, z.new_tensor(2.0**-k), z.new_tensor(1.0))
    else:
        s = 2.0**-k if z > big else 1.0
    return x * s, z * s, s


def l1_forward(
    x: torch.Tensor, r: float | torch.Tensor, d: int, sphere: bool, _rescaled: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, active, support)``: the projection, whether each row is outside the ball
    (every sphere row), and the support indicator (:func:`_support`; empty unless x is 16-bit)."""
    ax = x.abs()
    top = ax.amax(d, keepdim=True)
    # |x| onto the r-simplex, in coordinates relative to max|x| (exact for the entries
    # that can be in the support, by Sterbenz's lemma; for 16-bit x in float64, exact).
    work = _threshold_dtype(x.dtype)
    out = _shifted_simplex(ax.to(work) - top.to(work), r, d)
    if out is None:  # NaN/Inf in x (which poison the sums), or sums of ~n·r that overflow
        check_finite("x", x)
        if _rescaled:  # _scaled's bound rules out a finite radius: fail loudly, never loop
            raise SolverError(_OVERFLOW.format("project_lp(p=1)", "radius"))
        xs, rs, s = _scaled(x, r, d)
        y, active, _ = l1_forward(xs, rs, d, sphere, True)
        # |y| ≤ r exactly; the clamp keeps a last-ulp excess from turning r ≈ max into Inf.
        y = torch.clamp(y, -rs, rs).div_(s)
        support = x.new_empty(0)  # (y is in x's dtype here: x is not 16-bit)
        # Rows inside the ball keep x itself: scaled by 2^-k, entries near the subnormal
        # range lost bits (float32, r = 3e38: 1.1258e-40 came back as 1.1264e-40).
        return (y if sphere else torch.where(active, y, x)), active, support
    # (θ refined in float64 for float32 x: float32's put [1, 1e-9, 1e-9, 1e-9], 3e-9 outside r = 1, inside)
    t, support, theta = _answer(out, ax, top, r, d, x)
    # θ + max|x| is the threshold on |x|: ≤ 0 inside the ball, where the ball keeps x;
    # the sphere pushes every coordinate out by −θ along sign(x) there (the nearest
    # facet of the cross-polytope).
    if sphere:
        active = torch.ones_like(theta, dtype=torch.bool)
        if _may_underflow(r, x.shape[d], x.dtype):
            warn_unrepresentable(t, d, "project_lp(p=1, mode='sphere')")
    else:
        active = (theta + top.to(theta.dtype)) > 0  # (in θ's dtype: float16 [1, 6e-8] is outside r = 1)
        return torch.where(active, torch.copysign(t, x), x), active, support
    # Zero coordinates go to the + side (the tie rule of the sphere-from-inside case):
    # adding +0.0 turns −0.0 into +0.0, so copysign sees a + sign for every zero.
    return torch.copysign(t, x + 0.0), active, support


@bind_fast
class L1ReverseFn(torch.autograd.Function):
    """Duchi et al. projection onto the L1 ball/sphere with the Table 2 / §5.2 VJP, reverse
    mode only (what torch.compile traces: dynamo refuses a Function with a jvp). Forward
    mode: :class:`L1ProjectionFn`."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return l1_forward(x, r, d, sphere)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, r, d, _sphere = inputs
        y, active, support = output
        ctx.mark_non_differentiable(active, support)
        save_plain(ctx, y, active, support, r if isinstance(r, torch.Tensor) else None)
        ctx.d = d
        ctx.anchors = graph_anchor(*inputs[:2])  # (their graph, not them: see first_order)

    @staticmethod
    @first_order("project_lp")
    def backward(ctx, grad_y, _grad_active, _grad_support):  # type: ignore[override]
        y, active, support, r_t = ctx.saved_tensors
        if grad_y is None:  # undefined (the jvp's subclass does not materialise it): zeros, as before
            grad_y = torch.zeros_like(y)
        d = ctx.d
        # On the support S (y ≠ 0, or before y's rounding: _support) with s = sign(y):
        # Dy = diag(1_S) − (s∘1_S)(s∘1_S)ᵀ/|S|; inside the ball (θ = 0) Dy = I.
        s, m = _signs(y, support)
        # (Sums at least in float32: in float16 |S| > 65504, or sᵀv of a moderate v, was Inf.)
        acc = _accumulator(y.dtype)
        k = m.sum(d, keepdim=True, dtype=acc).clamp_(min=1.0)
        # A select, not a product with the mask: sᵀv may overflow (v near the largest
        # float), and Inf·0 made the inside gradient v NaN.
        # Selects for the masks too: an Inf in v off the support (where Dy's column is 0)
        # made 0·Inf = NaN of the whole row (x = [2, 0.1, -1], r = 1, v₃ = Inf: NaN, not 0).
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        coef = torch.where(m > 0, s * grad_y, zero).sum(d, keepdim=True, dtype=acc) / k
        coef = torch.where(active, coef, torch.zeros_like(coef))
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            # Pass-through mask: the support on active rows, everything on inactive ones.
            keep = (m > 0) | ~active
            grad_x = torch.where(keep, torch.addcmul(grad_y, s, coef.to(y.dtype), value=-1.0), zero)
        if ctx.needs_input_grad[1]:
            # dθ/dr = −1/|S|, so dy/dr = s/|S| on the support: sᵀv / |S|.
            grad_r = _sum_to(coef, r_t)
        # Entries of Dy are at most 1 (dy/dr: 1/|S|): no gain to check, no host read.
        return grad_x, grad_r, None, None


def _signs(y: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, m)``: the signs of the L1 projection on its support and the support indicator,
    from the forward's unrounded support (:func:`_support`) where it saved one. Zero
    coordinates of y on the support take + (the sphere's tie rule; y = 0 there only by
    rounding, as x ≠ 0 on a ball row's support)."""
    if not support.numel():
        s = y.sign()
        return s, s.abs()
    return torch.where(torch.signbit(y), -support, support), support  # (signbit: -0.0 too)


def _l1_jvp(ctx, x_t: torch.Tensor | None, r_t: torch.Tensor | None,
        _d_t: None, _sphere_t: None) -> tuple[torch.Tensor, None, None]:
    r"""Forward mode, the backward's Jacobian (symmetric in x): with s = sign(y) and
    m = |s| the support indicator, on rows outside the ball (and every sphere row)

    .. math:: \dot y = m \circ \dot x - s\,(s^\top \dot x - \dot r)/|S|

    (θ = (Σ_S |x| − r)/|S|, so dy/dr = s/|S|); on rows inside the ball ẏ = ẋ."""
    y, active, support = ctx.saved_tensors
    d = ctx.d
    s, m = _signs(y, support)
    acc = _accumulator(y.dtype)
    k = m.sum(d, keepdim=True, dtype=acc).clamp_(min=1.0)
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    # Selects for the masks (as in the backward): an Inf tangent off the support gave 0·Inf = NaN.
    shift = (torch.where(m > 0, s * x_t, zero).sum(d, keepdim=True, dtype=acc) if x_t is not None
             else torch.zeros_like(k))
    if r_t is not None:
        shift = shift - r_t
    # A select, not a product with the mask (as in the backward): Inf·0 would be NaN.
    coef = torch.where(active, shift / k, torch.zeros_like(k))
    base = torch.zeros_like(y) if x_t is None else x_t
    keep = (m > 0) | ~active  # the support on active rows, everything on inactive ones
    return torch.where(keep, torch.addcmul(base, s, coef.to(base.dtype), value=-1.0), zero), None, None


L1ProjectionFn = with_forward_mode(
    L1ReverseFn, "project_lp", lambda inputs, output: tuple(output), _l1_jvp)


def simplex_forward(
    x: torch.Tensor, z: float | torch.Tensor, d: int, _rescaled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, support)``: the projection and its support indicator (:func:`_support`:
    empty unless x is 16-bit, where the threshold is found in float64)."""
    lo, hi = torch.aminmax(x, dim=d, keepdim=True)
    if not bool((torch.isfinite(lo) & torch.isfinite(hi)).all()):
        check_finite("x", x)  # -Inf would be clamped away below: test here
    # The projection is shift invariant; shifting by the row max keeps τ's prefix sums at
    # the scale of the answer (no cancellation for large x). x − hi may overflow to −Inf:
    # the clamp at −z in _shifted_simplex takes it back.
    work = _threshold_dtype(x.dtype)
    out = _shifted_simplex(x.to(work) - hi.to(work), z, d)
    if out is None:  # sums of ~n·z that overflow (x is finite here)
        if _rescaled:  # _scaled's bound rules out a finite z: fail loudly, never loop
            raise SolverError(_OVERFLOW.format("project_simplex", "z"))
        xs, zs, s = _scaled(x, z, d)
        # y ≤ z exactly; the clamp keeps a last-ulp excess from turning z ≈ max into Inf.
        # (x is not 16-bit here, so y is in x's dtype and has no wider support to keep)
        return simplex_forward(xs, zs, d, True)[0].clamp(max=zs).div_(s), x.new_empty(0)
    if not torch.compiler.is_compiling() and _may_underflow(z, x.shape[d], x.dtype):
        # z/n below the dtype's normal range (float16 z = 1e-8, float32 1e-46): whole rows
        # can round to 0, off the simplex, as the L1 sphere's do. A row is 0 exactly where
        # its threshold is (max(t − θ, 0) with max t = 0 and θ ≤ 0), rounded to x's dtype:
        # the cheap (…, 1) test.
        warn_unrepresentable(out[1].to(x.dtype), d, "project_simplex", "z", "simplex")
    return _answer(out, x, hi, z, d, x)[:2]


@bind_fast
class SimplexProjectionFn(torch.autograd.Function):
    """Sparsemax (radius z) forward and VJP (Martins & Astudillo 2016)."""

    generate_vmap_rule = True  # (torch.func.jacfwd: a vmap over the jvp, the primals unbatched)

    @staticmethod
    def forward(x, z, d):  # type: ignore[override]
        return simplex_forward(x, z, d)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, z, d = inputs
        y, support = output
        ctx.mark_non_differentiable(support)
        save_plain(ctx, y, support, z if isinstance(z, torch.Tensor) else None)
        ctx.save_for_forward(y, support)
        ctx.d = d
        ctx.anchors = graph_anchor(*inputs[:2])  # (their graph, not them: see first_order)

    @staticmethod
    @first_order_jvp("project_simplex")  # its tangent differentiated again: DoubleBackwardError
    def jvp(ctx, x_t, z_t, _):  # type: ignore[override]
        """Forward mode: Dy·ẋ = m ∘ ẋ − m (mᵀẋ)/|S| (+ m ż/|S|), m the support indicator."""
        y, support = ctx.saved_tensors[:2]
        m = support if support.numel() else y.sign()
        acc = _accumulator(y.dtype)
        size = m.sum(ctx.d, keepdim=True, dtype=acc).clamp_(min=1.0)
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        # A select, not m·ẋ: an Inf tangent off the support gave 0·Inf = NaN (as the backward).
        mx = torch.where(m > 0, x_t, zero) if x_t is not None else torch.zeros_like(y)
        shift = mx.sum(ctx.d, keepdim=True, dtype=acc)
        if isinstance(z_t, torch.Tensor):
            shift = shift - z_t
        return torch.where(m > 0, mx - (shift / size).to(mx.dtype), zero), None

    @staticmethod
    @first_order("project_simplex")
    def backward(ctx, grad_y, _grad_support):  # type: ignore[override]
        y, support, z_t = ctx.saved_tensors
        # Dy = diag(m) − m mᵀ/|S| with m the support indicator: centre v on the support.
        # y ≥ 0, so y's sign is it (float: faster than bool) where y is not rounded from a
        # wider result; else the forward's own (_support: a subnormal entry rounded to 0).
        m = support if support.numel() else y.sign()
        # A select, not m·v: an Inf in v off the support (Dy's column 0 there) gave 0·Inf =
        # NaN for the whole row (x = [2, 0.1, -1], v₃ = Inf: NaN, exactly 0).
        on = m > 0
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        gm = torch.where(on, grad_y, zero)
        acc = _accumulator(y.dtype)
        mean = gm.sum(ctx.d, keepdim=True, dtype=acc) / m.sum(ctx.d, keepdim=True, dtype=acc).clamp_(min=1.0)
        grad_x = grad_z = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(on, gm - mean.to(gm.dtype), zero)
        if ctx.needs_input_grad[1]:
            # τ = (Σ_S x − z)/|S|, so dy/dz = m/|S|: the support mean of v.
            grad_z = _sum_to(mean, z_t)
        # Entries of Dy are at most 1 (dy/dz: 1/|S|): no gain to check, no host read.
        return grad_x, grad_z, None
