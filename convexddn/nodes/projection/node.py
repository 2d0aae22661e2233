"""Euclidean projections onto Lp spheres, Lp balls and the probability simplex.

Each projection is a declarative node

.. math::

    y(x) \\in \\operatorname*{argmin}_{u \\in C} \\tfrac12 \\|u - x\\|_2^2

over one dimension of ``x``, solved in closed form or by one sort (no iteration), and
differentiated by a hand-written vector–Jacobian product that never forms the Jacobian
(Gould, Hartley & Campbell, TPAMI 2021, Table 2 for the sphere, §5.2 for the ball).
Everything is batched torch code that runs unchanged on CPU and CUDA tensors. The
cone-program forms are the registry's ``lp_ball`` and ``simplex`` problems
(``convexddn.layer("lp_ball", n=..., p=..., backend="cvxpy")``).

Gradients at non-differentiable points (the sphere/ball boundary, a coordinate at a
clamp bound, a coordinate leaving the support) take one one-sided derivative; each
docstring says which. Gradcheck holds everywhere else.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..._checks import (building, check_choice, check_device, check_int, check_positive, check_tensor, normalize_dims,
                        normalize_p)
from ..._autograd import may_carry_tangents, refuse_export, refuse_vmap
from ...errors import ShapeError
from .._repr import format_option
from .._module_options import store_option
from .._overflow import option_rows
from .kernels import (L2ProjectionFn, L2ReverseFn, LinfProjectionFn, LinfReverseFn, carries_tangents,
                      l2_forward, linf_forward, needs_graph)
from .ranges import narrowed, wide_dtype
from .simplex import L1ProjectionFn, L1ReverseFn, SimplexProjectionFn, l1_forward, simplex_forward

__all__ = ["LpProjection", "SimplexProjection", "normalize_p", "project_lp", "project_simplex"]

_MODES = ["ball", "sphere"]


# --------------------------------------------------------------------------- options


def _p_repr(p: float) -> str:
    return "inf" if p == math.inf else str(int(p))


def _check_dim(dim: Any, x: torch.Tensor) -> int:
    check_int("dim", dim)
    d = normalize_dims("dim", dim, x.ndim)[0]
    if x.shape[d] == 0:
        raise ShapeError(
            f"x must have at least one entry along dim={dim} to project, "
            f"got shape {tuple(x.shape)}"
        )
    return d


def _check_radius_option(radius: Any, name: str = "radius") -> None:
    """Validate a radius on its own (constructor time): a positive number or tensor."""
    if isinstance(radius, torch.Tensor):
        # (check_tensor's value: an inference-mode Parameter's tracked clone, on which the
        # positivity test's ops may record; on the Parameter itself they raised torch's error)
        radius = check_tensor(name, radius)
    check_positive(name, radius)


def _prepare_radius(
    radius: Any, x: torch.Tensor, d: int, name: str = "radius"
) -> float | torch.Tensor:
    """Return radius as a float, or as a tensor that broadcasts against x with dim kept.

    A tensor radius must broadcast to x's shape with ``dim`` removed (one radius per
    projected vector, or any broadcastable part of that); it is broadcast to one radius
    per row and converted to x's dtype (differentiably, so a radius that requires grad
    gets its gradient, summed over the rows in float32 at least:
    :func:`~convexddn.nodes._overflow.option_rows`; the callers solve in float64 where it would overflow or
    round below the smallest normal, :func:`.ranges.wide_dtype`, which validates it before, device first);
    one on another device than x is refused (``InputError``), not moved.
    """
    if not isinstance(radius, torch.Tensor):
        return float(radius)
    check_device(name, radius, x)
    reduced = x.shape[:d] + x.shape[d + 1:]
    try:
        ok = torch.broadcast_shapes(radius.shape, reduced) == reduced
    except RuntimeError:
        ok = False
    if not ok:
        raise ShapeError(
            f"{name} must broadcast to the shape of x without dim={d}, {tuple(reduced)}, "
            f"got shape {tuple(radius.shape)}"
        )
    # One per row (a view, or a (*batch) tensor where the rows' gradients are summed wider than x's dtype,
    # cast back checked: _overflow.option_rows; a float32 radius over 60,000 float16 rows got +Inf).
    r = option_rows("project_simplex" if name == "z" else "project_lp", name, radius, x.dtype, reduced)
    return r.unsqueeze(d)  # the kept (size-1) dim


def project_lp(
    x: torch.Tensor,
    p: float | str = 2,
    mode: str = "ball",
    radius: float | torch.Tensor = 1.0,
    dim: int = -1,
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
      ``torch.clamp`` would pass 1). ``r`` is the radius rounded to x's dtype, as the
      clamp uses it: float32 ``x_i = 0.69999999`` is float32's 0.7, so it is pinned at
      ``radius=0.7`` (one side's derivative at the kink; in float64 it lies inside).

    For ``p=1, 2`` on the ball boundary (:math:`\|x\|_p = r`) the inside derivative
    (identity) is used; for ``p=2, x=0`` on the sphere, where no derivative exists, the
    gradient with respect to ``x`` is zero and a ``GradientWarning`` counts those rows.
    ``radius`` gets its gradient when it is a tensor that requires grad
    (:math:`\partial y/\partial r` is :math:`y/r`, :math:`s \circ m/|S|` and
    :math:`\operatorname{sign}(y)` on the pinned coordinates for p = 2, 1, inf; 0 inside the ball),
    summed over the rows in float32 at least (the radius's dtype if wider; a float16 one's sum beyond 65504 warns).

    Numerical range: every projection is computed scale-invariantly. ``p=1`` works
    relative to each row's :math:`\max_i |x_i|` (the threshold never cancels against
    :math:`|x|`, so :math:`|x| \gg r/\varepsilon` and tiny radii keep full relative
    accuracy; rows whose prefix sums of about :math:`n r` would overflow are solved on
    :math:`(2^{-k} x, 2^{-k} r)` and scaled back, exactly; float32 ``x`` gets its threshold refined
    and :math:`y` formed in float64, rounded once); ``p=2`` rescales rows whose norm
    would overflow or lose bits to subnormals, and its backward never squares ``r``. Where the true result cannot be
    represented in the dtype (a sphere radius so small that the projection rounds to
    zero; a gradient :math:`r/\|x\|` beyond the largest float for subnormal ``x``)
    a :class:`~convexddn.errors.ConvexDDNWarning` /
    :class:`~convexddn.errors.GradientWarning` says so. A radius beyond the largest float
    of x's dtype (``radius=1e5``, float16 ``x``), or a tensor one below its smallest normal (float64 ``1e-46``, float32
    ``x``: else its gradient is 0), is solved in float64, the result rounded once (the ball keeps ``x``; eager only).

    Args:
        x: input tensor, floating point.
        p: 1, 2, ``float('inf')`` or ``"inf"``. Default: 2.
        mode: ``"ball"`` (convex) or ``"sphere"`` (nonconvex). Default: ``"ball"``.
        radius: positive float, or positive tensor broadcastable to ``x``'s shape with
            ``dim`` removed (one radius per projected vector). Default: 1.0.
        dim: the dimension projected over. Default: -1.

    Shape:
        - Input: :math:`(*, n, *)` with ``n`` at ``dim``; leading batch may be empty.
        - Output: same shape, dtype and device as ``x``.

    Raises:
        DTypeError: ``x`` (or a tensor ``radius``) is not floating point.
        NonFiniteError: ``x`` contains NaN or Inf (the message gives the count).
        ShapeError: ``dim`` is out of range, ``x`` is empty along ``dim``, or ``radius``
            does not broadcast to the batch shape.
        OptionError: unknown ``p`` or ``mode`` (the message lists the valid ones),
            ``radius`` ≤ 0 or not a number, ``dim`` not an int.
        InputError: a tensor ``radius`` on another device than ``x`` (refused, not moved).
        SolverError: a sphere projection with an entry beyond the largest float of x's
            dtype (radius beyond that range).

    Warns:
        ConvexDDNWarning: a sphere projection rounded to zero (radius below the dtype's
            range). GradientWarning: in backward, ``p=2`` sphere rows at ``x = 0`` (no
            derivative; zero gradient), or a ``p=2`` sphere gradient that overflows
            where the gain ``r/‖x‖`` exceeds the largest float / 2**20 (float16: 256;
            float32 ``r = 3e38``, ``‖x‖ = 1``), naming the rows. The other projections'
            Jacobian entries are at most 1: a gradient that overflows only because the
            incoming one is near the largest float is torch's ordinary overflow (Inf),
            not checked (their backward reads nothing back to the host).

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
    refuse_vmap("project_lp", x, radius, exportable=True)  # (the closed forms, p = 2 and ∞, export)
    p = normalize_p(p)
    if p == 1:  # (its threshold is found on the host)
        refuse_export("project_lp(p=1)")
    check_choice("mode", mode, _MODES)
    d = _check_dim(dim, x)
    radius, wide = wide_dtype(radius, x)  # validates radius too: its device, then its values
    if wide is not None:  # solved there, rounded once to x's dtype
        y = project_lp(x.to(wide), p, mode, radius, dim)
        return narrowed(y, x.dtype, d, f"project_lp(p={_p_repr(p)}, mode={mode!r})", "radius", radius,
                        "sphere" if mode == "sphere" else None)  # (rows rounded to 0, off the sphere: warned)
    r = _prepare_radius(radius, x, d)
    sphere = mode == "sphere"
    # Forward mode runs the Function with the jvp (eagerly under torch.compile); reverse mode alone its base.
    tangents = carries_tangents(x, r)
    graph = tangents or needs_graph(x, r)
    if p == 2:
        fn = L2ProjectionFn if tangents else L2ReverseFn
        return (fn.apply if graph else l2_forward)(x, r, d, sphere)[0]
    if p == 1:
        fn = L1ProjectionFn if tangents else L1ReverseFn
        return (fn.apply if graph else l1_forward)(x, r, d, sphere)[0]
    fn = LinfProjectionFn if tangents else LinfReverseFn
    return (fn.apply if graph else linf_forward)(x, r, d, sphere)


def project_simplex(
    x: torch.Tensor, dim: int = -1, z: float | torch.Tensor = 1.0
) -> torch.Tensor:
    r"""Euclidean projection onto the simplex of radius z (sparsemax for z = 1), over one dim.

    .. math::

        y(x) = \operatorname*{argmin}_{u} \tfrac12 \|u - x\|_2^2
        \quad\text{s.t.}\quad u \ge 0,\ \mathbf{1}^\top u = z

    Solved by one sort: :math:`y = \max(x - \tau, 0)` with :math:`\tau` from the
    sorted prefix sums (Duchi et al. 2008; Martins & Astudillo 2016), computed relative
    to each row's maximum so that no large value cancels; for float32 ``x`` it is refined and
    :math:`y` formed in float64, rounded once (small entries keep their relative accuracy). The gradient is the VJP of
    :math:`\mathrm{D}y = \operatorname{diag}(m) - m m^\top/|S|`, :math:`m` the support
    indicator (a coordinate at the rounded threshold counts as outside), and
    :math:`\partial y/\partial z = m/|S|` when ``z`` is a tensor that requires grad.

    Args:
        x: input tensor, floating point.
        dim: the dimension projected over. Default: -1.
        z: the sum of the result, a positive float or a positive tensor broadcastable
            to ``x``'s shape with ``dim`` removed (one per projected vector). Default: 1.

    Shape:
        - Input: :math:`(*, n, *)` with ``n`` at ``dim``; leading batch may be empty.
        - Output: same shape, dtype and device as ``x``.

    Raises:
        DTypeError: ``x`` (or a tensor ``z``) is not floating point.
        NonFiniteError: ``x`` contains NaN or Inf.
        ShapeError: ``dim`` is out of range, ``x`` is empty along ``dim``, or ``z``
            does not broadcast to the batch shape.
        OptionError: ``dim`` is not an int, ``z`` ≤ 0 or not a number.
        InputError: a tensor ``z`` on another device than ``x`` (refused, not moved).
        SolverError: an entry of the result beyond the largest float of x's dtype (a
            ``z`` beyond that range is solved in float64 and the result rounded once to
            x's dtype).

    Warns:
        ConvexDDNWarning: whole rows rounded to zero (``z`` below the dtype's range:
            float16 ``z = 1e-8``, float32 ``1e-46``), which sum to 0, not ``z``: off the
            simplex (their gradient is zero). Nothing in backward: the entries of Dy
            are at most 1, so a gradient overflows only where the incoming one is near
            the largest float: torch's ordinary overflow (Inf, as in its own
            reductions), not checked (no host read).

    References:
        Martins & Astudillo, "From Softmax to Sparsemax", ICML 2016.
        Duchi et al., ICML 2008. Gould, Hartley & Campbell, TPAMI 2021.

    Examples::

        >>> y = project_simplex(torch.tensor([1.0, 0.5, -1.0]), z=2.0)
        >>> y.tolist()
        [1.25, 0.75, 0.0]
    """
    x = check_tensor("x", x)
    refuse_vmap("project_simplex", x, z)
    d = _check_dim(dim, x)
    z, wide = wide_dtype(z, x, "z")  # validates z too: its device, then its values
    if wide is not None:  # solved there, rounded once to x's dtype
        return narrowed(project_simplex(x.to(wide), dim, z), x.dtype, d, "project_simplex", "z", z, "simplex")
    zz = _prepare_radius(z, x, d, name="z")
    # Forward mode too: via the sort's ties tangents left the simplex ([1, 0, 0, -0.5]: [0, -1.3, 0.2, 0]).
    if needs_graph(x, zz) or may_carry_tangents(x, zz):
        return SimplexProjectionFn.apply(x, zz, d)[0]
    return simplex_forward(x, zz, d)[0]


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

    Shape:
        - Input: :math:`(*, n, *)`; Output: same shape.

    Raises:
        OptionError: at construction for an unknown ``p``/``mode``, ``radius`` ≤ 0 or a
            ``dim`` that is not an int; the call raises as :func:`project_lp`.
        DTypeError: at construction, a ``radius`` tensor that is not floating point.

    Examples::

        >>> proj = LpProjection(p=1, mode="sphere", radius=1.0)
        >>> proj(torch.randn(4, 10)).abs().sum(-1).shape
        torch.Size([4])
    """

    @building()
    def __init__(
        self,
        p: float | str = 2,
        mode: str = "ball",
        radius: float | torch.Tensor = 1.0,
        dim: int = -1,
    ) -> None:
        super().__init__()
        self.p = normalize_p(p)
        check_choice("mode", mode, _MODES)
        check_int("dim", dim)
        _check_radius_option(radius)
        self.mode, self.dim = mode, dim
        store_option(self, "radius", radius, as_float=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` with the stored options: ``(*, n, *) -> (*, n, *)``."""
        return project_lp(x, self.p, self.mode, self.radius, self.dim)

    def extra_repr(self) -> str:
        return f"p={_p_repr(self.p)}, mode={self.mode!r}, radius={format_option(self.radius)}, dim={self.dim}"


class SimplexProjection(nn.Module):
    r"""Module form of :func:`project_simplex` (sparsemax for ``z = 1``).

    .. math::

        y(x) = \operatorname*{argmin}_{u \ge 0,\ \mathbf{1}^\top u = z} \tfrac12 \|u - x\|_2^2

    Args:
        dim: the dimension projected over. Default: -1.
        z: the sum of the result: a positive float or tensor (a tensor is stored as a
            buffer, an ``nn.Parameter`` as a parameter and then learned). Default: 1.0.

    Shape:
        - Input: :math:`(*, n, *)`; Output: same shape.

    Raises:
        OptionError: at construction for a ``dim`` that is not an int or ``z`` ≤ 0;
            the call raises as :func:`project_simplex`.
        DTypeError: at construction, a ``z`` tensor that is not floating point.
    """

    @building()
    def __init__(self, dim: int = -1, z: float | torch.Tensor = 1.0) -> None:
        super().__init__()
        check_int("dim", dim)
        _check_radius_option(z, name="z")
        self.dim = dim
        store_option(self, "z", z, as_float=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` onto the simplex: ``(*, n, *) -> (*, n, *)``."""
        return project_simplex(x, self.dim, self.z)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, z={format_option(self.z)}"
