"""A certificate's reach: where an approximate ray stops proving anything, and whether a ray
has no such limit (exact to rounding), for :mod:`.dissent` and the per-element solve.

A dual ray ``ȳ ∈ K*`` of infeasibility with ``Aᵀȳ`` off zero in a column excludes only the
points whose ``−xᵀAᵀȳ`` stays below ``|bᵀȳ|`` (:func:`reach_point`); a primal ray ``d`` of
unboundedness with ``−Ad`` off K by ``e`` excludes only the dual points with
``‖y‖₁ < |cᵀd| / ‖e‖∞`` (:mod:`.dissent`'s identity). A ray whose misses are all within the
rounding of their terms has no reach a float64 point can show: :func:`exact_ray`,
:func:`exact_unbounded`, and :func:`exact_claim` for either claim.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .cone_checks import _blockwise_violation, _drop_noise, project, row_maxima, verify_certificate
from .ray_fit import column_misses, fitted, polyhedral

__all__ = ["exact_claim", "exact_ray", "exact_unbounded", "reach_point", "reach_scaling"]

_EPS = np.finfo(np.float64).eps
# Rounding units of a ray's terms within which a miss counts as rounding (as .dissent.reaches discounts).
_ROUNDING = 64


def reach_point(A: sp.csc_matrix, b: np.ndarray, cones: list, ray: np.ndarray) -> np.ndarray | None:
    """Where the dual ray ``ray`` stops reaching: ``x_j = −sign((Aᵀȳ)_j) R_j`` on the columns
    that set its reach (``R_j = |bᵀȳ| / |(Aᵀȳ)_j|`` within a factor 10 of the least; ``ȳ`` the
    ray in K*, normalised), 0 on the others; ``None`` where no column limits it (``Aᵀȳ = 0`` to
    rounding: the ray is exact, :func:`exact_ray`). All 0 where ``bᵀȳ = 0``."""
    yb = project(ray / np.max(np.abs(ray)), cones, dual=True)
    # A column whose (Aᵀȳ)_j is within the rounding of its terms (64 eps |A|ᵀ|ȳ|) limits nothing
    # a float64 point can show: beyond its "reach" |x_j (Aᵀȳ)_j| passes |bᵀȳ| only where the
    # rounding of those rows does too, which :func:`reaches` discounts. Scaled, such columns made
    # the re-solve a program of rounding: an O(1) QP with G₀x <= h₀, G₀x >= h₀ + 1e-2 had 24 of
    # its 25 columns within 10x of the least reach (1.8e12) by rounding alone; Clarabel failed
    # there and SCS ran to its iteration limit, while with the one column that sets the reach
    # scaled Clarabel confirmed the ray.
    g = column_misses(A, yb)
    if not np.any(g != 0):
        return None
    reach = np.full(g.shape, np.inf)
    reach[g != 0] = abs(float(b @ yb)) / np.abs(g[g != 0])
    x = np.zeros_like(g)
    if reach.min() > 0:
        near = reach <= 10 * reach.min()
        x[near] = -np.sign(g[near]) * reach[near]
    return x


def reach_scaling(A: sp.csc_matrix, b: np.ndarray, cones: list, ray: np.ndarray) -> np.ndarray | None:
    """The column scaling ``D`` at which to re-solve a program whose dual ray ``ray``
    reaches only so far: each column's reach ``|x_j|`` at :func:`reach_point` on the columns
    that set the reach, 1 on the others; ``None`` where no column limits it (the ray is exact,
    :func:`exact_ray`).

    With ``x = D x'`` the points at the edge of the reach are of unit size, where the
    solvers' tolerances see them: on ``x <= 1e6, log x >= log(1e6) + 1`` (infeasible)
    Clarabel claimed infeasibility again there, with a ray that verifies. (A column that stretches
    a second-order cone along its edge leaves it unbalanced at any scale: :mod:`.edge_boost`.)
    """
    x = reach_point(A, b, cones, ray)
    return None if x is None else np.where(x != 0, np.abs(x), 1.0)


def exact_ray(A: sp.csc_matrix, b: np.ndarray, cones: list, ray: np.ndarray) -> bool:
    """Whether the dual ray ``ray``, or a part of it that is itself a certificate, is exact in
    float64: each column of ``Aᵀȳ`` is 0 to the rounding of its terms (:func:`reach_point`
    is ``None``). A verified claim of infeasibility with such a ray stands whatever another run
    shows (:func:`believed`): every point is within its reach, and there is none to re-solve at.

    The parts tried: the ray as it came (verified by the caller); and, each kept only where it
    verifies (:func:`~.cone_checks.verify_certificate`), the ray without the noise of the rows it
    does not use (``_drop_noise``, at that check's tolerance) and that without its curved cone
    blocks (second-order, exponential, PSD), made exact on the rows it keeps
    (:func:`.ray_fit.polyhedral`), and the cleaned ray made exact on all its rows, less the blocks
    at the edge of K* that this pushes out (:func:`.ray_fit.fitted`). A solver's ray may lean on a
    cone it does not need: Clarabel's for ``G₀x <= h₀``, ``G₀x >= h₀ + 1e-3`` in a QP put 2e-3 on
    the objective's second-order cone, at its edge, whose epigraph column it missed by 4e-16
    ("reach" 1.4e12), while the two rows alone are an exact certificate; for an infeasible SDP or
    exponential cone program with a curved objective it leaned on the objective's epigraph cone
    too, and its curved constraint blocks, inside K*, are needed and fitted with the rest."""
    zero = np.zeros(A.shape[1])

    def parts():
        # (lazily: the later parts cost a least squares)
        yb = project(ray / np.max(np.abs(ray)), cones, dual=True)
        yield yb  # (projected onto K*: verified again below, as the parts are)
        rows = row_maxima(A)[0]
        clean = _drop_noise(yb, rows, cones, 1e-6)
        yield clean
        yield polyhedral(A, cones, clean)
        # All its rows made exact, the blocks at the edge of K* that the fit pushes out dropped
        # (.ray_fit): the objective's epigraph cones, which a ray may lean on though any x meets
        # them at a large t, set the reach of an SDP's and an exponential cone program's rays
        # (3e11-5e12), and the element's verdict then hung on the objective.
        yield fitted(A, cones, clean)

    # (the cheap test first: most rays that are not exact fail it)
    return any(r is not None and np.any(r != 0) and reach_point(A, b, cones, r) is None
               and verify_certificate(A, b, zero, cones, zero, r, "infeasible") for r in parts())


def exact_unbounded(A: sp.csc_matrix, cones: list, ray: np.ndarray) -> bool:
    """Whether the primal ray ``ray`` (a verified certificate of unboundedness) lies in the recession
    cone exact to rounding: ``d = ray / ‖ray‖∞``, ``s = −Ad`` within ``64 eps`` of K on each cone block,
    against the block's terms ``|A||d|`` plus its rows' largest ``|A|`` entry (``d``'s unit is 1: an
    entry of ``d`` at 4e-18, the rounding of a zero, met a row's term of 4e-18 alone and left it by
    all of it), as :func:`.rays.exact_unbounded_ray` on the batched path.

    An approximate ray excludes only the dual points below ``|cᵀd| / ‖e‖∞`` (:mod:`.dissent`):
    SCS's on ``min −Σentr(y) − aᵀy`` with ``y* = e^{a−1} ~ 1e8`` lies 6e-10 off K_exp (5.5e6 eps
    of its terms), a bounded problem; an LP's and a plain ``y >= exp(z)``'s lie within rounding.
    """
    if not np.all(np.isfinite(ray)) or not np.any(ray):
        return False
    d = ray / np.max(np.abs(ray))
    s = -(A @ d)
    terms = abs(A) @ np.abs(d) + row_maxima(A)[0]
    return _blockwise_violation(s, project(s, cones), cones, terms, unit=1e-300) <= _ROUNDING * _EPS


def exact_claim(A: sp.csc_matrix, b: np.ndarray, cones: list, claim: str, x: np.ndarray, y: np.ndarray) -> bool:
    """Whether the verified certificate of ``claim`` (``y`` for ``"infeasible"``, ``x`` for
    ``"unbounded"``) is exact to rounding (:func:`exact_ray`, :func:`exact_unbounded`): it decides
    with no other solver's opinion. ``False`` for any other claim."""
    if claim == "infeasible":
        return exact_ray(A, b, cones, y)
    return claim == "unbounded" and exact_unbounded(A, cones, x)
