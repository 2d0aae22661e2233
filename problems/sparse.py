"""Sparse maps: sparsemax, α-entmax and 1-D total variation, as CVXPY problems.

The native nodes :func:`convexddn.nodes.entmax.entmax` and
:func:`convexddn.nodes.total_variation.tv_denoise` solve the same problems exactly and
in batches; these forms let the two paths be checked against each other.
"""
from __future__ import annotations

from convexddn._checks import check_int
from convexddn._lazy import cvxpy as cp
from convexddn.convex.registry import real_option, register
from convexddn.errors import OptionError
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
    the simplex). ``alpha > 1``; CVXPY represents ``p^α`` by second-order or power cones
    (exactly for rational α). Parameters: ``x`` ``(n,)``. Variable: ``p`` ``(n,)``.
    References: Peters, Niculae & Martins, ACL 2019.
    """
    n = check_int("n", n, minimum=1)
    alpha = real_option("alpha", alpha, above=1, hint=(
        " (alpha = 1 is softmax, which has no cone form here; use convexddn.nodes.entmax.entmax)"))
    x = cp.Parameter(n, name="x")
    p = cp.Variable(n, name="p")

    def problem():  # deferred: the native node (Entmax) does not need it
        try:
            power = cp.power(p, alpha)
        except ZeroDivisionError as err:
            # CVXPY writes p^α with power cones after rounding 1/α to a fraction with
            # denominator <= 1024; above α ≈ 2048 that fraction is 0 and it divides by it.
            raise OptionError(
                f"alpha = {alpha:g} is too large for CVXPY's cone form of p**alpha (it rounds "
                f"1/alpha to a fraction with denominator <= 1024, which is 0 here); use the "
                f"native node: convexddn.layer('entmax', n={n}, alpha={alpha:g})") from err
        objective = cp.sum(power) / (alpha * (alpha - 1.0)) - x @ p
        return cp.Problem(cp.Minimize(objective), [p >= 0, cp.sum(p) == 1])
    return problem, [x], [p]


@register("tv1d", "1-D total variation denoising: argmin_y ½‖y − x‖² + λ Σ|y_{i+1} − y_i|")
def tv1d(n: int, lam: float = 1.0):
    """.. math:: y(x) = \\operatorname*{argmin}_y \\tfrac12 \\|y - x\\|_2^2 + \\lambda \\sum_{i=1}^{n-1} |y_{i+1} - y_i|

    Parameters: ``x`` of shape ``(n,)``. Variable: ``y`` of shape ``(n,)``.
    ``lam`` ≥ 0 is a fixed option here; the native node
    :class:`convexddn.nodes.total_variation.TotalVariation1d` can learn it.
    """
    n = check_int("n", n, minimum=1)
    lam = real_option("lam", lam, at_least=0)
    x = cp.Parameter(n, name="x")
    y = cp.Variable(n, name="y")

    def problem():  # deferred: the native node (TotalVariation1d) does not need it
        tv = cp.norm1(cp.diff(y)) if n > 1 else 0
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(y - x) + lam * tv))
    return problem, [x], [y]
