"""Sparse maps: sparsemax, α-entmax and 1-D total variation, as CVXPY problems.

The native nodes :func:`convexddn.nodes.entmax.entmax` and
:func:`convexddn.nodes.total_variation.tv_denoise` solve the same problems exactly and
in batches; these forms let the two paths be checked against each other.
"""
from __future__ import annotations

import numpy as np

from convexddn._checks import check_size
from convexddn._lazy import cvxpy as cp
from convexddn._warn import warn
from convexddn.convex.registry import real_option, register
from convexddn.errors import OptionError, SolverWarning
from convexddn.problems.projection import simplex


@register("sparsemax", "sparsemax (α-entmax with α = 2): argmin_p ½‖p − x‖² s.t. p ≥ 0, 1ᵀp = 1")
def sparsemax(n: int):
    """.. math:: p(x) = \\operatorname*{argmin}_{p \\ge 0,\\ 1^T p = 1} \\tfrac12 \\|p - x\\|_2^2

    The ``simplex`` problem under its attention name (one builder for both).
    Parameters: ``x`` of shape ``(n,)``. Variable: ``y`` of shape ``(n,)``.
    References: Martins & Astudillo, "From softmax to sparsemax", ICML 2016.
    """
    return simplex(n)


@register("entmax", "α-entmax: argmax_p pᵀx + Σ(p − p^α)/(α(α−1)) s.t. p ≥ 0, 1ᵀp = 1 (α > 1)")
def entmax(n: int, alpha: float = 1.5):
    """.. math:: p(x) = \\operatorname*{argmin}_{p \\ge 0,\\ 1^T p = 1} \\frac{\\sum_i p_i^\\alpha}{\\alpha(\\alpha - 1)} - x^T p

    (the Tsallis-entropy form of α-entmax; the linear term of the entropy is constant on
    the simplex). ``alpha > 1``; ``p^α`` is written in second-order cones for a fraction
    near α, with a denominator (up to 2^32) large enough that the solution moves by less
    than 1e-7 (see :func:`_power_epigraph`): an ``OptionError`` for α − 1 below 1e-7 or α
    above about 4e9 (2^32). From α = 16 on, building the cone form warns (``SolverWarning``):
    a tie at the maximum is not resolved in float64 there (see ``_TIES_UNRESOLVED``).
    Parameters: ``x`` ``(n,)``. Variable: ``p`` ``(n,)``.
    References: Peters, Niculae & Martins, ACL 2019.
    """
    n = check_size("n", n, minimum=1)
    alpha = real_option("alpha", alpha, above=1, hint=(
        " (alpha = 1 is softmax, which has no cone form here; use convexddn.nodes.entmax.entmax)"))
    x = cp.Parameter(n, name="x")
    p = cp.Variable(n, name="p")

    def problem():  # deferred: the native node (Entmax) does not need it
        if alpha >= _TIES_UNRESOLVED:
            warn(f"entmax's cone form at alpha = {alpha} curves along a tie at the maximum only through terms "
                 "~p**(alpha - 2) below the objective's scale, which float64 does not resolve: tied scores' mass "
                 "may come back split unevenly without a per-call warning (measured on exact ties: 2.2e-7 off at "
                 "alpha = 20, 2.3e-2 at alpha = 50); the native node (convexddn.layer's default backend) is exact",
                 SolverWarning)
        t, cones = _power_epigraph(p, alpha, n)
        objective = cp.sum(t) / (alpha * (alpha - 1.0)) - x @ p
        return cp.Problem(cp.Minimize(objective), [p >= 0, cp.sum(p) == 1, *cones])
    return problem, [x], [p]


# From this α on, the cone form's curvature along a tie at the maximum (~p^(α−2) beside terms of
# 1) is below what float64 resolves, and nothing in the solve can tell that from a face of
# optima: with every p^α multiplier at rounding the program is flat along the tie to working
# precision (uniqueness.undetermined catches it only where some column is left unresolved).
# Exact ties of 3 or 4 scores came back 3e-10 off at α = 15, 2.2e-7 at 20, 2.8e-6 at 30 and
# 2.3e-2 at 50 (against the native node); so building the form warns from here.
_TIES_UNRESOLVED = 16.0

