"""The factorisation behind :func:`convexddn.nodes.least_squares.least_squares`: Householder
QR of the weighted, regularised design matrix, Qᵀ applied by its reflectors, and what its
diagonal tells (rank, the backward's gain)."""
from __future__ import annotations

import math

import torch

from .._checks import check_finite
from .._generic import generic_vector
from .._warn import warn
from ..errors import InputError, SolverError, SolverWarning
from .degeneracy import shown_indices
from .multipliers import scaled_norm

__all__ = ["factor", "power_of_two_scale", "h_solve", "apply_q", "apply_qt", "weighted_terms",
           "conditioning", "backward_gain", "raise_rank", "check_solution", "WARN_ERROR"]

_MAX_INDICES_SHOWN = 8
# x's estimated relative error (float64 solve) above which a call warns: most digits lost.
WARN_ERROR = 1e-6
# Rows are sorted by size when one is this much larger than a data row: in the given
# order the error grows like eps times the ratio of a row to a lighter one before it.
_HEAVIER = 1024.0


def factor(A: torch.Tensor, w: torch.Tensor | None, ridge: torch.Tensor | None):
    """Householder QR of [W^{1/2} A; diag(ρ)^{1/2}] with its rows sorted by decreasing
    largest entry, over the batch of the factor (not of b): ``(reflectors, tau, R,
    W^{1/2}, column norms, row order, graded, row norms)`` (graded: whether an element's
    rows were sorted, or None where there are no rows; row norms, (…, rows): those of the
    matrix with unit columns, in the factor's order, where some element was sorted, else
    None).

    The sorting is half of what makes Householder QR stable row by row (Cox & Higham
    1998; the other half, column pivoting, torch's geqrf lacks): in the given order the
    error grew like eps times the heavy rows' size over the light ones' (a ridge of 1e24
    over ‖A‖ ~ 1: 4.6e-5 relative, and x = 0 from 1e34 on, for a problem whose
    condition is 1; weights 1e24 on the last rows: 3.3e-5). Q stays
    implicit (LAPACK's reflectors; :func:`apply_qt` applies Qᵀ): forming it cost half
    the QR again. The column norms are R's (‖A e_j‖ = ‖R e_j‖, Q orthonormal): a
    reduction over the (…, N, N) factor instead of down the (…, M, N) columns, which
    took half as long as the QR at (64, 40, 12)."""
    sw = None if w is None else w.sqrt().unsqueeze(-1)
    At = A if sw is None else sw * A
    n = A.shape[-1]
    size = At.abs().amax(-1) if n else None
    # (The lightest row of nonzero size: a zero weight or a zero row adds nothing, but as
    # "light" it made any element graded, which switched its accuracy warning off: 39 %
    # off at κ ~ 1e14 without a SolverWarning.)
    light, heavy = (None, None) if size is None or not size.shape[-1] else (
        size.masked_fill(size == 0, math.inf).amin(-1), size.amax(-1))
    root = None if ridge is None else ridge.sqrt().expand(*ridge.shape[:-1], n)
    if root is not None:
        heavy = None if heavy is None else torch.maximum(heavy, root.amax(-1))
        block = torch.diag_embed(root)
        shape = torch.broadcast_shapes(At.shape[:-2], block.shape[:-2])
        At = torch.cat([At.expand(*shape, *At.shape[-2:]), block.expand(*shape, n, n)], -2)
    # Sorted only where some row is more than _HEAVIER times a data row (a sort cost 20 %
    # of a call at (64, 40, 12); data rows of one scale and a smaller ridge below them,
    # the common case, need none). One host sync.
    order = None
    graded = None if heavy is None else heavy > _HEAVIER * light
    if graded is not None and bool(graded.any()):
        if root is not None:
            size = torch.cat([size.expand(*heavy.shape, size.shape[-1]), root.expand(*heavy.shape, n)], -1)
        order = size.argsort(dim=-1, descending=True, stable=True)
        order = order.expand(*At.shape[:-1])
        At = At.gather(-2, order.unsqueeze(-1).expand(At.shape))
    a, tau = torch.geqrf(At)
    R = a[..., :n, :].triu()
    columns = scaled_norm(R, dim=-2)
    # (Sorted elements' error is judged row by row, :func:`rowwise_error`: it needs the
    # size of each row of the design with unit columns, in the factor's order. Each entry
    # is at most its column's norm: no overflow.)
    unit = torch.where(columns > 0, columns, 1.0).unsqueeze(-2)
    rows = None if order is None else (At / unit).square().sum(-1).sqrt()
    return a, tau, R, sw, columns, order, graded, rows


