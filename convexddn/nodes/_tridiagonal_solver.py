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
   :math:`\omega = \max_{i,k} |d - A x|_{ik} / (|A||x| + |d|)_{ik}`, an O(N) pass, invariant under
   exact (power-of-two) scalings of the rows and of the columns; an answer with ω ≤ 16ε is
   accepted (its componentwise forward error is then at most 16ε times Skeel's condition
   number, graded systems included). Evaluated plainly (:func:`accepted`) where every
   ``(|A||x| + |d|)_{ik}`` lies in :math:`[2^{e_{min}}/\varepsilon, \infty)`; elsewhere that
   evaluation under- or overflows (a subnormal system's residual rounded to zero passed answers
   1e-2 off), so ω is formed there in exponent-split form (:func:`._tridiagonal_scaled.omega`:
   exact scalings, no range limit) and a correct answer is kept (routing every system with a
   diagonal entry below 1.5e-289 to step 3 returned graded systems up to 6e7 off). Elements
   with ω > 16ε and a plain check get one step of iterative refinement (one more unpivoted
   solve on their residuals) and are checked again;
   2b. **wide** (16- and 32-bit inputs, solved in float32): the elements that still fail are
   solved again unpivoted, and refined once, in float64, the answer rounded to float32 and
   checked, ω of that rounded answer (evaluated in float64: products of two float32 numbers are
   exact there) at most 16ε of **float32**, as on the other routes: easy to meet for any system
   the unpivoted algorithm does not break down on (a float32 non-dominant random system at
   N = 20000 failed in float32 and went to step 3's loop over the rows, 2.2 to 3.5 s, where its
   float64 twin passed refined in 5 ms; now 15 to 45 ms, one thread, a shared machine).
   Accepted only where the equilibrated matrix's estimated condition number
   (:func:`._tridiagonal_scaled.condition`: Hager–Higham, three more float64 solves) is below
   1/ε, LAPACK ``gtsvx``'s rule for "singular to working precision": a nearer-singular matrix
   goes on to step 3 and its singularity verdict, as before (an underestimate can let a
   near-singular matrix through: its answer still meets the ω check, and is more accurate than
   step 3's would be);
3. the elements that still fail are solved again, alone, **equilibrated and pivoted**: rows,
   then columns, then rhs columns scaled by powers of two (exact; columns too: rows alone left
   a solution graded by 2^±500, whose small entries underflowed,
   :func:`._tridiagonal_scaled.solve_scaled`; where the rhs shift rounds entries of ``d``, solved
   again with :func:`._tridiagonal_scaled.equilibrate`'s lossless shift, route + :data:`LOSSLESS`,
   kept where it passes: a κ = 1 permutation system with rhs (1e-300, 1.7e308) failed its check
   with 1e-300 flushed, a SolverError blaming the conditioning), by Gaussian elimination with partial pivoting on
   the band, the algorithm of LAPACK's ``gtsv`` (row interchanges fill one more
   super-diagonal), a loop over the N rows vectorised over those elements; backward stable
   (normwise) for every nonsingular tridiagonal matrix. Its answer is checked too, by the same
   componentwise ω, split form (at most :data:`_ACCEPT_PIVOTED` ε, else up to two refinements
   with the same pivoting, which make it componentwise stable unless ``A`` is near singular:
   graded systems with a cond-300 core needing pivots came to 1e3 ulps after one, 1 ulp after
   two; a normwise check passed graded answers 1e9 off; then its entries within rounding of 0
   set to 0 where that passes, route + :data:`SNAPPED`: exact zeros the structure forces,
   :func:`._tridiagonal_scaled.snap_zeros`); one that still fails raises (a derivative: warns).
   **Singularity** is decided there, locally and scale-free: a pivot that is 0, or at most
   :data:`._tridiagonal_report._SINGULAR` ε times the larger of the two terms whose difference formed it (it is
   rounding error: :math:`A` is within that relative distance of a singular matrix), raises a
   :class:`~convexddn.errors.SolverError` naming the batch elements and the ratio found; so
   does an overflowing solution. (A threshold :math:`N\varepsilon\|A\|_\infty` refused a
   decoupled κ = 4e12 block at N = 10⁴ but not at 10³, a matrix of entries 1e308 whose row sum
   overflowed, and diag(1, 1e-20).) The derivatives' solves (``strict=False``) use the
   forward's route (its wide elements start at step 2b, its pivoted ones at step 3) and make
   no singularity verdict of their own (:math:`A^\top` is singular with :math:`A`; its pivots
   differ; no condition estimate in step 2b): an answer that misses accuracy is a GradientWarning.
