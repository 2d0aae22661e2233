r"""The columns made exact at the end of :mod:`convexddn.nodes._sinkhorn`'s solve, for a caller
whose rows are the solver's columns (:func:`~convexddn.nodes.transport.sinkhorn` with
M < N, solved transposed so that the Schur complement lives on the smaller side)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._sinkhorn_padding import Padding

__all__ = ["exact_cols", "log_floor"]


def log_floor(dtype: torch.dtype) -> float:
    """The log of the smallest plan entry formed (below it, exp is denormal): log(tiny) + 1."""
    return math.log(torch.finfo(dtype).tiny) + 1.0


def exact_cols(
    P: torch.Tensor, b: torch.Tensor, logits: Callable[[], torch.Tensor], pad: Padding | None
) -> torch.Tensor:
    r"""P with its columns scaled to sum to ``b`` (in place); ``logits()``: α_i − C_ij/ε.

    Scaling column j by b_j / Σ_i P_ij is the log-domain column update of β_j. Where that
    sum is below e·tiny/ε_mach, entries of over an ulp of it underflowed to 0 (all of them:
    a column that stays 0, when ``max_iter`` ran out far from the optimum), so such columns
    are formed anew as the update itself, :math:`b_j\,\operatorname{softmax}_i(\alpha_i -
    C_{ij}/\varepsilon)`, relative to the column's own largest term (as
    :class:`convexddn.nodes._sinkhorn._State` forms rows); ``logits`` is only evaluated then.
    """
    cs = P.sum(-2, keepdim=True)
    P = P.mul_(torch.where(cs > 0, b.unsqueeze(-2) / cs, 1.0))
    lo = log_floor(P.dtype)  # (as the solver's rows)
    low = cs < math.exp(lo) / torch.finfo(P.dtype).eps
    if pad is not None:
        low &= ~pad.dead_c.unsqueeze(-2)
    if bool(low.any()):
        x = logits()
        d = x.sub_(x.amax(-2, keepdim=True))
        rest = d.clamp(min=lo).exp_().sum(-2, keepdim=True).log_()
        z = d.add_(b.unsqueeze(-2).log() - rest)
        P = torch.where(low, z.clamp(min=lo).exp_().masked_fill_(z < lo, 0.0), P)
    return P
