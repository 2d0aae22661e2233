r"""The batched tridiagonal solver behind :func:`convexddn.nodes.tridiagonal.tridiagonal_solve`.

Systems :math:`A x = d` with :math:`A` tridiagonal (main diagonal ``b`` ``(M, N)``, sub-diagonal
``a`` ``(M, N-1)`` holding :math:`A_{i+1,i}`, super-diagonal ``c`` ``(M, N-1)`` holding
:math:`A_{i,i+1}`) and ``d`` ``(M, N, K)``, all ``M`` elements in one tensor.

1. **Fast path: parallel cyclic reduction** (Hockney & Jesshope). Step ``h = 1, 2, 4, …``
   eliminates, in every equation at once, the unknowns :math:`x_{i\pm h}` with equations
   :math:`i \pm h`, leaving an equation in :math:`x_{i-2h}, x_i, x_{i+2h}`; after
   :math:`\lceil\log_2 N\rceil` steps each equation holds :math:`x_i` alone. O(N log N) work
   in O(log N) vectorised steps. The Thomas algorithm (elimination, a loop over the N rows, O(N)
   work but N steps) is faster on the CPU where the batch outweighs N (:func:`solve_fast`).
   Without pivoting both are stable for diagonally dominant and symmetric positive definite
   matrices only, so every element's answer is **checked**:
2. the componentwise backward error (Oettli–Prager)
   :math:`\omega = \max_{i,k} |d - A x|_{ik} / (|A||x| + |d|)_{ik}`, an O(N) pass; and a
   pivot test: the pivots (cyclic reduction's reduced diagonal, :math:`1/(A^{-1})_{ii}`;
   Thomas's LU pivots), one at most :math:`N\varepsilon\|A\|` says that :math:`A` is
   (numerically) singular or the elimination was unstable. Elements with
   :math:`\omega > 16\varepsilon` get one step of iterative refinement (one more unpivoted
   solve on their residuals) and are checked again;
3. the elements that still fail (a zero pivot, a non-dominant matrix that grew) are solved
   again, alone, by **Gaussian elimination with partial pivoting** on the band, the algorithm
   of LAPACK's ``gtsv`` (row interchanges fill one more super-diagonal), a loop over the N
   rows vectorised over those elements; it is backward stable for every nonsingular
   tridiagonal matrix. A pivot of that factorisation at most :math:`N\varepsilon\|A\|`
   (:math:`\|A\|` the element's largest row sum) means :math:`A` is singular to working
   precision: :class:`~convexddn.errors.SolverError` naming the batch elements.
"""
from __future__ import annotations

import torch

from ..errors import SolverError
from .degeneracy import shown_indices

__all__ = ["solve_checked"]

_THOMAS_RATIO, _THOMAS_WORK = 16, 1 << 16  # where Thomas's loop over the rows pays (solve_fast)
_ACCEPT = 16.0  # ω accepted up to this many ulps (dominant systems: ≤ 7 measured, N up to 10⁵)


