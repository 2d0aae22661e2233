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
   :math:`\omega = \max_{i,k} |d - A x|_{ik} / (|A||x| + |d|)_{ik}`, an O(N) pass (invariant under
   the scaling of rows and of ``d``; trusted only where no diagonal entry and no nonzero column
   of ``d`` is near underflow, :func:`in_range`: else the element takes step 3). Elements
   with :math:`\omega > 16\varepsilon` get one step of iterative refinement (one more unpivoted
   solve on their residuals) and are checked again;
3. the elements that still fail are solved again, alone, **scaled and pivoted**: each row of
   the system divided by the power of two of its largest entry and each rhs column then by that
   of its largest entry (exact, so that no entry is subnormal or near overflow: a system of
   subnormal entries came back 1e-2 off), by Gaussian elimination with partial pivoting on the
   band, the algorithm of LAPACK's ``gtsv`` (row interchanges fill one more super-diagonal), a
   loop over the N rows vectorised over those elements; it is backward stable for every
   nonsingular tridiagonal matrix. Its answer is checked too, by its normwise backward error
   (at most :data:`_ACCEPT_PIVOTED` ε, else one refinement with the same pivoting).
   **Singularity** is decided there, locally and scale-free: a pivot that is 0, or at most
   :data:`_SINGULAR` ε times the larger of the two terms whose difference formed it (it is
   rounding error: :math:`A` is within that relative distance of a singular matrix), raises a
   :class:`~convexddn.errors.SolverError` naming the batch elements and the ratio found; so
   does an overflowing solution. (A threshold :math:`N\varepsilon\|A\|_\infty` refused a
   decoupled κ = 4e12 block at N = 10⁴ but not at 10³, a matrix of entries 1e308 whose row sum
   overflowed, and diag(1, 1e-20).) The derivatives' solves (``strict=False``) use the
   forward's route and make no singularity verdict of their own (:math:`A^\top` is singular
   with :math:`A`; its pivots differ): an answer that misses accuracy is a GradientWarning.
"""
from __future__ import annotations

import math

import torch

from .._warn import warn
from ..errors import GradientWarning, SolverError
from .degeneracy import shown_indices

__all__ = ["FAST", "PIVOTED", "PIVOTED_REFINED", "REFINED", "check_cast", "solve_checked"]

_THOMAS_RATIO, _THOMAS_WORK = 16, 1 << 16  # where Thomas's loop over the rows pays (solve_fast)
_ACCEPT = 16.0  # ω accepted up to this many ulps (dominant systems: ≤ 7 measured, N up to 10⁵)
_ACCEPT_PIVOTED = 64.0  # the pivoted answer's normwise backward error, in ulps
_SINGULAR = 4.0  # a pivot at most this many ulps of the terms that formed it is rounding error
FAST, REFINED, PIVOTED, PIVOTED_REFINED = 0, 1, 2, 3  # an element's route (solve_checked)


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


def multiply(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A x`` (``(M, N, K)``), out of place: under torch.func.jacfwd a tangent (``b``, ``a`` or
    ``c``) may be batched where ``x`` is not, and an in-place sum into the unbatched term failed."""
    out = b.unsqueeze(-1) * x
    if b.shape[-1] > 1:
        out = out + torch.nn.functional.pad(a.unsqueeze(-1) * x[:, :-1], (0, 0, 1, 0))
        out = out + torch.nn.functional.pad(c.unsqueeze(-1) * x[:, 1:], (0, 0, 0, 1))
    return out


def accepted(b, a, c, d, x) -> torch.Tensor:
    """``(M,)`` whether each element's componentwise backward error ω (module docstring, step 2)
    is at most :data:`_ACCEPT` eps; False where ``x`` is not finite. As the sign of
    :math:`\\max_{ik} (|d - Ax| - 16\\varepsilon (|A||x| + |d|))_{ik}` rather than ω itself: no
    division, and a non-finite ``x`` makes the maximum NaN (one third of the passes of forming
    ω, which cost 60 % of the unpivoted solve at (64, 1024)). A scale ``|A||x| + |d|`` that
    overflows makes that entry's excess -Inf, which the maximum would pass: the minimum (the same
    pass, ``aminmax``) refuses it."""
    t0, ax, cx = b.unsqueeze(-1) * x, a.unsqueeze(-1) * x[:, :-1], c.unsqueeze(-1) * x[:, 1:]
    r, scale = d - t0, t0.abs_().add_(d.abs())
    if b.shape[-1] > 1:
        r[:, 1:] -= ax
        r[:, :-1] -= cx
        scale[:, 1:] += ax.abs_()
        scale[:, :-1] += cx.abs_()
    if not r.shape[1] * r.shape[2]:
        return torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
    excess = torch.add(r.abs_(), scale, alpha=-_ACCEPT * torch.finfo(b.dtype).eps)
    low, worst = torch.aminmax(excess.flatten(1), dim=1)
    return (worst <= 0) & (low > -math.inf)  # (NaN: False)


