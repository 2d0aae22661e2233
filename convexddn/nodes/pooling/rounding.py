"""The rounding model of robust pooling, shared by the solvers (:mod:`.iterations`, and
robust vector pooling's polish) and the backward (:mod:`.backward`): the noise constants,
the grid of the solution ``u`` itself, and the backward's refinement of the residuals
where that grid is coarse against alpha.

A point ``u`` is known only to its own rounding, about ``_NOISE eps |u|`` (the
``h |u|`` term of the gradient's noise, :func:`.iterations.gradient_noise`, over the
curvature ``h``: the change of ``g`` over a few ulps of ``u``). The solvers call a row
unresolved where that grid exceeds the tolerance or the span over which the curvature
holds; the backward needs far less: its weights ``phi''(y - x_i)`` vary on the scale
alpha, so a y off by ``e`` moves the gradient by about ``e / alpha`` (1-2 times that for
pseudo-Huber, up to 8 times for Welsch's ``dy/dalpha``; measured against float64).
Where the grid exceeds :data:`_GRADIENT_GRID` alpha (``|y| / alpha`` beyond about 250
in float32, 1.4e11 in float64), the backward takes its weights at the residuals to the
minimiser instead: ``y - x_i + rem`` where the solver knows y's remainder ``rem``
(:meth:`.Penalty.solve_split`: the truncated quadratic's exact mean of a run), else residuals
refined by Newton steps (:func:`refine_residuals`, in the working precision); robust vector
pooling translates such sets to y and polishes them there (:mod:`convexddn.nodes._vector_pool_refine`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .penalties import Penalty

# The grid of u, in eps |u| (see the module docstring).
_NOISE = 4.0
# The rounding of a float sum of terms d1 (torch's cascade sums) is a random walk, ~eps ||d1||_2,
# only for terms of random sizes: on rows of a few repeated values its errors add up
# (measured in float32, the largest of 20 trials: N(0, 1) rows 2.4 eps ||d1||_2 = 0.06
# eps sum |d1|; 2048 entries of 5 integers 8.3 eps ||d1||_2; 32768 zeros and 32768 ones
# 2.2 eps sum |d1| = 550 eps ||d1||_2). Bounded by _SUM_NOISE eps sum |d1|, sum |d1| by
# sqrt(n) ||d1||_2: with 4 eps ||d1||_2 a pseudo-Huber row of 32768 zeros and 32768 ones
# (alpha 0.003) stopped on rounding 1.9e-3 from its minimiser 0.5, 3800 times the tolerance,
# without a warning.
_SUM_NOISE = 2.5
# A Newton step |g| / h (or a gradient's noise over h) measures the distance to the root
# only where the curvature holds along it: each term's phi'' varies on the scale alpha
# (pseudo-Huber's keeps 72 % of its value over alpha / 2), so a step or a noise bound up
# to _LOCAL_SPAN * alpha is trusted, a longer one is not. Far out on a penalty's tails h
# collapses (pseudo-Huber's ~ alpha^3 / |z|^3): from a data point at 999.37 with alpha
# 1e-4 (float32), g = -alpha and h = 1 claimed a root within 5e-4 where it was at 999.67.
# A penalty may know better (Penalty.newton_span: pseudo-Huber's far rows, Huber).
_LOCAL_SPAN = 0.5
# The largest grid of y, in units of alpha, at which the backward takes its weights at
# the returned y. Float32 rows of 64 at 1000 + 0.01 randn, alpha 0.003 (|y| / alpha 3.3e5,
# y off by up to 0.16 alpha): dy/dx off by 16 % (pseudo-Huber) and 31 % (Welsch), dy/dalpha
# by 0.14 and 1.2 (of 0.2 and 2.4), Huber's inlier sets wrong (dy/dx_i off by 1/|S|).
# Below this bound (|y| / alpha up to ~250 in float32) they are off by up to ~2e-4 of their
# largest entry (measured at |y| / alpha 100 and 333: 4e-5-7e-5 and 1e-4-2.8e-4).
_GRADIENT_GRID = 2.0 ** -13
# Newton steps of the refinement, at most (from y up to ~6 alpha off, at alpha / 2 per
# step far out); a row stops once its step is within _REFINED alpha (the error after such
# a step is about its square over alpha) or its noise.
_REFINE_STEPS = 16
_REFINED = 2.0 ** -26


def grid(au: Tensor, eps: float) -> Tensor:
    """The rounding of points ``u`` (``au = |u|``) in a dtype of machine epsilon ``eps``."""
    return (_NOISE * eps) * au


def coarse_rows(y: Tensor, a: Tensor | float, eps: float) -> Tensor:
    """``(R,)``: the rows whose minimiser ``y (R,)`` has a grid beyond
    :data:`_GRADIENT_GRID` alpha (``a`` a float, or a tensor 0-d or ``(R, 1)``): there
    the weights ``phi''(y - x_i)`` at the returned y miss those at the minimiser by more
    than that (``grid(|y|) > G alpha`` as ``|y| > (G / (_NOISE eps)) alpha``)."""
    return y.abs() > _limit(a, eps)


def any_coarse(y: Tensor, a: Tensor | float, eps: float) -> Tensor:
    """0-d: whether :func:`coarse_rows` holds for some row (to be read with the caller's
    other flags; where alpha is a float, two small ops instead of three row-sized ones)."""
    if isinstance(a, float):
        return y.abs().amax() > _limit(a, eps)
    return coarse_rows(y, a, eps).any()


def coarse_flag(y: Tensor, alpha: Tensor, needs_grad: Sequence[bool]) -> bool | None:
    """Whether some row's (or set's) ``y`` is coarse (:func:`coarse_rows`), read in the
    forward where an input (x, alpha: ``needs_grad[:2]``) needs a gradient: the backward
    then pays nothing for it (there the read cost 2-3.5 % of a robust pooling backward at
    (4, 256, 1024), 2.5 % of a vector pooling one at (256, 32, 8)). None elsewhere
    (compiling, forward mode only, no rows: the backward or jvp reads it where needed).

    Shape: as :func:`coarse_mask`."""
    if not any(needs_grad[:2]) or torch.compiler.is_compiling() or y.shape[0] == 0:
        return None
    return bool(coarse_mask(y, alpha).any())


def coarse_mask(y: Tensor, alpha: Tensor) -> Tensor:
    """``(R,)``: :func:`coarse_rows` at y's own epsilon for ``y (R,)`` (robust pooling) or
    ``(R, C)`` (vector pooling's sets, judged by their largest ``|y_c|``); ``alpha`` 0-d
    or ``(R,)``."""
    top = y.abs().amax(-1) if y.dim() > 1 else y
    return coarse_rows(top, alpha.unsqueeze(-1) if alpha.dim() else alpha, torch.finfo(y.dtype).eps)


def _limit(a: Tensor | float, eps: float) -> Tensor | float:
    limit = _GRADIENT_GRID / (_NOISE * eps)
    return limit * a if isinstance(a, float) else limit * a.reshape(-1)


def refine_residuals(penalty: Penalty, z: Tensor, a: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(z', ok)``: the residuals ``z = y - x (r, N)`` of rows whose ``y`` is coarse,
    moved to the minimiser by Newton steps ``z <- z - g / h`` (``g = sum_i phi'(z_i)``,
    ``h = sum_i phi''(z_i)``), each cut to the span alpha / 2 over which ``h`` holds;
    ``ok (r,)`` is False where that failed (``h <= 0`` or not finite: no minimum of the
    local model, or no convergence within :data:`_REFINE_STEPS`), those rows keeping
    the residuals where their steps stopped. A row stops once its step is within
    :data:`_REFINED` alpha or the rounding noise of ``g`` over ``h``; only the rows still
    stepping are summed.

    The residuals, not y: ``y - x_i`` is exact where both are close (float32 values in
    float64, or any two within a factor 2), and each step moves them by an amount whose
    rounding is relative to alpha, never to ``|y|`` (in float32 too: its steps' noise is
    about eps alpha). ``a`` is a float, 0-d or ``(r, 1)``; ``z`` is clamped at the
    penalty's saturation (and scaled, on the careful path) as the weights need.

    The steps find the stationary point around y: on a nonconvex objective not
    necessarily the minimiser the solver returned (truncated quadratic, float32 rows at
    3e4 + 0.01 randn, alpha 0.01: the local minimum of another inlier set on 85 of 400
    rows), which is why a solver that knows its minimiser exactly hands its remainder to
    the backward instead (:meth:`.Penalty.solve_split`)."""
    r, n = z.shape
    eps = torch.finfo(z.dtype).eps
    z = z.clone()
    ok = torch.ones(r, dtype=torch.bool, device=z.device)
    at = torch.arange(r, device=z.device)  # the rows still stepping
    ar = a if isinstance(a, float) or a.dim() == 0 else a.reshape(-1)
    for _ in range(_REFINE_STEPS):
        a_t = ar if isinstance(ar, float) or ar.dim() == 0 else ar[at].unsqueeze(-1)
        zt = z[at]
        # The penalty's fused row sums, the solver's (they overwrite their input: a copy);
        # a nonconvex penalty's descent sums hold g and h too (Welsch: 0.5 ms against 9 for
        # the derived Newton sums on 512 Ki float32 residuals).
        work = [torch.empty_like(zt) for _ in range(3)]
        if penalty.convex:
            g, h, d1 = penalty.newton_sums(zt.clone(), a_t, work)
        else:
            _, g, h, _, d1 = penalty.descent_sums(zt.clone(), a_t, work)
        step = g / h
        good = ((h > 0) & torch.isfinite(step)).squeeze(-1)
        ok[at] = good
        z[at] = torch.where(good.unsqueeze(-1), zt - torch.clamp(step, -_LOCAL_SPAN * a_t, _LOCAL_SPAN * a_t), zt)
        noise = (_SUM_NOISE * math.sqrt(n) * eps) * torch.linalg.vector_norm(d1, dim=-1, keepdim=True) / h
        on = good & (step.abs() > torch.clamp(noise, min=_REFINED * a_t)).squeeze(-1)
        at = at[on]
        if at.numel() == 0:
            return z, ok
    ok[at] = False  # (still stepping after _REFINE_STEPS)
    return z, ok
