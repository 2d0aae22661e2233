"""The autograd Function of :func:`convexddn.nodes.pooling.node.robust_pool`: the solve
(:meth:`Penalty.solve <convexddn.nodes.pooling.penalties.Penalty.solve>`), the closed-form
backward of Gould et al. Table 1 (:func:`~.backward.pool_backward`) and its forward-mode
twin."""
from __future__ import annotations

import torch

from ..._autograd import batched_directions, bind_fast, save_plain
from ..._anchor import graph_anchor
from ..._first_order import first_order, first_order_jvp
from ..._warn import warn
from ...errors import GradientWarning
from ..degeneracy import in_saved_batch, naming_batch, shown_indices
from .backward import pool_backward
from .penalties import Quadratic
from .rounding import _GRADIENT_GRID, coarse_flag

__all__ = ["RobustPoolFunction"]


@bind_fast  # (all arguments positional: apply skips torch's argument binding)
class RobustPoolFunction(torch.autograd.Function):
    """y = argmin_u sum_i phi(u - x_i; alpha) over the last dim of x (R, N) -> (R,).

    ``alpha`` is a tensor of shape (R,) or 0-d; the options ride along as constants, and
    so does ``batch``, the caller's batch shape of the R rows (the pooled output's, as a
    :class:`~convexddn._autograd.BatchShape`), in which the warnings name rows.
    Outputs ``(y, rem)``: ``rem`` (non-differentiable) is the remainder of the exact
    minimiser beyond y's rounding where the solver knows it (:meth:`.Penalty.solve_split`;
    the backward takes the weights of rows whose y is coarse against alpha there), else
    empty.
    """

    # torch.func.jacfwd vmaps the jvp over the tangents (the primals stay unbatched; a
    # vmap over x or alpha is the node's call on the stacked rows: _vmap_stack).
    generate_vmap_rule = True

    @staticmethod
    def forward(x, alpha, penalty, tol, max_iter, use_compile, batch):  # type: ignore[override]
        if x.shape[0] == 0:
            return x.new_empty((0,)), x.new_empty((0,))
        a = alpha.unsqueeze(-1) if alpha.dim() > 0 else alpha
        # Never traced (robust_pool calls it outside the graph: _pool_rows). Inference mode: no
        # version counters or autograd bookkeeping on the per-row ops of the iterations, a hundred
        # or more per iteration on (R, 1) tensors (in-process A/B at (4, 256, 1024) float32:
        # 1.17-1.36x faster; nothing measurable at (8, 1024, 2048)). The (R,) result is cloned
        # into a normal tensor.
        with torch.inference_mode(), naming_batch(batch.dims):
            y, rem = penalty.solve_split(x, a, tol, max_iter, use_compile)
        return y.clone(), (x.new_empty((0,)) if rem is None else rem.clone())

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, alpha, penalty, _tol, _max_iter, use_compile, batch = inputs
        y, rem = output
        ctx.mark_non_differentiable(rem)
        save_plain(ctx, x, alpha, y, rem)  # (inference-mode inputs as plain copies)
        # Whether some row's y is coarse against alpha, read in the forward's time (a few us of
        # its milliseconds). (Grad mode is off here whatever the caller's: needs_input_grad says it.)
        ctx.coarse = coarse_flag(y, alpha, ctx.needs_input_grad)
        ctx.save_for_forward(x, alpha, y, rem)
        ctx.penalty = penalty
        ctx.use_compile = use_compile
        ctx.named_batch = batch.dims  # (the backward's and the jvp's warnings name rows in it)
        ctx.anchors = graph_anchor(x, alpha)  # (their graph, not them: see first_order)

    @staticmethod
    @first_order("robust_pool")
    @in_saved_batch
    def backward(ctx, grad_y, _grad_rem):  # type: ignore[override]
        x, alpha, y, rem = ctx.saved_tensors
        need_x, need_alpha = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if batched_directions(grad_y):
            # Cotangents batched by a vmap (torch.func.jacrev, is_grads_batched): the row
            # vectors dy/dx and dy/dα (the backward at an incoming gradient of 1, unbatched:
            # the solver's block loop writes in place and reads on the host) times them.
            return _scaled(_jvp_weights(ctx, x, alpha, y, rem, bool(need_x), bool(need_alpha)), grad_y, alpha)
        grad_x = grad_alpha = None
        rows, n = x.shape
        if rows == 0:
            return (x.new_zeros(x.shape) if need_x else None,
                    torch.zeros_like(alpha) if need_alpha else None, None, None, None, None, None)
        if isinstance(ctx.penalty, Quadratic):  # (by type: a user penalty may share the name)
            # dy/dx_i = 1/N exactly: a broadcast view, nothing to compute.
            if need_x:
                grad_x = (grad_y / n).unsqueeze(-1).expand(rows, n)
            if need_alpha:
                grad_alpha = torch.zeros_like(alpha)
            return grad_x, grad_alpha, None, None, None, None, None
        gx, ga = _weights(ctx, x, alpha, y, rem, grad_y, bool(need_x), bool(need_alpha))
        if need_x:
            grad_x = gx
        if need_alpha:
            grad_alpha = ga if alpha.dim() > 0 else ga.sum()
        return grad_x, grad_alpha, None, None, None, None, None

    @staticmethod
    @first_order_jvp("robust_pool")  # its tangent differentiated again: DoubleBackwardError
    @in_saved_batch
    def jvp(ctx, x_t, alpha_t, *_):  # type: ignore[override]
        """Forward mode: dy = Σ_i w_i dx_i / Σ_j w_j − (Σ_i wa_i / Σ_j w_j) dα (Table 1),
        i.e. the backward's row vectors at an incoming gradient of 1, times the tangents
        (rows without a derivative get 0 and the backward's warning)."""
        x, alpha, y, rem = ctx.saved_tensors
        rows, n = x.shape
        dy = y.new_zeros(y.shape)
        if rows == 0:
            return dy, None
        if isinstance(ctx.penalty, Quadratic):  # dy/dx_i = 1/N, no dependence on alpha
            return (dy if x_t is None else x_t.mean(-1)), None
        # (Tangents batched by torch.func.jacfwd or jacobian(vectorize=True): the same
        # unbatched row vectors, times them.)
        gx, ga = _jvp_weights(ctx, x, alpha, y, rem, x_t is not None, alpha_t is not None)
        if x_t is not None:
            dy = (gx * x_t).sum(-1)
        if alpha_t is not None:
            dy = dy + ga * alpha_t
        return dy, None


