"""Robust pooling as a declarative node: the autograd Function, :func:`robust_pool`, :class:`RobustPool`.

.. math::

    y(x) \\in \\operatorname*{argmin}_{u \\in \\mathbb{R}} \\sum_{i=1}^{n} \\phi(u - x_i; \\alpha)

The forward calls the penalty's solver hook (:meth:`.penalties.Penalty.solve`); the
backward is the closed form of Gould et al. Table 1 as a vector–Jacobian product
(§6.1): with :math:`w_i = \\phi''(y - x_i)`,

.. math::

    \\frac{\\partial y}{\\partial x_i} = \\frac{w_i}{\\sum_j w_j}, \\qquad
    \\frac{\\partial y}{\\partial \\alpha} =
        -\\frac{\\sum_j \\partial_\\alpha \\phi'(y - x_j)}{\\sum_j w_j},

never forming a Jacobian.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 2021 (Table 1; §6.1: vjp).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..._checks import (
    building,
    check_bool,
    check_device,
    check_dim_option,
    check_finite,
    check_scale,
    check_stopping,
    check_tensor,
    normalize_dims,
    positive_range,
)
from ..._autograd import BatchShape, batched_values, functorch_transforms, outside_compile, refuse_trace
from ...errors import NonFiniteError, ShapeError
from .._repr import format_option
from .._module_options import store_option
from .._overflow import option_rows
from .._vmap_stack import stacked_under_vmap
from .function import RobustPoolFunction
from .kernels import compile_available
from .penalties import Penalty, format_penalty

__all__ = ["RobustPool", "robust_pool"]

# Default stopping tolerance on the Newton step, relative to (alpha + |y|). float32 cannot
# resolve much below 1e-6 of the scale once the sums over a row carry rounding noise.
_DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
_DEFAULT_MAX_ITER = 100


def _resolve_tol(tol: float | None, dtype: torch.dtype) -> float:
    return _DEFAULT_TOL.get(dtype, 1e-6) if tol is None else tol


def _check_alpha(alpha: Any) -> tuple[Any, bool]:
    """``check_scale("alpha", alpha)``: alpha as checked (a tensor as ``check_tensor``
    returns it), and whether it leaves float32's normal range somewhere, where float32
    and 16-bit x are solved in float64 (a float alpha of 1e5 made in float16 x's dtype
    was Inf, 1e-8 was 0; 1e39 is Inf in float32). Within the check's one host read (none
    when compiling: an async assert, float32 kept)."""
    info, a = torch.finfo(torch.float32), alpha
    if not isinstance(a, torch.Tensor) or a.numel() == 0 or torch.compiler.is_compiling():
        a = check_scale("alpha", a)
        return a, not isinstance(a, torch.Tensor) and not info.tiny <= float(a) <= info.max
    a = check_tensor("alpha", a)
    lo, hi = positive_range("alpha", a)
    return a, not (info.tiny <= lo and hi <= info.max)


def _check_options(penalty: Any, keepdim: Any, tol: Any, max_iter: Any, compile: Any) -> Penalty:
    pen = Penalty.resolve(penalty)
    check_bool("keepdim", keepdim)
    check_stopping(tol, max_iter)
    check_bool("compile", compile, allow_none=True)
    return pen


@outside_compile
def _pool_rows(x: torch.Tensor, xw: torch.Tensor, aw: torch.Tensor, pen: Penalty, tol: float, max_iter: int,
               use_compile: bool, batch: tuple[int, ...]) -> torch.Tensor:
    """The pooled rows (R,) of ``xw`` (R, N) in the working dtype: the solve
    (:class:`RobustPoolFunction`); ``x``, the caller's input, names the non-finite entries.

    Never traced by torch.compile (a clean graph break around it, as ``ConvexLayer.forward``
    has): traced, the iterative solvers broke the graph at each host read of their loop,
    and each resume function guarded on values that change from call to call (the size
    of the working set after each compaction, ``idx is None``, ``h_prev is None``, the row
    count): a model's training steps recompiled the solver's frames at every step, up to
    dynamo's recompile limit (6 steps of one pooling layer at batch sizes 16 and 9: 53
    graphs, 13 s on a small CPU; now 8 graphs, 3.8 s, all in the first two steps, one per
    batch size). The solver's steps are small ops decided on the host;
    compiling them gains nothing. Run eagerly, the graph around the node is compiled once
    per input shape. (``compile=True``'s fused kernels are compiled functions of their
    own, called from here.)
    """
    try:
        return RobustPoolFunction.apply(xw, aw, pen, tol, max_iter, use_compile, BatchShape(batch))[0]
    except NonFiniteError:
        # The solver checks finiteness only where a row fails (no host sync otherwise), on
        # its rows: x of shape (4,) was reported as (1, 4), (2, 3, 4) as (6, 4). The caller's.
        check_finite("x", x)
        raise


def robust_pool(
    x: torch.Tensor,
    penalty: str | Penalty = "quadratic",
    alpha: float | torch.Tensor = 1.0,
    dim: int | tuple[int, ...] = -1,
    keepdim: bool = False,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """Robust pooling: the minimiser of a robust penalty of the residuals.

    .. math::

        y = \\operatorname*{argmin}_{u} \\sum_{i} \\phi(u - x_i; \\alpha)

    over the entries :math:`x_i` of ``x`` along ``dim`` (Gould et al. Table 1; the
    penalties are listed in :data:`PENALTIES`, their formulas in
    :mod:`convexddn.nodes.pooling.penalties`).

    Forward: ``quadratic`` is the mean (computed without overflow near the end of the
    float range). ``pseudo_huber`` and ``huber`` (convex) run a Newton iteration on
    :math:`g(u) = \\sum_i \\phi'(u - x_i) = 0` safeguarded by a bracket of the root
    (bisection where the Newton point leaves it or the steps stop halving); convexity
    makes the start immaterial to the result. ``welsch`` (nonconvex) runs a Newton
    iteration whose accepted objective never increases from two starts, the mean and a
    median, and keeps the one with the lower objective: a local minimum, not certified
    global (for rows longer than 512 both starts are first refined on 128 sampled
    entries, and where they reach the same point only one continues on the row). The
    median start of rows longer than 129 (beyond 512, both starts) comes from entries at
    fixed positions (129 up to 512; beyond, that sample of 128), so the local minimum ``welsch`` finds may depend
    on the order of the entries, which the problem does not: two clusters of 53 % and
    47 % of the entries (σ 0.4, 2.5 apart, alpha 0.6) pooled over 32 × 32 gave another
    local minimum on 289 of 1024 rows when the images were transposed, the objective
    (530 to 650) higher by up to 94 one way and 108 the other. torch's exact median of
    the whole rows alone takes about twice the forward's time at (4, 256, 1024). A
    user's :class:`Penalty` subclass runs on the same two solvers. ``trunc_quad``
    returns the exact global minimiser (sort, prefix sums and the 2N candidate inlier
    runs; O(N log N)).

    Stopping: a row stops when the distance to its minimiser is estimated within
    ``tol * (alpha + |y|)`` (where the row lies on one side of 0, ``|y|`` counts only up to
    the row's spread, and beyond it by ``min(tol, 64 eps) |y|``: a common offset moves y by
    exactly itself, and costs only its rounding) -- by the Newton step ``|g| / h`` (``h``
    the curvature) while ``|g|`` is above its rounding noise (convex penalties), by the
    bracket width, or by the error predicted after a Newton step (Kantorovich's bound,
    about ``|g''| step^2 / 2h``, with ``g''`` estimated from the last two points, trusted
    only after a step of at most ``alpha / 4``, and none where ``|g''| step / h > 1/2``:
    the curvature may vanish before the root; the only step test of ``welsch``, whose
    curvature can change sign within a short step) -- or when ``|g|`` has sunk into its
    rounding noise.
    Where that noise divided by the curvature exceeds the tolerance (a nearly flat
    objective, e.g. two clusters hundreds of alphas apart), or the span over which the
    curvature is known to hold (alpha / 2 near a data point; e.g. alpha below the float
    spacing of the data, |x| / alpha beyond ~1e6 in float32), the answer cannot be
    resolved in the working precision: float32 rows are then solved again in float64,
    and rows that float64 cannot resolve either are reported by a
    :class:`~convexddn.errors.SolverWarning` (their answer is within that noise level).
    The solvers are scale-invariant: rows near the end of the float range are scaled by
    a power of two, and alpha far below or above the data's spread is handled exactly
    where the penalty saturates.

    Backward: the closed form of Table 1 as a vector–Jacobian product,
    ``grad_x_i = grad_y * w_i / sum_j w_j`` with ``w_i = phi''(y - x_i)``, and
    ``grad_alpha = -grad_y * sum_j d2phi/dz dalpha / sum_j w_j``, without forming a
    Jacobian: one pass over ``x`` writing the gradient. Where ``sum_j w_j`` is zero,
    singular or negative (Huber or truncated quadratic with no inliers, a Welsch point
    that is not a strict minimum), or a cancellation of weights of both signs that y's own
    uncertainty moves by half (a degenerate minimum), that row's gradient is zero and a
    :class:`~convexddn.errors.GradientWarning` is issued once per call; it names the rows
    as indices into the output's batch shape, as all of its warnings about rows do. A NaN or Inf in
    ``grad_y`` (a fault upstream) propagates to that row's gradients, as torch does. At the
    kinks of Huber and truncated quadratic (:math:`|y - x_i| = \\alpha`) the inlier side is taken.

    Args:
        x: input tensor, float32 or float64 (float16/bfloat16 are solved in float32; all in
            float64 where ``alpha`` is no normal float32 number: below 1.2e-38, above 3.4e38).
        penalty: one of :data:`PENALTIES` (or an alias in :data:`PENALTY_ALIASES`, e.g.
            the DDN reference's ``"pseudo-huber"``) or a :class:`Penalty`.
            Default ``"quadratic"``.
        alpha: penalty scale > 0: a number, or a tensor broadcastable to the output shape
            (as without ``keepdim``; with ``keepdim``, shaped like the kept output also
            works); it may require grad. Default ``1.0``.
        dim: the dimension, or tuple of dimensions, pooled over. Default ``-1``.
        keepdim: keep the pooled dimensions with size 1. Default ``False``.
        tol: stopping tolerance of the iterative solvers, in (0, 1), relative to
            ``alpha + |y|`` (see Stopping). Default ``None``: 1e-12 for float64, 1e-6
            otherwise.
        max_iter: iteration limit of the iterative solvers (per start for Welsch);
            hitting it issues a :class:`~convexddn.errors.SolverWarning`, also where
            only the start that was not returned hit it (it might have gone lower).
            Default 100.
        compile: ``True``: form the row sums with the penalty's derived formulas fused by
            :func:`torch.compile` (one-off compile of tens of seconds on a small CPU; a
            compile failure falls back to eager with a warning). ``False`` or ``None``
            (default): eager, hand-fused in-place passes over cache-sized row blocks.

    Shape:
        - Input: ``(*)``, with at least one entry along every pooled dimension.
        - Output: ``x.shape`` without the pooled dimensions, or with them set to 1 when
          ``keepdim=True``; same dtype and device as ``x``.

    Raises:
        DTypeError: ``x`` is not a floating-point tensor, or ``alpha`` is an integer tensor.
        NonFiniteError: ``x`` holds NaN or Inf (checked through per-row statistics the
            solver computes anyway: one host sync per call; the message gives the counts).
        ShapeError: a pooled dimension is empty or out of range, or ``alpha`` does not
            broadcast to the output shape.
        OptionError: unknown ``penalty`` (the message lists the valid ones),
            ``alpha <= 0``, invalid ``dim``, ``keepdim``, ``tol``, ``max_iter`` or
            ``compile``.
        InputError: a tensor ``alpha`` on another device than ``x`` (refused, not moved).
        ProblemError: a call under another transform inside ``torch.func.vmap``
            (``vmap(grad(f))``): differentiate the batched call instead. (A plain
            ``torch.func.vmap`` pools the stacked rows: the same as the batched call;
            ``torch.func.jacfwd`` and ``jacrev`` and autograd's batched directions,
            ``is_grads_batched=True`` and ``jacobian(..., vectorize=True)``, take the
            rows' derivative vectors times the directions.)

    .. note::
        The iterative solvers decide when to stop on the host: a few device-to-host
        syncs per iteration (typically 2 to 4 iterations per call), and a few in the
        backward. The quadratic and truncated-quadratic solvers do not iterate.
        The cone-program form of the convex penalties is the registry's ``robust_pool``
        problem: ``convexddn.layer("robust_pool", n=N, penalty=..., backend="cvxpy")``.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI
        2021, Table 1 and §6.1.
    """
    x = check_tensor("x", x)
    refuse_trace("robust_pool")
    pen = _check_options(penalty, keepdim, tol, max_iter, compile)
    vmapped = "Vmap" in functorch_transforms()  # (vmap itself, and jacfwd, jacrev)
    if not (vmapped and batched_values(alpha)):  # (batched: checked stacked)
        alpha, wide = _check_alpha(alpha)
    else:
        wide = False
    dims = normalize_dims("dim", dim, x.ndim) if x.ndim > 0 else None
    if dims is None:
        raise ShapeError("x must have at least one dimension to pool over, got a 0-d tensor")
    for d in dims:
        if x.shape[d] == 0:
            raise ShapeError(
                f"x must have at least one entry along every pooled dim, got shape "
                f"{tuple(x.shape)} pooled over dim={dim!r}"
            )
    keep = [d for d in range(x.ndim) if d not in dims]
    batch = [x.shape[d] for d in keep]
    given = alpha
    if keepdim and isinstance(alpha, torch.Tensor) and alpha.dim() == x.ndim and len(dims):
        # An alpha shaped like the kept output: its pooled dims dropped here, before a
        # vmap stacks x (which shifts those dims: a (3, 1, 1) alpha for x (3, 3, 6)
        # pooled over dim 1 was refused under vmap and taken by the plain call).
        alpha = alpha.squeeze(dims)
    if vmapped:
        # The solver decides on the host from the values, which vmap cannot batch: a
        # vmapped call is the call on the stacked rows (solved independently).
        y = stacked_under_vmap(
            "robust_pool", x, alpha, batch,
            lambda xs, al: robust_pool(xs, pen, al, tuple(d + 1 for d in dims), keepdim, tol=tol,
                                       max_iter=max_iter, compile=compile),
            lambda: robust_pool(x, pen, alpha, dim, keepdim, tol=tol, max_iter=max_iter, compile=compile))
        if y is not None:
            return y
        # (None: a vmap over the tangents, torch.func.jacfwd: the Function's jvp, vmapped.)
    n = math.prod(x.shape[d] for d in dims)
    x2 = x.permute(*keep, *dims).reshape(-1, n)

    work = torch.float64 if wide or x.dtype == torch.float64 else torch.float32
    if isinstance(alpha, torch.Tensor):
        check_device("alpha", alpha, x)
        try:  # alpha's gradient is summed over the rows in `work`, or alpha's dtype if wider (_overflow)
            a = option_rows("robust_pool", "alpha", alpha, work, batch)
        except RuntimeError:
            # (with keepdim, an alpha of lower rank is read against the output without the
            # kept dims, as documented: the one of x's rank is the kept output's)
            kept = tuple(1 if d in dims else x.shape[d] for d in range(x.ndim))
            also = f" (or, with keepdim=True, be shaped like the kept output {kept}, of x's rank)" if keepdim else ""
            raise ShapeError(
                f"alpha must broadcast to the output shape {tuple(batch)}{also}, got shape "
                f"{tuple(given.shape)}"
            ) from None
        a = a.reshape(-1) if batch else a.reshape(())
    if not isinstance(alpha, torch.Tensor):
        a = torch.tensor(float(alpha), dtype=work, device=x.device)
    xw = x2.to(work)
    aw = a.to(work)
    use_compile = bool(compile) and compile_available()
    y2 = _pool_rows(x, xw, aw, pen, _resolve_tol(tol, work), _DEFAULT_MAX_ITER if max_iter is None else max_iter,
                    use_compile, tuple(batch))
    y = y2.to(x.dtype).reshape(batch)
    if keepdim:
        for d in dims:
            y = y.unsqueeze(d)
    return y


class RobustPool(nn.Module):
    """Robust pooling as a module: :func:`robust_pool` with stored options.

    .. math::

        y = \\operatorname*{argmin}_{u} \\sum_{i} \\phi(u - x_i; \\alpha)

    Args:
        penalty: one of :data:`PENALTIES` (or :data:`PENALTY_ALIASES`) or a
            :class:`Penalty`. Default ``"quadratic"``.
        alpha: penalty scale > 0, a number or a tensor broadcastable to the output shape
            (an :class:`~torch.nn.Parameter` makes it learnable). Default ``1.0``.
        dim: dimension or tuple of dimensions pooled over. Default ``-1``.
        keepdim: keep the pooled dimensions with size 1. Default ``False``.
        tol, max_iter, compile: solver options, see :func:`robust_pool`.

    Shape:
        - Input: ``(*)``; e.g. ``(B, C, N)`` with ``dim=-1`` or ``(B, C, H, W)`` with
          ``dim=(2, 3)``.
        - Output: the input shape without the pooled dimensions (``(B, C)`` in both
          examples), or with them kept as 1 when ``keepdim=True``.

    Raises:
        OptionError: invalid options, at construction (see :func:`robust_pool`).
        DTypeError: at construction, an ``alpha`` tensor that is not floating point.
        InputError: at call time, a tensor ``alpha`` not on ``x``'s device.
        DTypeError, ShapeError, NonFiniteError: bad input, at call time, as :func:`robust_pool`.

    Examples::

        >>> pool = RobustPool("huber", alpha=1.0, dim=-1)
        >>> pool(torch.randn(8, 64, 1024)).shape
        torch.Size([8, 64])

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
    """

    @building()
    def __init__(
        self,
        penalty: str | Penalty = "quadratic",
        alpha: float | torch.Tensor = 1.0,
        dim: int | tuple[int, ...] = -1,
        keepdim: bool = False,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        compile: bool | None = None,
    ) -> None:
        super().__init__()
        pen = _check_options(penalty, keepdim, tol, max_iter, compile)
        check_scale("alpha", alpha)
        check_dim_option("dim", dim)
        self.penalty = pen
        store_option(self, "alpha", alpha)
        self.dim = dim
        self.keepdim = keepdim
        self.tol = tol
        self.max_iter = max_iter
        self.compile = compile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``x`` with the stored options: ``(*) -> (*)`` without the pooled dims."""
        return robust_pool(
            x,
            self.penalty,
            self.alpha,
            self.dim,
            self.keepdim,
            tol=self.tol,
            max_iter=self.max_iter,
            compile=self.compile,
        )

    def extra_repr(self) -> str:
        parts = [f"penalty={format_penalty(self.penalty)}", f"alpha={format_option(self.alpha)}", f"dim={self.dim}",
                 f"keepdim={self.keepdim}"]
        if self.tol is not None:
            parts.append(f"tol={self.tol:g}")
        if self.max_iter is not None:
            parts.append(f"max_iter={self.max_iter}")
        if self.compile is not None:
            parts.append(f"compile={self.compile}")
        return ", ".join(parts)
