"""The autograd Function of a batched cone solve: the forward runs
:func:`~.interior_point.solve_cone_batch` (keeping its state where a derivative may be
asked for), the backward and forward mode run :func:`~.vjp.cone_vjp` and
:func:`~.vjp.cone_jvp` and name, in their warnings, the elements without a derivative
and those whose derivative the solve leaves unresolved (:mod:`.resolution`).
"""
from __future__ import annotations

import torch

from .._autograd import refuse_batched
from .._first_order import first_order, first_order_jvp
from .._warn import warn
from ..errors import GradientWarning, SolverWarning
from .interior_point import SOLVED, solve_cone_batch
from .resolution import moved_columns, warn_unresolved, warn_weak, weak_tangent, weakly_determined
from .saved_state import hooks_active, join, split
from .status import element_list, name_elements
from .upstream import poison, split_nonfinite
from .vjp import GRADIENT_ACCURACY, cone_jvp, cone_vjp
from .zero_rows import warn_zero_rows

__all__ = ["ConeSolve"]


class ConeSolve(torch.autograd.Function):
    """(P, q, A, b) -> (x, z) of the cone program, differentiated by :func:`cone_vjp`."""

    @staticmethod
    def forward(P, q, A, b, layout, options, needs_grad, tangent, where, moved):
        # Inference mode: no version counters or autograd bookkeeping on the ~400 small
        # ops of an iteration (measured: forward 8-10 % faster on the n = 50 QP at batch
        # 64). The outputs are cloned into normal tensors; the kept state is only read,
        # by the backward, with autograd off.
        # Under saved-tensor hooks the state is saved as tensors (setup_context), which
        # inference tensors cannot be: no_grad there.
        with torch.no_grad() if needs_grad and hooks_active() else torch.inference_mode():
            sol = solve_cone_batch(P.detach(), q.detach(), A.detach(), b.detach(), layout,
                                   keep_state=needs_grad, **options)
        _warn_undetermined(where, sol.undetermined)
        state = ((sol, layout, options.get("refine", 1), tangent, where, options.get("error_cols"), moved)
                 if needs_grad else None)
        return (*(v.clone() for v in (sol.x, sol.z, sol.status, sol.residual, sol.iterations, sol.error,
                                       sol.points)), state)

    @staticmethod
    def setup_context(ctx, inputs, output):
        state = output[7]
        ctx.skeleton = None
        if state is not None and hooks_active():
            # Checkpoint, save_on_cpu: the solution's state goes through the hooks as torch's
            # own ops' saved tensors do (.saved_state); it stayed alive past a checkpointed
            # forward before.
            # (the solution's state, and the parameters' copy the checks of the tangent and moves keep)
            ctx.skeleton, tensors = split(state)
            ctx.save_for_backward(*tensors)
            ctx.save_for_forward(*tensors)
            state = None
        ctx.state = state
        ctx.mark_non_differentiable(*output[2:7])

    @staticmethod
    @first_order_jvp("ConvexLayer")  # (the public name: the user calls a ConvexLayer)
    def jvp(ctx, dP, dq, dA, db, *_):
        """Forward mode: :func:`cone_jvp` along the data's tangents, with the backward's warning."""
        # (jacobian(..., vectorize=True, strategy="forward-mode"): a raw "Batching rule not
        # implemented" from inside the derivative before)
        refuse_batched("ConvexLayer", dP, dq, dA, db, tangents=True, functorch=False)
        sol, layout, refine, _, where, cols, _ = _state(ctx)
        # A NaN or Inf in an element's data tangent (a fault upstream): solved with zero, its
        # output tangents NaN after, as torch propagates it (upstream.py; the NaN reached the
        # derivative system before: zero tangents, with a false "not unique" warning).
        (dP, dq, dA, db), bad = split_nonfinite((dP, dq, dA, db))
        dx, dz, flagged, zeroed, unsolved, zero, error = cone_jvp(sol, layout, dP, dq, dA, db, refine + 2, cols)
        _warn_not_differentiable("forward mode", where, flagged, zeroed, "tangent", unsolved, zero)
        _warn_imprecise("forward mode", where, error, "tangent")
        warn_unresolved("forward mode", sol, layout, where, sol.status == SOLVED,
                        moved_columns(dP, dq, dA, db, sol.scaled.A))
        # (the zeroed elements' tangents are warned about already: nothing of theirs to bound)
        warn_weak("forward mode", where, weak_tangent(sol, dP, dA, dx, (sol.status == SOLVED) & ~zeroed, cols))
        dx, dz = poison(bad, (dx, dz))
        return dx, dz, None, None, None, None, None, None

    @staticmethod
    @first_order("ConvexLayer")
    def backward(ctx, gx, gz, *_):
        if ctx.state is None and ctx.skeleton is None:
            return (None,) * 10
        refuse_batched("ConvexLayer", gx, gz)  # (torch.func.jacrev: the checks read on the host)
        sol, layout, refine, tangent, where, cols, moved = _state(ctx)
        gx = torch.zeros_like(sol.x) if gx is None else gx
        gz = torch.zeros_like(sol.z) if gz is None else gz
        # A NaN or Inf in an element's cotangent (a fault upstream, e.g. an fp16 overflow under
        # GradScaler): zero before any solve sees it, its data gradients NaN after (upstream.py).
        (gx, gz), bad = split_nonfinite((gx, gz))
        gP, gq, gA, gb, flagged, zeroed, unsolved, zero, error = cone_vjp(sol, layout, gx, gz, refine + 2, tangent,
                                                                          cols)
        _warn_not_differentiable("backward", where, flagged, zeroed, "cotangent", unsolved, zero)
        _warn_imprecise("backward", where, error, "gradient")
        if moved is not None:
            live = (sol.status == SOLVED) & ((gx != 0).any(1) | (gz != 0).any(1))
            warn_unresolved("backward", sol, layout, where, live, moved)
            warn_weak("backward", where, weakly_determined(sol, gx, gz, (gP, gq, gA, gb), tangent, live,
                                                            moved.each))
        # Per element (B, ...): autograd then reduces them, through the data's fill, to the
        # parameters (a shared one summed over the batch: NaN there, as torch gives).
        gP, gq, gA, gb = poison(bad, (gP, gq, gA, gb))
        return gP, gq, gA, gb, None, None, None, None, None, None


