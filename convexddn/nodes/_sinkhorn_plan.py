"""The entropic transport plan's solve for :func:`~convexddn.nodes.transport.sinkhorn`, with
the checks of its error, outside torch.compile's graph (see :func:`_solve_plan`)."""
from __future__ import annotations

import math

import torch

from .._autograd import may_carry_tangents, outside_compile
from .._checks import check_finite
from .._warn import warn
from ..errors import InputError, SolverWarning
from ._overflow import may_overflow
from ._sinkhorn import solve
from ._sinkhorn_function import Box, SinkhornFn
from ._sinkhorn_padding import Padding

__all__ = ["_solve_plan"]


@outside_compile
def _solve_plan(cost: torch.Tensor, C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, am: tuple | None,
                eps: float, max_iter: int, tol: float, flip: bool, holes: tuple[bool, bool] | None,
                work: torch.dtype, accuracy: float, batch: tuple[int, ...]) -> torch.Tensor:
    """The plan (B, M, N) (transposed where ``flip``) for the unit-mass marginals ``a``, ``b``
    and the float64 costs ``C`` of :func:`sinkhorn` (``cost``: the caller's, for the error
    messages), with the checks of its error: the solve and its host reads.

    Never traced by torch.compile (a clean graph break around it, as ``ConvexLayer.forward``
    has): traced, the solver broke the graph at each host read of its loops, and the
    resume functions guarded on values that change from call to call (the rows' cost
    spreads against the log-domain cut, the working sets' sizes and strides): each new
    batch recompiled some of its frames (69 graphs over 10 calls at batch sizes 16 and 9,
    still recompiling at the last). The solver's steps are small ops decided on the host;
    compiling them gains nothing. Run eagerly, the graph around the node is compiled
    once per input shape.
    """
    # (Forward mode too: the Function's jvp, not the solver's iterations differentiated.)
    if (torch.is_grad_enabled() and any(t.requires_grad for t in (C, a, b))) or may_carry_tangents(C, a, b):
        # The Function's cost gradient and plan tangent reach about max(Σa, 1)/eps times
        # the incoming ones in float64 (bound in _sinkhorn_function): checked beyond its range.
        gain = max(1.0 if am is None else am[4][0], 1.0) / eps
        box = Box(a.requires_grad or b.requires_grad, may_overflow(gain, work), accuracy, batch)
        P, err = SinkhornFn.apply(C, a, b, eps, max_iter, tol, flip, holes, box)
    else:
        pad = None if holes is None else Padding(a, b, *holes)
        P, err, _ = solve(C, a, b, eps, max_iter, tol, flip, pad)
    worst = float(err.max())
    if not worst <= tol:
        if not math.isfinite(worst):
            check_finite("cost", cost)
        # Finite costs give a non-finite error, or none that converges (a row from -1e308 to
        # 1e308: column sums 0.16-0.20 for 1/6, only warned), where a row's range overflows
        # (the solver subtracts each row's minimum, and each column's in the other half-step): checked
        # on this failing path only, along both (C may be transposed here: flip).
        Cd = C.detach()  # (read on the host below: a C that requires grad made torch warn about the float())
        span = torch.maximum(Cd.amax(-1) - Cd.amin(-1), (Cd.amax(-2) - Cd.amin(-2)).amax(-1, keepdim=True))
        wide = ~torch.isfinite(span)
        if not bool(wide.any()) and not math.isfinite(float(span.amax()) / float(eps)):
            # (the solver divides the shifted costs by eps: 1e100 spreads at eps 1e-211)
            raise InputError(
                f"cost's spread within a row over eps must stay below {torch.finfo(work).max:.3g} "
                f"(float64's largest number), got {float(span.amax()):.3g} / {float(eps):.3g}; raise eps")
        if bool(wide.any()):
            i = int(wide.any(-1).flatten().nonzero()[0])  # (the first element with such a row or column)
            raise InputError(
                f"cost's entries within a row (or column) must differ by at most {torch.finfo(work).max:.3g} "
                f"(float64's largest number), got entries from {float(C[i].amin()):.3g} to {float(C[i].amax()):.3g} "
                "in one element")
    if not worst <= tol:
        failed = ~(err <= tol)
        idx = [tuple(i) for i in torch.nonzero(failed.reshape(batch)).tolist()]
        warn(
            f"sinkhorn did not reach tol={tol:.3g} within max_iter={max_iter} at batch "
            f"index(es) {idx[:10]}{' …' if len(idx) > 10 else ''} (relative column error "
            f"up to {worst:.3g}); raise max_iter or eps. The plan's rows are "
            "exact; its gradient assumes an optimum that was not reached",
            SolverWarning,
        )
    return P