def reduce_cyclic(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel cyclic reduction (module docstring, step 1): ``(x, pivots)`` with ``x``
    ``(M, N, K)`` and ``pivots`` ``(M, N)``, the reduced diagonal (``1/(A⁻¹)_ii``)."""
    n = b.shape[-1]
    diag, rhs = b, d
    # At step h, low[:, j] is minus the coefficient of x_{i-h} in equation i = j + h (i >= h: the
    # others have none) and up[:, i] minus that of x_{i+h} in equation i < n - h. (Kept negated:
    # the multipliers are then plain quotients, and each update one fused addcmul_, 10 passes a
    # step instead of 16: (64, 1024) float64 3.7 -> 2.4 ms.)
    low, up = -a, -c
    fused = not torch._C._are_functorch_transforms_active()
    h = 1
    while h < n:
        alpha = low / diag[:, :-h]  # eliminates x_{i-h} (i >= h) with equation i-h
        beta = up / diag[:, h:]  # eliminates x_{i+h} (i < n-h) with equation i+h
        diag, new = diag.clone(), rhs.clone()
        if fused:
            diag[:, h:].addcmul_(alpha, up, value=-1.0)
            diag[:, :-h].addcmul_(beta, low, value=-1.0)
            new[:, h:].addcmul_(alpha.unsqueeze(-1), rhs[:, :-h])
            new[:, :-h].addcmul_(beta.unsqueeze(-1), rhs[:, h:])
        else:  # (torch.func's batched tensors: addcmul_ has no batching rule, a loop and a warning)
            diag[:, h:] -= alpha * up
            diag[:, :-h] -= beta * low
            new[:, h:] += alpha.unsqueeze(-1) * rhs[:, :-h]
            new[:, :-h] += beta.unsqueeze(-1) * rhs[:, h:]
        rhs = new
        # The new neighbours are 2h away: equation i-h's own x_{i-2h} term, equation i+h's x_{i+2h}.
        low, up = alpha[:, h:] * low[:, :-h], beta[:, :-h] * up[:, h:]
        h *= 2
    return rhs / diag.unsqueeze(-1), diag


def eliminate(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Thomas algorithm (Gaussian elimination without pivoting), a loop over the N rows
    vectorised over the elements: ``(x, pivots)``, pivots ``(M, N)``."""
    n = b.shape[1]
    bt, at, ct, dt = b.T, a.T, c.T, d.transpose(0, 1)
    piv, ratio, y = [bt[0]], [], [dt[0] / bt[0].unsqueeze(-1)]
    for i in range(1, n):
        ratio.append(ct[i - 1] / piv[-1])  # U's super-diagonal over its pivot
        piv.append(bt[i] - at[i - 1] * ratio[-1])
        y.append((dt[i] - at[i - 1].unsqueeze(-1) * y[-1]) / piv[-1].unsqueeze(-1))
    x = [y[-1]]
    for i in range(n - 2, -1, -1):
        x.append(y[i] - ratio[i].unsqueeze(-1) * x[-1])
    return torch.stack(x[::-1], 1), torch.stack(piv, 1)


def solve_fast(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpivoted ``(x, pivots)``: on the CPU, Thomas where the batch M is at least 16 N and M N at
    least 2¹⁶ (its N steps then each carry enough work), cyclic reduction otherwise; on an
    accelerator, cyclic reduction (Thomas is N dependent kernel launches). Measured on the CPU,
    one thread, float64, medians, Thomas against cyclic reduction: (4096, 16) 0.98 against 0.99 ms,
    (16384, 16) 4.1 against 4.9, (4096, 64) 8.1 against 6.8, (4096, 256) 37 against 73, (1024, 64)
    2.2 against 1.3, (256, 16) 0.36 against 0.20, (64, 1024) 25 against 2.2, (1, 10⁵) 2.8 s against
    6 ms (the rule is near the crossover on both sides of it: within 20 % there)."""
    m, n = b.shape
    if b.device.type == "cpu" and m >= _THOMAS_RATIO * n and m * n >= _THOMAS_WORK:
        return eliminate(b, a, c, d)
    return reduce_cyclic(b, a, c, d)


def multiply(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, x: torch.Tensor, absolute: bool = False
             ) -> torch.Tensor:
    """``A x`` (``(M, N, K)``), or ``|A| |x|`` with ``absolute``."""
    if absolute:
        b, a, c, x = b.abs(), a.abs(), c.abs(), x.abs()
    out = b.unsqueeze(-1) * x
    if b.shape[-1] > 1:
        out[:, 1:] += a.unsqueeze(-1) * x[:, :-1]
        out[:, :-1] += c.unsqueeze(-1) * x[:, 1:]
    return out


def accepted(b, a, c, d, x) -> torch.Tensor:
    """``(M,)`` whether each element's componentwise backward error ω (module docstring, step 2)
    is at most :data:`_ACCEPT` eps; False where ``x`` is not finite. As the sign of
    :math:`\\max_{ik} (|d - Ax| - 16\\varepsilon (|A||x| + |d|))_{ik}` rather than ω itself: no
    division, and a non-finite ``x`` makes the maximum NaN (one third of the passes of forming
    ω, which cost 60 % of the unpivoted solve at (64, 1024))."""
    t0, ax, cx = b.unsqueeze(-1) * x, a.unsqueeze(-1) * x[:, :-1], c.unsqueeze(-1) * x[:, 1:]
    r, scale = d - t0, t0.abs_().add_(d.abs())
    if b.shape[-1] > 1:
        r[:, 1:] -= ax
        r[:, :-1] -= cx
        scale[:, 1:] += ax.abs_()
        scale[:, :-1] += cx.abs_()
    excess = torch.add(r.abs_(), scale, alpha=-_ACCEPT * torch.finfo(b.dtype).eps)
    worst = excess.flatten(1).amax(1) if r.shape[1] * r.shape[2] else r.new_zeros(r.shape[0])
    return worst <= 0  # (NaN: False)


def row_norm(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``‖A‖_∞`` per element ``(M,)``: its largest absolute row sum."""
    s = b.abs().clone()
    s[:, 1:] += a.abs()
    s[:, :-1] += c.abs()
    return s.amax(1)


def solve_pivoted(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian elimination with partial pivoting on the band (LAPACK ``gtsv``'s algorithm),
    vectorised over the ``M`` elements, a loop over the rows: ``(x, smallest |pivot|)``."""
    m, n = b.shape
    # Row-major over the rows (one contiguous (M,) slice per row); u2 is the fill-in
    # super-diagonal that a row interchange creates.
    u0, lo, u1 = b.T.clone(), a.T.clone(), c.T.clone()
    u2 = torch.zeros((max(n - 2, 0), m), dtype=b.dtype, device=b.device)
    rhs = d.transpose(0, 1).clone()  # (N, M, K)
    for i in range(n - 1):
        swap = u0[i].abs() < lo[i].abs()  # the sub-diagonal entry is the larger pivot
        piv = torch.where(swap, lo[i], u0[i])
        other = torch.where(swap, u0[i], lo[i])  # the entry eliminated below the pivot
        f = torch.where(piv == 0, torch.zeros_like(piv), other / piv)
        # The pivot row's entries in columns i+1, i+2 and its rhs, and the row left below it.
        top1 = torch.where(swap, u0[i + 1], u1[i])
        bot1 = torch.where(swap, u1[i], u0[i + 1])
        top_d = torch.where(swap.unsqueeze(-1), rhs[i + 1], rhs[i])
        bot_d = torch.where(swap.unsqueeze(-1), rhs[i], rhs[i + 1])
        u0[i], u1[i], rhs[i] = piv, top1, top_d
        u0[i + 1] = bot1 - f * top1
        rhs[i + 1] = bot_d - f.unsqueeze(-1) * top_d
        if i < n - 2:
            top2 = torch.where(swap, u1[i + 1], torch.zeros_like(piv))
            u2[i] = top2
            u1[i + 1] = torch.where(swap, -f * top2, u1[i + 1])
    x = torch.empty_like(rhs)
    x[n - 1] = rhs[n - 1] / u0[n - 1].unsqueeze(-1)
    for i in range(n - 2, -1, -1):
        acc = rhs[i] - u1[i].unsqueeze(-1) * x[i + 1]
        if i < n - 2:
            acc = acc - u2[i].unsqueeze(-1) * x[i + 2]
        x[i] = acc / u0[i].unsqueeze(-1)
    return x.transpose(0, 1), u0.abs().amin(0)


def _refine(b, a, c, d, x):
    """One step of iterative refinement: ``x + A⁻¹(d - A x)``, unpivoted."""
    dx, _ = solve_fast(b, a, c, d - multiply(b, a, c, x))
    return x + dx


def _raise(who: str, bad: torch.Tensor, batch: tuple, what: str, status: str) -> None:
    """A SolverError for the elements where ``bad`` (``(M,)``) holds, with their indices into ``batch``."""
    rows = bad.nonzero().squeeze(1).tolist()
    indices = [tuple(int(v) for v in torch.unravel_index(torch.tensor(r), batch)) for r in rows] if batch \
        else [()] * len(rows)
    raise SolverError(f"{who}: {what} in {shown_indices(bad)}", indices=indices, statuses=[status] * len(rows))


def solve_checked(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor, who: str, batch: tuple,
                  route: torch.Tensor | None = None, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A⁻¹ d, pivoted)`` for every element, checked and repaired (module docstring): ``pivoted``
    ``(M,)`` says which elements needed partial pivoting. ``route``: elements to solve pivoted
    from the start (the forward's, for the backward's and jvp's solves with the same matrices);
    ``check=False`` (under torch.func transforms, whose batched values allow no host decision):
    the fast path for the others, unchecked. ``batch``: the caller's batch shape (for the
    indices of :class:`SolverError`), ``who``: the node's name.

    Raises:
        SolverError: ``A`` is singular to working precision, or the solution overflows, for some
            elements (named)."""
    m, n = b.shape
    routed = torch.zeros(m, dtype=torch.bool, device=b.device) if route is None else route
    if m == 0:
        return torch.empty_like(d), routed
    x, piv = solve_fast(b, a, c, d)
    eps = torch.finfo(b.dtype).eps
    if not check:
        if bool(routed.any()):  # (route is the forward's plain mask: a host read on it is allowed)
            idx = routed.nonzero().squeeze(1)
            x = x.index_copy(0, idx, solve_pivoted(b[idx], a[idx], c[idx], d[idx])[0])
        return x, routed
    norm = row_norm(b, a, c)
    small = n * eps * norm
    ok = accepted(b, a, c, d, x)
    # A NaN pivot (0/0) fails too: the comparisons are written to be False for NaN.
    fail = ~(piv.abs() > small.unsqueeze(1)).all(1) | (norm == 0) | routed
    refine = ~ok & ~fail
    # (one host read where all pass: without a refinement, ~ok implies fail)
    any_refine, any_fail = torch.stack([refine.any(), fail.any()]).tolist()
    if not (any_refine or any_fail):
        return x, fail
    if any_refine:
        idx = refine.nonzero().squeeze(1)
        sub = (b[idx], a[idx], c[idx], d[idx])
        x_new = _refine(*sub, x[idx])
        x = x.index_copy(0, idx, x_new)
        ok = ok.index_copy(0, idx, accepted(*sub, x_new))
    fail = fail | ~ok
    if not bool(fail.any()):
        return x, fail
    idx = fail.nonzero().squeeze(1)
    x_p, pivot = solve_pivoted(b[idx], a[idx], c[idx], d[idx])
    singular = torch.zeros_like(fail).index_copy(0, idx, ~(pivot > small[idx]))
    overflow = torch.zeros_like(fail).index_copy(0, idx, ~torch.isfinite(x_p).flatten(1).all(1))
    if bool((singular | overflow).any()):
        if bool(singular.any()):
            _raise(who, singular, batch, f"the matrix is singular to working precision ({b.dtype}: a pivot of its "
                   "LU factorisation with partial pivoting at most N·eps·‖A‖∞), so the system has no unique "
                   "solution; check those elements' diagonals (or add a small multiple of the identity)", "singular")
        _raise(who, overflow, batch, f"the solution overflows {b.dtype} (finite inputs of extreme magnitude); "
               "rescale the system", "overflow")
    return x.index_copy(0, idx, x_p), fail
