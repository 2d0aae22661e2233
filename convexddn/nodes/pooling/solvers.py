"""Forward solvers of robust pooling: iteration drivers over the kernels of :mod:`.kernels`.

Every solver maps rows ``x (R, N)`` and ``alpha`` (``(R, 1)`` or 0-d) to the pooled
minimisers ``(R,)``. Rows converge independently; converged rows are frozen and, once
few rows still move, the moving ones are regathered into a smaller problem. One host
sync per iteration decides whether to stop.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import torch

from ..._checks import check_finite
from ...errors import SolverWarning
from .kernels import mm_step, newton_step, run, trunc_quad_runs, welsch_step
from .penalties import Penalty

# Welsch's robust start is the median of at most this many evenly strided entries per
# row (the exact median when the row is this short): an exact median of every row costs
# as much as the whole Welsch solve.
_MEDIAN_SAMPLE = 129

# Entries per row chunk in the exact truncated-quadratic solver on the CPU: the sort,
# the search and the float64 prefix sums of one chunk stay in cache, and no full-size
# float64 temporaries are allocated.
_TQ_CHUNK_NUMEL = 1 << 19


def check_rows_finite(x: torch.Tensor, stats: torch.Tensor) -> None:
    """Raise NonFiniteError for x when a per-row statistic that propagates NaN/Inf (a mean,
    min or max) is not finite. One host sync; the full count runs only on failure."""
    if not bool(torch.isfinite(stats).all()):
        check_finite("x", x)


def _iterate(step: Callable, name: str, x, state: list, a, tol, max_iter, use_compile,
             warn: bool = True) -> tuple[list, torch.Tensor | None]:
    """Run ``state = step(x, *state, a)`` (which also returns the step length) until each
    row's step is at most ``tol * (alpha + |u|)``, ``u = state[0]``. Returns the final
    state and, when some rows hit ``max_iter``, a mask of those rows (else None); with
    ``warn`` they are reported at once.

    Converged rows are frozen; once at most 3/4 of the rows are still moving, the
    moving rows are gathered into a smaller problem, so the long tail of slow rows costs
    in proportion to their number instead of a full pass over x per iteration. One host
    sync per iteration (to decide whether to stop).
    """
    out = [t.clone() for t in state]
    active = None  # indices into the full rows of the rows still iterating
    n_todo = out[0].shape[0]
    for _ in range(max_iter):
        *state, step_len = run(step, use_compile, x, *state, a)
        todo = (step_len > tol * (a + state[0].abs())).squeeze(-1)
        n_todo = int(todo.sum())
        if n_todo == 0:
            break
        todo_active = active  # the rows `todo` refers to, before any shrinking below
        if 4 * n_todo <= 3 * todo.numel():
            keep = todo.nonzero().squeeze(-1)
            _store(out, state, active)
            active = keep if active is None else active[keep]
            x, state = x[keep], [t[keep] for t in state]
            a = a[keep] if a.dim() > 0 else a
    else:
        unconverged = torch.zeros(out[0].shape[0], dtype=torch.bool, device=out[0].device)
        unconverged[todo.nonzero().squeeze(-1) if todo_active is None else todo_active[todo]] = True
        if warn:
            _warn_not_converged(name, n_todo, out[0].shape[0], tol)
        _store(out, state, active)
        return out, unconverged
    _store(out, state, active)
    return out, None


def _warn_not_converged(name: str, n_todo: int, rows: int, tol: float) -> None:
    warnings.warn(
        f"robust_pool(penalty={name!r}): {n_todo} of {rows} row(s) did not reach "
        f"tol={tol:g} within max_iter; returning the last iterate",
        SolverWarning,
        stacklevel=6,
    )


def _store(out: list, state: list, active) -> None:
    for o, t in zip(out, state):
        if active is None:
            o.copy_(t)
        else:
            o[active] = t


def newton_solve(penalty: Penalty, x, a, tol, max_iter, use_compile):
    """Safeguarded Newton for a convex penalty (see :func:`.kernels.newton_step`)."""
    step, name = newton_step(penalty), penalty.name
    # Start from the (sampled) median -- a data point, so Huber has an inlier there --
    # with an open bracket: no full pass over x before the first Newton step, whose
    # fused row sums serve as the NaN/Inf check.
    u = _median_start(x)
    lo, hi = torch.full_like(u, -math.inf), torch.full_like(u, math.inf)
    u, lo, hi, step_len, sums = run(step, use_compile, x, u, lo, hi, a, True)
    check_rows_finite(x, sums)
    state = [u, lo, hi]
    n_todo = int((step_len > tol * (a + u.abs())).sum())
    if n_todo and max_iter > 1:
        state, _ = _iterate(step, name, x, state, a, tol, max_iter - 1, use_compile)
    elif n_todo:
        _warn_not_converged(name, n_todo, x.shape[0], tol)
    return state[0].squeeze(-1)


def _median_start(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    if n > _MEDIAN_SAMPLE:
        x = x[:, :: -(-n // _MEDIAN_SAMPLE)]
    return x.median(-1, keepdim=True).values


def welsch_solve(x, a, tol, max_iter, use_compile):
    """Descent-safeguarded Newton for Welsch from the mean and a median; the lower objective wins."""
    starts = [x.mean(-1, keepdim=True), _median_start(x)]
    check_rows_finite(x, torch.cat(starts, -1))
    finals, objectives, stuck = [], [], []
    for u in starts:
        state = [u, torch.full_like(u, math.inf), u, (a * torch.ones_like(u)).to(u.dtype)]
        (u, f, _, _), unconverged = _iterate(welsch_step, "welsch", x, state, a, tol, max_iter,
                                             use_compile, warn=False)
        finals.append(u)
        objectives.append(f)
        stuck.append(unconverged)
    # Keep the start with the lower objective (evaluated at the last accepted point,
    # within tol of the returned one).
    second = (objectives[1] < objectives[0]).squeeze(-1)
    # Warn only for rows whose kept start did not converge: a mean start far from every
    # point sits where the Welsch objective is flat, and loses to the median start anyway.
    if stuck[0] is not None or stuck[1] is not None:
        none = torch.zeros_like(second)
        bad = torch.where(second, none if stuck[1] is None else stuck[1], none if stuck[0] is None else stuck[0])
        n_bad = int(bad.sum())
        if n_bad:
            _warn_not_converged("welsch", n_bad, x.shape[0], tol)
    return torch.where(second.unsqueeze(-1), finals[1], finals[0]).squeeze(-1)


def trunc_quad_solve(x, a, use_compile):
    """The exact global minimiser of truncated-quadratic pooling (see :func:`.kernels.trunc_quad_runs`)."""
    rows, n = x.shape
    # Work in row chunks on the CPU: the sort, the search and the float64 prefix sums of
    # one chunk stay in cache.
    step = rows if x.device.type != "cpu" else max(1, _TQ_CHUNK_NUMEL // n)
    ys, ends = [], []
    for i in range(0, rows, step):
        s = torch.sort(x[i : i + step], dim=-1).values
        # Sorting puts NaN last: the smallest and largest entries catch every NaN/Inf.
        ends.append(s[:, :: max(n - 1, 1)])
        ac = a[i : i + step] if a.dim() > 0 else a
        lft = torch.searchsorted(s, s - 2 * ac, right=True)
        ys.append(run(trunc_quad_runs, use_compile, s, lft, ac))
    check_rows_finite(x, torch.cat(ends))
    return torch.cat(ys)


def generic_solve(penalty: Penalty, x, a, tol, max_iter, use_compile):
    """The solver of a user-defined :class:`~.penalties.Penalty`.

    Convex penalty: the safeguarded Newton iteration of :func:`newton_solve` (its bracket
    keeps it convergent whatever the start). Nonconvex penalty: majorise-minimise (IRLS)
    steps, which never increase the objective when ``irls_weight`` majorises, from the
    mean and a median; the start with the lower objective is kept (a local minimum).
    """
    if penalty.convex:
        return newton_solve(penalty, x, a, tol, max_iter, use_compile)
    starts = [x.mean(-1, keepdim=True), _median_start(x)]
    check_rows_finite(x, torch.cat(starts, -1))
    finals, objectives, stuck = [], [], []
    for u in starts:
        state = [u, torch.full_like(u, math.inf)]
        (u, f), unconverged = _iterate(_mm_driver(penalty), penalty.name, x, state, a, tol,
                                       max_iter, use_compile, warn=False)
        finals.append(u)
        objectives.append(penalty.objective(x, u.squeeze(-1), a.squeeze(-1) if a.dim() else a).unsqueeze(-1))
        stuck.append(unconverged)
    second = (objectives[1] < objectives[0]).squeeze(-1)
    kept_stuck = [s if s is not None else torch.zeros_like(second) for s in stuck]
    n_bad = int(torch.where(second, kept_stuck[1], kept_stuck[0]).sum())
    if n_bad:
        _warn_not_converged(penalty.name, n_bad, x.shape[0], tol)
    return torch.where(second.unsqueeze(-1), finals[1], finals[0]).squeeze(-1)


@functools.lru_cache(maxsize=None)
def _mm_driver(penalty: Penalty) -> Callable:
    step = mm_step(penalty)

    def driver(x, u, f_prev, a):
        nxt, f, step_len = step(x, u, a)
        return nxt, f, step_len

    driver.__name__ = step.__name__
    return driver