def power_of_two_scale(R: torch.Tensor) -> torch.Tensor:
    """A power of two near R's largest entry, (…, 1, 1) (1 for a zero factor): H = RᵀR
    and v = H⁻¹g hold squares of the problem's scale, which left the float64 range for
    entries beyond ~1e154 or below ~1e-154 where the gradients themselves do not; the
    backward and jvp solve with R/c instead. A power of two keeps that exact."""
    if not R.shape[-1]:
        return R.new_ones(*R.shape[:-2], 1, 1)
    top = R.abs().amax((-2, -1), keepdim=True)
    return torch.ldexp(torch.ones_like(top), torch.frexp(top).exponent)


def h_solve(R: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """H⁻¹ rhs with H = RᵀR, the forward's factor: two triangular solves (the jvp's)."""
    return torch.linalg.solve_triangular(R, torch.linalg.solve_triangular(R.mT, rhs, upper=False), upper=True)


def _broadcast(a: torch.Tensor, tau: torch.Tensor, rhs: torch.Tensor, order: torch.Tensor | None):
    """The factor's reflectors (and row order) expanded to the batch shared with rhs
    (torch.ormqr does not broadcast)."""
    if a.shape[:-2] != rhs.shape[:-2]:
        shape = torch.broadcast_shapes(a.shape[:-2], rhs.shape[:-2])
        a, tau = a.expand(*shape, *a.shape[-2:]), tau.expand(*shape, tau.shape[-1])
        rhs = rhs.expand(*shape, *rhs.shape[-2:])
        order = None if order is None else order.expand(*shape, a.shape[-2])
    return a, tau, rhs, order


def apply_qt(a: torch.Tensor, tau: torch.Tensor, rhs: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Qᵀ [rhs; 0] (rhs (…, M, K) in the rows' given order; zero rows for the ridge rows
    of the factor), all rows, in the factor's row order, over the batches of the factor
    and of rhs."""
    rows = a.shape[-2]
    if rows > rhs.shape[-2]:
        rhs = torch.cat([rhs, rhs.new_zeros(*rhs.shape[:-2], rows - rhs.shape[-2], rhs.shape[-1])], -2)
    a, tau, rhs, order = _broadcast(a, tau, rhs, order)
    if order is not None:
        rhs = rhs.gather(-2, order.unsqueeze(-1).expand(rhs.shape))
    return torch.ormqr(a, tau, rhs, left=True, transpose=True)


def apply_q(a: torch.Tensor, tau: torch.Tensor, y: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Q y (y (…, rows, K) in the factor's row order), its rows put back in the given
    order: the inverse of :func:`apply_qt`."""
    a, tau, y, order = _broadcast(a, tau, y, order)
    out = torch.ormqr(a, tau, y, left=True, transpose=False)
    return out if order is None else torch.empty_like(out).scatter_(-2, order.unsqueeze(-1).expand(out.shape), out)


def weighted_terms(q: list[torch.Tensor], yc: torch.Tensor | None, n: int, m: int):
    """``(Q [yc; 0], r_w)`` on the M data rows in their given order: ``r_w = Q [0; (Qᵀ
    W^{1/2} b) below row n]``, the weighted residual ``W^{1/2}(b − A x)`` accurate to
    eps relative to each row's own size (``None`` for the first where ``yc`` is None).
    ``q``: the forward's reflectors, tau, Qᵀ W^{1/2} b and row order (if sorted)."""
    a, tau, qtb, *order = q
    rows, k = a.shape[-2], qtb.shape[-1]
    below = torch.cat([torch.zeros_like(qtb[..., :n, :]), qtb[..., n:, :]], -2)
    if yc is not None:
        batch = torch.broadcast_shapes(yc.shape[:-2], qtb.shape[:-2])
        top = torch.cat([yc.expand(*batch, n, k), yc.new_zeros(*batch, rows - n, k)], -2)
        below = torch.cat([top, below.expand(*batch, rows, k)], -1)
    # (narrow, not [..., :m, :]: that full slice is an alias, which autograd's own vmap of
    # the cotangents, is_grads_batched, cannot batch)
    out = apply_q(a, tau, below, order[0] if order else None).narrow(-2, 0, m)
    return (None, out) if yc is None else (out[..., :k], out[..., k:])


def conditioning(d: torch.Tensor, columns: torch.Tensor, R: torch.Tensor, qtb: torch.Tensor,
                 graded: torch.Tensor | None, sorted_: tuple | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per batch element: whether H = RᵀR is singular to working precision (over the
    factor's batch), an estimate of x's relative rounding error (over qtb's), and of
    1/σ_min(R)² (for :func:`backward_gain`); False and 0 for a factor with Inf or NaN (its
    inputs were non-finite or overflowed, which the caller reports as such) and for N = 0.

    Singular: judged on the factor of the matrix with unit columns, R diag(1/‖column‖)
    (the same Q): a unit intercept column beside features of 1e15 was called rank
    deficient, the condition of the problem with its columns rescaled being ~1. ``d``:
    the factor's diagonal, absolute. An unpivoted factor's diagonal can stay far from 0
    for a singular matrix (Kahan's: σ_min/σ_max = 5e-20 at N = 60, smallest diagonal
    ratio 2.3e-12): one step of inverse iteration on Rsᵀ Rs from a generic vector bounds
    σ_min from above, ‖v‖ / ‖(Rsᵀ Rs)⁻¹ v‖ ≥ σ_min², at two triangular solves.

    The error: least squares is sensitive to rounding as eps·κ(1 + κ tan θ) (Higham,
    *Accuracy and Stability*, §20.1), θ the angle between the weighted b and the range
    (tan θ = ‖r_w‖/‖R x‖, the two parts of ``qtb`` = Qᵀ W^{1/2} b), relative to the
    scale ‖x‖ + ‖r‖/σ_max: eps·κ(a + κ c)/(a + c) with a = ‖R x‖, c = ‖r_w‖ (κ² for b
    orthogonal to the range, 0 for b = 0). A design with two equal columns and a ridge
    of 1e-28 passed the singularity test (κ(R) 3e14) with x off by 1e11 relative.
    For ``graded`` elements (rows of very different sizes, sorted; ``sorted_``: the
    factor's reflectors, tau, row norms and x) the smaller of this and
    :func:`rowwise_error`: QR with sorted rows is also stable row by row (Cox & Higham
    1998), as far as the factor is one column pivoting could have made
    (:func:`pivot_growth`), where the normwise κ overstates the error (a weight of 1e20 on
    one row: κ ~1e10, x exact). Their estimate was 0 before, which hid nearly dependent
    columns (one row 1e-4 times the rest beside columns parallel to 1e-13: x 1e-3 off,
    silently). Their rank is judged row by row as well: singular only where the row-wise
    counterpart of κ, growth·‖A_s⁺ D‖, also exceeds 1/tol."""
    scale = torch.where(columns > 0, columns, 1.0)
    d = torch.where(columns > 0, d / scale, 0.0)
    n = d.shape[-1]
    if not n:
        return (torch.zeros(d.shape[:-1], dtype=torch.bool, device=d.device), qtb.new_zeros(qtb.shape[:-2]),
                d.new_zeros(d.shape[:-1]))
    eps = torch.finfo(R.dtype).eps
    tol = max(R.shape[-2], R.shape[-1], 1) * eps
    top = d.amax(-1, keepdim=True)
    small = (d <= tol * top).any(-1) | (top.squeeze(-1) == 0)
    Rs = R[..., :n, :] / scale.unsqueeze(-2)
    v = generic_vector(n, R.dtype, R.device).expand(*Rs.shape[:-2], n).unsqueeze(-1)
    y = torch.linalg.solve_triangular(Rs.mT, v, upper=False)
    w = torch.linalg.solve_triangular(Rs, y, upper=True)
    gain = w.abs().amax((-2, -1)) / v.abs().amax((-2, -1))  # ≈ 1/σ_min(Rs)²
    tiny = ~(gain * (tol * top.squeeze(-1)) ** 2 < 1)  # (NaN, inf: an exact zero pivot)
    # κ(Rs) ≈ σ_max/σ_min with σ_max² ≤ N (unit columns); (a + κc)/(a + c) within a
    # factor 2 of 1 + (κ − 1) c/max(a, c). (Singular and non-finite elements raise before
    # the estimate is read: no selection for them here.)
    kappa = (gain * n).sqrt()
    if not qtb.shape[-1]:  # (no right-hand sides, K = 0: a zero one, nothing to estimate)
        qtb = qtb.new_zeros(*qtb.shape[:-1], 1)
    a = qtb[..., :n, :].abs().amax((-2, -1))
    c = qtb[..., n:, :].abs().amax((-2, -1)) if qtb.shape[-2] > n else torch.zeros_like(a)
    est = (c / torch.maximum(a, c).clamp_min_(torch.finfo(R.dtype).tiny)).mul_(kappa - 1).add_(1).mul_(kappa * eps)
    singular = small | tiny
    if sorted_ is not None:
        a_, tau, rows, x = sorted_
        # ‖B‖ = ‖A_s⁺ D‖ times what the unpivoted factor may have added to it: the row-wise
        # counterpart of κ. Rows of very different sizes grade R's diagonal (rows s, 1, 1/s
        # of a well-conditioned 3×3: 1, 1/s, 1/s² after column scaling) without the matrix
        # being singular row by row: s = 1e8 was refused as rank deficient, torch.linalg.solve
        # gets x to 1e-16. Singular for sorted elements is singular both ways.
        norm_b = rowwise_norm(a_, tau, rows, Rs, y, v)
        growth = pivot_growth(a_, rows, Rs)
        singular = torch.where(graded, singular & ~(norm_b * growth * tol < 1), singular)
        rowwise = rowwise_error(a_, tau, rows, norm_b, growth, gain, qtb, x * scale.unsqueeze(-1))
        est = torch.where(graded, torch.minimum(est, rowwise), est)
    # 1/σ_min(R)² ≤ 1/(σ_min(Rs)² min ‖column‖²), R = Rs diag(‖column‖) (a zero column: inf,
    # a singular element, which raises).
    return singular & torch.isfinite(top.squeeze(-1)), est, gain / columns.amin(-1) ** 2


def pivot_growth(a: torch.Tensor, rows: torch.Tensor, Rs: torch.Tensor) -> torch.Tensor:
    """The row-wise growth of the unpivoted factor, (…): max(1, max_i Σ_k 2 |v_ik|/‖v_k‖
    · max_{j>k} ‖Rs[k:, j]‖ / D_i), v_k the k-th reflector (``a`` below its diagonal,
    v_kk = 1), D = ``rows`` the rows' norms (unit columns), both in the factor's order.
    Cox & Higham's row-wise stability needs column pivoting as well as sorted rows
    (geqrf has none): step k changes row i of a later column j by τ v_ik v_kᵀa_j, at most
    2 |v_ik|/‖v_k‖ times the norm a_j has left (‖Rs[k:, j]‖, Q orthonormal), and rounds
    that change, so row i's backward error grows by this sum over its own size (pivoting
    and sorting keep it modest). Columns equal to 2e-13 and weights from 3.8e-6 to 1.5e11
    (diagonal −8e5, −7e-7, 9e4, a pivot far below a later column's remaining norm): x
    1.6e-5 off while the row-wise bound without it said 2.8e-14. (The cruder bound
    Π_k max(1, max_{j>k} ‖Rs[k:, j]‖/|Rs[k, k]|), from R alone, flagged twice as many
    accurate results and refused five times as many designs in a random graded sweep.)"""
    m, n = a.shape[-2], a.shape[-1]
    if n < 2:
        return rows.new_ones(rows.shape[:-1])
    # (Squares of entries ≤ 1, unit columns: they underflow only far below eps.)
    left = Rs.square().flip(-2).cumsum(-2).flip(-2).triu(1).amax(-1).sqrt()
    v = a.tril(-1) + torch.eye(m, n, dtype=a.dtype, device=a.device)
    step = (v.abs() / torch.linalg.vector_norm(v, dim=-2, keepdim=True)) @ (2 * left).unsqueeze(-1)
    # (Zero rows, a zero weight or ridge entry: no reflector touches them.)
    per_row = torch.where(rows > 0, step.squeeze(-1) / rows, 0.0)
    return per_row.amax(-1).nan_to_num(nan=math.inf).clamp_min(1)


def rowwise_norm(a: torch.Tensor, tau: torch.Tensor, rows: torch.Tensor, Rs: torch.Tensor, y: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
    """‖B‖ = ‖A_s⁺ D‖ (see :func:`rowwise_error`) over the factor's batch, by one power
    step: ‖B Bᵀ v‖/‖v‖ from the generic ``v`` (``y`` = R_s⁻ᵀ v), B Bᵀ v = R_s⁻¹ Q₁ᵀ D² Q₁
    R_s⁻ᵀ v, at an ormqr each way. Inf or NaN for an exactly singular factor."""
    n, m = Rs.shape[-1], a.shape[-2]
    u = apply_q(a, tau, torch.cat([y, y.new_zeros(*y.shape[:-2], m - n, 1)], -2), None)
    z = apply_qt(a, tau, u * rows.square().unsqueeze(-1), None)[..., :n, :]
    power = torch.linalg.solve_triangular(Rs, z, upper=True).abs().amax((-2, -1)) / v.abs().amax((-2, -1))
    return power.sqrt()


def rowwise_error(a: torch.Tensor, tau: torch.Tensor, rows: torch.Tensor, norm_b: torch.Tensor,
                  growth: torch.Tensor, gain: torch.Tensor, qtb: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """x's estimated relative error where the rows were sorted, from a backward error
    bounded row by row: A_s + D E, ‖E‖ ≤ eps √M g, A_s the weighted, regularised design
    with unit columns (M rows), D = diag(``rows``) its row norms, in the factor's order,
    g the :func:`pivot_growth` (Cox & Higham 1998). To first order x_s = diag(‖column‖) x
    moves by −B E x_s + (A_sᵀA_s)⁻¹ Eᵀ D r_w, B = A_s⁺ D = R_s⁻¹ Q₁ᵀ D: the error is at
    most eps √M g (‖B‖ + ‖(A_sᵀA_s)⁻¹‖ ‖D r_w‖/‖x_s‖). ``norm_b``: ‖B‖
    (:func:`rowwise_norm`), ``growth``: g; ‖(A_sᵀA_s)⁻¹‖ is :func:`conditioning`'s
    ``gain``; r_w through Q, over the batch shared with b. With rows of one size this is
    the normwise estimate;
    where only the row scales are graded and the columns well determined row by row (a
    weight of 1e20 on one row: κ(R_s) ~1e10), ‖B‖ stays ~1, while nearly dependent
    columns still make it large (rows all nearly parallel, one 1.6e7 times the rest: x
    2.6 % off)."""
    n, m = a.shape[-1], a.shape[-2]
    eps = torch.finfo(a.dtype).eps
    below = torch.cat([torch.zeros_like(qtb[..., :n, :]), qtb[..., n:, :]], -2)
    drw = (apply_q(a, tau, below, None) * rows.unsqueeze(-1)).abs().amax((-2, -1))
    xmax = xs.abs().amax((-2, -1)) if xs.shape[-1] else torch.zeros_like(drw)
    # (x = 0 with r_w ≠ 0, b orthogonal to the range: no relative error to bound, inf;
    # b = 0: none at all.)
    tail = torch.where(drw > 0, gain * drw / xmax, 0.0)
    return (norm_b + tail) * growth * (math.sqrt(m) * eps)


def backward_gain(d: torch.Tensor, x: torch.Tensor, bt: torch.Tensor, columns: torch.Tensor,
                  inv_sigma2: torch.Tensor) -> torch.Tensor:
    """A 0-d estimate of the largest gradient the backward can return per unit of
    incoming gradient: with v = H⁻¹g, ‖v‖ ≤ ‖g‖/σ², 1/σ² estimated by the larger of
    1/min R_ii² and ``inv_sigma2`` (:func:`conditioning`'s inverse iteration: min R_ii²
    overstated σ² by 2e8 for a Kahan-type design, whose float32 gradients then came
    back Inf without a warning), and the
    gradients r vᵀ − A v xᵀ, A v, (A v)·r, v·x bounded by (‖b‖ + ‖A‖(1 + ‖x‖) + ‖x‖)‖v‖
    (‖r‖ ≤ ‖b‖ at the minimiser; infinity norms of the columns and entries). ``d``: the
    factor's diagonal, absolute."""
    if not d.numel() or not x.numel():
        return d.new_zeros(())
    d = d.amin(-1)
    xs = x.abs().amax((-2, -1))
    # (No rows, M = 0 with a ridge: b contributes nothing; amax of an empty b raised.)
    bmax = bt.abs().amax((-2, -1)) if bt.numel() else bt.new_zeros(bt.shape[:-2])
    top = bmax * math.sqrt(bt.shape[-2]) + columns.amax(-1) * (1 + xs) + xs
    # (top / d / d: d·d overflowed, or underflowed to 0, where the gain itself does not.)
    return torch.maximum(top / d / d, top * inv_sigma2).amax()


def raise_rank(bad: torch.Tensor) -> None:
    idx = torch.nonzero(bad)
    shown = [tuple(int(i) for i in row) for row in idx[:_MAX_INDICES_SHOWN].tolist()]
    more = ", ..." if idx.shape[0] > _MAX_INDICES_SHOWN else ""
    raise SolverError(
        f"least_squares: the weighted, regularised design matrix is rank deficient "
        f"(AᵀWA + diag(ridge) is singular to float64 precision) for {idx.shape[0]} of "
        f"{bad.numel()} batch element(s) (indices into the batch of A, weights and "
        f"ridge: {shown}{more}); the minimiser is not unique — pass ridge > 0 (or a larger one)",
        indices=[tuple(int(i) for i in row) for row in idx.tolist()],
        statuses=["rank deficient"] * idx.shape[0],
    )


def check_solution(named: list[tuple[str, torch.Tensor]], x: torch.Tensor, bad_rank: torch.Tensor,
                  error: torch.Tensor, gain: torch.Tensor) -> float:
    """Input and result checks of :func:`convexddn.nodes.least_squares.least_squares` with
    one host sync, after the solve; returns the gain (read in the same sync).

    NaN or Inf in any input reaches x (QR propagates it), so a non-finite x sends each
    input through :func:`check_finite`, which names the culprit; negative weights or
    ridge raise InputError; a rank-deficient element raises SolverError; an estimated
    relative error of x above ``WARN_ERROR`` warns (SolverWarning), naming the elements.
    """
    signed = [(name, t) for name, t in named if name in ("weights", "ridge") and t.numel() > 0]
    # In float64: a sum of x could overflow where no entry does (float16 [700]·300), and a
    # float64 weight of -1e-300 cast to float32 would pass the sign test as -0.0.
    stats = [(~torch.isfinite(x)).any(), bad_rank.any(), gain, error.amax() if error.numel() else gain * 0] + [
        t.detach().amin() for _, t in signed]
    broken, rank, gain_value, worst, *lows = torch.stack([v.to(torch.float64) for v in stats]).tolist()
    if broken:
        for name, t in named:
            check_finite(name, t)
    for (name, _), low in zip(signed, lows):
        if low < 0:
            raise InputError(f"{name} must be >= 0 everywhere, got a minimum of {low:g}")
    # An exactly singular H (a zero column, all weights zero) makes x non-finite too:
    # the rank test comes first, so that it is reported as what it is.
    if rank:
        raise_rank(bad_rank)
    if broken:
        idx = [tuple(int(i) for i in row) for row in torch.nonzero((~torch.isfinite(x)).any(-1).any(-1)).tolist()]
        raise SolverError(f"least_squares: the solution overflowed (finite inputs of extreme magnitude) for "
                          f"{len(idx)} batch element(s) (indices {idx[:_MAX_INDICES_SHOWN]})",
                          indices=idx, statuses=["overflow"] * len(idx))
    if worst > WARN_ERROR:
        warn(f"least_squares: x may be inaccurate for {shown_indices(error > WARN_ERROR, error.shape)}: "
             f"estimated relative error up to {worst:.1e} in float64, the problem's own sensitivity to "
             "rounding (eps·κ(1 + κ tan θ), κ the column-scaled design's condition number, θ the angle "
             "of b to its range; for rows over 1024× apart in size, at most its row-by-row counterpart); "
             "pass ridge > 0, or rescale or drop nearly dependent columns",
             SolverWarning)
    return gain_value