def row_max(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``(M, N)``: each row's largest absolute entry (a maximum: no sum to overflow)."""
    s = b.abs()
    if b.shape[-1] > 1:
        s[:, 1:] = torch.maximum(s[:, 1:], a.abs())
        s[:, :-1] = torch.maximum(s[:, :-1], c.abs())
    return s


def in_range(b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(M,)`` whether :func:`accepted` can be trusted for each element: every diagonal entry
    (so every row's largest entry), and every nonzero rhs column's largest entry, at least
    :math:`2^{e_{min}}/\\varepsilon^{1.2}` (below that ``16ε(|A||x| + |d|)`` is subnormal or zero,
    and a residual rounded to zero passed answers 1e-2 off; a row whose diagonal is that small
    takes the pivoted path, which it needs in most cases; large entries need no bound: an
    overflow fails the check)."""
    info = torch.finfo(b.dtype)
    tiny = info.tiny / info.eps ** 1.2
    cols = d.abs().amax(1)  # (M, K)
    return (b.abs().amin(1) >= tiny) & ((cols >= tiny) | (cols == 0)).all(1)


def _pow2(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``t · 2^k`` for an integer tensor ``k`` broadcasting with ``t``, exact where the result is
    normal: in steps of at most :math:`2^{\\pm(e_{max}-2)}` (``2^k`` alone over- or underflows for
    the exponents of a subnormal system), a fixed number of them (no host read: torch.func)."""
    top = int(math.log2(torch.finfo(t.dtype).max)) - 1  # (1023 for float64, 126 for float32)
    for _ in range(5):  # |k| <= 5 top: twice the exponent range of the dtype, with room
        step = k.clamp(-top, top)
        t, k = torch.ldexp(t, step.to(t.dtype)), k - step
    return t


def solve_pivoted(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian elimination with partial pivoting on the band (LAPACK ``gtsv``'s algorithm),
    vectorised over the ``M`` elements, a loop over the rows: ``(x, ratio)``, ``ratio`` ``(M,)``
    the smallest over the pivots of :math:`|u_{ii}|` over the larger of the two terms whose
    difference formed it (1 for a pivot that is an entry of ``A``): the cancellation. A
    ratio at most a few ε says a pivot is rounding error (``A`` within that distance of a
    singular matrix, entrywise); 0, an exactly zero pivot."""
    m, n = b.shape
    # Row-major over the rows (one contiguous (M,) slice per row); u2 is the fill-in
    # super-diagonal that a row interchange creates.
    u0, lo, u1 = b.T.clone(), a.T.clone(), c.T.clone()
    u2 = torch.zeros((max(n - 2, 0), m), dtype=b.dtype, device=b.device)
    rhs = d.transpose(0, 1).clone()  # (N, M, K)
    # formed[i]: the cancellation ratio of u0[i] (1 for an entry of A); a NaN (0/0) is a zero pivot.
    formed, ratio = torch.ones_like(u0[0]), torch.ones_like(u0[0])
    for i in range(n - 1):
        swap = u0[i].abs() < lo[i].abs()  # the sub-diagonal entry is the larger pivot
        piv = torch.where(swap, lo[i], u0[i])
        ratio = torch.minimum(ratio, torch.where(swap, 1.0, torch.where(piv == 0, 0.0, formed)))
        other = torch.where(swap, u0[i], lo[i])  # the entry eliminated below the pivot
        f = torch.where(piv == 0, torch.zeros_like(piv), other / piv)
        # The pivot row's entries in columns i+1, i+2 and its rhs, and the row left below it.
        top1 = torch.where(swap, u0[i + 1], u1[i])
        bot1 = torch.where(swap, u1[i], u0[i + 1])
        top_d = torch.where(swap.unsqueeze(-1), rhs[i + 1], rhs[i])
        bot_d = torch.where(swap.unsqueeze(-1), rhs[i], rhs[i + 1])
        u0[i], u1[i], rhs[i] = piv, top1, top_d
        ft = f * top1
        u0[i + 1] = bot1 - ft
        # (a maximum, not a sum: entries near the dtype's largest do not overflow it)
        formed = torch.where(ft == 0, 1.0, u0[i + 1].abs() / torch.maximum(bot1.abs(), ft.abs()))
        rhs[i + 1] = bot_d - f.unsqueeze(-1) * top_d
        if i < n - 2:
            top2 = torch.where(swap, u1[i + 1], torch.zeros_like(piv))
            u2[i] = top2
            u1[i + 1] = torch.where(swap, -f * top2, u1[i + 1])
    ratio = torch.minimum(ratio, torch.where(u0[n - 1] == 0, 0.0, formed))
    x = torch.empty_like(rhs)
    x[n - 1] = rhs[n - 1] / u0[n - 1].unsqueeze(-1)
    for i in range(n - 2, -1, -1):
        acc = rhs[i] - u1[i].unsqueeze(-1) * x[i + 1]
        if i < n - 2:
            acc = acc - u2[i].unsqueeze(-1) * x[i + 2]
        x[i] = acc / u0[i].unsqueeze(-1)
    return x.transpose(0, 1), ratio


def _backward_error(b, a, c, d, x) -> torch.Tensor:
    """``(M,)`` the normwise backward error :math:`\\max_k \\|d - Ax\\|_\\infty / (\\|A\\|_\\infty
    \\|x\\|_\\infty + \\|d\\|_\\infty)` (columns k) of a row-equilibrated system (its rows' largest
    entries in [1/2, 1): every norm at most 3 times its largest entry, quartered against overflow);
    NaN where ``x`` is not finite."""
    r = (d - multiply(b, a, c, x)).abs().amax(1) / 4
    norm = row_max(b, a, c).amax(1, keepdim=True) * 0.75
    size = norm * (x.abs().amax(1) / 4) + d.abs().amax(1) / 4
    eta = torch.where(r == 0, 0.0, r / size)
    return eta.amax(1) if eta.shape[1] else eta.new_zeros(eta.shape[0])


def solve_scaled(b, a, c, d, refine: torch.Tensor | bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slow path (module docstring, step 3): ``(x, ratio, η)``. Each row scaled by the power of
    two of its largest entry (:math:`RAx = Rd`: the same ``x``) and each rhs column by that of its
    largest entry (:math:`x = 2^f y`), both exact; solved by :func:`solve_pivoted` (``ratio``
    its), where ``refine`` (``(M,)`` or a bool) one step of refinement with the same pivoting;
    ``η``: :func:`_backward_error` of the result."""
    e = torch.frexp(row_max(b, a, c))[1]  # (M, N): rows' largest entries in [2^(e-1), 2^e); 0 for a zero row
    bs, as_, cs = _pow2(b, -e), _pow2(a, -e[:, 1:]), _pow2(c, -e[:, :-1])
    ed = torch.frexp(d)[1] - e.unsqueeze(-1)  # exponents of R d's entries
    low = torch.iinfo(ed.dtype).min
    f = ed.masked_fill(d == 0, low).amax(1, keepdim=True)  # (M, 1, K)
    f = f.masked_fill(f == low, 0)  # (a zero column: y = 0)
    ds = _pow2(d, -e.unsqueeze(-1) - f)
    y, ratio = solve_pivoted(bs, as_, cs, ds)
    if not isinstance(refine, bool) or refine:
        y_new = y + solve_pivoted(bs, as_, cs, ds - multiply(bs, as_, cs, y))[0]
        y = y_new if isinstance(refine, bool) else torch.where(refine.view(-1, 1, 1), y_new, y)
    return _pow2(y, f), ratio, _backward_error(bs, as_, cs, ds, y)


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


def check_cast(who: str, x: torch.Tensor, out: torch.Tensor, batch: tuple) -> None:
    """The solution ``x`` (``(M, N, K)``, the work dtype) cast to the caller's ``out``: a
    SolverError where a finite entry became ±Inf (float16 and bfloat16, solved in float32), as
    for an overflow in the work dtype."""
    lost = (torch.isinf(out) & torch.isfinite(x)).flatten(1).any(1)
    if bool(lost.any()):
        _raise(who, lost, batch, f"the solution overflows {out.dtype} (largest {torch.finfo(out.dtype).max:.4g}; "
               f"up to {float(x.abs().amax()):.3g} in {x.dtype}); rescale the system or pass {x.dtype} inputs",
               "overflow")


def _problems(x: torch.Tensor, ratio: torch.Tensor, eta: torch.Tensor, strict: bool):
    """The slow path's verdicts per element ``(M,)``: (exactly singular, singular at rounding
    level, overflow, inaccurate). ``strict=False`` (the derivative's solves, whose matrix the
    forward accepted): no singularity verdict, only the answer's finiteness and backward error."""
    eps = torch.finfo(x.dtype).eps
    finite = torch.isfinite(x).flatten(1).all(1)
    exact = (ratio == 0) & strict
    rounding = (ratio <= _SINGULAR * eps) & ~exact & strict
    overflow = ~finite & ~exact & ~rounding
    inaccurate = ~(eta <= _ACCEPT_PIVOTED * eps) & finite & ~exact & ~rounding
    return exact, rounding, overflow, inaccurate


def _report(who, bad, batch, dtype, ratio, eta, strict):
    """Raise (``strict``: the forward) or warn (GradientWarning: a derivative) for the elements of
    :func:`_problems`."""
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
        warn(f"{what} overflows {dtype} in {shown_indices(overflow)} (Inf or NaN returned)", GradientWarning)
    if bool(inaccurate.any()):
        found = f"normwise backward error up to {float(eta[inaccurate].max()):.2g} (> {_ACCEPT_PIVOTED}·eps)"
        if strict:
            _raise(who, inaccurate, batch, f"the pivoted solve did not reach working accuracy ({found}); the "
                   "matrix is too ill-conditioned for " + str(dtype), "inaccurate")
        warn(f"{what} did not reach working accuracy in {shown_indices(inaccurate)} ({found}): the derivatives "
             "there are inaccurate", GradientWarning)


def solve_checked(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor, who: str, batch: tuple,
                  route: torch.Tensor | None = None, check: bool = True, strict: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A⁻¹ d, route)`` for every element, checked and repaired (module docstring). ``route``
    ``(M,)`` int8, each element's path: :data:`FAST`, :data:`REFINED` (one unpivoted refinement),
    :data:`PIVOTED` (scaled and pivoted), :data:`PIVOTED_REFINED`. As an argument (the forward's,
    for the derivative's solves with the same matrix or its transpose): elements routed
    pivoted start there, and ``check=False`` (the values batched by a vmap, which allow no host
    decision) reproduces the route exactly, unchecked. ``strict=False``: the derivative's solves
    (the forward decided singularity): a solution that overflows or misses working accuracy is a
    GradientWarning, not a SolverError. ``batch``: the caller's batch shape (for the indices of
    :class:`SolverError`), ``who``: the node's name.

    Raises:
        SolverError: (``strict``) ``A`` is singular to working precision, the solution overflows
            or the pivoted solve misses working accuracy, for some elements (named)."""
    m, n = b.shape
    route = torch.zeros(m, dtype=torch.int8, device=b.device) if route is None else route
    if m == 0:
        return torch.empty_like(d), route
    x, _ = solve_fast(b, a, c, d)
    if not check:
        # (route is the forward's plain tensor, not batched: host reads on it are allowed)
        refined, slow, twice = (route == REFINED), route >= PIVOTED, route == PIVOTED_REFINED
        if bool(refined.any()):
            idx = refined.nonzero().squeeze(1)
            x = x.index_copy(0, idx, _refine(b[idx], a[idx], c[idx], d[idx], x[idx]))
        if bool(slow.any()):
            idx = slow.nonzero().squeeze(1)
            x = x.index_copy(0, idx, solve_scaled(b[idx], a[idx], c[idx], d[idx], twice[idx])[0])
        return x, route
    ok = accepted(b, a, c, d, x)
    # (one host read where all pass: no refinement, nothing out of range, nothing routed)
    fail = (route >= PIVOTED) | ~in_range(b, d)
    refine = ~ok & ~fail
    any_refine, any_fail = torch.stack([refine.any(), fail.any()]).tolist()
    if not (any_refine or any_fail):
        return x, route
    if any_refine:
        idx = refine.nonzero().squeeze(1)
        sub = (b[idx], a[idx], c[idx], d[idx])
        x_new = _refine(*sub, x[idx])
        x = x.index_copy(0, idx, x_new)
        ok = ok.index_copy(0, idx, accepted(*sub, x_new))
    fail = fail | ~ok
    route = torch.where(fail, PIVOTED, torch.where(refine, REFINED, FAST)).to(torch.int8)
    if not bool(fail.any()):
        return x, route
    idx = fail.nonzero().squeeze(1)
    sub = (b[idx], a[idx], c[idx], d[idx])
    eps = torch.finfo(b.dtype).eps
    x_p, ratio, eta = solve_scaled(*sub)
    redo = ~(eta <= _ACCEPT_PIVOTED * eps) & torch.isfinite(eta)  # (once, with the same pivoting)
    if bool(redo.any()):
        x_p, _, eta = solve_scaled(*sub, refine=redo)
        route = route.index_copy(0, idx, torch.where(redo, PIVOTED_REFINED, PIVOTED).to(torch.int8))
    bad = [torch.zeros_like(fail).index_copy(0, idx, v) for v in _problems(x_p, ratio, eta, strict)]
    if bool(torch.stack(bad).any()):
        full = (torch.ones(m, dtype=ratio.dtype, device=b.device).index_copy(0, idx, ratio),
                torch.zeros(m, dtype=eta.dtype, device=b.device).index_copy(0, idx, eta))
        _report(who, bad, batch, b.dtype, *full, strict)
    return x.index_copy(0, idx, x_p), route
