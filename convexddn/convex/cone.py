"""The residual map of a cone program, for the per-element path.

For a cone program in the form cvxpylayers' DIFFCP canonicalisation produces
(:mod:`.cone_checks` measures its points and certificates),
:class:`ResidualMap` is the piecewise-smooth map :math:`R(z)` whose zeros are the
solutions (Busseti, Moursi & Boyd, 2019): its derivative polishes solutions by Newton
steps and, transposed, gives the adjoint derivative (Agrawal et al., "Differentiating
through a cone program", 2019).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from diffcp import _diffcp

from .bordered import Bordered, bordered, probes, sparse_derivative, sparse_pays
from .cone_checks import kkt_residual, residual_parts
from .exp_cone import Memo, derivative_correction, has_exp, project_cones
from .iterative import ADJOINT_REFINE, ADJOINT_RTOL, Plus, iterative_solve, null_reach, solver_condition
from .kinks import kink_sides, pair_tolerances
from .min_norm import min_norm_solve
from .parametric import Parametric, data_grads, theta_grads, unique_anyway
from .point_error import point_error
from .zero_rows import moves_zero_row

__all__ = ["ILL_CONDITIONED", "POLISH_ABOVE", "ResidualMap", "auto_mode"]


# Solution error goes like the square root of the KKT residual when a squared objective
# became a second-order cone: a polished result above this residual is in doubt (see
# ConvexLayer), and polishing ends once below it and a step stops helping.
POLISH_ABOVE = 1e-11
# No step is taken from a point at this residual (rounding level).
_POLISHED = 1e-14
# A Newton step that cuts the residual less than this (and leaves it within _FLOOR_SPREAD
# of the best) has stalled (see ResidualMap.refine).
_STEP_GAIN, _FLOOR_SPREAD = 0.1, 1e3


# Dense solves of M (N = rows + columns + 1) up to this size; above, a sparse LU where it
# pays, else LSMR (10× faster than dense at N = 1026, to ~1e-9).
_DENSE_MAX_N = 400


def auto_mode(cones: list, data_nonzeros: int, size: int) -> str:
    """How :class:`ResidualMap` solves a program of ``size`` rows + columns by default:
    ``"dense"`` up to 400, ``"sparse"`` where :func:`.bordered.sparse_pays`, else ``"lsmr"``."""
    if size <= _DENSE_MAX_N:
        return "dense"
    return "sparse" if sparse_pays(cones, data_nonzeros, size) else "lsmr"


def _skew(A, b, c) -> sp.csc_matrix:
    """``Q = [[0, Aᵀ, c], [-A, 0, b], [-cᵀ, -bᵀ, 0]]`` from its triplets, as ``sp.bmat`` builds it
    (``A``'s stored entries, ``b``'s and ``c``'s nonzeros), at a tenth of bmat's cost per element."""
    m, n = A.shape
    coo = A.tocoo()
    ib, ic = np.flatnonzero(b), np.flatnonzero(c)
    rows = np.concatenate([coo.col, n + coo.row, ic, n + ib, np.full(ic.size + ib.size, n + m)])
    cols = np.concatenate([n + coo.row, coo.col, np.full(ic.size + ib.size, n + m), ic, n + ib])
    vals = np.concatenate([coo.data, -coo.data, c[ic], b[ib], -c[ic], -b[ib]])
    return sp.csc_matrix((vals, (rows, cols)), shape=(n + m + 1, n + m + 1))


class ResidualMap:
    """One cone program with diffcp's residual-map derivative, for refining and differentiating.

    With :math:`z = (u, v, w)`, :math:`\\Pi` the projection onto
    :math:`\\mathbb{R}^n \\times K^* \\times \\mathbb{R}_+` and the skew matrix
    :math:`Q = [[0, A^T, c], [-A, 0, b], [-c^T, -b^T, 0]]`, a solution satisfies
    :math:`R(z) = (Q - I)\\Pi(z) + z = 0` (Busseti, Moursi & Boyd, 2019). Its derivative
    :math:`M = (Q - I) D\\Pi(z) + I` serves twice: Newton steps :math:`z \\leftarrow z - M^{-1}
    R(z)` polish the interior-point solution (which stalls near 1e-5 on projections whose
    quadratic objective became a second-order cone), and :math:`M^{-T}` gives the adjoint
    derivative (Agrawal et al., "Differentiating through a cone program", 2019).
    """

    def __init__(self, A, b, c, cones, cones_cpp, mode: str, colours: list | None = None) -> None:
        self.A, self.b, self.c = A, b, c
        self.cones, self.cones_cpp, self.mode = cones, cones_cpp, mode
        self._colours = colours  # mode "sparse": how to read DΠ (bordered.probes; on first use if None)
        self._exp = has_exp(cones)  # (their derivative is corrected: _dprojection)
        self.m, self.n = A.shape
        self._Q_dense = None  # (Q as an array, on first use by a dense M)
        self._memo = Memo()  # (the exponential cones' projections: each point's, once)
        self.Q = _skew(A, b, c)
        self.residual: float | None = None  # the polished point's KKT residual (refine's)
        self._rtol = _RANK_RTOL  # the dense solves' rank cut, for the point M is formed at (_rank_rtol)
        self.condition = 0.0  # the last dense or bordered solve's (equilibrated; 0: none solved)

    def _pi(self, z: np.ndarray) -> np.ndarray:
        n, m = self.n, self.m
        # diffcp's projection here, not project(): the Newton steps pair R with diffcp's
        # own derivative of it (dprojection), which has the same 1e-8 band on second-order
        # cones (exponential cones: both exact, _dual_projection and _dprojection).
        return np.concatenate([z[:n], self._dual_projection(z[n:n + m]), np.maximum(z[-1:], 0.0)])

    def _dual_projection(self, v: np.ndarray) -> np.ndarray:
        # (exponential cones: exact, where diffcp's stops at ~1e-8 and the polish with it)
        return project_cones(v, self.cones, True, self._memo)

    def _residual(self, z: np.ndarray) -> np.ndarray:
        pz = self._pi(z)
        # z − Π(z) first (−s in v's rows, exact where Π keeps a coordinate): summed left to right,
        # Q Π(z) − Π(z) lost a row's Q-term below the rounding of its multiplier (rows of 1e-8
        # with multipliers of 5e7: the rows' residual 2e-13 read as 0, and the polish stalled
        # at 5.6e-6 of their size).
        return self.Q @ pz + (z - pz)

    def _dprojection(self, v: np.ndarray):
        """D Π_{K*}(v): diffcp's operator, with exact exponential-cone blocks (those of
        :meth:`_dual_projection`; diffcp's are its own projection's)."""
        dproj = _diffcp.dprojection(v, self.cones_cpp, True)
        delta = derivative_correction(v, self.cones, dproj, self._memo)
        return dproj if delta is None else Plus(dproj, delta)

    def _operator(self, z: np.ndarray, dense: bool | None = None, dproj=None):
        """M at z: an (N, N) array (``dense``, by default in mode "dense"), in mode
        "sparse" a :class:`~.bordered.Bordered` factorisation (diffcp's operator where
        the bordered matrix is singular), else diffcp's operator; each with the exact
        exponential-cone derivative (:meth:`_dprojection`)."""
        n, m = self.n, self.m
        u, v, w = z[:n], z[n:n + m], float(z[-1])
        if dproj is None and (self._exp or (self.mode == "sparse" and not dense)):
            dproj = self._dprojection(v)  # (else given: the caller's, at the same v)
        if self.mode == "sparse" and not dense:
            if self._colours is None:
                self._colours = probes(self.cones)
            lu = bordered(sparse_derivative(self.Q, dproj, self._colours, z, n), z, _RANK_RTOL)
            if lu is not None:
                return lu
        # diffcp's M plus (Q - I) ΔD, ΔD the exponential cones' correction in v's rows and columns
        if (self.mode == "dense") if dense is None else dense:
            if self._Q_dense is None:
                self._Q_dense = self.Q.toarray()
            M = _diffcp.M_dense(self._Q_dense, self.cones_cpp, u, v, w)
            if isinstance(dproj, Plus):  # (dense: sparse products cost more than they save here)
                delta = dproj.delta.toarray()
                M[:, n:n + m] += self._Q_dense[:, n:n + m] @ delta
                M[n:n + m, n:n + m] -= delta
            return M
        op = _diffcp.M_operator(self.Q, self.cones_cpp, u, v, w)
        if not isinstance(dproj, Plus):
            return op
        delta = sp.block_diag([sp.csr_matrix((n, n)), dproj.delta, sp.csr_matrix((1, 1))], format="csr")
        return Plus(op, self.Q @ delta - delta)

    def _solve(self, M, rhs: np.ndarray, transpose: bool = False, refine: int = 0, budget: int | None = None):
        """Minimum-norm solution of M d = rhs (or Mᵀ d = rhs).

        M is singular at every solution (R is positively homogeneous), so a plain LU
        solve returns a finite vector with an arbitrary, often huge, component along
        the null space of Mᵀ, which the adjoint's formula does not cancel (seen:
        gradients off by 8 on a projection with no active constraint). The minimum-norm
        least-squares solution is the one the derivative is defined by (``refine``, ``budget``: iterative_solve's)."""
        if isinstance(M, Bordered):
            self.degenerate, self.outcome = False, "solved"  # (a rank below N - 1 gave diffcp's operator instead)
            sol, self.relative_residual = M.solve(rhs, transpose)
            self.condition = M.condition  # (equilibrated, as the dense solve's: .spread.in_doubt reads it)
            return sol
        if isinstance(M, np.ndarray):
            # (rank decided in equilibrated units, minimum norm in the caller's: .min_norm)
            sol, rank, self.condition = min_norm_solve(M.T if transpose else M, rhs, self._rtol)
            # R is positively homogeneous, so M is singular along z: rank N - 1 at a
            # differentiable solution. A lower rank means the solution is not unique (or
            # not differentiable there): the minimum-norm answer is then one choice among many.
            self.degenerate, self.rank = rank < rhs.size - 1, rank  # (rank: for unique_anyway)
            return sol
        self.degenerate = False  # (the iterative solvers give no rank: the adjoint tests M's null spaces, _doubt)
        lsqr = self.mode == "lsqr"
        sol, self.relative_residual, self.outcome = iterative_solve(M, rhs, transpose, lsqr, refine, budget)
        return sol

    def _triple(self, z: np.ndarray):
        """(x, y, s) of a point z = (u, v, w) scaled to w = 1: y = Π_{K*}(v), s = y − v."""
        z = z / z[-1]
        n, m = self.n, self.m
        y = self._dual_projection(z[n:n + m])
        return z, (z[:n], y, y - z[n:n + m])

    def refine(self, x, y, s, steps: int):
        """Newton steps on R(z) from the solver's point; returns (x, y, s, residual).

        The solver's own (x, y, s) is first replaced by the triple of z = (x, y − s, 1), whose complementarity is exact
        by construction, so the KKT residual also measures what an interior point leaves in y ∘ s. R is only piecewise
        smooth: a full step may first land on another piece and converge from there (seen on box constraints: residual
        1e-6 → 1 → 1e-16), so steps are taken in full and the best point seen is kept. At most ``steps`` steps; none
        from a point at rounding level (1e-14), and none after one that fails to cut a residual already at
        :data:`POLISH_ABOVE` tenfold without jumping a thousandfold above it (another piece of R). ``condition``: the
        last solve's; in the modes "lsmr" and "lsqr" the solver's own at the point kept (.iterative).
        """
        z, best = self._triple(np.concatenate([x, y - s, [1.0]]))
        zb, parts = z, residual_parts(self.A)  # (zb: best's z. A is the same at every step: its transposes once)
        best_r = kkt_residual(self.A, self.b, self.c, self.cones, *best, self._memo, parts)
        r, stepped = best_r, False
        for _ in range(steps):
            if not np.isfinite(best_r) or best_r <= _POLISHED:
                break
            self._rtol = _rank_rtol(r)  # (M at z, as accurate as z is)
            try:
                z, stepped = z - self._solve(self._operator(z), self._residual(z)), True
            except (ValueError, RuntimeError, ArithmeticError):
                break
            # M is singular along z itself (R is positively homogeneous), so the step
            # may rescale z, even flip it; only its direction matters.
            if not np.all(np.isfinite(z)) or z[-1] == 0:
                break
            z, cand = self._triple(z)
            r = kkt_residual(self.A, self.b, self.c, self.cones, *cand, self._memo, parts)
            stalled = _STEP_GAIN * best_r <= r <= _FLOOR_SPREAD * best_r
            if r < best_r:
                best, best_r, zb = cand, r, z
            # Newton converges quadratically; once the residual is down at POLISH_ABOVE, a
            # step that neither cuts it tenfold nor leaves the rounding floor's spread has
            # met that floor, and the next ones repeat it (a constrained MPC: 4e-4, 2e-9,
            # 4e-12, then 6e-12, 5e-12, 5e-12, each an LSMR solve of 0.7 s). A step may land
            # on another piece of R first and converge from there (1e-6 -> 1 -> 1e-16): a
            # jump far above, at any residual, lets the steps go on.
            if stalled and best_r <= POLISH_ABOVE:
                break
        if stepped and self.mode in ("lsmr", "lsqr"):
            self.condition = solver_condition(self._operator(zb), zb, self.mode == "lsqr")
        self.residual = best_r
        return (*best, best_r)

    def own_scale_residual(self, x: np.ndarray, y: np.ndarray, s: np.ndarray) -> float:
        """:func:`~.cone_checks.kkt_residual` of a point with its rows' own-scale floors (the
        per-element acceptance test, ``own_scale``), reusing this map's projections."""
        return kkt_residual(self.A, self.b, self.c, self.cones, x, y, s, self._memo, own_scale=True)

    def adjoint(self, x, y, s, parametric: Parametric | None = None):
        """The map (dx, dy) -> (dA at any (row, col), db, dc) of the solution's derivative.

        Sets ``degenerate`` when the gradient may not be unique: a cone block is not
        strictly complementary (a kink of the projection, :func:`.kinks.kink_sides`: a
        nonnegative row with multiplier and slack both 0, a second-order or PSD pair sharing
        a zero spectral value, an exponential cone's pair on the border of two pieces) and
        the side taken there matters, or the derivative system is rank-deficient beyond
        the homogeneity direction and the parameters or the cotangent reach the extra
        null directions (:func:`.parametric.unique_anyway` on a dense M; on an iterative or
        sparse one, whatever its size, the systems' consistency, :meth:`_doubt`; ``parametric``
        says how the parameters move the data, :class:`Parametric`; with ``None`` every
        rank deficiency counts). Sets ``zero_row`` where, degenerate, the program has a zero
        row that holds and that the parameters move (:func:`~.zero_rows.moves_zero_row`).
        """
        n, m = self.n, self.m
        z = np.concatenate([x, y - s, [1.0]])
        if self.residual is None:  # (a map rebuilt in a worker: refine ran in another process)
            self.residual = kkt_residual(self.A, self.b, self.c, self.cones, x, y, s, self._memo)
        self._rtol = _rank_rtol(self.residual)
        dproj = self._dprojection(z[n:n + m])
        M = self._operator(z, dproj=dproj)
        pi_z = self._pi(z)

        def error():  # the point's forward error in v's rows (.point_error), where a row is near a kink
            err = point_error(M, self.Q, z, pi_z, self._residual(z), self._rtol, self.mode == "lsqr")
            return None if err is None else err[n:n + m]

        tols = pair_tolerances(self.A, self.b, self.c, x, y, s, self.residual, self.cones, error)
        sides = kink_sides(self.cones, y, s, _SIDE_STEP * (1.0 + np.abs(z).max()), tols)
        reach: list = []  # (null_reach's test of M, on first need: it does not depend on the cotangent)

        def vjp(dx: np.ndarray, dy: np.ndarray, rows: np.ndarray, cols: np.ndarray):
            # This call's flags only (a zero cotangent returns before any solve; the
            # forward's refine left its own degeneracy flag here: with workers=1, whose
            # map is reused, an element with no cotangent was warned about).
            self.inaccurate, self.degenerate, self.zero_row = 0.0, False, False
            dw = -(x @ dx + y @ dy)
            dz = np.concatenate([dx, dproj.rmatvec(dy), [dw]])
            if not np.any(dz):
                return np.zeros(rows.size), np.zeros(m), np.zeros(n)
            # Refined where steps cost less than the dense fallback's ~N³ (N iterations), else above ADJOINT_RTOL to it
            # (_doubt): a QP, 451 rows + cols, 3800 iterations a step; an L1-ball projection, 2900: 5 ms LSMR, 3.4 s LU.
            Mz = M
            r = self._solve(Mz, dz, True, ADJOINT_REFINE, None if dz.size > _DENSE_FALLBACK_MAX else dz.size)
            doubt = None if isinstance(Mz, np.ndarray) else self._doubt(Mz, z, pi_z, parametric, reach)
            if doubt is not None:
                # Solved densely where that is affordable (its rank and unique_anyway decide), else reported.
                if dz.size <= _DENSE_FALLBACK_MAX:
                    Mz = self._operator(z, dense=True)
                    r = self._solve(Mz, dz, transpose=True)
                elif doubt[0]:
                    self.degenerate = True
                else:
                    self.inaccurate = doubt[1]
            degenerate = self.degenerate and (parametric is None or not isinstance(Mz, np.ndarray)
                                              or not unique_anyway(Mz, dz, pi_z, n, parametric, self.rank))
            grads = data_grads(r, pi_z, n, rows, cols)
            self.degenerate = degenerate or (sides is not None and not self._either_side(
                z, sides, (dx, dy, dw), r, pi_z, parametric, isinstance(Mz, np.ndarray)))
            # (why, for the warning: a zero row that holds, moved by the parameters)
            self.zero_row = self.degenerate and parametric is not None and moves_zero_row(
                self.A, self.b, self.cones, x, parametric)
            return grads

        return vjp

    def _doubt(self, M, z, pi_z, parametric: Parametric | None, reach: list) -> tuple[bool, float] | None:
        """Why the last iterative or bordered solve's ``r`` may not be the gradient, ``(degenerate, relative
        residual)``: the adjoint system, consistent at a differentiable solution (z̄ ⟂ z), is not (``degenerate``
        where the solver found its least-squares solution: the cotangent reaches a second null direction; else
        it stopped short: a constrained MPC, 1291 rows and columns, at 1e-5, 19 % off; an iterative solve, refined,
        above :data:`.iterative.ADJOINT_RTOL`: an entropy problem at 5e-10, 2e-5 off); or M has a null direction
        beyond z that the parameters reach (:func:`.iterative.null_reach`, cached in ``reach``; not where the
        bordered LU certified rank N − 1): a 15 × 15 assignment LP with two optimal permutations and a loss
        constant on their face got a gradient from LSMR silently. None where neither."""
        if self.relative_residual > (_ITERATIVE_RTOL if isinstance(M, Bordered) else ADJOINT_RTOL):
            return self.outcome == "least squares", self.relative_residual
        if isinstance(M, Bordered):
            return None
        if not reach:
            reach.append(null_reach(M, z, pi_z, self.n, parametric, self.mode == "lsqr"))
        relative, outcome = reach[0]
        # (a residual above rounding where LSMR says it solved the system: its atol term, ‖M‖‖d‖ large).
        # A test stopped on a limit decides nothing: the adjoint converged, its gradient stands.
        doubtful = outcome == "least squares" and relative > max(_ITERATIVE_RTOL, self.residual)
        return (True, relative) if doubtful else None

    def _either_side(self, z, sides, dz_parts, r, pi_z, parametric: Parametric | None, dense: bool) -> bool:
        """Whether the gradient is the same whichever side of its kink each cone block
        that is not strictly complementary is taken on (``sides``: :func:`.kinks.kink_sides`'
        two points v; on a nonnegative row the projection's derivative is 0 or 1): the
        adjoint solved with each (densely where ``r`` was, else by the bordered LU or LSMR:
        the non-dense modes warned about a weak row in a block the loss does not read) must
        give the same gradient as ``r`` (a free epigraph variable's bound, e.g. ‖x_i‖ <= t_i
        with row i inside, is such a row; a weakly active constraint is not). Compared in
        the parameters θ where ``parametric`` says how they move the data (a constant
        objective's entries may differ: no parameter reads them). A side's LSMR solve that
        does not converge counts as different. ``dz_parts``: the cotangent's ``(dx, dy, dw)``."""
        n, m = self.n, self.m
        dx, dy, dw = dz_parts

        if parametric is None:  # (no map to θ: every difference in the data would count)
            return False

        def gradient(adj):
            return (theta_grads(parametric, *data_grads(adj, pi_z, n, parametric.rows, parametric.cols)),)

        base = gradient(r)
        size = max(max(np.abs(g).max(initial=0.0) for g in base), 1e-300)
        kept = {k: getattr(self, k) for k in _SOLVE_DIAGNOSTICS if hasattr(self, k)}
        try:
            for side in sides:
                zs = z.copy()
                zs[n:n + m] = side
                dproj = self._dprojection(zs[n:n + m])
                other = self._solve(self._operator(zs, dense=dense, dproj=dproj),
                                    np.concatenate([dx, dproj.rmatvec(dy), [dw]]), transpose=True)
                if not dense and self.relative_residual > _ITERATIVE_RTOL:
                    return False
                if any(np.abs(a - b).max(initial=0.0) > _SIDE_RTOL * size for a, b in zip(gradient(other), base)):
                    return False
            return True
        finally:
            self.__dict__.update(kept)


# Singular values of M below this fraction of its largest are taken as 0 by the dense
# solves. M is formed at the solver's point, accurate to its tolerance (~1e-9), so a
# direction that weak is not resolved there: equality rows that repeat each other (a
# row and twice it) left M's second null direction at 1.5e-12 (not 1e-16) at Clarabel's
# point, and with a cut at 1e-12 the Newton polish stepped along it to multipliers of
# ±8e3 and the gradient's norm went to 4e4 (the minimum-norm one: 0.9).
_RANK_RTOL = 1e-9
# ... but only where M is formed at a point that inaccurate: at a point of KKT residual r
# (relative, as the singular values are on the equilibrated M), directions above r are
# resolved, down to this floor (rounding in forming M: the homogeneity direction's own
# singular value sits at ~r, ~eps at an exact point). Nearly parallel active rows (1e-6
# apart, multipliers 0.26 and 0.90) make a genuine singular value of 1.4e-13 (their
# angle, squared by the objective's block): cut at 1e-9, the polish stalled at multipliers
# 0.58 and 0.58 (solution 2.6e-7 off at residual 4.7e-14) and the adjoint called the
# solution not unique, its gradient 0.55 off.
_RANK_FLOOR = 64 * np.finfo(np.float64).eps

# A polish whose last dense or bordered solve had a condition above this (the equilibrated M's, along the
# directions it kept; LAPACK's 1-norm estimate; LSMR's and LSQR's: .iterative.solver_condition) leaves a point
# and a gradient whose errors its residual does not bound: rounding alone costs ~10 eps of it (rows scaled by
# 1e8: condition 7.7e8, gradients 2e-6 off at residual 1e-16; the parallel rows above, kept at 1.4e-13: 1.8e13,
# 5e-4 off), so such a result is in doubt (.spread.in_doubt) and the batched path re-solves it.
ILL_CONDITIONED = 1e6


def _rank_rtol(residual: float) -> float:
    """The rank cut of the dense solves at a point of KKT residual ``residual``."""
    return min(_RANK_RTOL, max(_RANK_FLOOR, residual)) if np.isfinite(residual) else _RANK_RTOL

# Where kink_sides puts a zero spectral value of v on either side, relative to z's size.
_SIDE_STEP = 1e-12

# What _solve leaves on the map about its solve, which the kinks' side solves keep.
_SOLVE_DIAGNOSTICS = ("degenerate", "rank", "condition", "outcome", "relative_residual")

# Relative difference between the gradients on the two sides of the kinks below
# which it is taken as one (dense solves of one system: ~1e-14 apart when it is).
_SIDE_RTOL = 1e-8

# The largest relative residual accepted from the bordered LU's adjoint, a kink's side solve, and null_reach's test
# (at least the point's KKT residual: M is singular along z to that accuracy); above, the dense solve below this size.
_ITERATIVE_RTOL = 1e-9
_DENSE_FALLBACK_MAX = 3000
