"""The descent-safeguarded Newton iteration of the nonconvex robust-pooling penalties.

The iteration machinery (blocks, sweeps, compaction, the noise model of the gradient) is
:mod:`.iterations`'; this module adds the safe step, the trust region and the stopping
rule of :func:`descent_rows`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import iterations
from .iterations import (_MODEL_SPAN, _compact, _first, _live, _predicted_error, _store, _sweep, gradient_noise,
                         offset_rows, step_graphs, stop_tolerance)
from .kernels import Scratch, block_ranges, col_ranges, far_rows
from .penalties import Penalty
from .rows import Result, Rows

__all__ = ["descent_rows", "safe_step"]

# The descent iteration's safe step is -g / max(h, kappa W), W >= h the IRLS curvature.
# Any kappa > 1/2 keeps it a strict descent step (see descent_rows).
_KAPPA = 0.55
# A start stops on the float grid's floor: where an accepted step of at most _GRID eps |u|
# (4-8 ulps) did not lower the objective beyond rounding. In exact arithmetic each accepted
# step lowers it; on the grid, where alpha is about an ulp of u or less, the curvature
# changes sign between neighbouring floats and a safe step of 1.8 ulps rounds to 2 (t = 2:
# no decrease): float32 rows of 0.3 with alpha 1e-8 (ulp 3e-8) sent the mean start, an ulp
# off, between -1, +1 and +2 ulps of the minimum (equal objectives) until max_iter, then
# through a float64 solve again (70x a Gaussian row's time). The objective equal at both
# ends, a stationary point lies between them (Rolle): within the step of u.
_GRID = 4.0

def safe_step(g: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """The descent iteration's safe step ``-g / max(h, kappa W)`` (0 where ``W = 0``):
    ``t = W / max(h, kappa W) < 2`` times the step that minimises the IRLS majoriser
    (curvature ``W >= h``), so it strictly decreases the majoriser and hence the
    objective; where ``h >= kappa W`` it is the Newton step."""
    return torch.where(w > 0, -g / torch.maximum(h, _KAPPA * w), torch.zeros_like(g))



def descent_rows(pen: Penalty, rows: Rows, u: Tensor | None, start: Callable | None, tol: float,
                 max_iter: int, use_compile: bool) -> Result | None:
    """A descent-safeguarded trust-region Newton iteration for a nonconvex penalty, from
    ``k`` starts per row at once (``u`` is ``(R, k)``, or None: ``start(x_block)`` gives
    ``(r, k)`` in the first pass, ``k = start.count``; long rows take its ``on_chunks``
    form, see :func:`.chunks.block_sums`).

    At the current point it evaluates the objective f, g, h and the IRLS (majoriser)
    curvature W >= h. The safe step -g / max(h, kappa W), kappa > 1/2, is t times the
    majoriser's minimising step with t = W / max(...) < 2, so it strictly decreases the
    majoriser and hence f. The trial point is the Newton step (or, where h <= 0, a step
    downhill) clipped to the trust radius rho, or the safe step when that is longer. A
    trial point whose objective rose above the accepted point's (beyond rounding) is
    rejected on the next call, which shrinks rho and takes the accepted point's safe
    step instead; an accepted one doubles rho. So the accepted objective never
    increases, the iteration cannot climb to a maximum, and near a minimum it is plain
    Newton. A start stops at an accepted point where h > 0 and the error left after the
    Newton step, bounded by the local model (Kantorovich, ``_predicted_error``; a smooth
    penalty: from the second accepted point on; else |g| / h), is within
    :func:`.iterations.stop_tolerance` (|g| above its noise), where |g| is at its noise level and h is not
    negative (from a maximum it steps downhill by rho, either way where g = 0), or on
    the float grid's floor: an accepted step of a few ulps that did not lower f (see
    ``_GRID``; unresolved where that step exceeds the tolerance).

    Returns per row and start (``(R, k)``) the point, the objective at the last accepted
    point and the flags; None when some entry of x is NaN or Inf.
    """
    x = rows.like  # (the solve's dtype: x's, or float64 for float32 rows solved again)
    R, n = rows.count, x.shape[1]
    eps = torch.finfo(x.dtype).eps
    # (a start names its count: calling it on a row to learn k read, and converted, the whole row)
    k = u.shape[-1] if u is not None else start.count
    ranges = block_ranges(R, n, x, use_compile)
    scratch = Scratch.make(3, (ranges[0].stop - ranges[0].start) * k * col_ranges(n, x, use_compile, k)[0].stop, x)
    u2 = x.new_empty(R, k) if u is None else u.reshape(R, k).clone()
    fill = u2 if start is not None else None
    u = u2.unsqueeze(-1)
    sums = x.new_empty(4, R, k, 1)  # f, g, h, W: one tensor, checked finite in one op
    first = _first(pen, rows, "descent_sums", u, ranges, list(sums.unbind(0)), use_compile, scratch, fill, start)
    if first is None:
        return None
    norm, clamp, lo, hi = first
    live = [True] * len(ranges)
    spread = (hi - lo).unsqueeze(-1)
    offset = offset_rows(lo, hi)
    a3 = rows.alpha if rows.alpha.dim() == 0 else rows.alpha.reshape(-1, 1, 1)
    af = a3 if rows.alpha_f is None else rows.alpha_f
    f_prev = torch.full_like(u, math.inf)
    safe_prev = u
    rho = a3 * torch.ones_like(u)
    g_prev = h_prev = u_prev = None
    # Rows with entries near the end of the float range stop at once as special: solved again
    # scaled (see .kernels.far_rows and .solvers._solve).
    far = far_rows(lo, hi).unsqueeze(-1).repeat(1, k, 1)
    active = ~far
    out_u, out_f = u.clone(), torch.full_like(u, math.inf)
    out_flags = [torch.zeros(R, k, 1, dtype=torch.bool, device=x.device) for _ in range(3)]
    # The (compacted) problem's flags (unresolved, converged, special), written into the
    # outputs with its points and objectives -- which stay put once a start stops --
    # only when the problem is compacted or ends (no indexed updates every iteration).
    unres, conv_f = (torch.zeros(R, k, 1, dtype=torch.bool, device=x.device) for _ in range(2))
    spec = far.clone()
    idx = None  # rows of the (compacted) problem, as indices of the original rows
    def update(u, f_prev, safe_prev, rho, g_prev, h_prev, u_prev, active, unres, conv_f, spec, sums, norm):
        """One iteration's bookkeeping from the sums at ``u``: the next state."""
        f, g, h, w = sums.unbind(0)
        bad = ~torch.isfinite(sums).all(0)
        reject = f > f_prev + (8 * eps) * f.abs()
        rho = torch.where(reject, 0.25 * rho, 2 * rho)
        safe = safe_step(g, h, w)
        # Where h <= 0 step downhill by the trust radius (either way from a maximum, g = 0),
        # except on a plateau where every weight vanished (the start is stuck; the other
        # start wins).
        hpos, nstep = h > 0, g / h  # the Newton step is -nstep where h > 0
        downhill = torch.where(g > 0, -rho, rho)
        newton = torch.where(hpos, -nstep, torch.where(w > 0, downhill, torch.zeros_like(u)))
        newton = torch.minimum(torch.maximum(newton, -rho), rho)
        trial = u + torch.where(newton.abs() >= safe.abs(), newton, safe)
        au = u.abs()
        noise = gradient_noise(pen.dphi_norm(h, w, n, af, spread) if norm is None else norm, h.abs(), au, n, eps)
        tol_s = stop_tolerance(a3 * tol, tol, au, spread, eps, offset)
        ag = g.abs()
        quiet = ag <= noise
        if not pen.smooth:
            conv = hpos & (ag <= tol_s * h)
        elif h_prev is None:
            conv = torch.zeros_like(hpos)
        else:
            # A smooth penalty's start stops only where the local model bounds the error
            # after the Newton step (Kantorovich, see _predicted_error), not on a short
            # step alone: |g| / h is the distance to the root only while h holds, and a
            # nonconvex h may vanish within the step. Welsch rows at tol 1e-2 (tolerance
            # 0.16 alpha on one side of 0) stopped on a step of 0.12 alpha where h fell
            # from 0.45 to -0.5 within 0.4 alpha: 0.58 from the local minimum, not
            # stationary, and another point for the same row shifted to straddle 0.
            astep, du = nstep.abs(), u - u_prev
            adu = du.abs()
            pred = _predicted_error(g, h, g_prev, h_prev, du, adu, astep)
            near = adu <= _MODEL_SPAN * a3
            conv = hpos & ~quiet & near & (astep <= rho) & (pred.addcdiv_(noise, h) <= tol_s)
        # A quiet gradient where the curvature is negative is a maximum, not a stop: both
        # starts of x = (1, 1, -1, -1, 0), α = 0.43 sat at 0, the mean and the median.
        stop = ~reject & ((quiet & ~((h < 0) & (w > 0))) | conv)
        floor = wide = torch.zeros_like(stop)
        if h_prev is not None:
            # The float grid's floor (see _GRID): a step of a few ulps from the last accepted
            # point (h_prev is NaN after a rejected one) that did not lower the objective.
            adu = (u - u_prev).abs()
            floor = (~reject & ~conv & (f >= f_prev - (8 * eps) * f.abs()) & ~torch.isnan(h_prev)
                     & (adu <= (_GRID * eps) * au))
            stop |= floor
            wide = floor & (adu > tol_s)  # a floor wider than the tolerance: unresolved
        stop |= bad
        done = stop & active
        nxt = torch.where(reject, safe_prev, trial)
        f_prev = torch.where(reject | ~active, f_prev, f)
        safe_prev = torch.where(reject, safe_prev, u + safe)
        # (Not where the sums are bad: a user's phi' of NaN with a finite h made u - NaN,
        # under the warning that the last finite iterate is returned.)
        # (At the floor the Newton step is no estimate: it sent a row of 0.3 a third away.)
        final = torch.where(hpos & ~quiet & ~bad & ~floor, u - nstep, u)
        h_prev = torch.where(reject, math.nan, h)  # no estimate across a rejected step
        # (Once a start stops, u and f_prev stay put: its point and the objective at its
        # last accepted point; a start still running at the end returns its last iterate.)
        u_new = torch.where(active, torch.where(stop, final, nxt), u)
        both = done & bad
        spec = spec | both
        conv_f = conv_f | (done ^ both)  # done & ~bad
        unres = unres | (done & ((quiet & ~bad & hpos & (noise > tol_s * h)) | wide))
        active = active & ~done
        return u_new, f_prev, safe_prev, rho, g.clone(), h_prev, u, active, unres, conv_f, spec

    def body(*state):  # a sweep of every row and the update (captured on CUDA)
        sums = x.new_empty(4, R, k, 1)
        norm = _sweep(pen, rows, "descent_sums", state[0], live, ranges, list(sums.unbind(0)), use_compile,
                      scratch, clamp)
        state = update(*state, sums, norm)
        return (*state, state[7].reshape(R, -1).any(-1).sum())

    state = (u, f_prev, safe_prev, rho, g_prev, h_prev, u_prev, active, unres, conv_f, spec)
    graphs = step_graphs(rows, use_compile, "robust pooling, descent")
    whole = graphs.capture or iterations._WHOLE_ROWS
    for it in range(max_iter):
        if it == 0 or not whole:
            if it > 0:
                norm = _sweep(pen, rows, "descent_sums", state[0], live, ranges, list(sums.unbind(0)), use_compile,
                              scratch, clamp)
            state = update(*state, sums, norm)
            row_active = state[7].reshape(state[7].shape[0], -1).any(-1)
            n_active, live = _live(row_active, ranges)
        else:
            state, (count,) = graphs.run(None, body, state)
            n_active = int(count)  # (the one host read per iteration)
        if n_active == 0 or it == max_iter - 1:
            break
        if not whole and 2 * n_active <= state[7].shape[0]:
            # Gather the rows still running into a smaller problem (spread rides along).
            _store((out_u, out_f, *out_flags), idx, (*state[:2], *state[8:]))
            keep = row_active.nonzero().squeeze(-1)
            rows, idx, ranges, clamp, live, a3, af, (*state, spread) = _compact(
                rows, keep, idx, clamp, ranges, use_compile, a3, (*state, spread))
            state = tuple(state)
            sums = x.new_empty(4, n_active, k, 1)
    _store((out_u, out_f, *out_flags), idx, (*state[:2], *state[8:]))  # u, f_prev and the flags
    scratch.release()
    return Result(*(t.squeeze(-1) for t in (out_u, out_f, *out_flags)))
