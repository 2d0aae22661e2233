"""The verdicts of the tridiagonal solver's pivoted route (:mod:`._tridiagonal_solver`, step 3)
and the errors and warnings that report them, each naming the batch elements."""
from __future__ import annotations

import torch

from .._warn import warn
from ..errors import GradientWarning, SolverError
from ._tridiagonal_scaled import ACCEPT_PIVOTED
from .degeneracy import failed_indices, shown_indices

__all__ = ["check_cast", "problems", "report"]

_SINGULAR = 4.0  # a pivot at most this many ulps of the terms that formed it is rounding error


def _raise(who: str, bad: torch.Tensor, batch: tuple, what: str, status: str) -> None:
    """A SolverError for the elements where ``bad`` (``(M,)``) holds, with their indices into ``batch``."""
    indices = failed_indices(bad, batch)
    raise SolverError(f"{who}: {what} in {shown_indices(bad, batch)}", indices=indices,
                      statuses=[status] * len(indices))


def check_cast(who: str, x: torch.Tensor, out: torch.Tensor, batch: tuple) -> None:
    """The solution ``x`` (``(M, N, K)``, the work dtype) cast to the caller's ``out``: a
    SolverError where a finite entry became ±Inf (float16 and bfloat16, solved in float32), as
    for an overflow in the work dtype."""
    lost = (torch.isinf(out) & torch.isfinite(x)).flatten(1).any(1)
    if bool(lost.any()):
        _raise(who, lost, batch, f"the solution overflows {out.dtype} (largest {torch.finfo(out.dtype).max:.4g}; "
               f"up to {float(x.abs().amax()):.3g} in {x.dtype}); rescale the system or pass {x.dtype} inputs",
               "overflow")


def problems(x: torch.Tensor, ratio: torch.Tensor, eta: torch.Tensor, strict: bool):
    """The slow path's verdicts per element ``(M,)``: (exactly singular, singular at rounding
    level, overflow, inaccurate). ``strict=False`` (the derivative's solves, whose matrix the
    forward accepted): no singularity verdict, only the answer's finiteness and backward error."""
    eps = torch.finfo(x.dtype).eps
    finite = torch.isfinite(x).flatten(1).all(1)
    exact = (ratio == 0) & strict
    rounding = (ratio <= _SINGULAR * eps) & ~exact & strict
    overflow = ~finite & ~exact & ~rounding
    inaccurate = ~(eta <= ACCEPT_PIVOTED * eps) & finite & ~exact & ~rounding
    return exact, rounding, overflow, inaccurate


def report(who, bad, batch, dtype, ratio, eta, strict, rounded):
    """Raise (``strict``: the forward) or warn (GradientWarning: a derivative) for the elements of
    :func:`problems`; ``rounded`` ``(M,)``: those whose answer comes from an equilibrated rhs that
    lost bits (the lossless retry did not pass: the range of the rhs, not only the matrix, may be
    the cause; where the solution is representable a lossless shift with its growth's headroom exists
    up to a bit or two, so this is rare)."""
    exact, rounding, overflow, inaccurate = bad
    eps = torch.finfo(dtype).eps
    if strict and bool(exact.any()):
        _raise(who, exact, batch, "the matrix is singular (an exactly zero pivot of its LU factorisation with "
               "partial pivoting), so the system has no unique solution; check those elements' diagonals (or add "
               "a small multiple of the identity)", "singular")
    if strict and bool(rounding.any()):
        worst = float(ratio[rounding].min())
        _raise(who, rounding, batch, f"the matrix is singular to working precision ({dtype}): a pivot of its LU "
               f"factorisation with partial pivoting is {worst:.2g} times the terms it was formed from (at most "
               f"{_SINGULAR}·eps = {_SINGULAR * eps:.2g}: rounding error), so A is within that relative distance "
               f"of a singular matrix (condition number ≳ {1 / max(worst, 1e-300):.2g}); rescale or regularise "
               "those elements (a small multiple of the identity)", "singular")
    what = f"{who}: the derivative's solve"
    if bool(overflow.any()):
        if strict:
            _raise(who, overflow, batch, f"the solution overflows {dtype} (finite inputs of extreme magnitude); "
                   "rescale the system", "overflow")
        warn(f"{what} overflows {dtype} in {shown_indices(overflow, batch)} (Inf or NaN returned)", GradientWarning)
    if bool(inaccurate.any()):
        found = f"componentwise backward error up to {float(eta[inaccurate].max()):.2g} (> {ACCEPT_PIVOTED}·eps)"
        if strict:
            cause = f"the matrix is too ill-conditioned for {dtype}"
            if bool((rounded & inaccurate).any()):
                cause += (", or the right-hand side spans more magnitudes than it can hold beside the solution's "
                          "growth (its small entries rounded in the equilibrated solve): rescale those elements")
            _raise(who, inaccurate, batch, f"the pivoted solve did not reach working accuracy ({found}); {cause}",
                   "inaccurate")
        warn(f"{what} did not reach working accuracy in {shown_indices(inaccurate, batch)} ({found}): the derivatives "
             "there are inaccurate", GradientWarning)
