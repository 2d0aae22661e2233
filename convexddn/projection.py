"""Euclidean projections onto Lp spheres, Lp balls and the probability simplex.

Each projection is a declarative node

.. math::

    y(x) \\in \\operatorname*{argmin}_{u \\in C} \\tfrac12 \\|u - x\\|_2^2

over one dimension of ``x``, solved in closed form or by one sort (no iteration), and
differentiated by a hand-written vector–Jacobian product that never forms the Jacobian
(Gould, Hartley & Campbell, TPAMI 2021, Table 2 for the sphere, §5.2 for the ball).
Everything is batched torch code that runs unchanged on CPU and CUDA tensors.

Public functions: :func:`project_lp`, :func:`project_simplex`; modules:
:class:`LpProjection`, :class:`SimplexProjection`.

Gradients at non-differentiable points (the sphere/ball boundary, a coordinate at a
clamp bound, a coordinate leaving the support) take one one-sided derivative; each
docstring says which. Gradcheck holds everywhere else.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._checks import check_choice, check_finite, check_positive, check_tensor, normalize_dims
from .errors import OptionError, ShapeError

__all__ = ["project_lp", "project_simplex", "LpProjection", "SimplexProjection"]

_P_VALID = [1, 2, math.inf, "inf"]
_MODES = ["ball", "sphere"]
_BACKENDS = ["native", "cvxpy"]


# --------------------------------------------------------------------------- options


def normalize_p(p: Any) -> float:
    """Map the accepted spellings of p (1, 2, inf, "inf") to 1, 2 or math.inf.

    Raises:
        OptionError: any other value (the message lists the valid ones).
    """
    # bool is an int subclass and tensors make ``in`` ambiguous: reject both up front.
    if isinstance(p, bool) or not isinstance(p, (int, float, str)):
        raise OptionError(f"p must be one of {_P_VALID}, got {p!r}")
    check_choice("p", p, _P_VALID)
    return math.inf if p == "inf" else p


def _p_repr(p: float) -> str:
    return "inf" if p == math.inf else str(int(p))


def _check_dim(dim: Any, x: torch.Tensor) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise OptionError(f"dim must be a single int, got {dim!r}")
    d = normalize_dims("dim", dim, x.ndim)[0]
    if x.shape[d] == 0:
        raise ShapeError(
            f"x must have at least one entry along dim={dim} to project, "
            f"got shape {tuple(x.shape)}"
        )
    return d


def _check_radius_option(radius: Any) -> None:
    """Validate a radius on its own (constructor time): a positive number or tensor."""
    if isinstance(radius, torch.Tensor):
        check_tensor("radius", radius)
    check_positive("radius", radius)


def _prepare_radius(radius: Any, x: torch.Tensor, d: int) -> float | torch.Tensor:
    """Return radius as a float, or as a tensor that broadcasts against x with dim kept.

    A tensor radius must broadcast to x's shape with ``dim`` removed (one radius per
    projected vector, or any broadcastable part of that); it is converted to x's dtype
    and device (differentiably, so a radius that requires grad gets its gradient).
    """
    _check_radius_option(radius)
    if not isinstance(radius, torch.Tensor):
        return float(radius)
    reduced = x.shape[:d] + x.shape[d + 1:]
    try:
        ok = torch.broadcast_shapes(radius.shape, reduced) == reduced
    except RuntimeError:
        ok = False
    if not ok:
        raise ShapeError(
            f"radius must broadcast to the shape of x without dim={d}, {tuple(reduced)}, "
            f"got shape {tuple(radius.shape)}"
        )
    r = radius.to(dtype=x.dtype, device=x.device)
    # Right-aligned broadcasting: the kept (size-1) dim goes before the radius dims that
    # line up with x's trailing dims after d; with fewer dims than that it broadcasts as is.
    pos = r.ndim - (x.ndim - 1 - d)
    if pos >= 0:
        r = r.unsqueeze(pos)
    return r


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


def _needs_graph(x: torch.Tensor, r: float | torch.Tensor) -> bool:
    """Whether autograd will record the call (else the Function wrapper is skipped)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or (isinstance(r, torch.Tensor) and r.requires_grad)
    )


# --------------------------------------------------------------------------- L2