"""
from __future__ import annotations

import math

import torch

from ._tridiagonal_report import check_cast, problems, report
from ._tridiagonal_scaled import (ACCEPT_PIVOTED as _ACCEPT_PIVOTED, condition, equilibrate, growth, multiply, omega,
                                  refine_pivoted, snap_zeros, solve_pivoted, solve_scaled, unscale)

__all__ = ["FAST", "LOSSLESS", "PIVOTED", "PIVOTED_REFINED", "REFINED", "SNAPPED", "WIDE", "check_cast",
           "multiply", "solve_checked"]

_THOMAS_RATIO, _THOMAS_WORK = 16, 1 << 16  # where Thomas's loop over the rows pays (solve_fast)
_ACCEPT = 16.0  # ω accepted up to this many ulps (dominant systems: ≤ 7 measured, N up to 10⁵)
FAST, REFINED, WIDE, PIVOTED, PIVOTED_REFINED = 0, 1, 2, 3, 4  # an element's route (solve_checked)
_WIDE_COND = 1.0  # the wide route's answer accepted where the estimated κ(Ã)·ε is below this (LAPACK gtsvx's rule)
_PIVOTED_STEPS = 2  # refinements of a pivoted answer at most (route PIVOTED + their number)
LOSSLESS = 8  # added to a pivoted route: the rhs shifted without flushing entries (equilibrate's lossless)
SNAPPED = 16  # added to a pivoted route: entries within rounding of 0 set to 0 (snap_zeros)


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


def accepted(b, a, c, d, x, eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ok, trusted)``, each ``(M,)``: whether each element's componentwise backward error ω
    (module docstring, step 2) is at most :data:`_ACCEPT` eps (False where ``x`` is not finite;
    ``eps``: the dtype's unless given, the input dtype's for the wide route's float64 check),
    and whether that plain evaluation can be trusted: every scale ``(|A||x| + |d|)_{ik}`` at
    least :math:`2^{e_{min}}/\\varepsilon` (so ``16ε·scale`` is normal and the subnormal
    roundings in the residual are far below it) and finite (an overflow made an entry's excess
    -Inf, which the maximum would pass). As the sign of
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
    if not r.shape[1] * r.shape[2]:
        every = torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
        return every, every
    info = torch.finfo(b.dtype)
    low, high = torch.aminmax(scale.flatten(1), dim=1)
    worst = torch.add(r.abs_(), scale, alpha=-_ACCEPT * (info.eps if eps is None else eps)).flatten(1).amax(1)
    return worst <= 0, (low >= info.tiny / info.eps) & (high < math.inf)  # (NaN: False)


def _certified(b, a, c, d, x, eps: float | None = None) -> torch.Tensor:
    """``(M,)`` ω ≤ :data:`_ACCEPT` ε: :func:`accepted`, and where it cannot be trusted
    :func:`._tridiagonal_scaled.omega` (``eps`` as there)."""
    eps = torch.finfo(b.dtype).eps if eps is None else eps
    ok, trusted = accepted(b, a, c, d, x, eps)
    if not bool(trusted.all()):
        idx = (~trusted).nonzero().squeeze(1)
        ok = ok.index_copy(0, idx, omega(b[idx], a[idx], c[idx], d[idx], x[idx]) <= _ACCEPT * eps)
    return ok


def _refine(b, a, c, d, x):
    """One step of iterative refinement: ``x + A⁻¹(d - A x)``, unpivoted."""
    dx, _ = solve_fast(b, a, c, d - multiply(b, a, c, x))
    return x + dx


def _solve_wide(b, a, c, d, check: bool = True, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The wide route (module docstring, step 2b) for 16/32-bit ``b, a, c, d``: ``(x, ok)``, ``x``
    the unpivoted float64 answer refined once and rounded to the input dtype, ``ok`` ``(M,)``
    whether that rounded answer's ω (evaluated in float64: the products of two float32 numbers
    are exact there) is at most :data:`_ACCEPT` ε of the input dtype and (``strict``, the
    forward) the equilibrated matrix's estimated condition number below 1/ε
    (:func:`._tridiagonal_scaled.condition`); ``check=False``: the same answer, ``ok`` all True."""
    wide = tuple(t.double() for t in (b, a, c, d))
    x = _refine(*wide, solve_fast(*wide)[0]).to(b.dtype)
    if not check:
        return x, torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
    eps = torch.finfo(b.dtype).eps
    ok = _certified(*wide, x.double(), eps)
    if strict:  # (NaN, a breakdown of the estimate's unpivoted solves: not accepted)
        ok &= condition(*wide[:3], lambda *s: solve_fast(*s)[0]) * eps < _WIDE_COND
    return x, ok


