"""Iterative solves of the residual map's derivative systems, and what they say about its null spaces.

:class:`~.cone.ResidualMap` solves with :math:`M = (Q - I)\\, D\\Pi(z) + I` (``N`` = rows +
columns + 1) by LSMR or LSQR in the modes ``"lsmr"`` and ``"lsqr"`` (``"auto"`` above 400 where
a sparse LU does not pay), and in the mode ``"sparse"`` where the bordered LU is singular
(:func:`~.bordered.bordered`: rank below ``N - 1``). :math:`M` is singular along ``z`` at every
solution; a second null direction means a solution that is not unique or not differentiable
(a degenerate vertex, a face of optima), and the least-squares solvers return their
minimum-norm point whatever the rank: the dense path's rank (:mod:`.min_norm`) has no
counterpart here. What decides whether the gradient exists (:func:`~.parametric.unique_anyway`)
is a pair of consistency conditions, and an iterative solver sees consistency in its residual:

- the adjoint :math:`M^T r = \\bar z` is consistent, :math:`N_r^T \\bar z = 0` (the cotangent
  does not see the solution set's directions): its own residual says so;
- every :math:`M\\, d = \\partial_{\\theta_k} R` is consistent, :math:`N_l^T \\partial_{\\theta_k}
  R = 0` (no parameter moves the solution off its set): one system with a fixed generic
  combination :math:`g = \\sum_k \\omega_k \\partial_{\\theta_k} R` tests them all
  (:func:`~.parametric.data_tangent`); with no map to θ, a generic :math:`h \\perp z` in
  :math:`M^T r = h` tests the rank itself (range :math:`M^T = z^\\perp` exactly at rank ``N - 1``).

A consistent system's relative residual goes to ~1e-11 and LSMR stops "solved"; an inconsistent
one's stays at :math:`\\|P_{N_l} g\\| / \\|g\\|` and LSMR stops on its least-squares test (a 15 × 15
assignment LP with two optimal permutations and a loss constant on their face: 1.5e-2; the same
LP with one optimum, degenerate but unique in its cost C: 1.6e-11, solved). Where the test doubts,
the adjoint is solved densely up to 3000 rows + columns (its rank and ``unique_anyway`` decide, as
on the dense path); above, the test's verdict stands. Cost: one more LSMR solve per element's
backward, none where the bordered LU certified rank ``N - 1`` (a capped-simplex QP, 805 and 1605
rows + columns: backward 13.6 -> 17.4 ms and 28.5 -> 33.4 ms, forward ~25 and ~65 ms, as measured
by its author; a review measured the backward in mode ``"lsmr"`` at batch 4 at 10.7 -> 17-19 ms for
the n = 400 capped simplex and 4.2 -> 7.9 s for a QP with n = 200, 400 rows: the test system takes
about as many iterations as the adjoint; the modes ``"auto"`` and ``"sparse"`` were unchanged there,
their bordered LU certifying the rank).

The Newton polish in the modes ``"lsmr"`` and ``"lsqr"`` has no factorisation to estimate the
condition its residual's bound needs (:data:`~.cone.ILL_CONDITIONED`): :func:`solver_condition`
measures the solver's own, at the point kept.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse import linalg as sla

from .parametric import Parametric, data_tangent

__all__ = ["ADJOINT_REFINE", "ADJOINT_RTOL", "Plus", "iterative_solve", "null_reach", "solver_condition"]

# LSMR's and LSQR's stopping codes (istop): a solution within their tolerances (1, 4), a
# least-squares one (2, 5: the system is not consistent), or neither (3, 6: their condition
# limit; 7: their iteration limit). 0: the right-hand side is 0.
_OUTCOMES = {0: "solved", 1: "solved", 4: "solved", 2: "least squares", 5: "least squares"}
# Their tolerances (atol, btol).
_SOLVER_TOL = 1e-12
# Iterative refinement (_refine) ends at this relative residual (rounding on the systems seen: 1e-14 to 1e-17),
# or after a step that cuts the residual less than _REFINE_GAIN-fold.
_REFINED, _REFINE_GAIN = 1e-14, 0.1
# The residual map's adjoint solves are refined by up to ADJOINT_REFINE steps (_refine: the gradient loses to
# cancellation what their residual leaves); what is left above ADJOINT_RTOL is in doubt (.cone.ResidualMap._doubt;
# refined solves reached 1e-14 to 1e-16; a log barrier's gradient was 8e-4 off at 7e-10, ~1e-6 at 1e-12).
ADJOINT_REFINE, ADJOINT_RTOL = 3, 1e-12


def iterative_solve(op, rhs: np.ndarray, transpose: bool = False, lsqr: bool = False, refine: int = 0,
                    budget: int | None = None) -> tuple[np.ndarray, float, str]:
    """``(d, relative residual, outcome)``: the minimum-norm least-squares solution of ``op d =
    rhs`` (``op.transpose()``'s where ``transpose``; ``op``: diffcp's operator or a :class:`Plus`,
    ``(N, N)``) by LSMR (LSQR where ``lsqr``) to 1e-12, at most ``10 N`` iterations; ``outcome``
    ``"solved"`` (consistent to those tolerances), ``"least squares"`` (not consistent) or
    ``"unfinished"`` (stopped on a limit: undecided). With ``refine`` > 0, a solved system is
    refined by up to that many steps (:func:`_refine`) and the residual returned is the one measured;
    with a ``budget`` of iterations, only where the steps' likely cost (the first solve's iterations
    each) is within it (a caller with a cheaper way to an exact answer: the dense solve, ~N³)."""
    size = rhs.size
    op = op.transpose() if transpose else op
    lin = sla.LinearOperator((size, size), matvec=op.matvec, rmatvec=op.rmatvec)
    sol, istop, normr, iterations = _least_squares(lin, rhs, lsqr)
    scale = max(float(np.linalg.norm(rhs)), np.finfo(float).tiny)
    outcome = _OUTCOMES.get(istop, "unfinished")
    if refine and outcome == "solved" and np.any(rhs) and (budget is None or iterations * refine <= budget):
        sol, normr = _refine(lin, rhs, sol, lsqr, refine)
    return sol, float(normr / scale), outcome


def _least_squares(lin, rhs: np.ndarray, lsqr: bool) -> tuple[np.ndarray, int, float, int]:
    """``(d, istop, ‖rhs − lin d‖, iterations)``: LSMR's (LSQR's where ``lsqr``) solution of ``lin d =
    rhs`` to :data:`_SOLVER_TOL`, in ``10 N`` steps at most."""
    # (scipy's lsqr calls the iteration limit iter_lim, lsmr maxiter; lsqr's 3rd and 4th
    # results are its iterations and residual norm r1norm, lsmr's itn and normr.)
    solver = sla.lsqr if lsqr else sla.lsmr
    limit = {"iter_lim" if lsqr else "maxiter": 10 * rhs.size}
    sol, istop, iterations, normr = solver(lin, rhs, atol=_SOLVER_TOL, btol=_SOLVER_TOL, **limit)[:4]
    return sol, int(istop), float(normr), int(iterations)


def _refine(lin, rhs: np.ndarray, sol: np.ndarray, lsqr: bool, steps: int) -> tuple[np.ndarray, float]:
    r"""``(d, ‖rhs − lin d‖)`` after iterative refinement of a consistent system's solution ``sol``:
    :math:`d \leftarrow d + \delta`, :math:`\delta` the same solver's solution of :math:`\mathrm{lin}\,
    \delta = \mathrm{rhs} - \mathrm{lin}\, d` (the residual measured, not the solver's recurrence).

    Why: LSMR and LSQR stop where :math:`\|r\| \le \mathrm{btol} \|b\| + \mathrm{atol} \|A\| \|d\|`, which
    on an ill-conditioned :math:`M` (``‖A‖‖d‖ ≫ ‖b‖``) passes relative residuals of 1e-10 to 1e-8; the
    adjoint's gradient, a difference of products of ``d`` with the data, loses a further 1e3–1e6 to
    cancellation (an entropy problem, y ~ 1e4: residual 5e-10, gradient 2e-5 off; a log barrier at a ~ 1e3:
    7e-10, 8e-4 off). One step took both to residuals of 1e-14 and 1e-16 and gradients within 1e-9 of
    the dense solve's. Each correction starts from 0, so it lies in the range of ``lin``'s adjoint, as
    the first solve does: the sum is still the minimum-norm solution. Steps stop at rounding level
    (:data:`_REFINED`), where one fails to cut the residual tenfold (it is kept only if smaller), or
    where the correction's solve does not converge."""
    res = rhs - lin.matvec(sol)
    normr, scale = float(np.linalg.norm(res)), float(np.linalg.norm(rhs))
    for _ in range(steps):
        if normr <= _REFINED * scale:
            break
        delta, istop, _, _ = _least_squares(lin, res, lsqr)
        if _OUTCOMES.get(istop) is None or not np.all(np.isfinite(delta)):
            break
        cand = sol + delta
        res_c = rhs - lin.matvec(cand)
        norm_c, before = float(np.linalg.norm(res_c)), normr
        if norm_c < normr:
            sol, res, normr = cand, res_c, norm_c
        if not norm_c <= _REFINE_GAIN * before:  # (at its floor: another step repeats it; NaN stops too)
            break
    return sol, normr


def null_reach(op, z: np.ndarray, pi_z: np.ndarray, n: int, par: Parametric | None, lsqr: bool = False
               ) -> tuple[float, str]:
    """``(relative residual, outcome)`` (:func:`iterative_solve`'s) of the test system (module
    docstring): ``M d = g``, ``g`` the parameters' generic direction of ``R`` at ``z`` (``pi_z`` =
    Π(z), ``n`` columns), or with ``par`` None ``Mᵀ r = h``, ``h ⟂ z`` generic. ``"least squares"``
    at a residual above rounding: the parameters (with ``par`` None: any rank deficiency) reach a
    null direction beyond ``z``."""
    if par is not None:
        k = par.c_map.shape[1]
        # Each parameter at unit reach into the data: one with small entries beside large ones
        # would otherwise be lost in g's rounding. A fixed seed: the same verdict on every call.
        size = np.sqrt(sp.csr_matrix(par.ab_map).power(2).sum(0).A1 + sp.csr_matrix(par.c_map).power(2).sum(0).A1)
        omega = np.random.default_rng(0).standard_normal(k) / np.where(size > 0, size, 1.0)
        rhs, transpose = data_tangent(par, pi_z, n, omega), False
    else:
        rhs, transpose = _off(np.random.default_rng(0).standard_normal(z.size), z), True
    if not np.any(rhs):  # (no parameter moves R: nothing to reach)
        return 0.0, "solved"
    return iterative_solve(op, rhs, transpose, lsqr)[1:]


def solver_condition(op, z: np.ndarray, lsqr: bool = False) -> float:
    """A lower bound of :math:`M`'s condition on :math:`z^\\perp` as the iterative solver sees it
    (``op``: :math:`M` at ``z``, ``(N, N)``): its forward over its backward error on a system whose
    solution is known, :math:`M d = M g` with a fixed generic :math:`g \\perp z`,

    .. math::  \\kappa \\ge \\frac{\\|P (d - g)\\| / \\|g\\|}{\\max(\\|M d - M g\\| / \\|M g\\|, \\tau)},

    :math:`P` the projection off :math:`z` (``M``'s null direction, along which ``d`` is free), ``τ``
    the solvers' tolerance (1e-12; a residual below it is not what they aim at). Both errors are
    honest: ``κ ≥ ‖e‖/‖g‖ ÷ (‖M e‖/‖M g‖)`` for any ``M``. A solve stopped short of its tolerance (on
    a limit, or on its least-squares test: the system is consistent) certified no residual, and its
    forward error counts in units of ``τ`` (LSQR on that QP: 4.7e-2 at 1.8e-7, its iteration limit,
    which would bound only 2.6e5; read 4.7e10). It is what the Newton polish's point is
    worth: a step solves :math:`M d = R(z) = M z` (``R`` is positively homogeneous), the same system
    with ``z`` for ``g``, so what the solver leaves of a generic direction it leaves of the point's
    error. A QP scaled by 10²–10³ (:mod:`.bordered`'s) missed ``g`` by 4.7e-2 at a relative residual
    of 1.1e-9 and 2.3e-9 (bounds 4e7 and 2e7): its polish left residuals of 1e-12 with points 8e-6
    and 2.7e-4 off; the same QP unscaled, 5e-8 at 6e-10 (86), its point 3e-15 off; a capped simplex,
    n = 200 and 400, 5e-11 to 1.4e-8 (1 to 100). One more solve, as costly as a Newton step's."""
    g = _off(np.random.default_rng(0).standard_normal(z.size), z)  # (fixed seed: the same verdict on every call)
    rhs = op.matvec(g)
    d, relative, outcome = iterative_solve(op, rhs, False, lsqr)
    e = _off(d - g, z)
    forward = float(np.linalg.norm(e) / np.linalg.norm(g))
    backward = relative if outcome == "solved" else 0.0  # (stopped short of its tolerance: worth no more)
    return forward / max(backward, _SOLVER_TOL) if np.isfinite(forward) else float("inf")


def _off(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``v`` with its part along ``z`` removed (M's null direction)."""
    return v - (v @ z) / (z @ z) * z


class Plus:
    """An operator (diffcp's: ``matvec``, ``rmatvec``, ``transpose``) plus a sparse matrix."""

    def __init__(self, op, delta: sp.spmatrix) -> None:
        self.op, self.delta = op, delta

    def matvec(self, x: np.ndarray) -> np.ndarray:
        return self.op.matvec(x) + self.delta @ x

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self.op.rmatvec(y) + self.delta.T @ y

    def transpose(self) -> _Transposed:
        return _Transposed(self)


class _Transposed:
    def __init__(self, plus: Plus) -> None:
        self.plus = plus

    def matvec(self, y: np.ndarray) -> np.ndarray:
        return self.plus.rmatvec(y)

    def rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self.plus.matvec(x)
