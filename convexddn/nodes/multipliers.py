"""Which constraints are active at the returned point, and their multipliers (eq. 25).

``solve`` returns only ``y``; the implicit backward (:mod:`.implicit`) needs the active
set and the Lagrange multipliers :math:`\\lambda` with
:math:`\\nabla_y f + A^\\top \\lambda = 0`, inequality entries :math:`\\ge 0`:

- :func:`inactive_mask`: an inequality is inactive where it is negative by more than
  ``active_tol`` *relative to its own scale* :math:`\\|\\nabla_y g_j\\|\\,\\ell` (how
  much ``g_j`` moves when ``y`` moves by its length :math:`\\ell`: ``‖y‖``, floored for a
  solution near 0 by a fraction of how far the objective's curvature lets ``y`` move,
  see :func:`~.lagrangian._solution_length`), and never by less than a few
  epsilons of the data's dtype: a correctly rounded boundary point of
  :math:`\\|y\\|^2 - 100 \\le 0` in float32 has :math:`g \\approx -10^{-5}`, which an
  absolute test calls inactive.
- :func:`multipliers`: the least-squares (minimum-norm) multipliers of eq. 25; where
  that gives an active inequality a negative multiplier (possible only when the active
  constraints are linearly dependent, e.g. a degenerate vertex, where the multipliers
  are not unique), the nonnegative least-squares ones instead
  (:func:`nonnegative_multipliers`), so that a KKT point is recognised as one.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", TPAMI 2021
    (eq. 25, Prop. 4.6); C. L. Lawson and R. J. Hanson, "Solving Least Squares
    Problems", 1974, ch. 23 (the NNLS algorithm).
"""
from __future__ import annotations

import math

import torch

__all__ = ["ACTIVE_EPS", "dependent", "inactive_mask", "multipliers", "near_active", "nonnegative_multipliers",
           "relative_slack", "scaled_norm", "unit_rows"]

Tensor = torch.Tensor

#: The activity threshold is at least this many epsilons of the data's dtype: the
#: rounding of ``y`` alone moves ``g_j`` by about one epsilon of its scale.
ACTIVE_EPS = 8


def _finite(t: Tensor) -> Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def relative_slack(g: Tensor, A_ineq: Tensor, length: Tensor) -> Tensor:
    """``(B, q)``: how far inequalities ``g`` ``(B, q)`` are from their bounds relative to their own
    scale, :math:`-g_j / (\\|\\nabla_y g_j\\|\\,\\ell)` (``length`` ``(B,)``: :math:`\\ell`); ``+inf``
    where ``∇_y g_j`` is zero and ``g_j < 0`` (slack at any scale), ``-inf`` where it is zero otherwise.

    ``A_ineq`` ``(B, q, m)`` is :math:`D_y g`; its non-finite entries do not count towards the scale
    (such a constraint is judged by its finite part). Divided in two steps, by the norm scaled (the
    product ``‖∇g_j‖ ℓ`` is never formed): finite where both ``|g_j| / ‖∇g_j‖`` and the ratio are
    within the dtype's range, not wherever the ratio is. Where only the first overflows it is ±inf
    with the ratio's sign (``g = -1e300``, ``‖∇g‖ = 1e-10``, ``ℓ = 1e100``: +inf for a ratio of
    1e210), which counts the same (inactive, or violated) as the ratio would. At |y| ~ 1e154 in
    float64 ``‖y‖`` (or the product ``‖∇g_j‖ ℓ``) overflowed to Inf, every bound counted as active
    and the gradient came back as zeros under a false zero-multiplier warning (:func:`inactive_mask`);
    at ``‖∇g_j‖ ℓ`` beyond 1e308 :func:`near_active` reported a slack of 0 and too small an
    ``active_tol``.
    """
    row = scaled_norm(_finite(A_ineq))
    has = row > 0
    return torch.where(has, (-g / torch.where(has, row, 1.0)) / length.unsqueeze(-1),
                       torch.where(g < 0, torch.inf, -torch.inf))


def inactive_mask(g: Tensor, A_ineq: Tensor, length: Tensor, active_tol: float,
                  data_dtype: torch.dtype) -> Tensor:
    """``(B, q)``: inequalities ``g`` ``(B, q)`` below ``-tol`` times their own scale
    :math:`\\|\\nabla_y g_j\\|\\,\\ell` (``length`` ``(B,)``: :math:`\\ell`, at least ``‖y‖``):
    :func:`relative_slack` above ``tol``, ``active_tol`` but at least a few epsilons of the data's dtype.

    ``A_ineq`` ``(B, q, m)`` is :math:`D_y g`; its non-finite entries do not count
    towards the scale (such a constraint is judged by its finite part; if it is then
    active, the caller reports the non-finite Jacobian).
    """
    tol = max(active_tol, ACTIVE_EPS * torch.finfo(data_dtype).eps)
    return relative_slack(g, A_ineq, length) > tol