def _pivoted(sub: tuple[torch.Tensor, ...], headroom: torch.Tensor | None = None):
    """Step 3 on the elements ``sub = (b, a, c, d)``: :func:`._tridiagonal_scaled.solve_scaled`'s
    steps one at a time, each checked (the same operations: ``check=False`` reproduces them):
    ``(x, ratio, eta, steps, lost)``, ``eta`` the answer's ω, ``steps`` the refinements taken,
    ``lost`` whether the rhs shift rounded entries of ``d``, ``grew`` the first solve's
    :func:`._tridiagonal_scaled.growth` (``headroom``: :func:`equilibrate`'s lossless shift)."""
    eps = torch.finfo(sub[0].dtype).eps
    system, shift, lost = equilibrate(*sub, headroom)
    y, ratio, factors = solve_pivoted(*system)
    grew = growth(system[3], y)
    x_p = unscale(y, shift)
    eta = omega(*sub, x_p)
    steps = torch.zeros(sub[0].shape[0], dtype=torch.long, device=sub[0].device)
    for _ in range(_PIVOTED_STEPS):  # (refinement with the same pivoting)
        redo = ~(eta <= _ACCEPT_PIVOTED * eps) & torch.isfinite(eta)
        if not bool(redo.any()):
            break
        steps = steps + redo
        y = refine_pivoted(system, factors, y, redo)
        x_p = unscale(y, shift)
        eta = omega(*sub, x_p)
    return x_p, ratio, eta, steps, lost, grew


