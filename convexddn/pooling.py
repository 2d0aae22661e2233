"""Robust pooling: the five penalties of Gould et al. Table 1 as one declarative node.

Robust pooling replaces the mean of a set of features by

.. math::

    y(x) \\in \\operatorname*{argmin}_{u \\in \\mathbb{R}} \\sum_{i=1}^{n} \\phi(u - x_i; \\alpha)

taken over one or several dimensions of ``x``, for the penalties (forward algorithm
in brackets):

- ``quadratic``: :math:`\\tfrac12 z^2` (the mean);
- ``pseudo_huber``: :math:`\\alpha^2(\\sqrt{1 + (z/\\alpha)^2} - 1)` (safeguarded Newton);
- ``huber``: :math:`\\tfrac12 z^2` if :math:`|z| \\le \\alpha`, else
  :math:`\\alpha(|z| - \\tfrac12\\alpha)` (safeguarded Newton);
- ``welsch``: :math:`1 - \\exp(-z^2 / (2\\alpha^2))` (descent-safeguarded Newton from
  the mean and from a median, keeping the lower objective);
- ``trunc_quad``: :math:`\\tfrac12 z^2` if :math:`|z| \\le \\alpha`, else
  :math:`\\tfrac12 \\alpha^2` (the exact global minimiser: sort, prefix sums and all
  candidate inlier runs).

The backward pass is the closed form of Table 1 as a vector–Jacobian product (§6.1):
with weights :math:`w_i = \\phi''(y - x_i)`,

.. math::

    \\frac{\\partial y}{\\partial x_i} = \\frac{w_i}{\\sum_j w_j}, \\qquad
    \\frac{\\partial y}{\\partial \\alpha} =
        -\\frac{\\sum_j \\partial_\\alpha \\phi'(y - x_j)}{\\sum_j w_j},

never forming a Jacobian. Everything is batched torch code that runs unchanged on CPU
and CUDA tensors; the iterations are fused by :func:`torch.compile` when it is
available (see ``compile`` in :func:`robust_pool`).

Public names: :class:`Penalty` (and one subclass per penalty), :data:`PENALTIES`,
:func:`robust_pool`, :class:`RobustPool`.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 2021 (Table 1: robust penalties and their gradients; §6.1: vjp).
"""
from __future__ import annotations

import abc
import functools
import math
import warnings
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._checks import check_choice, check_finite, check_positive, check_tensor, normalize_dims
from .errors import (
    ConvexDDNWarning,
    DTypeError,
    GradientWarning,
    OptionError,
    ShapeError,
    SolverWarning,
)

__all__ = [
    "Penalty",
    "Quadratic",
    "PseudoHuber",
    "Huber",
    "Welsch",
    "TruncatedQuadratic",
    "PENALTIES",
    "CONVEX_PENALTIES",
    "robust_pool",
    "RobustPool",
]

_BACKENDS = ["native", "cvxpy"]

# Default stopping tolerance on the Newton step, relative to (alpha + |y|). float32 cannot
# resolve much below 1e-6 of the scale once the sums over a row carry rounding noise.
_DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
_DEFAULT_MAX_ITER = 100

# compile=None compiles only tensors at least this large: below it the one-off compile
# (tens of seconds on a small CPU) costs more than eager kernels ever will.
_AUTO_COMPILE_NUMEL = 1 << 22

# Welsch's robust start is the median of at most this many evenly strided entries per
# row (the exact median when the row is this short): an exact median of every row costs
# as much as the whole Welsch solve.
_MEDIAN_SAMPLE = 129

# Damped Newton for Welsch takes u - g / max(H, kappa W), W the IRLS curvature. Any
# kappa > 1/2 keeps every step a strict descent step of the objective (see _welsch_step).
_WELSCH_KAPPA = 0.55

# Entries per row chunk in the exact truncated-quadratic solver on the CPU: the sort,
# the search and the float64 prefix sums of one chunk stay in cache, and no full-size
# float64 temporaries are allocated.
_TQ_CHUNK_NUMEL = 1 << 19


# --------------------------------------------------------------------------- penalties