def scaled_norm(t: Tensor, dim: int = -1) -> Tensor:
    """The 2-norm over ``dim``, :math:`m\\,\\|t/m\\|` with :math:`m = \\max|t|` (0 where
    ``t`` is 0 or ``dim`` is empty), so without overflow or underflow on the way: finite
    wherever the norm itself is. ``t`` ``(..., n, ...)`` -> ``(..., ...)``.

    The plain sum of squares overflowed to Inf beyond ~1e154 and underflowed to 0 below
    ~1e-162 (vector_norm too): a least-squares factor's column norms (``dim=-2``) then
    passed a well-conditioned problem as singular.
    """
    if not t.shape[dim]:  # (amax has nothing to reduce)
        return t.abs().sum(dim)
    top = t.abs().amax(dim, keepdim=True)
    safe = torch.where(top > 0, top, 1.0)
    ts = t / safe
    # Along the last dimension linalg.vector_norm (Tensor.norm's kernel without its Python
    # dispatch: this runs some twenty times per backward of a small node); along another a
    # sum of squares (vector_norm over the columns of a (64, 40, 12) factor: 76 against 7.5 µs).
    norm = torch.linalg.vector_norm(ts, dim=dim) if dim % t.dim() == t.dim() - 1 else (ts * ts).sum(dim).sqrt_()
    return norm * safe.squeeze(dim)


def _least_squares(A: Tensor, g: Tensor, use: Tensor | None = None) -> Tensor:
    """``argmin ‖Aᵀλ + g‖``, with ``λ_j = 0`` where ``use`` is false: the minimum-norm solution
    in the units where each row of ``A`` has length 1 (the multipliers of dependent rows
    are not unique)."""
    if use is not None:
        A = A * use.unsqueeze(-1)  # a zero row gets a zero multiplier from pinv
    # Rows at unit length first (λ_j = μ_j / ‖a_j‖): pinv's cut-off is relative to the
    # largest singular value, and a constraint written in small units (−1e-14·y ≤ 0 for
    # y ≥ 0) lost its multiplier beside the others' (a stationarity residual of 0.33
    # at an exact solution, rejected as not a KKT point).
    An, inv = unit_rows(A)
    mu = -(torch.linalg.pinv(An.transpose(1, 2)) @ g.unsqueeze(-1)).squeeze(-1)
    return mu * inv.squeeze(-1)


def unit_rows(A: Tensor) -> tuple[Tensor, Tensor]:
    """``(A / ‖a_j‖, 1/‖a_j‖ (…, r, 1))``: each row of ``A`` at unit length (zero rows stay
    zero, with a factor of 0), so that a pseudo-inverse's relative cut-off does not drop a
    constraint written in small units. Norms scaled (:func:`scaled_norm`): a row of norm beyond
    ~1e154 (−1e160·y ≤ 0) had its squares overflow to Inf and a factor of 0, below ~1e-162 underflow
    to 0: its multiplier came out 0, and an exact solution was rejected as no KKT point."""
    norm = scaled_norm(A).unsqueeze(-1)
    inv = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0)
    return A * inv, inv


def nonnegative_multipliers(A: Tensor, g: Tensor, nonneg: Tensor,
                            lower: Tensor | None = None) -> Tensor:
    """``argmin ‖Aᵀλ + g‖`` subject to ``λ_j >= lower_j`` where ``nonneg``, batched.

    Lawson–Hanson's active-set NNLS, run on every batch element at once (masks, not a
    loop over elements): it terminates in finitely many steps in exact arithmetic, and
    the few constraints of a node keep the iteration caps small.

    Args:
        A: ``(B, r, m)``, the constraint Jacobian (zero rows: inactive, multiplier 0).
        g: ``(B, m)``, the objective's gradient.
        nonneg: ``(B, r)`` or ``(r,)``, the bounded multipliers (the others are free).
        lower: ``(B, r)`` lower bounds (default 0), used where ``nonneg``.
    """
    batch, r, _ = A.shape
    nonneg = nonneg.expand(batch, r)
    if lower is not None:  # λ = lower + z with z >= 0: shift the right-hand side
        lower = torch.where(nonneg, lower, 0.0)
        g = g + (A.transpose(1, 2) @ lower.unsqueeze(-1)).squeeze(-1)
    passive = ~nonneg
    z = _least_squares(A, g, passive)
    # A multiplier enters when it lowers the residual by more than rounding can explain.
    enter_tol = 64 * torch.finfo(A.dtype).eps * _finite(A).norm(dim=-1) * g.norm(
        dim=-1, keepdim=True)
    for _ in range(3 * r + 1):
        descent = -(A @ ((A.transpose(1, 2) @ z.unsqueeze(-1)).squeeze(-1) + g)
                    .unsqueeze(-1)).squeeze(-1)
        candidates = nonneg & ~passive & (descent > enter_tol)
        if not bool(candidates.any()):
            break
        pick = torch.where(candidates, descent / A.norm(dim=-1).clamp_min(
            torch.finfo(A.dtype).tiny), -torch.inf).argmax(-1, keepdim=True)
        passive = passive | (torch.zeros_like(passive).scatter_(-1, pick, True)
                             & candidates.any(-1, keepdim=True))
        for _ in range(r + 1):
            s = _least_squares(A, g, passive)
            bad = passive & nonneg & (s <= 0)
            if not bool(bad.any()):
                z = s
                break
            # Step from z towards s until the first bounded multiplier reaches zero.
            ratio = z / (z - s).clamp_min(torch.finfo(A.dtype).tiny)
            alpha = torch.where(bad, ratio, torch.inf).amin(-1, keepdim=True).clamp(0, 1)
            z = z + alpha * (s - z)
            z = torch.where(nonneg, z.clamp_min(0.0), z)
            passive = passive & ~(nonneg & (z <= 0))
            z = torch.where(passive, z, 0.0)
    return z if lower is None else lower + z


