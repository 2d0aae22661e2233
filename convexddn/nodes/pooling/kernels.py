"""Tensor kernels of robust pooling, run eagerly or fused by :func:`torch.compile`.

Each kernel is a plain function of tensors. Rows are the pooled sets: ``x`` is
``(R, N)``, per-row values are ``(R, 1)``, ``alpha`` is ``(R, 1)`` or 0-d. The Newton
step and the backward are *derived from the penalty's own methods* (``dphi``,
``d2phi``, ``irls_weight``, ``weights``), so each formula is written once, in
:mod:`.penalties`; torch.compile fuses the calls into one or two passes over ``x``.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable

import torch

from ...errors import ConvexDDNWarning
from .penalties import Penalty, exp_floor

# Damped Newton for Welsch takes u - g / max(H, kappa W), W the IRLS curvature. Any
# kappa > 1/2 keeps every step a strict descent step of the objective (see welsch_step).
_WELSCH_KAPPA = 0.55

_COMPILED: dict[Callable, Callable] = {}
_COMPILE_FAILED: set[Callable] = set()


def compile_available() -> bool:
    return hasattr(torch, "compile") and not torch.jit.is_scripting()


def run(fn: Callable, use_compile: bool, *args: Any) -> Any:
    """Call ``fn(*args)`` through torch.compile when asked, falling back to eager (with a
    one-time warning per kernel) when compilation fails."""
    if use_compile and fn not in _COMPILE_FAILED:
        try:
            compiled = _COMPILED.get(fn)
            if compiled is None:
                compiled = _COMPILED[fn] = torch.compile(fn)
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            _COMPILE_FAILED.add(fn)
            warnings.warn(
                f"robust_pool: torch.compile failed for {fn.__name__} "
                f"({type(exc).__name__}: {str(exc)[:200]}); running it eagerly from now on",
                ConvexDDNWarning,
                stacklevel=3,
            )
    return fn(*args)


def _bracketed_update(u, g, h, w, lo, hi):
    """One safeguarded Newton step on the increasing function g (the derivative of a
    convex objective) with curvature h: keep [lo, hi] around the root; take the Newton
    point when it lands strictly inside, else the IRLS point u - g / w (w >= h the
    majoriser curvature: a shorter step the same way, which also absorbs rounding noise
    once converged), else bisect. Returns the new point, the bracket and the step length."""
    lo = torch.where(g < 0, u, lo)
    hi = torch.where(g > 0, u, hi)
    newton = u - g / h
    irls = u - g / w
    # NaN (h == 0) and inf candidates fail the comparisons and fall through. A step
    # below one ulp leaves u unchanged, which sits on the bracket end just set to u.
    ok_newton = ((newton > lo) & (newton < hi)) | (newton == u)
    ok_irls = ((irls > lo) & (irls < hi)) | (irls == u)
    # Bisection needs a finite bracket; while one end is still infinite the IRLS point
    # (a weighted mean of the row, moving towards the open end) is always inside.
    mid = 0.5 * (lo + hi)
    bisect = ~ok_irls & torch.isfinite(mid)
    new = torch.where(g == 0, u, torch.where(ok_newton, newton, torch.where(bisect, mid, irls)))
    return new, lo, hi, (new - u).abs()


@functools.lru_cache(maxsize=None)
def newton_step(penalty: Penalty) -> Callable:
    """The safeguarded Newton step of a convex ``penalty``: g, h and the IRLS curvature w
    are row sums of its ``dphi``, ``d2phi`` and ``irls_weight``; with ``check`` the step
    also returns the row sums of x, which are finite unless x holds NaN or Inf."""

    def step(x, u, lo, hi, a, check=False):
        z = u - x
        g = penalty.dphi(z, a).sum(-1, keepdim=True)
        h = penalty.d2phi(z, a).sum(-1, keepdim=True)
        w = penalty.irls_weight(z, a).sum(-1, keepdim=True)
        out = _bracketed_update(u, g, h, w, lo, hi)
        return (*out, x.sum(-1, keepdim=True)) if check else out

    step.__name__ = f"_newton_step_{penalty.name}"
    return step


@functools.lru_cache(maxsize=None)
def mm_step(penalty: Penalty) -> Callable:
    """A majorise-minimise (IRLS) step for any penalty whose ``irls_weight`` majorises:
    ``u <- sum_i w_i x_i / sum_i w_i``, with the objective at the current point (so the
    caller can keep the best of several starts) and the step length."""

    def step(x, u, a):
        z = u - x
        w = penalty.irls_weight(z, a)
        sw = w.sum(-1, keepdim=True)
        nxt = torch.where(sw > 0, (w * x).sum(-1, keepdim=True) / torch.where(sw > 0, sw, 1), u)
        f = penalty.phi(z, a).sum(-1, keepdim=True)
        return nxt, f, (nxt - u).abs()

    step.__name__ = f"_mm_step_{penalty.name}"
    return step


def welsch_step(x, u, f_prev, safe_prev, rho, a):
    """One step of a descent-safeguarded trust-region Newton iteration for Welsch.

    At the current point u it evaluates the objective f = N - sum_i e_i (e_i =
    exp(-r_i^2 / 2), r_i = (u - x_i) / alpha), its derivative g and curvature H, and the
    IRLS (majoriser) curvature W = sum e_i >= H. The safe step -g / max(H, kappa W),
    kappa > 1/2, is t times the majoriser's minimising step with t = W / max(...) < 2,
    so it strictly decreases the majoriser and hence f. The trial point is the Newton
    step (or, where H <= 0, a step downhill) clipped to the trust radius rho, or the safe
    step when that is longer. A trial point whose objective rose above the accepted
    point's is rejected on the next call, which shrinks rho and takes the accepted
    point's safe step instead; an accepted one doubles rho. So the accepted objective
    never increases, the iteration cannot climb to a maximum, and near a minimum it is
    plain Newton (quadratic convergence).

    Returns (next point, accepted objective, safe point from the accepted point, trust
    radius, step length).
    """
    n = x.shape[-1]
    z = u - x
    r = z * (1 / a)
    r2 = r * r
    e = torch.exp(torch.clamp(-0.5 * r2, min=exp_floor(x.dtype)))
    g = (z * e).sum(-1, keepdim=True)
    w = e.sum(-1, keepdim=True)
    h = ((1 - r2) * e).sum(-1, keepdim=True)
    f = n - w
    # Rounding noise of f: a trial step that changes f by less than this is not a rise.
    reject = f > f_prev + (8 * torch.finfo(x.dtype).eps) * n
    rho = torch.where(reject, 0.25 * rho, 2 * rho)
    # w == 0 only if exp underflowed for every point (u far from all of them, f at its
    # maximum N): stay put and let the other start win.
    safe_step = torch.where(w > 0, -g / torch.maximum(h, _WELSCH_KAPPA * w), torch.zeros_like(u))
    # Where H <= 0 (a concave stretch) step downhill by the trust radius, except on a
    # plateau where every weight sits at the exp floor: there g carries no information
    # (the start is stuck and the other start wins).
    plateau = w <= (2 * math.exp(exp_floor(x.dtype))) * n
    newton_step = torch.where(h > 0, -g / h, torch.where(plateau, 0.0, -torch.sign(g) * rho))
    newton_step = torch.minimum(torch.maximum(newton_step, -rho), rho)
    trial = u + torch.where(newton_step.abs() >= safe_step.abs(), newton_step, safe_step)
    nxt = torch.where(reject, safe_prev, trial)
    return (
        nxt,
        torch.where(reject, f_prev, f),
        torch.where(reject, safe_prev, u + safe_step),
        rho,
        (nxt - u).abs(),
    )


@functools.lru_cache(maxsize=None)
def backward_kernel(penalty: Penalty, need_alpha: bool) -> Callable:
    """The vjp of Table 1 for one penalty, as a function of (x, y, a, grad_y)."""

    def kernel(x, y, a, gy):
        w, wa = penalty.weights(y - x, a)
        sw = w.sum(-1, keepdim=True)
        # A Hessian sum at or below its own rounding noise is singular (or negative:
        # not a minimum): the exact gradient does not exist there.
        noise = (x.shape[-1] * torch.finfo(x.dtype).eps) * w.abs().sum(-1, keepdim=True)
        ok = (sw > noise) & torch.isfinite(sw)
        scale = torch.where(ok, gy / torch.where(ok, sw, torch.ones_like(sw)), torch.zeros_like(sw))
        gx = w * scale
        gx = torch.where(torch.isfinite(gx), gx, torch.zeros_like(gx))
        if need_alpha:
            ga = -(wa.sum(-1, keepdim=True) * scale)
            ga = torch.where(torch.isfinite(ga), ga, torch.zeros_like(ga))
        else:
            ga = sw
        return gx, ga.squeeze(-1), ok.squeeze(-1)

    kernel.__name__ = f"_backward_{penalty.name}{'_alpha' if need_alpha else ''}"
    return kernel


def trunc_quad_runs(s: torch.Tensor, lft: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Exact global minimiser of sum_i min((u - x_i)^2, alpha^2) / 2 for each sorted row s.

    The objective is piecewise quadratic; on each piece between consecutive breakpoints
    x_i +- alpha the inliers form a contiguous run of the sorted row, and the global
    minimiser is the mean of its own inlier run. Every piece starts where a point
    enters (the run ends at that point i and starts at l_i = #{k : s_k <= s_i - 2 alpha},
    given as ``lft``) or leaves (the run starts after i and ends at
    r_i = #{k : s_k < s_i + 2 alpha} = #{k : l_k <= i}, counted from ``lft`` in O(N)).
    For any run W, G_W = SSE_W / 2 + alpha^2 (N - |W|) / 2 bounds the objective at the
    mean of W from above, with equality for the optimal run, so the smallest G over the
    2N candidate runs is the global minimum and its mean the global minimiser: no
    clipping into pieces needed, and rounding in the run ends can only add valid runs.
    """
    rows, n = s.shape
    acc = torch.float64
    # Centre on the middle order statistic and accumulate in float64: prefix sums of
    # squares cancel catastrophically otherwise.
    centre = s[:, n // 2 : n // 2 + 1]
    d = (s - centre).to(acc)
    c1 = d.cumsum(-1)
    c2 = (d * d).cumsum(-1)
    half_a2 = 0.5 * a.to(acc) ** 2
    idx = torch.arange(1, n + 1, device=s.device)

    def prefix(c, k):  # sum of the first k entries
        return torch.where(k > 0, c.gather(-1, (k - 1).clamp(min=0)), torch.zeros((), dtype=acc, device=s.device))

    # Entry runs [l_i, i], never empty.
    n_e = (idx - lft).to(acc)
    s1_e = c1 - prefix(c1, lft)
    g_e = 0.5 * (c2 - prefix(c2, lft) - s1_e * s1_e / n_e) + half_a2 * (n - n_e)
    # Exit runs [i + 1, r_i), possibly empty.
    counts = torch.zeros(rows, n + 1, dtype=torch.int64, device=s.device)
    counts.scatter_add_(-1, lft, torch.ones_like(lft))
    rgt = counts.cumsum(-1)[:, :n]
    n_x = (rgt - idx).to(acc)
    safe_n = n_x.clamp(min=1)
    s1_x = prefix(c1, rgt) - c1
    g_x = 0.5 * (prefix(c2, rgt) - c2 - s1_x * s1_x / safe_n) + half_a2 * (n - n_x)
    g_x = torch.where(n_x > 0, g_x, torch.full_like(g_x, math.inf))

    best_e, i_e = g_e.min(-1, keepdim=True)
    best_x, i_x = g_x.min(-1, keepdim=True)
    m_e = s1_e.gather(-1, i_e) / n_e.gather(-1, i_e)
    m_x = s1_x.gather(-1, i_x) / safe_n.gather(-1, i_x)
    return (centre.to(acc) + torch.where(best_x < best_e, m_x, m_e)).to(s.dtype).squeeze(-1)