class Penalty(abc.ABC):
    """A robust penalty :math:`\\phi(z; \\alpha)` of Gould et al. Table 1.

    Subclasses give the penalty and the two derivatives the implicit backward needs.
    All methods are elementwise on tensors ``z`` (residuals ``u - x``) and ``alpha``
    (a tensor broadcastable against ``z``).

    Resolve a name with :meth:`Penalty.resolve`; the valid names are :data:`PENALTIES`.
    """

    name: ClassVar[str]
    convex: ClassVar[bool]

    @abc.abstractmethod
    def phi(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The penalty :math:`\\phi(z; \\alpha)`."""

    @abc.abstractmethod
    def dphi(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The first derivative :math:`\\partial_z \\phi`."""

    @abc.abstractmethod
    def d2phi(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The second derivative :math:`\\partial^2_{zz} \\phi` (zero off the inliers for
        Huber and truncated quadratic, whose second derivative jumps at :math:`|z| = \\alpha`)."""

    @abc.abstractmethod
    def d2phi_dalpha(self, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The mixed derivative :math:`\\partial^2_{z\\alpha} \\phi`."""

    def weights(self, z: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(w, w_alpha)``: :meth:`d2phi` and :meth:`d2phi_dalpha` along the last dim,
        both multiplied by one positive factor per row.

        Only the ratios ``w / w.sum(-1)`` and ``w_alpha.sum(-1) / w.sum(-1)`` enter the
        gradient, so a penalty whose weights underflow (Welsch, pseudo-Huber far from
        every point) rescales them here.
        """
        return self.d2phi(z, alpha), self.d2phi_dalpha(z, alpha)

    def objective(self, x: torch.Tensor, u: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_i \\phi(u - x_i; \\alpha)` over the last dim of ``x``; ``u`` has one
        entry per row of ``x`` (shape ``x.shape[:-1]``)."""
        alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
        if alpha.dim() > 0:
            alpha = alpha.unsqueeze(-1)
        return self.phi(u.unsqueeze(-1) - x, alpha).sum(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @staticmethod
    def resolve(penalty: "str | Penalty") -> "Penalty":
        """Return the :class:`Penalty` for a name in :data:`PENALTIES` (or the instance itself).

        Raises:
            OptionError: ``penalty`` is neither a valid name nor a :class:`Penalty`.
        """
        if isinstance(penalty, Penalty):
            return penalty
        if not isinstance(penalty, str):
            raise OptionError(
                f"penalty must be one of {list(PENALTIES)} or a Penalty, got {penalty!r}"
            )
        check_choice("penalty", penalty, PENALTIES)
        return _REGISTRY[penalty]


class Quadratic(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2`; the minimiser is the mean, ``alpha`` plays no role."""

    name = "quadratic"
    convex = True

    def phi(self, z, alpha):
        return 0.5 * z * z

    def dphi(self, z, alpha):
        return z

    def d2phi(self, z, alpha):
        return torch.ones_like(z)

    def d2phi_dalpha(self, z, alpha):
        return torch.zeros_like(z)


class PseudoHuber(Penalty):
    """:math:`\\phi(z) = \\alpha^2 (\\sqrt{1 + (z/\\alpha)^2} - 1)`: smooth and convex."""

    name = "pseudo_huber"
    convex = True

    def phi(self, z, alpha):
        r = z / alpha
        return alpha * alpha * (torch.sqrt(1 + r * r) - 1)

    def dphi(self, z, alpha):
        r = z / alpha
        return z * torch.rsqrt(1 + r * r)

    def d2phi(self, z, alpha):
        r = z / alpha
        return torch.rsqrt(1 + r * r) ** 3

    def d2phi_dalpha(self, z, alpha):
        r = z / alpha
        return (r * torch.rsqrt(1 + r * r)) ** 3

    def weights(self, z, alpha):
        # Scale by (1 + r_min^2)^{3/2}, r_min the residual nearest zero in the row, so the
        # largest weight is 1 however far every point lies from y.
        r = z / alpha
        q = 1 + r * r
        q_min = q.amin(-1, keepdim=True)
        ratio = torch.sqrt(q_min / q)
        w = ratio ** 3
        return w, (r * ratio) ** 3


class Huber(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2` for :math:`|z| \\le \\alpha`, else
    :math:`\\alpha (|z| - \\tfrac12 \\alpha)`: convex, with a kink in :math:`\\phi''` at
    :math:`|z| = \\alpha` (the inlier side is used there)."""

    name = "huber"
    convex = True

    def phi(self, z, alpha):
        a = z.abs()
        return torch.where(a <= alpha, 0.5 * z * z, alpha * (a - 0.5 * alpha))

    def dphi(self, z, alpha):
        return torch.maximum(torch.minimum(z, alpha), -alpha)

    def d2phi(self, z, alpha):
        return (z.abs() <= alpha).to(z.dtype)

    def d2phi_dalpha(self, z, alpha):
        return torch.where(z.abs() <= alpha, torch.zeros_like(z), torch.sign(z))


class Welsch(Penalty):
    """:math:`\\phi(z) = 1 - \\exp(-z^2 / (2\\alpha^2))`: smooth, bounded and nonconvex."""

    name = "welsch"
    convex = False

    def phi(self, z, alpha):
        r = z / alpha
        return -torch.expm1(-0.5 * r * r)

    def dphi(self, z, alpha):
        r = z / alpha
        return r / alpha * torch.exp(-0.5 * r * r)

    def d2phi(self, z, alpha):
        r = z / alpha
        return (1 - r * r) * torch.exp(-0.5 * r * r) / (alpha * alpha)

    def d2phi_dalpha(self, z, alpha):
        r = z / alpha
        return r * (r * r - 2) * torch.exp(-0.5 * r * r) / (alpha * alpha)

    def weights(self, z, alpha):
        # exp(-r^2/2) underflows to 0 for every point once |y - x_i| > ~13 alpha (float32):
        # shift the exponent by the row's smallest r^2, and drop the common 1/alpha^2.
        r = z / alpha
        r2 = r * r
        e = torch.exp(torch.clamp(-0.5 * (r2 - r2.amin(-1, keepdim=True)), min=_exp_floor(z.dtype)))
        return (1 - r2) * e, r * (r2 - 2) * e


class TruncatedQuadratic(Penalty):
    """:math:`\\phi(z) = \\tfrac12 z^2` for :math:`|z| \\le \\alpha`, else
    :math:`\\tfrac12 \\alpha^2`: nonconvex and non-smooth at :math:`|z| = \\alpha`."""

    name = "trunc_quad"
    convex = False

    def phi(self, z, alpha):
        return 0.5 * torch.minimum(z * z, alpha * alpha)

    def dphi(self, z, alpha):
        return torch.where(z.abs() <= alpha, z, torch.zeros_like(z))

    def d2phi(self, z, alpha):
        return (z.abs() <= alpha).to(z.dtype)

    def d2phi_dalpha(self, z, alpha):
        return torch.zeros_like(z)


_REGISTRY: dict[str, Penalty] = {
    p.name: p for p in (Quadratic(), PseudoHuber(), Huber(), Welsch(), TruncatedQuadratic())
}

#: Valid penalty names, in the order of Gould et al. Table 1.
PENALTIES: tuple[str, ...] = tuple(_REGISTRY)
#: The convex ones: those the registry's CVXPY ``robust_pool`` problem accepts.
CONVEX_PENALTIES: tuple[str, ...] = tuple(p for p in PENALTIES if _REGISTRY[p].convex)


# --------------------------------------------------------------------------- kernels
#
# Each kernel below is a plain function of tensors, run either eagerly or through
# torch.compile (which fuses one whole Newton step, or the whole backward, into one or
# two passes over x). Rows are the pooled sets: x is (R, N), per-row values are (R, 1),
# alpha is (R, 1) or 0-d.

_COMPILED: dict[Callable, Callable] = {}
_COMPILE_FAILED: set[Callable] = set()


def _compile_available() -> bool:
    return hasattr(torch, "compile") and not torch.jit.is_scripting()


def _run(fn: Callable, use_compile: bool, *args: Any) -> Any:
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


def _huber_step(x, u, lo, hi, a, check=False):
    """Safeguarded Newton step for Huber (h counts the inliers); with ``check`` it also
    returns the row sums of x, which are finite unless x holds NaN or Inf."""
    z = u - x
    az = z.abs()
    g = torch.maximum(torch.minimum(z, a), -a).sum(-1, keepdim=True)
    h = (az <= a).to(x.dtype).sum(-1, keepdim=True)
    w = (a / torch.maximum(az, a)).sum(-1, keepdim=True)
    out = _bracketed_update(u, g, h, w, lo, hi)
    return (*out, x.sum(-1, keepdim=True)) if check else out


def _pseudo_huber_step(x, u, lo, hi, a, check=False):
    """Safeguarded Newton step for pseudo-Huber; ``check`` as for :func:`_huber_step`."""
    z = u - x
    r = z * (1 / a)
    s = torch.rsqrt(1 + r * r)
    g = (z * s).sum(-1, keepdim=True)
    h = (s * s * s).sum(-1, keepdim=True)
    w = s.sum(-1, keepdim=True)
    out = _bracketed_update(u, g, h, w, lo, hi)
    return (*out, x.sum(-1, keepdim=True)) if check else out


def _exp_floor(dtype: torch.dtype) -> float:
    """Smallest exponent whose exp is still a normal number: exp of anything lower is
    clamped to it, because subnormal arithmetic is ~50x slower on x86 CPUs and the
    clamped weights (< 1e-35 of the largest) change no sum in a representable digit."""
    return -700.0 if dtype == torch.float64 else -80.0


def _welsch_step(x, u, f_prev, safe_prev, rho, a):
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
    e = torch.exp(torch.clamp(-0.5 * r2, min=_exp_floor(x.dtype)))
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
    plateau = w <= (2 * math.exp(_exp_floor(x.dtype))) * n
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


def _backward_kernel(penalty: Penalty, need_alpha: bool):
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


@functools.lru_cache(maxsize=None)
def _backward_kernel_for(penalty_name: str, need_alpha: bool) -> Callable:
    return _backward_kernel(_REGISTRY[penalty_name], need_alpha)


# --------------------------------------------------------------------------- forward solvers


def _check_rows_finite(x: torch.Tensor, stats: torch.Tensor) -> None:
    """Raise NonFiniteError for x when a per-row statistic that propagates NaN/Inf (a mean,
    min or max) is not finite. One host sync; the full count runs only on failure."""
    if not bool(torch.isfinite(stats).all()):
        check_finite("x", x)


def _resolve_tol(tol: float | None, dtype: torch.dtype) -> float:
    return _DEFAULT_TOL.get(dtype, 1e-6) if tol is None else tol


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
        *state, step_len = _run(step, use_compile, x, *state, a)
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


def _newton_solve(step: Callable, name: str, x, a, tol, max_iter, use_compile):
    # Start from the (sampled) median -- a data point, so Huber has an inlier there --
    # with an open bracket: no full pass over x before the first Newton step, whose
    # fused row sums serve as the NaN/Inf check.
    u = _median_start(x)
    lo, hi = torch.full_like(u, -math.inf), torch.full_like(u, math.inf)
    u, lo, hi, step_len, sums = _run(step, use_compile, x, u, lo, hi, a, True)
    _check_rows_finite(x, sums)
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


def _welsch_solve(x, a, tol, max_iter, use_compile):
    starts = [x.mean(-1, keepdim=True), _median_start(x)]
    _check_rows_finite(x, torch.cat(starts, -1))
    finals, objectives, stuck = [], [], []
    for u in starts:
        state = [u, torch.full_like(u, math.inf), u, (a * torch.ones_like(u)).to(u.dtype)]
        (u, f, _, _), unconverged = _iterate(_welsch_step, "welsch", x, state, a, tol, max_iter,
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


def _trunc_quad_runs(s: torch.Tensor, lft: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
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


def _trunc_quad_solve(x, a, use_compile):
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
        ys.append(_run(_trunc_quad_runs, use_compile, s, lft, ac))
    _check_rows_finite(x, torch.cat(ends))
    return torch.cat(ys)


def _solve(penalty: Penalty, x, a, tol, max_iter, use_compile):
    name = penalty.name
    if name == "quadratic":
        y = x.mean(-1)
        _check_rows_finite(x, y)
        return y
    if name == "huber":
        return _newton_solve(_huber_step, name, x, a, tol, max_iter, use_compile)
    if name == "pseudo_huber":
        return _newton_solve(_pseudo_huber_step, name, x, a, tol, max_iter, use_compile)
    if name == "welsch":
        return _welsch_solve(x, a, tol, max_iter, use_compile)
    if name == "trunc_quad":
        return _trunc_quad_solve(x, a, use_compile)
    raise OptionError(
        f"penalty {penalty!r} has no native solver; the native penalties are {list(PENALTIES)}"
    )


class _RobustPoolFunction(torch.autograd.Function):
    """y = argmin_u sum_i phi(u - x_i; alpha) over the last dim of x (R, N) -> (R,).

    ``alpha`` is a tensor of shape (R,) or 0-d; the options ride along as constants.
    """

    @staticmethod
    def forward(x, alpha, penalty, tol, max_iter, use_compile):  # type: ignore[override]
        if x.shape[0] == 0:
            return x.new_empty((0,))
        a = alpha.unsqueeze(-1) if alpha.dim() > 0 else alpha
        return _solve(penalty, x, a, tol, max_iter, use_compile)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, alpha, penalty, _tol, _max_iter, use_compile = inputs
        ctx.save_for_backward(x, alpha, output)
        ctx.penalty = penalty
        ctx.use_compile = use_compile

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, alpha, y = ctx.saved_tensors
        need_x, need_alpha = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_alpha = None
        rows, n = x.shape
        if rows == 0:
            return (x.new_zeros(x.shape) if need_x else None,
                    torch.zeros_like(alpha) if need_alpha else None, None, None, None, None)
        if ctx.penalty.name == "quadratic":
            # dy/dx_i = 1/N exactly: a broadcast view, nothing to compute.
            if need_x:
                grad_x = (grad_y / n).unsqueeze(-1).expand(rows, n)
            if need_alpha:
                grad_alpha = torch.zeros_like(alpha)
            return grad_x, grad_alpha, None, None, None, None
        a = alpha.unsqueeze(-1) if alpha.dim() > 0 else alpha
        kernel = _backward_kernel_for(ctx.penalty.name, bool(need_alpha))
        gx, ga, ok = _run(kernel, ctx.use_compile, x, y.unsqueeze(-1), a, grad_y.unsqueeze(-1))
        bad = ~ok
        if bool(bad.any()):
            warnings.warn(
                f"robust_pool(penalty={ctx.penalty.name!r}): the Hessian sum_i phi''(y - x_i) is "
                f"zero, singular or negative for {int(bad.sum())} of {rows} row(s) (no inliers, "
                f"or a non-isolated minimiser); their gradient is set to zero",
                GradientWarning,
                stacklevel=2,
            )
        if need_x:
            grad_x = gx
        if need_alpha:
            grad_alpha = ga if alpha.dim() > 0 else ga.sum()
        return grad_x, grad_alpha, None, None, None, None


# --------------------------------------------------------------------------- cvxpy backend


def _cvxpy_alpha(alpha: float | torch.Tensor) -> float:
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise OptionError(
                "backend='cvxpy' needs one alpha for the whole tensor (it is a constant of "
                f"the CVXPY problem), got an alpha tensor of shape {tuple(alpha.shape)}"
            )
        if alpha.requires_grad and torch.is_grad_enabled():
            raise OptionError(
                "backend='cvxpy' cannot differentiate with respect to alpha (a constant of "
                "the CVXPY problem); use backend='native' or pass alpha without requires_grad"
            )
        return float(alpha.detach())
    return float(alpha)


# --------------------------------------------------------------------------- public API


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_floating_point():
            raise DTypeError(f"alpha must be a float or a floating-point tensor, got dtype {alpha.dtype}")
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise OptionError(f"alpha must be a positive number or tensor, got {alpha!r}")
    check_positive("alpha", alpha)


def _check_options(penalty: Any, backend: Any, tol: Any, max_iter: Any, compile: Any) -> Penalty:
    pen = Penalty.resolve(penalty)
    check_choice("backend", backend, _BACKENDS)
    if backend == "cvxpy" and not pen.convex:
        raise OptionError(
            f"backend='cvxpy' solves convex problems only, and penalty={pen.name!r} is "
            f"nonconvex; use backend='native' (convex penalties: "
            f"{[p for p in PENALTIES if _REGISTRY[p].convex]})"
        )
    if tol is not None:
        check_positive("tol", tol)
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise OptionError(f"max_iter must be a positive int, got {max_iter!r}")
    if compile is not None and not isinstance(compile, bool):
        raise OptionError(f"compile must be True, False or None (automatic), got {compile!r}")
    return pen


def robust_pool(
    x: torch.Tensor,
    penalty: str | Penalty = "quadratic",
    alpha: float | torch.Tensor = 1.0,
    dim: int | tuple[int, ...] = -1,
    keepdim: bool = False,
    *,
    backend: str = "native",
    tol: float | None = None,
    max_iter: int | None = None,
    compile: bool | None = None,
) -> torch.Tensor:
    """Robust pooling: the minimiser of a robust penalty of the residuals.

    .. math::

        y = \\operatorname*{argmin}_{u} \\sum_{i} \\phi(u - x_i; \\alpha)

    over the entries :math:`x_i` of ``x`` along ``dim`` (Gould et al. Table 1; the
    penalties are listed in this module's docstring and in :data:`PENALTIES`).

    Forward: ``quadratic`` is the mean. ``pseudo_huber`` and ``huber`` (convex) run a
    Newton iteration from the median start below, safeguarded by a bracket of the root
    (an IRLS step or bisection when the Newton point leaves it), until the step is at
    most ``tol * (alpha + |y|)``; convexity makes the start immaterial to the result. ``welsch`` (nonconvex) runs a Newton iteration whose
    accepted objective never increases (a rejected Newton point is replaced by a
    majorise-minimise step) from two starts, the mean and a median, to the same
    tolerance, and keeps the one with the lower objective: a local minimum, not
    certified global. The median start is the exact lower median (torch's convention)
    for rows of at most 129 entries, else the lower median of at most 129 evenly
    strided entries, because an exact median of every row costs as much as the whole
    solve. Rows converge independently; the ones still moving are regathered so that a
    few slow rows do not cost full passes over ``x``.
    ``trunc_quad`` returns the exact global minimiser (sort, prefix sums and the 2N
    candidate inlier runs; O(N log N)).

    Backward: the closed form of Table 1 as a vector–Jacobian product,
    ``grad_x_i = grad_y * w_i / sum_j w_j`` with ``w_i = phi''(y - x_i)``, and
    ``grad_alpha = -grad_y * sum_j d2phi/dz dalpha / sum_j w_j``, without forming a
    Jacobian. Where ``sum_j w_j`` is zero, singular or negative (Huber or truncated
    quadratic with no inliers, a Welsch point that is not a strict minimum) that row's
    gradient is zero and a :class:`~convexddn.errors.GradientWarning` is issued once
    per call. At the kinks of Huber and truncated quadratic (:math:`|y - x_i| = \\alpha`)
    the inlier side is taken.

    Args:
        x: input tensor, float32 or float64 (float16/bfloat16 are solved in float32).
        penalty: one of :data:`PENALTIES` or a :class:`Penalty`. Default ``"quadratic"``.
        alpha: penalty scale > 0: a number, or a tensor broadcastable to the output shape
            (as without ``keepdim``); it may require grad. Default ``1.0``.
        dim: the dimension, or tuple of dimensions, pooled over. Default ``-1``.
        keepdim: keep the pooled dimensions with size 1. Default ``False``.
        backend: ``"native"`` (default) or ``"cvxpy"`` (convex penalties only; solves the
            registry's ``robust_pool`` problem through :class:`~convexddn.ConvexLayer`,
            one scalar alpha, no gradient for alpha).
        tol: stopping tolerance of the iterative solvers, relative to
            ``alpha + |y|``. Default ``None``: 1e-12 for float64, 1e-6 otherwise.
        max_iter: iteration limit of the iterative solvers (per start for Welsch);
            hitting it issues a :class:`~convexddn.errors.SolverWarning`. Default 100.
        compile: fuse the iterations and the backward with :func:`torch.compile`
            (``True``), run eagerly (``False``), or decide by size (``None``, default:
            compile tensors of at least 2**22 elements). A compile failure falls back to
            eager with a warning. The first compiled call pays a one-off compile.

    Shape:
        - Input: ``(*)``, with at least one entry along every pooled dimension.
        - Output: ``x.shape`` without the pooled dimensions, or with them set to 1 when
          ``keepdim=True``; same dtype and device as ``x``.

    Raises:
        DTypeError: ``x`` is not a floating-point tensor, or ``alpha`` is an integer tensor.
        NonFiniteError: ``x`` holds NaN or Inf (checked through per-row statistics the
            solver computes anyway: one host sync per call; the message gives the counts).

    .. note::
        The iterative solvers decide when to stop on the host: one device-to-host sync
        per iteration (typically 3 to 6 per call), and one in the backward to decide
        whether to warn. The quadratic and truncated-quadratic solvers do not iterate.
        ShapeError: a pooled dimension is empty or out of range, or ``alpha`` does not
            broadcast to the output shape.
        OptionError: unknown ``penalty`` or ``backend`` (the message lists the valid
            ones), ``alpha <= 0``, ``backend="cvxpy"`` with a nonconvex penalty or a
            non-scalar alpha, invalid ``tol``, ``max_iter`` or ``compile``.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI
        2021, Table 1 and §6.1.
    """
    check_tensor("x", x)
    pen = _check_options(penalty, backend, tol, max_iter, compile)
    _check_alpha(alpha)
    dims = normalize_dims("dim", dim, x.ndim) if x.ndim > 0 else None
    if dims is None:
        raise ShapeError("x must have at least one dimension to pool over, got a 0-d tensor")
    for d in dims:
        if x.shape[d] == 0:
            raise ShapeError(
                f"x must have at least one entry along every pooled dim, got shape "
                f"{tuple(x.shape)} pooled over dim={dim!r}"
            )
    keep = [d for d in range(x.ndim) if d not in dims]
    batch = [x.shape[d] for d in keep]
    n = math.prod(x.shape[d] for d in dims)
    x2 = x.permute(*keep, *dims).reshape(-1, n)

    if isinstance(alpha, torch.Tensor):
        if alpha.device != x.device:
            raise OptionError(f"alpha must be on x's device {x.device}, got {alpha.device}")
        a = alpha
        if keepdim and a.dim() == x.ndim:
            a = a.squeeze(dims) if len(dims) else a
        try:
            a = torch.broadcast_to(a, batch)
        except RuntimeError:
            raise ShapeError(
                f"alpha must broadcast to the output shape {tuple(batch)}, got shape "
                f"{tuple(alpha.shape)}"
            ) from None
        a = a.reshape(-1) if batch else a.reshape(())
    else:
        a = torch.tensor(float(alpha), dtype=x.dtype, device=x.device)

    if backend == "cvxpy":
        y2 = _cvxpy_pool(x2, pen.name, _cvxpy_alpha(alpha))
    else:
        work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        xw = x2.to(work)
        aw = a.to(work)
        use_compile = (
            _compile_available() and x2.numel() >= _AUTO_COMPILE_NUMEL
            if compile is None
            else bool(compile) and _compile_available()
        )
        y2 = _RobustPoolFunction.apply(
            xw,
            aw,
            pen,
            _resolve_tol(tol, work),
            _DEFAULT_MAX_ITER if max_iter is None else max_iter,
            use_compile,
        ).to(x.dtype)

    y = y2.reshape(batch)
    if keepdim:
        for d in dims:
            y = y.unsqueeze(d)
    return y


def _cvxpy_pool(x2: torch.Tensor, penalty: str, alpha: float) -> torch.Tensor:
    rows, n = x2.shape
    if rows == 0:
        return x2.sum(-1)
    _check_rows_finite(x2, x2.mean(-1))
    from .registry import shared_layer  # lazy: cvxpy is only needed on this path

    return shared_layer("robust_pool", n=n, penalty=penalty, alpha=alpha)(x2)


class RobustPool(nn.Module):
    """Robust pooling as a module: :func:`robust_pool` with stored options.

    .. math::

        y = \\operatorname*{argmin}_{u} \\sum_{i} \\phi(u - x_i; \\alpha)

    Args:
        penalty: one of :data:`PENALTIES` or a :class:`Penalty`. Default ``"quadratic"``.
        alpha: penalty scale > 0, a number or a tensor broadcastable to the output shape
            (an :class:`~torch.nn.Parameter` makes it learnable). Default ``1.0``.
        dim: dimension or tuple of dimensions pooled over. Default ``-1``.
        keepdim: keep the pooled dimensions with size 1. Default ``False``.
        backend: ``"native"`` (default) or ``"cvxpy"`` (convex penalties only).
        tol, max_iter, compile: solver options, see :func:`robust_pool`.

    Shape:
        - Input: ``(*)``; e.g. ``(B, C, N)`` with ``dim=-1`` or ``(B, C, H, W)`` with
          ``dim=(2, 3)``.
        - Output: the input shape without the pooled dimensions (``(B, C)`` in both
          examples), or with them kept as 1 when ``keepdim=True``.

    Raises:
        OptionError: invalid options, at construction (see :func:`robust_pool`).
        Errors of :func:`robust_pool` for bad input, at call time.

    Examples::

        >>> pool = RobustPool("huber", alpha=1.0, dim=-1)
        >>> pool(torch.randn(8, 64, 1024)).shape
        torch.Size([8, 64])

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
    """

    def __init__(
        self,
        penalty: str | Penalty = "quadratic",
        alpha: float | torch.Tensor = 1.0,
        dim: int | tuple[int, ...] = -1,
        keepdim: bool = False,
        *,
        backend: str = "native",
        tol: float | None = None,
        max_iter: int | None = None,
        compile: bool | None = None,
    ) -> None:
        super().__init__()
        pen = _check_options(penalty, backend, tol, max_iter, compile)
        _check_alpha(alpha)
        if not isinstance(dim, int) and not (isinstance(dim, tuple) and all(isinstance(d, int) for d in dim)):
            raise OptionError(f"dim must be an int or a tuple of ints, got {dim!r}")
        self.penalty = pen
        if isinstance(alpha, torch.Tensor) and not isinstance(alpha, nn.Parameter):
            # A buffer, so that state_dict holds it and .to() moves it.
            self.register_buffer("alpha", alpha.detach().clone())
        else:
            self.alpha = alpha
        self.dim = dim
        self.keepdim = keepdim
        self.backend = backend
        self.tol = tol
        self.max_iter = max_iter
        self.compile = compile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return robust_pool(
            x,
            self.penalty,
            self.alpha,
            self.dim,
            self.keepdim,
            backend=self.backend,
            tol=self.tol,
            max_iter=self.max_iter,
            compile=self.compile,
        )

    def extra_repr(self) -> str:
        alpha = self.alpha
        if isinstance(alpha, torch.Tensor):
            alpha = f"Tensor{tuple(alpha.shape)}" if alpha.numel() != 1 else f"{float(alpha.detach()):g}"
        parts = [f"penalty={self.penalty.name!r}", f"alpha={alpha}", f"dim={self.dim}", f"keepdim={self.keepdim}"]
        if self.backend != "native":
            parts.append(f"backend={self.backend!r}")
        if self.tol is not None:
            parts.append(f"tol={self.tol:g}")
        if self.max_iter is not None:
            parts.append(f"max_iter={self.max_iter}")
        if self.compile is not None:
            parts.append(f"compile={self.compile}")
        return ", ".join(parts)