def _jvp_weights(ctx, x, alpha, y, rem, need_x: bool, need_alpha: bool):
    """The rows' vectors dy/dx ``(R, N)`` and dy/dα ``(R,)`` (``None`` where not needed):
    :func:`_weights` at an incoming gradient of 1 (the quadratic's: 1/N and 0)."""
    if isinstance(ctx.penalty, Quadratic) or x.shape[0] == 0:
        return (x.new_full(x.shape, 1.0 / x.shape[1]) if need_x else None,
                torch.zeros_like(y) if need_alpha else None)
    return _weights(ctx, x, alpha, y, rem, torch.ones_like(y), need_x, need_alpha)


def _scaled(weights, grad_y: torch.Tensor, alpha: torch.Tensor) -> tuple:
    """The backward's outputs from the row vectors ``weights`` (:func:`_jvp_weights`) and
    cotangents ``grad_y`` (R,), batched by a vmap: a product, no host read."""
    gx, ga = weights
    grad_x = None if gx is None else gx * grad_y.unsqueeze(-1)
    grad_alpha = None if ga is None else ga * grad_y
    if grad_alpha is not None and alpha.dim() == 0:
        grad_alpha = grad_alpha.sum()
    return grad_x, grad_alpha, None, None, None, None, None


def _weights(ctx, x, alpha, y, rem, grad_y, need_x: bool, need_alpha: bool):
    """:func:`~.backward.pool_backward`'s ``(grad_x, grad_alpha per row)`` at ``grad_y``,
    with the warnings for rows whose gradient does not exist (set to zero), naming them
    in the caller's batch shape (the rows are its flattened elements: within the backward's
    :func:`~..degeneracy.naming_batch`); ``rem``: y's
    remainder from the forward (empty where the solver gave none)."""
    a = alpha.unsqueeze(-1) if alpha.dim() > 0 else alpha
    gx, ga, ok, all_ok, alpha_lost, coarse = pool_backward(ctx.penalty, x, y, a, grad_y, need_x, need_alpha,
                                                           ctx.use_compile, ctx.coarse,
                                                           rem if rem.shape == y.shape else None)
    who = f"robust_pool(penalty={ctx.penalty.name!r})"
    if coarse is not None:
        warn(
            f"{who}: y's rounding exceeds {_GRADIENT_GRID:.2g} alpha for {shown_indices(coarse)}, "
            f"|y| / alpha being too large for {x.dtype}, and Newton steps from y did not reach the "
            f"minimiser's residuals (a curvature sum <= 0, or y too far off); their gradient is taken "
            f"where the steps stopped, and may be off by about that point's distance to the minimiser "
            f"over alpha",
            GradientWarning,
        )
    if alpha_lost is not None:
        warn(
            f"{who}: the sum of d2phi_dalpha(y - x_i) is not finite for {shown_indices(alpha_lost)}, "
            f"even in float64 (the penalty's formula overflows); alpha's gradient from those rows is set "
            f"to zero",
            GradientWarning,
        )
    if not all_ok:
        warn(
            f"{who}: the Hessian sum_i phi''(y - x_i) is zero, singular or negative for "
            f"{shown_indices(~ok)}: no inliers, a non-isolated minimiser, or a curvature that "
            f"vanishes within y's own uncertainty (a degenerate minimum); their gradient is set to zero",
            GradientWarning,
        )
    return gx, ga
