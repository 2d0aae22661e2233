"""Batched projected conjugate gradients with a singularity probe (matrix-free KKT solves).

:func:`projected_cg` solves, for every batch element at once,

.. math::

    \\min_{w}\\ \\tfrac12 w^\\top H w - v^\\top w \\quad\\text{s.t.}\\quad A w = 0,

i.e. the KKT system of :mod:`.linear_solvers` with ``H`` given only through
Hessian–vector products, by CG on the null space of ``A`` (Gould, Hribar & Nocedal
2001). It needs ``H`` positive definite on that null space only (as the dense solve
does), not on the whole space.

References:
    N. I. M. Gould, M. E. Hribar and J. Nocedal, "On the solution of equality
    constrained quadratic programming problems arising in optimization", SIAM J. Sci.
    Comput. 23(4), 2001.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._generic import GOLDEN_ANGLE
from .constraint_rows import constraint_gram
from .multipliers import unit_rows

__all__ = [
    "CG_BUDGET_MIN",
    "CG_ITER_WORK",
    "CGResult",
    "cg_budget",
    "hvp_of_rows",
    "projected_cg",
    "pseudo_random_directions",
    "restricted_hvp",
]

Tensor = torch.Tensor

#: Lanczos steps kept for the condition estimate (the extreme Ritz values settle first).
_LANCZOS_STEPS = 100


def pseudo_random_directions(m: int, batch: int, dtype: torch.dtype, device) -> Tensor:
    """A fixed, unit-norm, dense direction per batch element, ``(B, m)``."""
    j = torch.arange(m, dtype=dtype, device=device) + 1.0
    u = torch.cos(j * GOLDEN_ANGLE) + 0.5 * torch.sin(j * j * 0.7548776662466927)
    u = u / u.norm().clamp_min(torch.finfo(dtype).tiny)
    return u.expand(batch, m).clone()


class CGResult(NamedTuple):
    """Output of :func:`projected_cg`; masks and residuals are ``(B,)``."""

    w: Tensor
    mu: Tensor | None
    converged: Tensor  #: the system reached ``tol`` without a breakdown
    singular: Tensor  #: the probe broke down: H singular (or indefinite) on the null space
    dependent: Tensor | None  #: the active constraints are linearly dependent
    residual: Tensor  #: final relative residual of the system
    unfinished: Tensor  #: the probe neither converged nor broke down within max_iter
    cond: Tensor  #: condition number of H on the null space, from the probe's Ritz values


def restricted_hvp(hvp: Callable[[Tensor], Tensor], idx: Tensor, D: Tensor,
                   HD: Tensor) -> Callable[[Tensor], Tensor] | None:
    """The products of the batch elements ``idx`` ``(n,)`` alone, ``(k, n, m) -> (k, n, m)``,
    where ``hvp`` offers them (an attribute ``rows``: ``idx -> hvp``, which
    :func:`~.implicit_system.implicit_system` sets), else ``None``.

    A graph over the whole batch costs the whole batch per product, also for elements
    whose solve is finished (one ill-conditioned element kept 63 solved ones in 400
    products: 9-65x the time of the two groups solved apart). The restriction is
    accepted only where it reproduces the whole batch's products ``HD = hvp(D)``
    ``(k, B, m)`` on those rows to :math:`\\sqrt{\\varepsilon}` relative: an objective that
    mixes batch elements, or that cannot be evaluated on fewer of them, keeps the whole
    batch's products.
    """
    rows = getattr(hvp, "rows", None)
    if rows is None:
        return None
    try:  # (the user's objective, called again on fewer rows: any failure only costs the speed-up)
        with torch.enable_grad():
            sub = rows(idx)
            got = sub(D.index_select(1, idx))
    except Exception:  # noqa: BLE001
        return None
    want = HD.index_select(1, idx)
    ok = (got - want).norm(dim=-1) <= torch.finfo(want.dtype).eps ** 0.5 * want.norm(dim=-1)
    return sub if bool(ok.all()) else None


#: :func:`cg_budget`: the dense solve costs about ``B N^3 / CG_ITER_WORK`` CG iterations
#: (CPU, float64, one thread: one per 0.9e6-4.5e6 of ``B N^3`` for cheap Hessian-vector
#: products, N = 128-2000, B = 1-64; 5e6-1.7e7 for dense matrix products; ~75 at
#: linear_solvers.DENSE_WORK).
CG_BUDGET_MIN, CG_ITER_WORK = 50, 4e6


def cg_budget(size: int, batch: int = 1) -> int:
    """CG iterations ``"auto"`` allows ``batch`` systems of ``size = N`` unknowns before
    the dense fallback: :math:`\\max(\\texttt{CG\\_BUDGET\\_MIN}, \\min(N, \\lceil B N^3 /
    \\texttt{CG\\_ITER\\_WORK} \\rceil))`.

    Ski rental: the fallback forms ``H`` from ``N`` Hessian-vector products (a CG step
    does two: system and probe), factorises ``B`` matrices of ``N^2`` entries and holds
    ``3 B N^2`` floats; CG gets about that time (measured), so a system that stalls costs
    about twice the dense solve alone (up to ~5x with dense matrix products as HVPs). With
    ``B N^3 / CG_ITER_WORK = N (B N^2 / CG_ITER_WORK)``, memory counts too: a dense batch of
    32 MB (float64) or more leaves CG all ``N`` steps, the most exact CG needs (more means
    rounding has taken over: an ill-conditioned system, which the dense tests judge better).
    ``B`` counts the elements still running where the products and the fallback cost only
    theirs (:func:`restricted_hvp`): one stalled element in 64 kept the budget of 64
    (N = 400 steps where alone it has 50), and 63 solved ones paying for each step.
    """
    work = batch * float(size) ** 3 / CG_ITER_WORK
    return max(CG_BUDGET_MIN, min(size, math.ceil(work)))


def hvp_of_rows(hvp: Callable[[Tensor], Tensor], idx: Tensor, v: Tensor) -> Callable[[Tensor], Tensor] | None:
    """:func:`restricted_hvp` for the elements ``idx`` of the batch of ``v`` ``(B, m)``,
    checked against one product of the whole batch; ``None`` also where ``idx`` is all of it."""
    batch, m = v.shape
    if idx.numel() == batch or getattr(hvp, "rows", None) is None:
        return None
    D = pseudo_random_directions(m, batch, v.dtype, v.device).unsqueeze(0)
    return restricted_hvp(hvp, idx, D, hvp(D))


def projected_cg(
    hvp: Callable[[Tensor], Tensor],
    A: Tensor | None,
    inactive: Tensor | None,
    v: Tensor,
    tol: float,
    max_iter: int,
    check_every: int,
    rcond: float,
    cap: Callable[[int], int] | None = None,
) -> CGResult:
    """Projected CG on ``v`` and on a fixed probe, frozen per system once done or broken.

    A system *breaks down* when a search direction has (numerically) no positive
    curvature, :math:`p^\\top H p \\le 100\\,\\varepsilon \\max(\\text{curvature seen})
    \\|p\\|^2`: :math:`H` is singular (zero curvature) or indefinite (negative) on the
    null space; the latter is not a degeneracy of the KKT system, only of CG. Started at zero
    on a consistent singular system, CG converges to the minimum-norm solution without
    meeting the null space; the probe (dense, so with a component in every direction)
    does meet it, which is why it is there. The probe's CG coefficients also give its
    Lanczos tridiagonal matrix, whose extreme eigenvalues (Ritz values, which converge
    first) estimate the condition number of :math:`H` on the null space.

    Once half the elements whose products are computed (or more) are finished, the rest
    go on with products of their own rows (:func:`restricted_hvp`, where ``hvp`` offers
    them; each element's iterates are its own, so only rounding changes). ``cap(n)``,
    when given, ends the iteration early once it reaches ``cap`` of the ``n`` elements
    still running (tested every ``check_every`` iterations, with convergence), but only
    while those products are in use: refused, they cost the whole batch, whose budget
    ``max_iter`` stays.
    """
    batch, m = v.shape
    eps = torch.finfo(v.dtype).eps
    tiny = torch.finfo(v.dtype).tiny
    if A is None:
        Minv = dependent = None

        def project(Z: Tensor) -> Tensor:
            return Z
    else:
        # Rows at unit length (the same null space; μ = D μ' below): (A Aᵀ)⁺ of a row of 1e200 is
        # 1e-400, zero in float64, and the projection kept the constrained direction, silently.
        A, row_inv = unit_rows(A)
        Minv, deficit = constraint_gram(A, inactive, rcond)
        dependent = deficit > 0

        A_c = A.contiguous()
        At = A.transpose(1, 2).contiguous()

        def project(Z: Tensor) -> Tensor:
            # P Z = Z - A^T M^+ A Z: the component in the null space of the active A.
            Zb = Z.permute(1, 2, 0)  # (B, m, k)
            corr = At @ (Minv @ (A_c @ Zb))
            return Z - corr.permute(2, 0, 1)
    probe = pseudo_random_directions(m, batch, v.dtype, v.device)
    probe = probe * v.norm(dim=-1, keepdim=True).clamp_min(1.0)
    Res = torch.stack([v, probe])  # (2, B, m): unprojected residuals b - H x
    G = project(Res)
    X = torch.zeros_like(Res)
    P = G.clone()
    rg = (G * G).sum(-1, keepdim=True)
    # Relative to the projected right-hand side, but never below the rounding of the
    # projection itself: where the active constraints leave no free direction (a
    # vertex), the projected probe is pure rounding and "converging" relative to it
    # never happened (a false ill-conditioning warning).
    thresh = torch.maximum((tol * tol) * rg, (64 * eps) ** 2 * (Res * Res).sum(-1, keepdim=True))
    done = rg <= thresh
    broken = torch.zeros_like(done)
    negative = torch.zeros_like(done)
    curv = torch.zeros_like(rg)
    lanczos: list[tuple[Tensor, Tensor, Tensor]] = []  # the probe's (alpha, beta, step)
    live, hvp_live = None, hvp  # the elements whose products are computed (None: all)
    for it in range(max_iter):
        P_in = P
        # Frozen elements' products are never read (their step is 0): only live ones'.
        HP = hvp(P) if live is None else P.new_zeros(P.shape).index_copy(1, live, hvp_live(P.index_select(1, live)))
        pp = (P * P).sum(-1, keepdim=True)
        pHp = (P * HP).sum(-1, keepdim=True)
        curv = torch.maximum(curv, pHp / pp.clamp_min(tiny))
        running = ~(done | broken)
        bad = running & (pHp <= 100 * eps * curv * pp)
        negative = negative | (bad & (pHp < -100 * eps * curv * pp))
        step = running & ~bad
        alpha = torch.where(step, rg / torch.where(step, pHp, torch.ones_like(pHp)), 0.0)
        X = X + alpha * P
        Res = Res - alpha * HP
        G_new = project(Res)
        rg_new = (G_new * G_new).sum(-1, keepdim=True)
        beta = torch.where(step, rg_new / rg.clamp_min(tiny), 0.0)
        P = torch.where(step, G_new + beta * P, P)
        rg = torch.where(step, rg_new, rg)
        broken = broken | bad
        done = done | (step & (rg_new <= thresh))
        if it < _LANCZOS_STEPS:
            lanczos.append((alpha[1, :, 0], beta[1, :, 0], step[1, :, 0]))
        # Convergence is tested only every few iterations to limit host syncs.
        if (it + 1) % check_every:
            continue
        idx = (~(done | broken)).any(0).squeeze(-1).nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        # The cap is the budget of the elements still running only while they alone pay
        # for the products: where restricted_hvp refused them, the whole batch pays and
        # keeps its budget (one element's 10 steps ended CG, in a batch of 8, at 12 of the
        # 110 products it needed, and sent it to the dense solve).
        over = cap is not None and it + 1 >= cap(idx.numel())
        if over and live is not None:
            break
        if hvp_live is not None and 2 * idx.numel() <= (batch if live is None else live.numel()):
            # Half the elements (or more) finished: go on with the others' products only.
            live, hvp_live = idx, restricted_hvp(hvp, idx, P_in, HP)
            if hvp_live is None:  # (not offered, or not the same products: the whole batch's)
                live = None
            elif over:
                break
    rel = (rg / (thresh / (tol * tol)).clamp_min(tiny)).sqrt().squeeze(-1)
    done, broken, negative = done.squeeze(-1), broken.squeeze(-1), negative.squeeze(-1)
    cond = _ritz_condition(lanczos, batch, v)
    cond = torch.where(broken[1], float("inf"), cond)
    w = X[0]
    mu = None
    if A is not None:
        # A^T mu = v - H w on the range of A^T (the null-space part is what CG zeroed).
        Hw = hvp(w.unsqueeze(0))[0]
        mu = (Minv @ (A @ (v - Hw).unsqueeze(-1))).squeeze(-1) * row_inv.squeeze(-1)
    return CGResult(
        w=w,
        mu=mu,
        # Negative curvature means indefinite, not singular: CG cannot tell more, so
        # the element counts as failed (the caller's dense fallback decides).
        converged=done[0] & ~broken[0] & ~negative[1],
        singular=broken[1] & ~negative[1],
        dependent=dependent,
        residual=rel[0],
        cond=cond,
        unfinished=~done[1] & ~broken[1],
    )


def _ritz_condition(steps: list[tuple[Tensor, Tensor, Tensor]], batch: int, like: Tensor) -> Tensor:
    """Condition estimate from the CG coefficients of one system (Lanczos tridiagonal).

    ``T_jj = 1/α_j + β_{j-1}/α_{j-1}`` and ``T_j,j+1 = sqrt(β_j)/α_j`` (Saad, Iterative
    Methods, §6.7.3); frozen steps are padded with ``T_00`` on the diagonal, inside the
    spectrum, so they move neither extreme Ritz value.
    """
    if not steps:
        return torch.ones(batch, dtype=like.dtype, device=like.device)
    alpha = torch.stack([a for a, _, _ in steps], -1)  # (B, k)
    beta = torch.stack([b for _, b, _ in steps], -1)
    valid = torch.stack([s for _, _, s in steps], -1)
    safe = torch.where(valid, alpha, torch.ones_like(alpha))
    inv = 1.0 / safe
    prev = torch.cat([torch.zeros_like(beta[:, :1]), beta[:, :-1] * inv[:, :-1]], -1)
    diag = torch.where(valid, inv + prev, inv[:, :1])
    off = torch.where(valid[:, 1:], beta[:, :-1].clamp_min(0).sqrt() * inv[:, :-1], 0.0)
    T = torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    # A NaN or Inf Hessian (e.g. sqrt at 0 in the objective) makes its element's T
    # non-finite, and eigvalsh then fails for the whole batch: such an element's
    # condition is unknown (inf), the others' are estimated as usual.
    finite = torch.isfinite(T).all(-1).all(-1)
    T = torch.where(finite[:, None, None], T, torch.eye(T.shape[-1], dtype=T.dtype, device=T.device))
    ritz = torch.linalg.eigvalsh(T)
    lo, hi = ritz[:, 0], ritz[:, -1]
    cond = torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(like.dtype).tiny), float("inf"))
    cond = torch.where(finite, cond, float("inf"))
    return torch.where(valid.any(-1), cond, torch.ones_like(cond))