def _state(ctx) -> tuple:
    """The state the forward kept: as it is, or joined from the saved tensors."""
    return ctx.state if ctx.skeleton is None else join(ctx.skeleton, ctx.saved_tensors)


def _warn_undetermined(where, flagged: torch.Tensor | None) -> None:
    """The SolverWarning naming the solved elements whose outputs float64 does not
    determine (:func:`~.uniqueness.undetermined`; one host read)."""
    idx = [] if flagged is None else torch.nonzero(flagged).squeeze(1).tolist()
    if idx:
        warn(f"ConvexLayer forward (batched): the solution of {len(idx)} batch element(s) "
             f"({name_elements(where, idx)}) is not determined in this precision: the program curves along some "
             "direction of the outputs only through terms far below its scale (p**alpha at a large alpha, whose "
             "curvature is ~p**(alpha - 2); cp.huber with M = 1e-10 beside data of 1), which leave its objective and "
             "KKT residual at rounding anywhere along it, so the point returned may lie anywhere on that face "
             "(entmax at alpha = 50 on a tie: 0.309 and 0.353 for 1/3 each); use a native node where one exists "
             "(convexddn.layer's default backend), or rescale the program so that those terms lie within ~1e8 of "
             "its others",
             SolverWarning, elements=element_list(where, idx))


