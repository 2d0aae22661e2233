"""Robust vector pooling: a robust mean of a set of feature vectors.

.. math::

    y(x) \\in \\operatorname*{argmin}_{u \\in \\mathbb{R}^C}
        \\sum_{i=1}^{N} \\phi(\\|u - x_i\\|_2; \\alpha)

for the five penalties of :class:`~convexddn.RobustPool` (Gould et al. Table 1),
applied to the Euclidean distance between vectors instead of a scalar residual.

Forward: iteratively reweighted least squares (a Weiszfeld-type majorise–minimise step
:math:`u \\leftarrow \\sum_i \\kappa_i x_i / \\sum_i \\kappa_i`, :math:`\\kappa_i = \\phi'(z_i)/z_i`, which never
increases the objective because every penalty here is concave in :math:`z^2`) safeguarded Newton steps (the
Newton point is taken when it lowers the objective more than the IRLS point). Nonconvex penalties (Welsch,
truncated quadratic) first run IRLS from several starts at once and keep the one with the lowest objective.

Backward (Gould et al. Prop. 4.4 and §6.1): with :math:`z_i = \\|y - x_i\\|`,
:math:`n_i = (y - x_i)/z_i`, :math:`c_i = \\phi''(z_i) - \\kappa_i`, the Hessian is
:math:`H = \\sum_i H_i`, :math:`H_i = \\kappa_i I + c_i n_i n_i^\\top`, and
:math:`\\partial g/\\partial x_i = -H_i`, so one solve :math:`v = H^{-1}\\bar y` gives

.. math::

    \\bar x_i = H_i v = \\kappa_i v + c_i (n_i^\\top v)\\, n_i, \\qquad
    \\bar\\alpha = -\\sum_i \\partial_\\alpha \\phi'(z_i)\\, (n_i^\\top v),

without forming the mixed derivative B. :math:`H` is solved as a C×C system, or by the
Woodbury identity as an N×N one when the set is smaller than the dimension.

Public names: :func:`robust_vector_pool`, :class:`RobustVectorPool`.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
    E. Weiszfeld, "Sur le point pour lequel la somme des distances de n points donnés
    est minimum", Tôhoku Math. J. 43, 1937.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._autograd import (BatchShape, batched_values, bind_fast, functorch_transforms, may_carry_tangents,
                         refuse_trace, without_autocast)
from .._first_order import first_order, first_order_jvp, graph_anchor
from .._checks import (building, check_device, check_dim_option, check_int, check_scale, check_stopping, check_tensor,
                       normalize_dims)
from ..errors import OptionError, ProblemError, ShapeError
from ._repr import format_option
from ._module_options import store_option
from ._overflow import option_cast
from ._vector_pool_polish import solve
from ._vector_pool_refine import per_set
from ._vector_pool_hessian import gradient_rows as _gradient, hessian_solve_warned as _h_solve, hessian_terms as _terms
from ._vector_pool_units import in_units as _in_units, rescaled
from ._vmap_stack import stacked_under_vmap
from .pooling.penalties import Penalty, Quadratic, format_penalty
from .pooling.rounding import coarse_flag

__all__ = ["robust_vector_pool", "RobustVectorPool"]

_DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
_DEFAULT_MAX_ITER = 100
_DEFAULT_STARTS = 32


# --------------------------------------------------------------------------- node


@bind_fast
class _VectorPoolFunction(torch.autograd.Function):
    """y = argmin_u Σ_i φ(‖u − x_i‖; α), x (R, N, C) -> (R, C); alpha (R,) or 0-d; batch: R's caller shape."""

    generate_vmap_rule = True  # (torch.func.jacfwd: a vmap over the jvp, the primal unbatched, run as written)

    @staticmethod
    @without_autocast
    def forward(x, alpha, pen, tol, max_iter, starts, batch):  # type: ignore[override]
        if x.shape[0] == 0:
            return x.new_empty((0, x.shape[-1]))
        a = alpha.unsqueeze(-1) if alpha.dim() > 0 else alpha
        return solve(pen, x, a, tol, max_iter, starts, batch.dims)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, alpha, pen = inputs[:3]
        ctx.save_for_backward(x, alpha, output)
        ctx.save_for_forward(x, alpha, output)
        ctx.anchors = graph_anchor(x, alpha)  # (their graph, not them: see first_order)
        ctx.pen, ctx.coarse, ctx.batch = pen, coarse_flag(output, alpha, ctx.needs_input_grad), inputs[6].dims

    @staticmethod
    @first_order("robust_vector_pool")
    @without_autocast
    def backward(ctx, gy):  # type: ignore[override]
        # (Cotangents batched by jacrev or autograd's vmap: the Hessian solve decides its
        # rows on the primal alone, as for jacfwd's tangents: _vector_pool_solvers.)
        x, alpha, y = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[:2]
        R, N, C = x.shape
        if isinstance(ctx.pen, Quadratic) or R == 0:
            gx = (gy / N).unsqueeze(-2).expand(R, N, C) if need_x else None
            return gx, torch.zeros_like(alpha) if need_a else None, None, None, None, None, None
        def rows(xs, al, ys, idx):  # (per_set: sets whose y is coarse again, refined)
            g = gy if idx is None else gy.index_select(0, idx)
            return _gradient(ctx.pen, xs, al, ys, g, need_x, need_a, ctx.batch, idx)
        gx, ga = per_set(ctx.pen, x, alpha, y, rows, ctx.coarse, ctx.batch)
        return gx, ga if ga is None or alpha.dim() > 0 else ga.sum(), None, None, None, None, None

    @staticmethod
    @first_order_jvp("robust_vector_pool")
    @without_autocast
    def jvp(ctx, x_t, alpha_t, *_):  # type: ignore[override]
        r"""Forward mode, the backward's Jacobian applied to the tangents:
        :math:`\dot y = H^{-1}\big(\sum_i [\kappa_i \dot x_i + c_i (n_i^\top \dot x_i)
        n_i] - \dot\alpha \sum_i \partial^2_{z\alpha}\phi(z_i)\, n_i\big)`, zero (with
        the backward's warning) where H is singular."""
        x, alpha, y = ctx.saved_tensors
        if x.shape[0] == 0 or x_t is None and alpha_t is None:
            return y.new_zeros(y.shape)
        if isinstance(ctx.pen, Quadratic):  # the mean: α plays no part
            return y.new_zeros(y.shape) if x_t is None else x_t.to(y.dtype).mean(-2)
        pen = ctx.pen
        def rows(xs, al, ys, idx):  # (per_set: sets whose y is coarse again, refined)
            a, z, n, k1, c = _terms(pen, xs, al, ys)
            rhs = ys.new_zeros(ys.shape)
            if x_t is not None:
                xt = (x_t if idx is None else x_t.index_select(0, idx)).to(ys.dtype)
                nx = (n * xt).sum(-1)  # n_iᵀ ẋ_i, (R, N)
                rhs = rhs + (k1.unsqueeze(-1) * xt + (c * nx).unsqueeze(-1) * n).sum(-2)
            if alpha_t is not None:
                at = alpha_t.to(ys.dtype)
                at = (at if idx is None else at.index_select(0, idx)).unsqueeze(-1) if at.dim() > 0 else at
                rhs = rhs - ((pen.d2phi_dalpha(z, a) * at).unsqueeze(-1) * n).sum(-2)
            return (_h_solve(pen, (xs, a, ys), k1, n, c, rhs, "tangent", ctx.batch, idx),)
        return per_set(pen, x, alpha, y, rows, ctx.coarse, ctx.batch)[0]