# CVXPY writes p^α with cones after rounding α to a fraction of bounded denominator
# (1024 by default): α = 1.0001 became 1, a linear objective, and the layer returned a
# vertex 0.15 from the solution as "solved". The rounding error δ moves the solution by
# about δ / (α − 1); denominators grow until that is below _ALPHA_RTOL (the layer's
# default tolerance is 1e-6), each step a few more second-order cones per entry (about
# log2 of the denominator in all). Up to 2^20 only, ordinary alphas were refused: 4/3 was
# the nearest fraction to 1.3333333 there (1e-7 off in the solution), float32(1.1) needs 2^26.
_ALPHA_RTOL = 1e-7
_MAX_DENOMS = (1024, 1 << 14, 1 << 20, 1 << 26, 1 << 32)
# Below it the objective's scale 1/(α(α − 1)) passes 1e7 against its α-dependent part:
# alpha = 1 + 1e-8 was written exactly and both Clarabel and SCS failed on it.
_MIN_ALPHA_GAP = 1e-7


def _power_epigraph(p, alpha: float, n: int) -> tuple:
    """``(t, cones)``: second-order cones stating ``t ≥ p^r`` (p ≥ 0) for a fraction r close
    enough to ``alpha`` (see above), as CVXPY's canonicalisation of ``cp.power`` writes them.

    Written here rather than left to CVXPY, which warned at every build that the power was
    "approximated" (a plain UserWarning suggesting power cones, which neither solver path
    takes) although the fraction is chosen to be exact to 1e-7 of the solution.

    Raises:
        OptionError: α − 1 < 1e-7, or no fraction of denominator up to 2^32 is close enough.
    """
    from cvxpy.utilities.power_tools import gm_constrs  # the cones of cp.power's canonicalisation

    if alpha - 1.0 >= _MIN_ALPHA_GAP:
        for denom in _MAX_DENOMS:
            try:
                power = cp.power(p, alpha, max_denom=denom)
            except ZeroDivisionError:  # 1/α rounded to 0 (α above about the denominator)
                continue
            if power.approx_error <= _ALPHA_RTOL * (alpha - 1.0):
                t = cp.Variable(n)
                # p <= t^(1/r) 1^(1 - 1/r), i.e. t >= p^r: the weights are (1/r, 1 - 1/r).
                return t, gm_constrs(p, [t, cp.Constant(np.ones(n))], power.w)
    raise OptionError(
        f"alpha = {alpha!r} has no cone form close enough here: p**alpha is written with a fraction "
        f"of denominator <= 2^32 whose error must move the solution by less than {_ALPHA_RTOL:g}, and "
        f"alpha - 1 must be >= {_MIN_ALPHA_GAP:g} (alpha too close to 1, or above about 4e9); use the "
        f"native node: convexddn.layer('entmax', n={n}, alpha={alpha!r})")


@register("tv1d", "1-D total variation denoising: argmin_y ½‖y − x‖² + λ Σ|y_{i+1} − y_i|")
def tv1d(n: int, lam: float = 1.0):
    """.. math:: y(x) = \\operatorname*{argmin}_y \\tfrac12 \\|y - x\\|_2^2 + \\lambda \\sum_{i=1}^{n-1} |y_{i+1} - y_i|

    Parameters: ``x`` of shape ``(n,)``. Variable: ``y`` of shape ``(n,)``.
    ``lam`` ≥ 0 is a fixed option here; the native node
    :class:`convexddn.nodes.total_variation.TotalVariation1d` can learn it.
    """
    n = check_size("n", n, minimum=1)
    lam = real_option("lam", lam, at_least=0)
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")

    def problem():  # deferred: the native node (TotalVariation1d) does not need it
        tv = cp.norm1(cp.diff(y)) if n > 1 else 0
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x) + lam * tv))
    return problem, [x], [y]