def dependent(A: Tensor) -> Tensor:
    """``(B,)``: whether the nonzero rows of ``A`` ``(B, r, m)`` are linearly dependent,
    i.e. whether the multipliers of those constraints are not unique (only then can
    another choice than the least-squares one exist; one SVD per element)."""
    A = _finite(A)
    return torch.linalg.matrix_rank(A) < (A != 0).any(-1).sum(-1)


def multipliers(A: Tensor, g: Tensor, n_eq: int, inactive: Tensor) -> Tensor:
    """The multipliers ``(B, r)`` of eq. 25, nonnegative on active inequalities.

    Least squares first (one pseudo-inverse); only the batch elements where that gives
    an active inequality a negative multiplier and the active constraints are
    dependent (:func:`dependent`: otherwise the multipliers are unique) run
    :func:`nonnegative_multipliers`.
    """
    lam = _least_squares(A, g)
    is_ineq = torch.zeros(A.shape[1], dtype=torch.bool, device=A.device)
    is_ineq[n_eq:] = True
    negative = (is_ineq & ~inactive & (lam < 0)).any(-1)
    if bool(negative.any()):
        rows = torch.nonzero(negative).flatten()
        rows = rows[dependent(A[rows])]
        if rows.numel():
            lam = lam.index_copy(0, rows, nonnegative_multipliers(A[rows], g[rows], is_ineq))
    return lam


def near_active(g: Tensor, A_all: Tensor, length: Tensor, gf: Tensor, n_eq: int, inactive: Tensor,
                active_tol: float, rows: Tensor) -> tuple[float, float, float, float, float] | None:
    """``(tol, least, largest, active_tol, left)``: the smallest ``active_tol`` (a power of ten up to 1e-2)
    at which counting the inequalities within it active makes the stationarity residual ``‖∇_y f + Aᵀλ‖`` of
    every element ``rows`` (B,) at least 10 times smaller (``left``: the largest of the ratios after / before,
    at most 0.1, 0 where it vanishes: finite, where the ratio before / after was Inf), and the relative slack
    ``-g_j / (‖∇_y g_j‖ ℓ)`` of those inequalities (:func:`relative_slack`); ``None`` where no such
    ``active_tol`` does.

    A solver that approaches bounds without reaching them (an interior point method's ``y_j =
    1e-6`` for ``y_j = 0``) returns slack bounds, which the default ``active_tol`` counts
    inactive: without their multipliers ``y`` is not stationary, and the error said so with
    causes that did not name ``active_tol`` (for the report only: a few least-squares solves).
    ``g`` (B, q): the inequalities; ``A_all`` (B, r, m): all constraints' Jacobian, inactive rows
    kept; ``length`` (B,): :func:`inactive_mask`'s; ``gf`` (B, m): ``∇_y f``; ``inactive`` (B, r).
    """
    slack = relative_slack(g, A_all[:, n_eq:], length)  # (row * length overflowed: a slack of 0 reported)
    is_ineq = torch.zeros(A_all.shape[1], dtype=torch.bool, device=A_all.device)
    is_ineq[n_eq:] = True

    def residual(off: Tensor) -> Tensor:
        A = A_all.masked_fill(off.unsqueeze(-1), 0.0)
        lam = multipliers(A, gf, n_eq, off)
        lam = torch.where(is_ineq, lam.clamp_min(0.0), lam)
        return scaled_norm(gf + (A.transpose(1, 2) @ lam.unsqueeze(-1)).squeeze(-1))

    before = residual(inactive)
    exponent = math.floor(math.log10(active_tol)) + 1
    for tol in (10.0 ** e for e in range(exponent, -1)):
        near = inactive[:, n_eq:] & (slack <= tol) & rows.unsqueeze(-1)
        if not bool(near.any()):
            continue
        after = residual(inactive & ~torch.cat([torch.zeros_like(near[:, :n_eq]), near], -1))
        fixed = rows & near.any(-1) & (after <= 0.1 * before)
        if bool((fixed == rows).all()):
            s = slack[near]
            left = (after / before)[rows].amax()  # (before > tol > 0 on the rows reported)
            return tol, float(s.amin()), float(s.amax()), active_tol, float(left)
    return None
