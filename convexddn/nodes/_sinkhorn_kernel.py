r"""Plain Sinkhorn on the kernel, the first path of :mod:`convexddn.nodes._sinkhorn`.

For costs whose rows spread over at most ``SCALE_ABOVE``·ε (50ε) the kernel
:math:`e^{(\min_j C_{ij} - C)/\varepsilon}` has no entry below e⁻⁵⁰, so nothing
underflows and two matrix–vector products make an iteration; the caller hands the
potentials on to its Newton rounds when the observed linear rate is slow.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._sinkhorn_padding import Padding

# Iterations between the first error checks.
KERNEL_CHECK = 2
# Most iterations between two checks when the observed rate predicts convergence later;
# past three times as many still needed, the Newton rounds take over.
KERNEL_AHEAD = 20
_LOG2E = 1.0 / math.log(2.0)


def kernel_sinkhorn(
    D: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, iters: int, tol: float,
    pad: Padding | None = None, v0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float, torch.Tensor, torch.Tensor | None]:
    r"""Plain Sinkhorn on the kernel, for costs whose rows spread over ``SCALE_ABOVE``·ε at most.

    ``D`` is the costs less their row minima (overwritten with the kernel, then the plan).
    :math:`P = \operatorname{diag}(u) K \operatorname{diag}(v)` with
    :math:`K = e^{-D/\varepsilon} \in [e^{-50}, 1]`:
    alternating v = b / Kᵀu, u = a / Kv (the rows exact after each pair); the column
    error ‖v ∘ Kᵀu − b‖₁ comes free with the next iteration's first product and is
    checked after ``KERNEL_CHECK`` iterations and as many again, then where the rate
    observed between the last two checks predicts ``tol`` (at most ``KERNEL_AHEAD``
    iterations on). Returns (plan, column error, v ``(B, 1, N)``, iterations used,
    largest error, u ``(B, 1, M)``, fast); β = log v warm-starts the Newton rounds when the
    kernel iterations stopped short of ``tol``. ``fast`` ``(B,)``: where they stopped
    because the batch's rate was slow (else None), the elements above ``tol`` whose own
    rate is not: they would converge here, and the caller goes on with them from ``v0`` =
    their v. With ``pad``, v starts at 0 on dead
    columns; u = a / Kv and v = b / Kᵀu are then 0 on dead rows and columns (no product
    is 0: every entry of K is positive and every marginal has a live entry).
    """
    # e^x as 2^(x·log₂e): torch's exp2 takes about 0.6 of exp's time on float64 (21 against
    # 33 µs at (2, 100, 100)), as accurate (both within an ulp of the rounded argument), and
    # the kernel's exponent is scaled anyway.
    K = D.mul_(-_LOG2E / eps).exp2_()
    Kt = K.transpose(-1, -2)
    a_, b_ = a.unsqueeze(-2), b.unsqueeze(-2)
    v = v0 if v0 is not None else torch.ones_like(b_) if pad is None else 1.0 - pad.pad_c.unsqueeze(-2)
    u = a_ / torch.bmm(v, Kt)
    s, t, it = torch.bmm(u, K), torch.empty_like(u), 0
    # The error falls linearly: after two checks the next one is placed where the
    # observed rate predicts ``tol`` (a check costs as much as an iteration).
    check, last, fast = KERNEL_CHECK, None, None
    while True:
        if it == check or it == iters:
            # (‖·‖₁ in one op: a check is a few ops on (B, 1, N), so their count is its cost)
            err = torch.linalg.vector_norm(torch.addcmul(b_, v, s, value=-1), 1, (-2, -1))
            worst = err.max().item()
            if it == iters or worst <= tol:
                break
            check = it + KERNEL_CHECK
            if last is not None:
                # Iterations still needed at the observed rate (inf: no progress).
                gain = math.log(worst / last[1]) / (it - last[0]) if 0.0 < worst < last[1] else 0.0
                ahead = math.log(tol / worst) / gain if gain < 0.0 else math.inf
                if ahead > KERNEL_AHEAD * 3:  # slow: Newton converges faster from here
                    # ... for the elements whose own rate is slow too; fast: those above tol whose own
                    # rate is not (NaN: no progress, slow)
                    gains = (err / last[2]).log_().div_(it - last[0])
                    fast = (err > tol) & (gains < 0) & ((tol / err).log_().div_(gains) <= KERNEL_AHEAD * 3)
                    break
                check = it + max(1, min(KERNEL_AHEAD, math.ceil(ahead)))
            last = (it, worst, err)
        torch.div(b_, s, out=v)
        torch.div(a_, torch.bmm(v, Kt, out=t), out=u)
        torch.bmm(u, K, out=s)
        it += 1
    # (the plan in K's memory: no caller reads the kernel afterwards)
    return K.mul_(v).mul_(u.transpose(-1, -2)), err, v, it, worst, u, fast


def kernel_rounds(
    D: torch.Tensor, shifted: Callable[[], torch.Tensor], a: torch.Tensor, b: torch.Tensor, eps: float,
    max_iter: int, iters: int, tol: float,
    pad: Padding | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float, torch.Tensor]:
    """:func:`kernel_sinkhorn` for at most ``min(max_iter, iters)`` iterations; where it stopped
    on the batch's slow rate and some elements above ``tol`` converge fast on their own,
    those go on alone from their v (``shifted()``: ``D`` anew), so that one slow element does
    not send the others to the Newton rounds (511 of them with it: 12x the groups apart).
    Returns (plan, column error, v, iterations used ``(B,)``, largest error, u): each element's
    own count, so that the fast ones' second round does not come off the slow ones' budget
    (which left a slow element 42 Newton iterations fewer than alone, and short of ``tol``)."""
    P, err, v, n, worst, u, fast = kernel_sinkhorn(D, a, b, eps, min(max_iter, iters), tol, pad)
    used = torch.full(err.shape, n, dtype=torch.long, device=err.device)
    fast = None if fast is None else torch.nonzero(fast).squeeze(1)
    if fast is not None and 0 < fast.numel() < err.numel():
        out = kernel_sinkhorn(shifted()[fast], a[fast], b[fast], eps, min(max_iter - n, iters), tol,
                              None if pad is None else pad.select(fast), v[fast])
        P, err, v, u = (w.index_copy(0, fast, x) for w, x in zip((P, err, v, u), (out[0], out[1], out[2], out[5])))
        used, worst = used.index_fill(0, fast, n + out[3]), float(err.max())
    return P, err, v, used, worst, u