def _warn_imprecise(mode: str, where, error: torch.Tensor | None, what: str) -> None:
    """The GradientWarning naming the elements whose derivative, kept from a dense solve of an
    ill-conditioned system (:func:`~.vjp._certify`), is estimated less accurate than the float64
    promise (:data:`~.vjp.GRADIENT_ACCURACY`): ``error`` ``(B,)`` the relative estimates (one host
    sync; None where no dense solve was certified, the usual case: none)."""
    values = [] if error is None else error.tolist()  # (one host read)
    idx = [i for i, e in enumerate(values) if e > GRADIENT_ACCURACY]
    if not idx:
        return
    estimates = [values[i] for i in idx]
    worst = max(estimates)
    warn(f"ConvexLayer {mode} (batched): the derivative system of {len(idx)} batch element(s) "
         f"({name_elements(where, idx)}) is so ill-conditioned that float64 determines their {what} only to an "
         f"estimated relative error of up to {worst:.1e} (above the {GRADIENT_ACCURACY:.0e} promised; rounding "
         "the system's own entries leaves about that much: a derivative far larger than its data, arising by "
         "cancellation, e.g. CVXPY's chain of second-order cones for u**1.005 at u* = 2e6, du/dq = 3.7e8, "
         f"7e-7 off); their {what} is kept",
         GradientWarning, elements=element_list(where, idx), estimated_error=estimates)


def _warn_not_differentiable(mode: str, where, flagged: torch.Tensor, zeroed: torch.Tensor, along: str,
                             unsolved: torch.Tensor, zero: torch.Tensor) -> None:
    """The GradientWarnings naming the elements without a derivative (``flagged``; those
    ``zeroed`` got exactly zero): first those of them with a moved zero row (``zero``:
    :func:`~.zero_rows.warn_zero_rows`), then, apart from the rest, those whose system could
    not be solved (``unsolved``, zeroed: u^1.005 at u = 2e6 was called not unique)."""
    what = "gradient" if along == "cotangent" else "tangent"
    if not torch.nonzero(flagged).numel():  # a host sync (one more for each message)
        return
    idx = torch.nonzero(zero).squeeze(1).tolist()
    n_zero = int((zero & zeroed).sum()) if idx else 0
    kept = ("the part of their tangent that moves that row is dropped and the rest kept, as the gradient keeps "
            "the derivatives that exist" if along == "tangent" else f"their {what} is a one-sided limit's blend")
    warn_zero_rows(f"{mode} (batched)", where, idx, kept + (f" ({n_zero} of them: set to zero)" if n_zero else ""))
    flagged = flagged & ~zero
    if idx and not torch.nonzero(flagged).numel():
        return
    bad = torch.nonzero(unsolved).squeeze(1).tolist()
    if bad:
        warn(f"ConvexLayer {mode} (batched): the derivative system of {len(bad)} batch element(s) "
             f"({name_elements(where, bad)}) could not be solved accurately, not even by a dense LU (too "
             "ill-conditioned in this precision; the solution itself is solved, and may be unique: "
             f"solver='Clarabel' differentiates each element apart); their {what} is set to zero",
             GradientWarning, elements=element_list(where, bad))
    flagged, zeroed = flagged & ~unsolved, zeroed & ~unsolved
    idx = torch.nonzero(flagged).squeeze(1).tolist()
    if idx:
        n_zero = int(zeroed.sum())
        zero = (f"; {n_zero} of them have a solution that is not unique along their {along} "
                "(the derivative system is singular there, or too ill-conditioned to be solved: "
                f"solver='Clarabel' differentiates each element apart), and their {what} is set to zero"
                ) if n_zero else ""
        warn(
            f"ConvexLayer {mode} (batched): the solution of {len(idx)} batch element(s) "
            f"({name_elements(where, idx)}) is not unique or not differentiable "
            "(a constraint active with a zero multiplier, or a second-order cone at its tip "
            "with its multiplier on the boundary; a derivative system that is singular: e.g. an "
            "LP with an edge of optima; or more active constraints than the solution's "
            f"dimension: a degenerate vertex); their {what} is a one-sided limit's blend{zero}",
            GradientWarning, elements=element_list(where, idx))