def solve_checked(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, d: torch.Tensor, who: str, batch: tuple,
                  route: torch.Tensor | None = None, check: bool = True, strict: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A⁻¹ d, route)`` for every element, checked and repaired (module docstring). ``route``
    ``(M,)`` int8, each element's path: :data:`FAST`, :data:`REFINED` (one unpivoted refinement),
    :data:`WIDE` (16/32-bit: unpivoted in float64, refined once, step 2b), :data:`PIVOTED`
    (equilibrated and pivoted), :data:`PIVOTED_REFINED` (and refined once;
    ``PIVOTED + k``: k times, at most :data:`_PIVOTED_STEPS`). As an argument (the forward's,
    for the derivative's solves with the same matrix or its transpose): elements routed
    wide or pivoted start there, and ``check=False`` (the values batched by a vmap, which allow no host
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
        refined, wide, slow = (route == REFINED), route == WIDE, route >= PIVOTED
        if bool(refined.any()):
            idx = refined.nonzero().squeeze(1)
            x = x.index_copy(0, idx, _refine(b[idx], a[idx], c[idx], d[idx], x[idx]))
        if bool(wide.any()):
            idx = wide.nonzero().squeeze(1)
            x = x.index_copy(0, idx, _solve_wide(b[idx], a[idx], c[idx], d[idx], check=False)[0])
        if bool(slow.any()):
            idx, flags = slow.nonzero().squeeze(1), route[slow]
            x = x.index_copy(0, idx, solve_scaled(b[idx], a[idx], c[idx], d[idx], flags % LOSSLESS - PIVOTED,
                                                  flags % SNAPPED >= LOSSLESS, flags >= SNAPPED)[0])
        return x, route
    ok, trusted = accepted(b, a, c, d, x)
    routed = route >= WIDE  # (the forward's wide and pivoted elements start there)
    # (one host read where all pass: checked plainly, nothing to refine, nothing routed)
    if bool((ok & trusted & ~routed).all()):
        return x, route
    eps = torch.finfo(b.dtype).eps
    doubt = ~trusted & ~routed  # (the plain check under- or overflows: ω in split form)
    if bool(doubt.any()):
        idx = doubt.nonzero().squeeze(1)
        ok = ok.index_copy(0, idx, omega(b[idx], a[idx], c[idx], d[idx], x[idx]) <= _ACCEPT * eps)
    # Refined: where the plain check holds (elsewhere the unpivoted residual itself under- or overflows).
    refine = ~ok & trusted & ~routed
    if bool(refine.any()):
        idx = refine.nonzero().squeeze(1)
        sub = (b[idx], a[idx], c[idx], d[idx])
        x_new = _refine(*sub, x[idx])
        x = x.index_copy(0, idx, x_new)
        ok = ok.index_copy(0, idx, _certified(*sub, x_new))
    fail = routed | ~ok
    widen = (fail & (route < PIVOTED)) if torch.finfo(b.dtype).bits < 64 else None
    route = torch.where(fail, PIVOTED, torch.where(refine, REFINED, FAST)).to(torch.int8)
    if not bool(fail.any()):
        return x, route
    if widen is not None and bool(widen.any()):  # step 2b: 16/32-bit, their fast path again in float64
        idx = widen.nonzero().squeeze(1)
        x_w, ok_w = _solve_wide(b[idx], a[idx], c[idx], d[idx], strict=strict)
        x = x.index_copy(0, idx, x_w)
        route = route.index_copy(0, idx, torch.where(ok_w, WIDE, PIVOTED).to(torch.int8))
        fail = fail.index_copy(0, idx, ~ok_w)
        if not bool(fail.any()):
            return x, route
    idx = fail.nonzero().squeeze(1)
    sub = (b[idx], a[idx], c[idx], d[idx])
    x_p, ratio, eta, steps, lost, grew = _pivoted(sub)
    if bool(lost.any()):  # the rhs shift rounded entries of d: again with the lossless one, kept where it passes
        at = lost.nonzero().squeeze(1)
        x_l, _, eta_l, steps_l, _, _ = _pivoted(tuple(t[at] for t in sub), grew[at])
        take = torch.zeros_like(lost).index_copy(0, at, eta_l <= _ACCEPT_PIVOTED * eps)
        x_p = torch.where(take.view(-1, 1, 1), x_p.index_copy(0, at, x_l), x_p)
        eta = torch.where(take, eta.index_copy(0, at, eta_l), eta)
        steps = torch.where(take, steps.index_copy(0, at, steps_l) + LOSSLESS, steps)
    near = ~(eta <= _ACCEPT_PIVOTED * eps) & torch.isfinite(eta)
    if bool(near.any()):  # entries within rounding of 0 set to 0 (snap_zeros), kept where that passes
        x_z = snap_zeros(x_p)
        eta_z = omega(*sub, x_z)
        take = near & (eta_z <= _ACCEPT_PIVOTED * eps)
        x_p, eta = torch.where(take.view(-1, 1, 1), x_z, x_p), torch.where(take, eta_z, eta)
        steps = torch.where(take, steps + SNAPPED, steps)
    route = route.index_copy(0, idx, (PIVOTED + steps).to(torch.int8))
    bad = [torch.zeros_like(fail).index_copy(0, idx, v) for v in problems(x_p, ratio, eta, strict)]
    if bool(torch.stack(bad).any()):
        full = (torch.ones(m, dtype=ratio.dtype, device=b.device).index_copy(0, idx, ratio),
                torch.zeros(m, dtype=eta.dtype, device=b.device).index_copy(0, idx, eta))
        rounded = torch.zeros_like(fail).index_copy(0, idx, lost & (steps % SNAPPED < LOSSLESS))
        report(who, bad, batch, b.dtype, *full, strict, rounded)
    return x.index_copy(0, idx, x_p), route