def _check_options(penalty: Any, alpha: Any, dim: Any, vector_dim: Any, tol: Any, max_iter: Any,
                   starts: Any) -> tuple[Penalty, Any]:
    """The penalty, and alpha as checked (a tensor as ``check_tensor`` returns it)."""
    pen = Penalty.resolve(penalty)
    if batched_values(alpha):  # (under torch.func.vmap: its values are checked once stacked)
        alpha = check_tensor("alpha", alpha)
    else:
        alpha = check_scale("alpha", alpha)
    check_dim_option("dim", dim)
    check_int("vector_dim", vector_dim)
    # One sign: the same dim at every rank, refused here (as the Module is built); 1 and -2 clash at rank 3 only.
    if vector_dim in (tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)):
        raise OptionError(f"vector_dim={vector_dim} must not be one of the pooled dims, dim={dim!r}")
    check_stopping(tol, max_iter)
    if starts is not None:
        check_int("starts", starts, minimum=0)
    return pen, alpha


def robust_vector_pool(
    x: torch.Tensor,
    penalty: str | Penalty = "quadratic",
    alpha: float | torch.Tensor = 1.0,
    dim: int | tuple[int, ...] = -1,
    vector_dim: int = -2,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
    starts: int | None = None,
) -> torch.Tensor:
    r"""Robust vector pooling: the robust centre of a set of vectors.

    .. math::

        y = \operatorname*{argmin}_{u \in \mathbb{R}^C} \sum_i \phi(\|u - x_i\|_2; \alpha)

    over the vectors :math:`x_i` (along ``vector_dim``) indexed by the pooled
    dimension(s) ``dim``; :math:`\phi` is one of ``quadratic`` (the mean, exactly),
    ``pseudo_huber``, ``huber`` (convex: the global minimiser), ``welsch`` and
    ``trunc_quad`` (nonconvex).

    Forward: IRLS (majorise–minimise, monotone) safeguarded with Newton steps, to
    ``tol``. Convex penalties start from the mean or the coordinate-wise median,
    whichever has the lower objective. Nonconvex ones first run IRLS from
    the mean, the coordinate-wise median (the reference's two starts) and, around each of
    ``starts`` evenly spaced data points, the means of its neighbours within rα
    (r ∈ {½, 1, 3/2, 2}) at once, then polish the lowest-objective end point.
    Guarantee for ``welsch`` and ``trunc_quad``: a stationary point that is no maximum
    or saddle (for ``trunc_quad`` the mean of its own inliers, a local minimiser) whose
    objective is no higher than that of the local searches from these starts; the
    global minimiser of the vector problem is combinatorial in C dimensions and is not
    certified. A set stops on a Newton step within ``tol`` and within the span (α/2 near
    a data point) where the curvature holds, or where the gradient is at its rounding
    noise (:mod:`._vector_pool_polish`); where that noise over the curvature exceeds
    either, the set is solved again in float64 (from float32) and a
    :class:`~convexddn.errors.SolverWarning` names those still unresolved.

    Backward: :math:`\bar x_i = H_i v`, :math:`v = H^{-1}\bar y`,
    :math:`H_i = \kappa_i I + (\phi''_i - \kappa_i) n_i n_i^\top` (see the module
    docstring); ``alpha`` gets :math:`-\sum_i \partial_\alpha\phi'(z_i)\, n_i^\top v`. Where
    :math:`H` is singular, or its smallest eigenvalue vanishes within y's own uncertainty (a degenerate
    minimum: :mod:`._vector_pool_hessian`), the row's gradient is zero and a :class:`~convexddn.errors.GradientWarning`
    names it (a test of :math:`H` alone: a NaN or Inf in :math:`\bar y` or a tangent, a fault upstream, propagates
    as torch does). At the kinks of Huber and the truncated quadratic (:math:`z_i = \alpha`) the inlier side is taken.

    Scale-equivariant: :math:`y(s x, s\alpha) = s\, y(x, \alpha)`; the solve runs in units
    of a power of two near α, so data and α far from 1 (1e-20 or 1e25 in float32) are
    handled as at unit scale. The nonconvex start phase measures distances by Gram
    products, which err by about eps·M² (M: the set's largest distance from its mean);
    sets where that exceeds 1e-3 α² (float32: M beyond ~90 α) run that phase in float64,
    and sets beyond float64's reach (M beyond ~2e6 α) with direct differences. A float32
    set spreading more than 2^60 α (where squared distances overflow) or with an α that
    is no normal float32 number (1e-40, 1e39) is solved in float64; a set spreading
    beyond 2^500 α raises ``SolverError``. Translation-equivariant too,
    :math:`y(x + t) = y(x) + t`: a set whose entries reach further from 0 than 16 times
    its spread plus α is solved relative to the midpoint of each coordinate's range, so
    its offset neither overflows (100 float32 vectors at 1e37 with α = 1; one float64
    vector repeated at 1e300 with α = 1e-5) nor loosens ``tol``.

    Args:
        x: input tensor, float32 or float64 (float16/bfloat16 are solved in float32);
            ``torch.autocast`` does not lower the solve or its backward.
        penalty: a name in ``convexddn.nodes.pooling.PENALTIES`` (or one of the DDN
            reference's spellings, ``"pseudo-huber"``, ``"trunc-quad"``: see
            ``convexddn.nodes.pooling.penalties.PENALTY_ALIASES``) or a ``Penalty`` whose
            :math:`\phi'(z)/z` is non-increasing. Default: ``"quadratic"``.
        alpha: scale > 0: a number, or a tensor broadcastable to the output shape
            without ``vector_dim``; may require grad. Default: 1.
        dim: the set dimension(s) pooled over. Default: -1.
        vector_dim: the dimension holding each vector's C components, not one of ``dim``. Default: -2.
        tol: stopping tolerance on the step, in (0, 1), relative to ``alpha + max|y|`` (``y`` from
            the set's midpoint where the set lies far from 0, see above). Default:
            1e-12 (float64), 1e-6 (float32).
        max_iter: iteration limit per phase; reaching it issues a
            :class:`~convexddn.errors.SolverWarning`. Default: 100.
        starts: data-point starts for nonconvex penalties (0: mean and median only, as
            the reference; ``>= N``: every point); time grows with it, memory does not. Default: 32.

    Shape:
        - Input: ``(*)``, e.g. ``(B, C, N)`` with the defaults or ``(B, C, H, W)``
          with ``dim=(-2, -1), vector_dim=1``.
        - Output: the input shape without ``dim`` (``(B, C)`` in both examples).

    Raises:
        DTypeError: ``x`` is not floating point or ``alpha`` is an integer tensor.
        NonFiniteError: ``x`` holds NaN or Inf.
        ShapeError: a dimension is out of range, ``vector_dim`` is in ``dim`` at ``x``'s rank only (1 and -2
            of a 3-d ``x``), a pooled dimension is empty, or ``alpha`` does not broadcast.
        OptionError: unknown penalty, ``alpha <= 0``, invalid ``tol``, ``max_iter``, ``starts`` or ``dim``,
            or ``vector_dim`` in ``dim`` at every rank (indices of one sign: ``dim=(1, 2), vector_dim=2``).
        InputError: a tensor ``alpha`` on another device than ``x`` (refused, not moved).
        SolverError: a pooled set spreads more than 2^500 α (squared distances
            overflow even float64).
        ProblemError: a ``torch.func.vmap`` around another transform (``vmap(grad(f))``).
            A plain ``torch.func.vmap`` solves the stacked sets (the same as the batched
            call); ``torch.func.jacfwd`` and ``jacrev``, and autograd's batched directions
            (``is_grads_batched=True``, ``jacobian(..., vectorize=True)`` in either
            strategy) work (zero with the warning where H is singular).

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.

    Examples::

        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(8, 3, 50); x[..., :5] += 20.0   # 10% gross outliers
        >>> y = robust_vector_pool(x, "welsch", alpha=1.0)   # (8, 3), near the origin
        >>> bool(y.norm(dim=-1).max() < 1.0)
        True
    """
    x = check_tensor("x", x)
    refuse_trace("robust_vector_pool")
    pen, alpha = _check_options(penalty, alpha, dim, vector_dim, tol, max_iter, starts)
    if x.ndim < 2:
        raise ShapeError(f"x must have a vector dim and a set dim, got shape {tuple(x.shape)}")
    dims = normalize_dims("dim", dim, x.ndim)
    vd = normalize_dims("vector_dim", vector_dim, x.ndim)[0]
    if vd in dims:
        raise ShapeError(f"vector_dim={vector_dim} must not be one of the pooled dims {dim!r}")
    if any(x.shape[d] == 0 for d in dims):
        raise ShapeError(f"x must have at least one entry along every pooled dim, got shape {tuple(x.shape)}")
    if x.shape[vd] == 0:
        raise ShapeError(f"x must have vectors of at least one component along vector_dim={vector_dim}, "
                         f"got shape {tuple(x.shape)}")
    others = [d for d in range(x.ndim) if d not in dims and d != vd]
    batch = [x.shape[d] for d in others]
    C, N = x.shape[vd], math.prod(x.shape[d] for d in dims)
    if isinstance(alpha, torch.Tensor):
        check_device("alpha", alpha, x)
        try:  # in float64 (every work dtype's), then broadcast: its gradient is summed there (_overflow)
            a = option_cast("robust_vector_pool", "alpha", alpha, torch.float64)
            a = torch.broadcast_to(a, batch).reshape(math.prod(batch)) if batch else a.reshape(())
        except RuntimeError:
            raise ShapeError(f"alpha must broadcast to the batch shape {tuple(batch)} (the output "
                             f"without vector_dim), got shape {tuple(alpha.shape)}") from None
    else:
        a = torch.tensor(float(alpha), dtype=torch.float64, device=x.device)
    if "Vmap" in functorch_transforms():  # torch.func.vmap (and jacfwd: tangents only)
        y = stacked_under_vmap(
            "robust_vector_pool", x, alpha, batch,
            lambda xs, al: robust_vector_pool(xs, pen, al, tuple(d + 1 for d in dims), vd + 1, tol=tol,
                                              max_iter=max_iter, starts=starts),
            lambda: robust_vector_pool(x, pen, alpha, dims, vd, tol=tol, max_iter=max_iter, starts=starts))
        if y is not None:
            return y
        if "Grad" in functorch_transforms():
            # A vjp inside a vmap over tangents (torch.func.hessian, jacfwd(jacrev(f)),
            # jacfwd(grad(f))): the Function would be vmapped around its backward, which
            # it has no rule for (torch's "does not have vmap support" before).
            raise ProblemError(
                "robust_vector_pool does not run under torch.func.hessian, jacfwd(jacrev(f)) or "
                "jacfwd(grad(f)) (a vmap around its vjp; second derivatives are not supported): use "
                "torch.func.jacfwd or torch.autograd for first derivatives")
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    # Rows of N vectors, components contiguous: norms and products run along memory, and
    # in the same order whatever x's strides (a strided view's Gram products rounded
    # otherwise, and exact ties between data points, as trunc_quad's at alpha = 1, went
    # to another of the tied minimisers: 2.9 apart). Explicit sizes, not -1: under jacfwd on an empty
    # batch the tangents' vmap dim is 0 too, and torch cannot infer -1 beside it.
    x3 = x.permute(*others, *dims, vd).reshape(math.prod(batch), N, C).to(work).contiguous()
    # y(σx, σα) = σ y(x, α): solving in units of a power of two near α (exact) keeps the
    # squared distances and the α² of the penalties inside the dtype's range when data
    # and α are scaled together (at 1e-20 in float32, α² underflowed and Welsch returned
    # NaN; at 1e25 Huber returned the plain mean). A float α in [2^-16, 2^16] needs none.
    # y(x + t) = y(x) + t: sets far from 0 in units of α are moved to their midpoint.
    rescale = isinstance(alpha, torch.Tensor) or not 2.0**-16 <= float(alpha) <= 2.0**16
    x3, a, scale, anchor = _in_units(x, x3, a, rescale, tuple(batch))
    args = (x3, a, pen, _DEFAULT_TOL.get(work, 1e-6) if tol is None else float(tol),
            _DEFAULT_MAX_ITER if max_iter is None else max_iter,
            _DEFAULT_STARTS if starts is None else starts, BatchShape(tuple(batch)))
    if (torch.is_grad_enabled() and (x.requires_grad or (isinstance(alpha, torch.Tensor) and alpha.requires_grad))) \
            or may_carry_tangents(x, alpha):
        # Forward mode (torch.func.jvp, jacfwd): the Function's jvp, not the solver's ops (at a
        # singular H their derivative was arbitrary, silently: jacfwd gave 0.56, the jvp 0 and a warning).
        y = _VectorPoolFunction.apply(*args)
    else:
        y = _VectorPoolFunction.forward(*args)
    if scale is not None:
        y = rescaled(y, scale.view(-1, 1) if scale.dim() else scale)
    if anchor is not None:
        y = y + anchor
    y = y.to(x.dtype).reshape(*batch, C)
    # The vector dim returns to its place among the kept dims, in a contiguous tensor (a
    # moved view of the rows made a following y.view(-1) raise).
    return y.movedim(-1, sorted(others + [vd]).index(vd)).contiguous()


