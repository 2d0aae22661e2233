"""The autograd Function of :func:`~convexddn.nodes.total_variation.tv_denoise`: the exact
solve (:mod:`._tv_solver`), its backward by segment averaging and its forward mode, with the
warnings where the derivative does not exist (the module docstring of
:mod:`convexddn.nodes.total_variation` gives the math)."""
from __future__ import annotations

import torch

from .._anchor import graph_anchor
from .._autograd import bind_fast, save_plain
from .._first_order import first_order, first_order_jvp
from .._warn import warn
from ..errors import GradientWarning
from ._tv_solver import _counts, _edge_terms, _segment_ids, _segment_mean, _solve
from .degeneracy import naming_batch, shown_indices

__all__ = ["_TVFn"]


def _warn_rows(rows: torch.Tensor, what: str, batch: tuple[int, ...]) -> None:
    """Warn ``what`` for the signals where ``rows`` (``(R,)``, one per signal, ``batch``, x's
    shape without dim, flattened) holds: how many and the first few, as index tuples into
    ``batch`` (flat positions in the flattened rows were not indices the caller can use)."""
    if bool(rows.any()):
        warn(f"tv_denoise: in {shown_indices(rows, batch)}, each a signal along dim, {what}",
             GradientWarning)  # at the backward's/jvp's caller


def _warn_nondifferentiable(tie: torch.Tensor, plateau: torch.Tensor, result: str, batch: tuple[int, ...]) -> None:
    """The backward's and the jvp's GradientWarnings: rows at a tie, and rows with λ = 0
    and equal neighbours differentiated in x and λ together. ``result``: what is returned
    there ("gradient" or "tangent"); ``batch``: the rows' shape in x, to name them."""
    if bool((tie | plateau).any()):  # one host read for both warnings
        _warn_rows(tie, "the solution is at a tie (an edge where |z| = lam exactly, or a "
                   "jump of size 0): the derivative does not exist there; the "
                   f"{result} of the current segmentation (a one-sided one) is returned", batch)
        _warn_rows(plateau, "lam = 0 with equal neighbours in x: y is not differentiable "
                   "in (x, lam) jointly there; the partial derivatives are returned "
                   "(identity for x, the one-sided d/dlam at lam = 0+ for lam)", batch)


def _plateau(sigma: torch.Tensor, zero: torch.Tensor | None, both: bool) -> torch.Tensor:
    """Rows where λ = 0, x has equal neighbours and both x and λ are differentiated."""
    if zero is None or not both:
        return torch.zeros(sigma.shape[0], dtype=torch.bool, device=sigma.device)
    # λ = 0: equal neighbours stay one segment (as for all small λ > 0) but ∂y/∂x = I;
    # ∂y/∂x jumps at λ = 0+, so only the partials exist (module doc).
    return zero.squeeze(1) & (sigma == 0).any(1)


@bind_fast
class _TVFn(torch.autograd.Function):
    r"""Exact TV-1D forward; derivative by segment averaging (x) and boundary signs (λ).

    With :math:`P` the segment-mean operator of the solution (symmetric) and
    :math:`t_i = \sigma_i - \sigma_{i-1}`: :math:`\partial y/\partial x = P` (:math:`I`
    in rows with :math:`\lambda = 0`) and :math:`\partial y/\partial\lambda = P t`.
    Backward: :math:`\bar x = P \bar y`, :math:`\bar\lambda = t^\top P \bar y`;
    forward mode: :math:`\dot y = P \dot x + \dot\lambda\, P t`.
    """

    # torch.func.jacfwd vmaps the jvp over tangent batches (it worked on the solver's ops
    # before forward mode went through this Function); the rule torch generates does.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, lam, scale, zero_lam, max_iter, batch):  # type: ignore[override]
        with naming_batch(batch.dims):  # (a failure names the signals in x's shape without dim)
            return _solve(x, lam, max_iter, scale, zero_lam)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, sigma, tie = output
        ctx.mark_non_differentiable(sigma, tie)
        save_plain(ctx, sigma, tie, inputs[1])
        ctx.save_for_forward(sigma, tie, inputs[1])  # the jvp applies the same Jacobian
        # Tangents of inputs without one stay None (not zeros): whether x and λ both carry
        # one decides the λ = 0 warning, as needs_input_grad does in the backward.
        ctx.set_materialize_grads(False)
        # x's and λ's graph, not x (which the derivatives do not read): a second differentiation's
        # error (see first_order) without holding x past a checkpointed forward (convexddn._anchor)
        ctx.anchors = graph_anchor(*inputs[:2])
        ctx.zero_lam, ctx.batch = inputs[3], inputs[5].dims  # batch: x's shape without dim, for the warnings

    @staticmethod
    @first_order("tv_denoise")
    def backward(ctx, grad_y, _gs, _gt):  # type: ignore[override]
        if grad_y is None:  # (not materialised: y's gradient is undefined)
            return None, None, None, None, None, None
        (sigma, tie, lam), (need_x, need_lam) = ctx.saved_tensors, ctx.needs_input_grad[:2]
        zero = lam == 0 if ctx.zero_lam else None
        _warn_nondifferentiable(tie, _plateau(sigma, zero, need_x and need_lam), "gradient", ctx.batch)
        seg = _segment_ids(sigma)
        g = _segment_mean(grad_y, seg, _counts(seg, torch.empty(seg.shape, dtype=grad_y.dtype, device=grad_y.device)))
        # λ = 0: y = x, so ∂y/∂x = I, not the average over the segments of equal entries.
        grad_x = g if zero is None or not need_x else torch.where(zero, grad_y, g)
        # ∂y_i/∂λ = segment mean of t; the segment-mean operator is symmetric. At λ = 0 it
        # is the one-sided derivative at 0+ (segments: the runs of equal entries of x).
        grad_lam = (g * _edge_terms(sigma)).sum(1, keepdim=True) if need_lam else None
        return grad_x if need_x else None, grad_lam, None, None, None, None

    @staticmethod
    @first_order_jvp("tv_denoise")  # its tangent differentiated again: DoubleBackwardError
    def jvp(ctx, x_t, lam_t, *_):  # type: ignore[override]
        r""":math:`\dot y = P \dot x + \dot\lambda\, P t` (:math:`\dot x` itself in rows
        with :math:`\lambda = 0`): the backward's Jacobian, with its warnings."""
        sigma, tie, lam = ctx.saved_tensors
        zero = lam == 0 if ctx.zero_lam else None
        # None: an input without a tangent (a constant λ, or x held fixed).
        _warn_nondifferentiable(tie, _plateau(sigma, zero, x_t is not None and lam_t is not None),
                                "tangent", ctx.batch)
        if x_t is None and lam_t is None:
            return None, None, None
        seg = _segment_ids(sigma)
        # From σ alone, not like x_t: under jacfwd (vmap) x_t is batched, the counts are not.
        count = _counts(seg, sigma.new_empty(seg.shape))
        if x_t is None:  # P (λ̇ t): ∂y/∂λ = P t, λ̇ constant over the row
            return _segment_mean(lam_t * _edge_terms(sigma), seg, count), None, None
        v = x_t if lam_t is None else x_t + lam_t * _edge_terms(sigma)
        y_t = _segment_mean(v, seg, count)
        if zero is not None:
            # λ = 0 rows: ∂y/∂x = I, so ẋ + P(λ̇ t) = ẋ − P ẋ + P(ẋ + λ̇ t).
            y_t = torch.where(zero, y_t + (x_t - _segment_mean(x_t, seg, count)), y_t)
        return y_t, None, None