def _l2_forward(
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
class _L2Projection(torch.autograd.Function):
    """y = x·min(1, r/‖x‖) (ball) or r·x/‖x‖ (sphere) with the Table 2 / §5.2 VJP."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return _l2_forward(x, r, d, sphere)

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


def _l1_forward(
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
        y, active = _l1_forward(x / a, r / a, d, sphere)
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
class _L1Projection(torch.autograd.Function):
    """Duchi et al. projection onto the L1 ball/sphere with the Table 2 / §5.2 VJP."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return _l1_forward(x, r, d, sphere)

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


def _simplex_forward(x: torch.Tensor, d: int) -> torch.Tensor:
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
class _SimplexProjection(torch.autograd.Function):
    """Sparsemax forward and VJP (Martins & Astudillo 2016)."""

    @staticmethod
    def forward(x, d):  # type: ignore[override]
        return _simplex_forward(x, d)

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


def _linf_forward(
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
class _LinfProjection(torch.autograd.Function):
    """Clamp (ball) / clamp-and-push (sphere) with the VJP that zeroes pinned coordinates."""

    @staticmethod
    def forward(x, r, d, sphere):  # type: ignore[override]
        return _linf_forward(x, r, d, sphere)

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


def _cvxpy_radius(radius: float | torch.Tensor) -> float:
    if isinstance(radius, torch.Tensor):
        if radius.requires_grad:
            raise OptionError(
                "radius: a gradient with respect to radius needs backend='native', "
                "got a radius tensor with requires_grad=True and backend='cvxpy'"
            )
        if radius.numel() != 1:
            raise OptionError(
                "radius: backend='cvxpy' needs one radius for all rows, "
                f"got a tensor of shape {tuple(radius.shape)}"
            )
        return float(radius)
    return float(radius)


def _project_cvxpy(x: torch.Tensor, d: int, name: str, **kwargs: Any) -> torch.Tensor:
    if x.numel() == 0:
        return x.clone()
    check_finite("x", x)
    # Imported here: the registry pulls in cvxpy, which the native path never needs.
    from .registry import shared_layer

    layer = shared_layer(name, n=x.shape[d], **kwargs)
    return layer(x.movedim(d, -1)).movedim(-1, d)


# --------------------------------------------------------------------------- public API


def project_lp(
    x: torch.Tensor,
    p: float | str = 2,
    mode: str = "ball",
    radius: float | torch.Tensor = 1.0,
    dim: int = -1,
    *,
    backend: str = "native",
) -> torch.Tensor:
    r"""Euclidean projection onto the Lp ball or Lp sphere of radius r, over one dim.

    .. math::

        y(x) \in \operatorname*{argmin}_{u} \tfrac12 \|u - x\|_2^2
        \quad\text{s.t.}\quad \|u\|_p \le r \ \text{(ball)} \quad\text{or}\quad
        \|u\|_p = r \ \text{(sphere)}

    - ``p=2``: :math:`y = x \min(1, r/\|x\|_2)` (ball), :math:`y = r x/\|x\|_2` (sphere).
    - ``p=1``: the sort-based algorithm of Duchi et al. (2008),
      :math:`y = \operatorname{sign}(x)\max(|x| - \theta, 0)`. The sphere is nonconvex;
      from inside the ball the global minimiser is the projection onto the nearest facet,
      :math:`y = x + s\,(r - \|x\|_1)/n` with :math:`s = \operatorname{sign}(x)`. Tie rule:
      zero coordinates (where both signs are minimisers) take :math:`s_i = +1`.
    - ``p=inf``: :math:`y = \operatorname{clamp}(x, -r, r)` (ball). The sphere also clamps
      from outside; from inside it pushes the largest-magnitude coordinate to
      :math:`\pm r` (its sign; ``+r`` for a zero). Tie rule: among equal largest
      magnitudes the first index moves. For ``p=2`` and ``x = 0`` the sphere returns
      :math:`r e_0` (first coordinate of the dim).

    Gradients (vector–Jacobian products, no Jacobian is formed), Gould et al. Table 2 for
    the sphere and §5.2 for the ball (the identity inside the ball, the sphere gradient
    outside):

    - ``p=2``: :math:`\mathrm{D}y = \frac{r}{\|x\|}(I - y y^\top / r^2)`.
    - ``p=1``: :math:`\mathrm{D}y = \operatorname{diag}(m) - (m \circ s)(m \circ s)^\top/|S|`
      on the support :math:`S = \{i : y_i \ne 0\}` with indicator :math:`m`.
    - ``p=inf``: :math:`\mathrm{D}y = \operatorname{diag}(|y| < r)`: coordinates at
      :math:`\pm r` get zero gradient (also exactly at :math:`|x_i| = r`, where
      ``torch.clamp`` would pass 1).

    For ``p=1, 2`` on the ball boundary (:math:`\|x\|_p = r`) the inside derivative
    (identity) is used; for ``p=2, x=0`` on the sphere the gradient with respect to ``x``
    is zero. ``radius`` gets its gradient when it is a tensor that requires grad
    (:math:`\partial y/\partial r` is :math:`y/r`, :math:`s \circ m/|S|` and
    :math:`\operatorname{sign}(y)` on the pinned coordinates for p = 2, 1, inf; 0 inside
    the ball). Accuracy is that of the dtype relative to :math:`\max_i |x_i|`: for
    :math:`r` below its rounding error (e.g. ``p=1``, float32, :math:`|x| \sim 10^8 r`)
    the threshold cancels and the result may fall short of the sphere.

    Args:
        x: input tensor, floating point.
        p: 1, 2, ``float('inf')`` or ``"inf"``. Default: 2.
        mode: ``"ball"`` (convex) or ``"sphere"`` (nonconvex). Default: ``"ball"``.
        radius: positive float, or positive tensor broadcastable to ``x``'s shape with
            ``dim`` removed (one radius per projected vector). Default: 1.0.
        dim: the dimension projected over. Default: -1.
        backend: ``"native"`` (batched torch) or ``"cvxpy"`` (the registry's ``lp_ball``
            problem through :class:`convexddn.ConvexLayer`; ball only, scalar radius
            without gradient). Default: ``"native"``.

    Shape:
        - Input: :math:`(*, n, *)` with ``n`` at ``dim``; leading batch may be empty.
        - Output: same shape, dtype and device as ``x``.

    Raises:
        DTypeError: ``x`` (or a tensor ``radius``) is not floating point.
        NonFiniteError: ``x`` contains NaN or Inf (the message gives the count).
        ShapeError: ``dim`` is out of range, ``x`` is empty along ``dim``, or ``radius``
            does not broadcast to the batch shape.
        OptionError: unknown ``p``, ``mode`` or ``backend`` (the message lists the valid
            ones), ``radius`` ≤ 0, or ``mode="sphere"`` / a per-row or trainable radius
            with ``backend="cvxpy"``.

    References:
        Gould, Hartley & Campbell, "Deep Declarative Networks", TPAMI 2021 (§5.2, Table 2).
        Duchi, Shalev-Shwartz, Singer & Chandra, "Efficient Projections onto the
        l1-Ball for Learning in High Dimensions", ICML 2008.

    Examples::

        >>> y = project_lp(torch.randn(8, 16), p=1, mode="ball", radius=2.0)
        >>> bool((y.abs().sum(-1) <= 2.0 + 1e-5).all())
        True
    """
    x = check_tensor("x", x)
    p = normalize_p(p)
    check_choice("mode", mode, _MODES)
    check_choice("backend", backend, _BACKENDS)
    d = _check_dim(dim, x)
    r = _prepare_radius(radius, x, d)
    sphere = mode == "sphere"
    if backend == "cvxpy":
        if sphere:
            raise OptionError(
                "mode='sphere' is nonconvex and needs backend='native', got backend='cvxpy'"
            )
        return _project_cvxpy(x, d, "lp_ball", p=p, radius=_cvxpy_radius(radius))
    graph = _needs_graph(x, r)
    if p == 2:
        return (_L2Projection.apply if graph else _l2_forward)(x, r, d, sphere)[0]
    if p == 1:
        return (_L1Projection.apply if graph else _l1_forward)(x, r, d, sphere)[0]
    return (_LinfProjection.apply if graph else _linf_forward)(x, r, d, sphere)


def project_simplex(x: torch.Tensor, dim: int = -1, *, backend: str = "native") -> torch.Tensor:
    r"""Euclidean projection onto the probability simplex (sparsemax), over one dim.

    .. math::

        y(x) = \operatorname*{argmin}_{u} \tfrac12 \|u - x\|_2^2
        \quad\text{s.t.}\quad u \ge 0,\ \mathbf{1}^\top u = 1

    Solved by one sort: :math:`y = \max(x - \tau, 0)` with :math:`\tau` from the
    sorted prefix sums (Duchi et al. 2008; Martins & Astudillo 2016). The gradient is the
    VJP of :math:`\mathrm{D}y = \operatorname{diag}(m) - m m^\top/|S|`, :math:`m` the
    support indicator (a coordinate exactly at the threshold counts as outside).

    Args:
        x: input tensor, floating point.
        dim: the dimension projected over. Default: -1.
        backend: ``"native"`` or ``"cvxpy"`` (the registry's ``simplex`` problem through
            :class:`convexddn.ConvexLayer`). Default: ``"native"``.

    Shape:
        - Input: :math:`(*, n, *)` with ``n`` at ``dim``; leading batch may be empty.
        - Output: same shape, dtype and device as ``x``.

    Raises:
        DTypeError: ``x`` is not floating point.
        NonFiniteError: ``x`` contains NaN or Inf.
        ShapeError: ``dim`` is out of range or ``x`` is empty along ``dim``.
        OptionError: unknown ``backend``.

    References:
        Martins & Astudillo, "From Softmax to Sparsemax", ICML 2016.
        Duchi et al., ICML 2008. Gould, Hartley & Campbell, TPAMI 2021.
    """
    x = check_tensor("x", x)
    check_choice("backend", backend, _BACKENDS)
    d = _check_dim(dim, x)
    if backend == "cvxpy":
        return _project_cvxpy(x, d, "simplex")
    if _needs_graph(x, 1.0):
        return _SimplexProjection.apply(x, d)
    return _simplex_forward(x, d)


class LpProjection(nn.Module):
    r"""Module form of :func:`project_lp`: projection onto an Lp ball or sphere.

    .. math::

        y(x) \in \operatorname*{argmin}_{\|u\|_p \le r \text{ or } \|u\|_p = r}
        \tfrac12 \|u - x\|_2^2

    Args:
        p: 1, 2, ``float('inf')`` or ``"inf"``. Default: 2.
        mode: ``"ball"`` or ``"sphere"``. Default: ``"ball"``.
        radius: positive float or tensor (a tensor is stored as a buffer, an
            ``nn.Parameter`` as a parameter and then learned). Default: 1.0.
        dim: the dimension projected over. Default: -1.
        backend: ``"native"`` or ``"cvxpy"``. Default: ``"native"``.

    Shape:
        - Input: :math:`(*, n, *)`; Output: same shape.

    Raises:
        OptionError: at construction for an unknown ``p``/``mode``/``backend`` or
            ``radius`` ≤ 0; the call raises as :func:`project_lp`.

    Examples::

        >>> proj = LpProjection(p=1, mode="sphere", radius=1.0)
        >>> proj(torch.randn(4, 10)).abs().sum(-1).shape
        torch.Size([4])
    """

    def __init__(
        self,
        p: float | str = 2,
        mode: str = "ball",
        radius: float | torch.Tensor = 1.0,
        dim: int = -1,
        *,
        backend: str = "native",
    ) -> None:
        super().__init__()
        self.p = normalize_p(p)
        check_choice("mode", mode, _MODES)
        check_choice("backend", backend, _BACKENDS)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise OptionError(f"dim must be a single int, got {dim!r}")
        if backend == "cvxpy" and mode == "sphere":
            raise OptionError(
                "mode='sphere' is nonconvex and needs backend='native', got backend='cvxpy'"
            )
        _check_radius_option(radius)
        self.mode, self.dim, self.backend = mode, dim, backend
        if isinstance(radius, nn.Parameter):
            self.radius = radius
        elif isinstance(radius, torch.Tensor):
            self.register_buffer("radius", radius)
        else:
            self.radius = float(radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project_lp(x, self.p, self.mode, self.radius, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        r = self.radius
        shown = f"Tensor{tuple(r.shape)}" if isinstance(r, torch.Tensor) else f"{r}"
        return (
            f"p={_p_repr(self.p)}, mode={self.mode!r}, radius={shown}, dim={self.dim}, "
            f"backend={self.backend!r}"
        )


class SimplexProjection(nn.Module):
    r"""Module form of :func:`project_simplex` (sparsemax).

    .. math::

        y(x) = \operatorname*{argmin}_{u \ge 0,\ \mathbf{1}^\top u = 1} \tfrac12 \|u - x\|_2^2

    Args:
        dim: the dimension projected over. Default: -1.
        backend: ``"native"`` or ``"cvxpy"``. Default: ``"native"``.

    Shape:
        - Input: :math:`(*, n, *)`; Output: same shape.

    Raises:
        OptionError: at construction for an unknown ``backend``; the call raises as
            :func:`project_simplex`.
    """

    def __init__(self, dim: int = -1, *, backend: str = "native") -> None:
        super().__init__()
        check_choice("backend", backend, _BACKENDS)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise OptionError(f"dim must be a single int, got {dim!r}")
        self.dim, self.backend = dim, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project_simplex(x, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"