class RobustVectorPool(nn.Module):
    r"""Module form of :func:`robust_vector_pool`.

    .. math::

        y = \operatorname*{argmin}_{u \in \mathbb{R}^C} \sum_i \phi(\|u - x_i\|_2; \alpha)

    Args:
        penalty, alpha, dim, vector_dim, tol, max_iter, starts: see :func:`robust_vector_pool` (an
            ``nn.Parameter`` alpha is learned; another tensor is stored as a buffer).

    Shape:
        - Input: ``(*)``, e.g. ``(B, C, H, W)`` with ``dim=(-2, -1), vector_dim=1``.
        - Output: the input shape without ``dim``.

    Raises:
        OptionError: invalid options at construction (``vector_dim`` in ``dim`` where that holds at every
            rank); calls raise as :func:`robust_vector_pool`.
        DTypeError: at construction, an ``alpha`` tensor that is not floating point.

    Examples::

        >>> pool = RobustVectorPool("huber", alpha=0.5, dim=(-2, -1), vector_dim=1)
        >>> pool(torch.randn(4, 16, 7, 7)).shape
        torch.Size([4, 16])
    """

    @building()
    def __init__(self, penalty: str | Penalty = "quadratic", alpha: float | torch.Tensor = 1.0,
                 dim: int | tuple[int, ...] = -1, vector_dim: int = -2, *, tol: float | None = None,
                 max_iter: int | None = None, starts: int | None = None) -> None:
        super().__init__()
        self.penalty = _check_options(penalty, alpha, dim, vector_dim, tol, max_iter, starts)[0]
        store_option(self, "alpha", alpha)  # (the caller's tensor: a checked copy would be no leaf)
        self.dim, self.vector_dim = dim, vector_dim
        self.tol, self.max_iter, self.starts = tol, max_iter, starts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return robust_vector_pool(x, self.penalty, self.alpha, self.dim, self.vector_dim,
                                  tol=self.tol, max_iter=self.max_iter, starts=self.starts)

    def extra_repr(self) -> str:
        parts = [f"penalty={format_penalty(self.penalty)}", f"alpha={format_option(self.alpha)}", f"dim={self.dim}",
                 f"vector_dim={self.vector_dim}"]
        extra = (("tol", self.tol), ("max_iter", self.max_iter), ("starts", self.starts))
        parts += [f"{k}={v}" for k, v in extra if v is not None]
        return ", ".join(parts)
