"""Cone-program maths shared by the backends: KKT residual and the residual map.

A cone program in the form cvxpylayers' DIFFCP canonicalisation produces,

.. math::

    \\min_x c^T x \\quad \\text{s.t.}\\quad A x + s = b,\\; s \\in K,

is solved exactly when its KKT conditions hold: :func:`kkt_residual` measures how far a
point ``(x, y, s)`` is from that, relative to the data's magnitude.
:class:`ResidualMap` is the piecewise-smooth map :math:`R(z)` whose zeros are the
solutions (Busseti, Moursi & Boyd, 2019): its derivative polishes solutions by Newton
steps and, transposed, gives the adjoint derivative (Agrawal et al., "Differentiating
through a cone program", 2019).
"""
from __future__ import annotations


import numpy as np
import scipy.linalg
import scipy.sparse as sp
from diffcp import _diffcp
from diffcp import cones as cone_lib
from scipy.sparse import linalg as sla

from .parametric import Parametric, data_grads, theta_grads, unique_anyway

__all__ = ["POLISH_ABOVE", "ResidualMap", "kkt_residual", "verify_certificate"]


# Solution error goes like the square root of the KKT residual when a squared objective
# became a second-order cone: a polished result above this residual is in doubt (see
# ConvexLayer), and polishing ends once below it and a step stops helping.
POLISH_ABOVE = 1e-11
# No step is taken from a point at this residual (rounding level).
_POLISHED = 1e-14
# A Newton step that cuts the residual less than this (and leaves it within _FLOOR_SPREAD
# of the best) has stalled (see ResidualMap.refine).
_STEP_GAIN, _FLOOR_SPREAD = 0.1, 1e3


def _soc(v: np.ndarray) -> np.ndarray:
    """The exact projection onto one second-order cone {(t, u): ‖u‖ <= t}."""
    t, u = v[0], v[1:]
    nu = float(np.linalg.norm(u))
    if nu <= t:
        return v
    if nu <= -t:
        return np.zeros_like(v)
    a = 0.5 * (t + nu)
    return np.concatenate([[a], (a / nu) * u])


def _rows(kind: str, size) -> int:
    """Rows of a parsed diffcp cone entry (``size``: an int, or a list for q and s)."""
    if kind in (cone_lib.SOC, cone_lib.PSD):
        return int(sum(size if kind == cone_lib.SOC else (k * (k + 1) // 2 for k in size)))
    return 3 * int(size) if kind in (cone_lib.EXP, cone_lib.EXP_DUAL) else int(size)


def project(x: np.ndarray, cones: list, dual: bool = False) -> np.ndarray:
    """diffcp's projection onto K (or K*), exact on the second-order cones, for the checks
    (:func:`kkt_residual`, :func:`verify_certificate`): diffcp's returns a point unchanged
    when ``‖u‖`` is within ``1e-8`` of ``t`` (``np.isclose``: 1e-5 relative), so a slack
    outside a cone by 1e-5 relative read as inside and passed a KKT check at 1e-6 (the
    cones are self-dual: ``dual`` does not matter there)."""
    out = cone_lib.pi(x, cones, dual=dual)
    at = 0
    for kind, size in cones:
        if kind == cone_lib.SOC:
            for q in size:
                out[at:at + q] = _soc(x[at:at + q])
                at += q
        else:
            at += _rows(kind, size)
    return out


def kkt_residual(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, cones: list,
                 x: np.ndarray, y: np.ndarray, s: np.ndarray) -> float:
    """Largest relative violation of primal/dual feasibility, cone membership and gap.

    Feasibility is measured row by row (column by column) against the magnitudes of the
    row's own terms, ``1 + (|A||x| + |s| + |b|)_i`` (``1 + (|A|ᵀ|y| + |c|)_j``), after
    discounting the rounding those terms carry (``64 eps`` of them); a slack's distance
    to K against its rows' scale, a multiplier's against ``1 + ‖y‖∞``. One norm for all
    rows let an inactive bound of 6.7e7 hide violations of 6e-3 in rows of 1e-2 (an
    infeasible LP returned as solved). (A far-off point whose residual grows with its
    own size is relatively accurate by these measures: only the gap can tell it.)
    The gap is relative to the smaller of the two objective values, as Clarabel
    measures it.
    """
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(s))):
        return float("inf")
    Ax = A @ x
    ATy = A.T @ y
    cx, by = float(c @ x), float(b @ y)
    absA = abs(A)

    def worst(v: np.ndarray) -> float:
        return float(np.max(v)) if v.size else 0.0

    eps = np.finfo(np.float64).eps
    terms_p = absA @ np.abs(x) + np.abs(s) + np.abs(b)  # each row's terms' magnitudes
    terms_d = absA.T @ np.abs(y) + np.abs(c)
    primal = worst(np.maximum(np.abs(Ax + s - b) - 64 * eps * terms_p, 0.0) / (1.0 + terms_p))
    dual = worst(np.maximum(np.abs(ATy + c) - 64 * eps * terms_d, 0.0) / (1.0 + terms_d))
    gap = max(abs(cx + by) - 64 * eps * (abs(cx) + abs(by)), 0.0) / (1.0 + min(abs(cx), abs(by)))
    s_cone = _blockwise_violation(s, project(s, cones, dual=False), cones, terms_p)
    y_cone = float(np.max(np.abs(y - project(y, cones, dual=True)), initial=0.0)) / (1.0 + float(np.max(np.abs(y), initial=0.0)))
    return max(primal, dual, gap, s_cone, y_cone)


def _blockwise_violation(v: np.ndarray, proj: np.ndarray, cones: list, scale: np.ndarray) -> float:
    """Largest ``‖v_b − proj_b‖∞ / (1 + max scale_b)`` over the cone blocks ``b`` of ``v``
    (one row each for the zero and nonnegative cones), ``scale`` one value per row."""
    dist, at, out = np.abs(v - proj), 0, 0.0
    for kind, size in cones:
        if kind in (cone_lib.ZERO, cone_lib.POS):
            k = int(size)
            if k:
                out = max(out, float(np.max(dist[at:at + k] / (1.0 + scale[at:at + k]))))
            at += k
            continue
        if kind == cone_lib.SOC:
            blocks = list(size)
        elif kind == cone_lib.PSD:
            blocks = [k * (k + 1) // 2 for k in size]
        else:  # exponential cones: three rows each
            blocks = [3] * int(size)
        for q in blocks:
            if q:
                out = max(out, float(np.max(dist[at:at + q])) / (1.0 + float(np.max(scale[at:at + q]))))
            at += q
    return out


def verify_certificate(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, cones: list,
                       x: np.ndarray, y: np.ndarray, claim: str, tol: float = 1e-6) -> bool:
    """Whether the solver's certificate of ``claim`` ("infeasible" or "unbounded") holds.

    - infeasible: a dual ray ``y ∈ K*`` with ``Aᵀy = 0`` and ``bᵀy < 0``;
    - unbounded: a primal ray ``x`` with ``-Ax ∈ K`` and ``cᵀx < 0``.

    Each condition is checked relative to the data and the ray's own size (the ray is
    scale-free), so a status that a badly scaled problem provoked is not believed
    unless its certificate verifies. The sign test of ``bᵀy`` (``cᵀx``) is relative to
    its own largest term: measured against ``‖b‖∞``, an inactive bound of 1e4 beside
    rows of 1e-2 (which the ray does not use) rejected a valid certificate.
    """
    def inf(v: np.ndarray) -> float:
        return float(np.max(np.abs(v))) if v.size else 0.0

    if claim == "infeasible":
        ny = inf(y)
        if not np.all(np.isfinite(y)) or ny == 0:
            return False
        d = y / ny
        ATd = A.T @ d
        a_scale = max(float(abs(A).max()) if A.nnz else 0.0, 1e-300)
        in_cone = inf(d - project(d, cones, dual=True)) <= tol
        return in_cone and inf(ATd) <= tol * a_scale and float(b @ d) < -tol * max(inf(b * d), 1e-300)
    if claim == "unbounded":
        nx = inf(x)
        if not np.all(np.isfinite(x)) or nx == 0:
            return False
        d = x / nx
        Ad = A @ d
        a_scale = max(float(abs(A).max()) if A.nnz else 0.0, 1e-300)
        s = -Ad
        in_cone = inf(s - project(s, cones, dual=False)) <= tol * a_scale
        return in_cone and float(c @ d) < -tol * max(inf(c * d), 1e-300)
    return False


# A nonnegative pair (y_i, s_i) with |y_i − s_i| below this, relative to the solution's
# size, has both members at 0: strict complementarity fails and the projection onto the
# cone, hence the solution map, has a kink there (no derivative).
_UNDECIDED = 1e-9


def _undecided_rows(cones, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The nonnegative rows whose multiplier and slack are both (relatively) zero.

    ``cones``: diffcp's parsed list of ``(name, size)`` in row order.
    """
    scale = 1.0 + max(np.abs(y).max(initial=0.0), np.abs(s).max(initial=0.0))
    offset, found = 0, []
    for name, size in cones:
        sizes = size if isinstance(size, (tuple, list)) else (size,)
        if name == cone_lib.POS:
            k = int(sum(sizes))
            found.append(offset + np.flatnonzero(np.abs(y[offset:offset + k] - s[offset:offset + k])
                                                 <= _UNDECIDED * scale))
        for dim in sizes:
            offset += (cone_lib.vec_psd_dim(dim) if name == cone_lib.PSD
                       else 3 * dim if name in (cone_lib.EXP, cone_lib.EXP_DUAL) else dim)
    return np.concatenate(found) if found else np.zeros(0, dtype=int)


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

    def __init__(self, A, b, c, cones, cones_cpp, mode: str) -> None:
        self.A, self.b, self.c = A, b, c
        self.cones, self.cones_cpp, self.mode = cones, cones_cpp, mode
        self.m, self.n = A.shape
        self.Q = sp.csc_matrix(sp.bmat([
            [None, A.T, c[:, None]],
            [-A, None, b[:, None]],
            [-c[None, :], -b[None, :], None],
        ]))

    def _pi(self, z: np.ndarray) -> np.ndarray:
        n, m = self.n, self.m
        # diffcp's projection here, not project(): the Newton steps pair R with diffcp's
        # own derivative of it (dprojection), which has the same 1e-8 band.
        return np.concatenate([z[:n], cone_lib.pi(z[n:n + m], self.cones, dual=True),
                               np.maximum(z[-1:], 0.0)])

    def _residual(self, z: np.ndarray) -> np.ndarray:
        pz = self._pi(z)
        return self.Q @ pz - pz + z

    def _operator(self, z: np.ndarray, dense: bool | None = None):
        """M at z: an (N, N) array (``dense``, by default in mode "dense") or diffcp's operator."""
        n, m = self.n, self.m
        u, v, w = z[:n], z[n:n + m], float(z[-1])
        if (self.mode == "dense") if dense is None else dense:
            return _diffcp.M_dense(self.Q.toarray(), self.cones_cpp, u, v, w)
        return _diffcp.M_operator(self.Q, self.cones_cpp, u, v, w)

    def _solve(self, M, rhs: np.ndarray, transpose: bool = False) -> np.ndarray:
        """Minimum-norm solution of M d = rhs (or Mᵀ d = rhs).

        M is singular at every solution (R is positively homogeneous), so a plain LU
        solve returns a finite vector with an arbitrary, often huge, component along
        the null space of Mᵀ, which the adjoint's formula does not cancel (seen:
        gradients off by 8 on a projection with no active constraint). The minimum-norm
        least-squares solution is the one the derivative is defined by.
        """
        if isinstance(M, np.ndarray):
            mat = M.T if transpose else M
            sol, _, rank, _ = scipy.linalg.lstsq(mat, rhs, cond=_RANK_RTOL, lapack_driver="gelsy",
                                                 check_finite=False)
            # R is positively homogeneous, so M is singular along z: rank N - 1 at a
            # differentiable solution. A lower rank means the solution is not unique (or
            # not differentiable there): the minimum-norm answer is then one choice among many.
            self.degenerate = rank < rhs.size - 1
            return sol
        size = rhs.size
        op = M.transpose() if transpose else M
        lin = sla.LinearOperator((size, size), matvec=op.matvec, rmatvec=op.rmatvec)
        solver = sla.lsqr if self.mode == "lsqr" else sla.lsmr
        # The iterative solvers give no reliable rank (M is always singular along z), so
        # degeneracy is detected on the dense path only (<= 400 rows + columns by default).
        self.degenerate = False
        # (scipy's lsqr calls the iteration limit iter_lim, lsmr maxiter; lsqr's 4th
        # result is its residual norm r1norm, lsmr's normr.)
        limit = {"iter_lim" if solver is sla.lsqr else "maxiter": 10 * size}
        sol, _, _, normr = solver(lin, rhs, atol=1e-12, btol=1e-12, **limit)[:4]
        self.relative_residual = normr / max(float(np.linalg.norm(rhs)), np.finfo(float).tiny)
        return sol

    def _triple(self, z: np.ndarray):
        """(x, y, s) of a point z = (u, v, w) scaled to w = 1: y = Π_{K*}(v), s = y − v."""
        z = z / z[-1]
        n, m = self.n, self.m
        y = cone_lib.pi(z[n:n + m], self.cones, dual=True)
        return z, (z[:n], y, y - z[n:n + m])

    def refine(self, x, y, s, steps: int):
        """Newton steps on R(z) from the solver's point; returns (x, y, s, residual).

        The solver's own (x, y, s) is first replaced by the triple of z = (x, y − s, 1),
        whose complementarity is exact by construction, so the KKT residual also
        measures what an interior point leaves in y ∘ s. R is only piecewise smooth: a
        full step may first land on another piece and converge from there (seen on box
        constraints: residual 1e-6 → 1 → 1e-16), so steps are taken in full and the best
        point seen is kept. At most ``steps`` steps; none from a point at rounding level
        (1e-14), and none after one that fails to cut a residual already at
        :data:`POLISH_ABOVE` tenfold without jumping a thousandfold above it (another
        piece of R).
        """
        z, best = self._triple(np.concatenate([x, y - s, [1.0]]))
        best_r = kkt_residual(self.A, self.b, self.c, self.cones, *best)
        for _ in range(steps):
            if not np.isfinite(best_r) or best_r <= _POLISHED:
                break
            try:
                z = z - self._solve(self._operator(z), self._residual(z))
            except (ValueError, RuntimeError, ArithmeticError):
                break
            # M is singular along z itself (R is positively homogeneous), so the step
            # may rescale z, even flip it; only its direction matters.
            if not np.all(np.isfinite(z)) or z[-1] == 0:
                break
            z, cand = self._triple(z)
            r = kkt_residual(self.A, self.b, self.c, self.cones, *cand)
            stalled = _STEP_GAIN * best_r <= r <= _FLOOR_SPREAD * best_r
            if r < best_r:
                best, best_r = cand, r
            # Newton converges quadratically; once the residual is down at POLISH_ABOVE, a
            # step that neither cuts it tenfold nor leaves the rounding floor's spread has
            # met that floor, and the next ones repeat it (a constrained MPC: 4e-4, 2e-9,
            # 4e-12, then 6e-12, 5e-12, 5e-12, each an LSMR solve of 0.7 s). A step may land
            # on another piece of R first and converge from there (1e-6 -> 1 -> 1e-16): a
            # jump far above, at any residual, lets the steps go on.
            if stalled and best_r <= POLISH_ABOVE:
                break
        return (*best, best_r)

    def adjoint(self, x, y, s, parametric: Parametric | None = None):
        """The map (dx, dy) -> (dA at any (row, col), db, dc) of the solution's derivative.

        Sets ``degenerate`` when the gradient may not be unique: a nonnegative row has
        multiplier and slack both 0 (a kink of the projection), or the derivative system
        is rank-deficient beyond the homogeneity direction and the parameters or the
        cotangent reach the extra null directions (:func:`_unique_anyway`; ``parametric``
        says how the parameters move the data, :class:`Parametric`; with ``None`` every
        rank deficiency counts).
        """
        n, m = self.n, self.m
        z = np.concatenate([x, y - s, [1.0]])
        M = self._operator(z)
        dproj = _diffcp.dprojection(z[n:n + m], self.cones_cpp, True)
        pi_z = self._pi(z)
        undecided = _undecided_rows(self.cones, y, s)

        def vjp(dx: np.ndarray, dy: np.ndarray, rows: np.ndarray, cols: np.ndarray):
            # This call's flags only (a zero cotangent returns before any solve; the
            # forward's refine left its own degeneracy flag here: with workers=1, whose
            # map is reused, an element with no cotangent was warned about).
            self.inaccurate, self.degenerate = 0.0, False
            dw = -(x @ dx + y @ dy)
            dz = np.concatenate([dx, dproj.rmatvec(dy), [dw]])
            if not np.any(dz):
                return np.zeros(rows.size), np.zeros(m), np.zeros(n)
            Mz = M
            r = self._solve(Mz, dz, transpose=True)
            if not isinstance(Mz, np.ndarray) and self.relative_residual > _ITERATIVE_RTOL:
                # The adjoint system is consistent (z̄ ⟂ z), so LSMR should drive its residual
                # to rounding; on an ill-conditioned one it stops at its iteration limit
                # (a constrained MPC with 1291 rows and columns: relative residual 1e-5,
                # gradient 19 % off). Solved densely where that is affordable, else reported.
                if dz.size <= _DENSE_FALLBACK_MAX:
                    Mz = self._operator(z, dense=True)
                    r = self._solve(Mz, dz, transpose=True)
                else:
                    self.inaccurate = self.relative_residual
            degenerate = self.degenerate and (parametric is None
                                              or not unique_anyway(Mz, dz, pi_z, n, parametric))
            grads = data_grads(r, pi_z, n, rows, cols)
            self.degenerate = degenerate or (undecided.size > 0 and not (
                isinstance(Mz, np.ndarray) and self._either_side(z, undecided, (dx, dy, dw), r, pi_z, parametric)))
            return grads

        return vjp

    def _either_side(self, z, undecided, dz_parts, r, pi_z, parametric: Parametric | None) -> bool:
        """Whether the gradient is the same whichever side of its kink each undecided
        nonnegative row (multiplier and slack both ~0) is taken on: the projection's
        derivative there is 0 or 1, and the adjoint solved densely with each choice must
        give the same gradient as ``r`` (a free epigraph variable's bound, e.g.
        ‖x_i‖ <= t_i with row i inside, is such a row; a weakly active constraint is
        not). Compared in the parameters θ where ``parametric`` says how they move the
        data (a constant objective's entries may differ: no parameter reads them).
        ``dz_parts``: the cotangent's ``(dx, dy, dw)``."""
        n, m = self.n, self.m
        dx, dy, dw = dz_parts

        if parametric is None:  # (no map to θ: every difference in the data would count)
            return False

        def gradient(adj):
            return (theta_grads(parametric, *data_grads(adj, pi_z, n, parametric.rows, parametric.cols)),)

        base = gradient(r)
        size = max(max(np.abs(g).max(initial=0.0) for g in base), 1e-300)
        kept = self.degenerate
        try:
            for side in (1.0, -1.0):
                zs = z.copy()
                zs[n + undecided] = side * 1e-12 * (1.0 + np.abs(z).max())
                dproj = _diffcp.dprojection(zs[n:n + m], self.cones_cpp, True)
                other = gradient(self._solve(self._operator(zs, dense=True),
                                             np.concatenate([dx, dproj.rmatvec(dy), [dw]]), transpose=True))
                if any(np.abs(a - b).max(initial=0.0) > _SIDE_RTOL * size for a, b in zip(other, base)):
                    return False
            return True
        finally:
            self.degenerate = kept


# Singular values of M below this fraction of its largest are taken as 0 by the dense
# solves. M is formed at the solver's point, accurate to its tolerance (~1e-9), so a
# direction that weak is not resolved there: equality rows that repeat each other (a
# row and twice it) left M's second null direction at 1.5e-12 (not 1e-16) at Clarabel's
# point, and with a cut at 1e-12 the Newton polish stepped along it to multipliers of
# ±8e3 and the gradient's norm went to 4e4 (the minimum-norm one: 0.9).
_RANK_RTOL = 1e-9

# Relative difference between the gradients on the two sides of an undecided row below
# which it is taken as one (dense solves of one system: ~1e-14 apart when it is).
_SIDE_RTOL = 1e-8

# The largest relative residual accepted from LSMR on the (consistent) adjoint system
# (converged solves reach ~1e-12); above it, the dense solve below this size.
_ITERATIVE_RTOL = 1e-9
_DENSE_FALLBACK_MAX = 3000
