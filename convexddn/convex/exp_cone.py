"""The projection onto the exponential cone, to rounding.

:math:`K_{\\exp} = \\operatorname{cl}\\{(r, s, t) : s > 0,\\ s e^{r/s} \\le t\\}`. diffcp's
projection (a bisection to 1e-8, with membership tests at 1e-6) is accurate to ~1e-8 near
the cone's boundary: ``⟨Π_K(v), Π_K(v) − v⟩`` of 1.2e-8 at a logistic regression's
solution, so the per-element polish stalled there (KKT residual ~1e-8 after five Newton
steps, then an SCS attempt; solutions 2e-7 off stationarity).

Off the cone, its polar and the quadrant :math:`r, s \\le 0`, the projection lies on the
boundary ray :math:`a(\\rho) = (\\rho, 1, e^\\rho)` with the residual along the boundary's
normal :math:`b(\\rho) = (e^\\rho, (1 - \\rho) e^\\rho, -1)`, :math:`a \\perp b`
(Friberg, "Projection onto the exponential cone: a univariate root-finding problem",
2021): :math:`v = s\\, a(\\rho) + \\mu\\, b(\\rho)` with :math:`s > 0`, :math:`\\mu \\ge 0`,
i.e. :math:`\\rho` is a root of :math:`g(\\rho) = \\langle v, a \\times b \\rangle`,

.. math::

    g(\\rho) = -r (1 + (1 - \\rho) e^{2\\rho}) + s (e^{2\\rho} + \\rho) - t (\\rho^2 - \\rho + 1) e^\\rho.

At unit size (the projection is positively homogeneous; diffcp's tolerances are
absolute), Newton's method on :math:`g` converges quadratically from the point's own guesses
(:math:`r/s` near K's boundary, :math:`\\log(-r/t)` near its polar's, the ρ last found for as
many rows: a polish step moves each cone's point a little), all tried in one batch, else
from diffcp's point (its :math:`r/s`); where none verifies (:math:`s > 0`, :math:`\\mu \\ge 0`,
the last step at ρ's rounding, each coordinate of :math:`v` reconstructed to its own terms'
rounding; not so far along the boundary, where each step gains ~0.5, at a spurious root of
g, or 12 steps from far off), Newton steps safeguarded by bisection from the grid ray nearest
:math:`v`. The exact membership tests decide the other cases.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from diffcp import cones as cone_lib

from .cone_checks import cone_blocks

__all__ = ["Memo", "derivative_correction", "has_exp", "project_cones", "project_exp", "projection_derivative",
           "projection_piece"]

# (12: from diffcp's point, -0.04, a root at 23.09 takes 11; 8 left some 2.6e-6 off, then unverified.)
_NEWTON_STEPS = 12
# The grid of boundary rays that brackets the root where Newton from diffcp's point fails
# (far along the boundary: ρ ≳ 10, each step gains ~0.5), and its safeguarded steps.
_GRID_SPAN, _GRID_POINTS, _BRACKETED_STEPS = 60.0, 481, 60
_FAR = 30.0
# Newton's steps stop once every row's step is this small relative to its ρ (rounding).
_EPS = float(np.finfo(float).eps)
_SETTLED = 4 * _EPS


def _g(v: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(g, g')`` at ``rho``, both scaled by :math:`e^{-2\\max(\\rho, 0)}` (their ratio is
    Newton's step; no overflow for large :math:`\\rho`); ``v (..., 3)`` broadcast with ``rho``."""
    r, s, t = v[..., 0], v[..., 1], v[..., 2]
    w = np.exp(-2.0 * np.maximum(rho, 0.0))
    e1, e2 = np.exp(rho) * w, np.exp(2.0 * rho) * w
    g = -r * (w + (1.0 - rho) * e2) + s * (e2 + rho * w) - t * (rho * rho - rho + 1.0) * e1
    dg = -r * (1.0 - 2.0 * rho) * e2 + s * (2.0 * e2 + w) - t * (rho * rho + rho) * e1
    return g, dg


def _on_boundary(v: np.ndarray, rho: np.ndarray, step: np.ndarray):
    """The projection ``s a(ρ)``, whether it verifies, ``s``, ``μ`` (a ⊥ b: v's coordinates). It
    verifies where ``s > 0``, ``μ ≥ 0``, the last ``step`` to ρ is within δ, ρ's rounding level
    (Newton has converged), and ``v = s a + μ b`` holds in each coordinate against its own
    terms, 64 ε (|v_i| + |s a_i| + |μ b_i|), plus what δ moves it by. (Against 64 ε max|v| after
    8 steps, a ρ 2.6e-6 off passed: r, s 2.5e-6 off where one ulp of v moves them 1e-14.)"""
    e, one = np.exp(rho), np.ones_like(rho)
    a, b = np.stack([rho, one, e], 1), np.stack([e, (1.0 - rho) * e, -one], 1)
    s, mu = (np.einsum("ij,ij->i", v, x) / np.einsum("ij,ij->i", x, x) for x in (a, b))
    p, q = s[:, None] * a, mu[:, None] * b
    err, tol = np.abs(v - p - q), 64 * _EPS * (np.abs(v) + np.abs(p) + np.abs(q))
    signs = np.isfinite(err).all(1) & (s > 0) & (mu >= 0)
    delta = _SETTLED * (1.0 + np.abs(rho))
    ok = signs & (np.abs(step) <= delta) & (err <= tol).all(1)
    if (signs & ~ok).any():  # (else δ's first term decides)
        # c = a × b: g = ⟨v, c⟩, and at a root g' = -⟨s a' + μ b', c⟩ (⟨a, c⟩ = ⟨b, c⟩ = 0). δ: the
        # step g / g' that g's rounding makes (16 ε times its terms' sizes), plus ρ's ulps. The
        # residual v - s a - μ b = ⟨v, c⟩ c / ‖c‖²; moving ρ by δ moves it by δ g' c / ‖c‖².
        e2 = e * e
        c = np.stack([-1.0 - (1.0 - rho) * e2, e2 + rho, -(rho * rho - rho + 1.0) * e], 1)
        size = np.stack([1.0 + np.abs(1.0 - rho) * e2, e2 + np.abs(rho), (rho * rho + np.abs(rho) + 1.0) * e], 1)
        dg = np.abs((s + mu * e) * c[:, 0] - mu * rho * e * c[:, 1] + s * e * c[:, 2])
        delta = delta + 16 * _EPS * np.einsum("ij,ij->i", np.abs(v), size) / dg
        tol = tol + (delta * dg / np.einsum("ij,ij->i", c, c))[:, None] * np.abs(c)
        ok = signs & (np.abs(step) <= delta) & (err <= tol).all(1)
    return p, ok, s, mu


# Which piece of the projection a point is on (see _projection).
_INSIDE, _POLAR, _QUADRANT, _FACE, _BOUNDARY, _DIFFCP = range(6)


def _newton(v: np.ndarray, rho: np.ndarray, steps: int, row: np.ndarray, k: int):
    """``(ρ, the last step)``: at most ``steps`` Newton steps on :math:`g` from ``rho``, for the
    ``k`` points whose starts these rows are (``row``: which point each is); none after every
    point has a start whose step is at rounding (its next steps repeat it; the others are spares)."""
    for _ in range(steps):
        g, dg = _g(v, rho)
        step = g / dg  # (NaN, inf where g' = 0: _projection ignores numpy's warnings)
        rho = rho - np.where(np.isfinite(step), step, 0.0)
        settled = np.zeros(k, dtype=bool)
        settled[row[np.abs(step) <= _SETTLED * (1.0 + np.abs(rho))]] = True
        if settled.all():
            break
    return rho, step


def _guesses(v: np.ndarray) -> np.ndarray:
    """Starting points ``(2, k)`` for Newton on :math:`g` (NaN: none), one per way the rows of
    ``v`` (unit size) may lie near a piece of the projection: near K's boundary
    (:math:`v \\approx s a(\\rho)`, :math:`\\rho = r/s`), near its polar's
    (:math:`v \\approx \\mu b(\\rho)`, :math:`e^\\rho = -r/t`; the checks project points
    just projected, which lie there)."""
    r, s, t = v[:, 0], v[:, 1], v[:, 2]
    with np.errstate(all="ignore"):
        own = np.where(s > 0, r / s, np.nan)
        polar = np.where((r > 0) & (t < 0), np.log(r / -t), np.nan)
    return np.stack([own, polar])


def _first_verified(v: np.ndarray, starts: np.ndarray):
    """``(ρ, Π, ok, s, μ)`` (:func:`_on_boundary`'s) for each row of ``v`` ``(k, 3)``, from
    the first of its starting points ``starts`` ``(c, k)`` (NaN: none) from which Newton's
    steps verify; ``ok`` False (and zeros) where none does. All starts in one batch."""
    c, k = starts.shape
    cand, row = np.nonzero(np.isfinite(starts))
    rho, step = _newton(v[row], starts[cand, row], _NEWTON_STEPS, row, k)
    p, ok, s, mu = _on_boundary(v[row], rho, step)
    verified, at = np.zeros((c, k), dtype=bool), np.zeros((c, k), dtype=np.int64)
    verified[cand, row], at[cand, row] = ok, np.arange(row.size)
    found = verified.any(0)
    at = at[verified.argmax(0), np.arange(k)][found]  # (each point's first verified start)
    out = np.zeros(k), np.zeros((k, 3)), found, np.zeros(k), np.zeros(k)
    out[0][found], out[1][found], out[3][found], out[4][found] = rho[at], p[at], s[at], mu[at]
    return out


def _bracketed(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ρ, the last step)``: the root of :math:`g` where the projection of ``v`` (unit-size
    rows) lies: on a grid of :math:`\\rho \\in [-60, 60]` (beyond, a ray is within e^-60 of the
    face's direction), the first interval where g changes sign with :math:`s \\propto \\langle v,
    a \\rangle > 0` at both ends (else the ray of largest :math:`\\langle v, a \\rangle / \\|a\\|`
    and its neighbours), then Newton steps safeguarded by bisection in it, and one more (the
    loop may end on a bisection step, whose size says nothing of how far off ρ is)."""
    grid = np.linspace(-_GRID_SPAN, _GRID_SPAN, _GRID_POINTS)[None, :]
    r, s, t = v[:, :1], v[:, 1:2], v[:, 2:3]
    w1 = np.exp(-np.maximum(grid, 0.0))  # a scaled by it (signs kept)
    e1 = np.exp(grid) * w1
    g = _g(v[:, None, :], grid)[0]
    valid = (r * grid + s) * w1 + t * e1 > 0  # (μ ≥ 0 is verified after: it may be ~1e-28)
    change = (np.sign(g[:, :-1]) != np.sign(g[:, 1:])) & valid[:, :-1] & valid[:, 1:]
    rays = np.concatenate([grid * w1, w1, e1]).T
    nearest = np.argmax(v @ (rays / np.linalg.norm(rays, axis=1, keepdims=True)).T, 1)
    at = np.where(change.any(1), np.argmax(change, 1), np.maximum(nearest - 1, 0))
    lo, hi = grid[0, at], grid[0, np.minimum(at + np.where(change.any(1), 1, 2), grid.size - 1)]
    rho, g_lo = 0.5 * (lo + hi), _g(v, lo)[0]
    for _ in range(_BRACKETED_STEPS):
        gr, dg = _g(v, rho)
        same = np.sign(gr) == np.sign(g_lo)
        lo, g_lo, hi = np.where(same, rho, lo), np.where(same, gr, g_lo), np.where(same, hi, rho)
        with np.errstate(all="ignore"):
            newton = rho - gr / dg
        rho, before = np.where(np.isfinite(newton) & (newton > lo) & (newton < hi), newton, 0.5 * (lo + hi)), rho
        if np.all(np.abs(rho - before) <= _SETTLED * (1.0 + np.abs(rho))):  # (the next steps repeat it)
            break
    gr, dg = _g(v, rho)
    step = gr / dg  # (taken where no longer than the bracket: a far root is the face's, see below)
    return np.where(np.abs(step) <= hi - lo + _SETTLED * (1.0 + np.abs(rho)), rho - step, rho), step


class Memo:
    """One program's projections (:class:`~.cone.ResidualMap` holds one; use from one thread):
    the last few, read-only, by the input's bytes (the per-element polish projects each point
    up to three times: the triple, the residual, the derivative), and the ρ last found for
    as many rows, a start for the next point's Newton steps (a polish step moves each cone's
    point a little). Its own, not shared: where Newton starts moves a root by rounding, and
    a program's answers depend on its own calls only (bit for bit, whatever else ran)."""

    SIZE, ROWS = 16, 4096  # entries; rows above which nothing is kept (memory)

    def __init__(self) -> None:
        self.found: dict = {}
        self.recent: dict = {}

    def projection(self, v: np.ndarray):
        """:func:`_projection` of ``v``, kept."""
        if v.shape[0] > self.ROWS:
            return _project_rows(v, None)
        key = (v.shape, v.tobytes())
        found = self.found.get(key)
        if found is None:
            last = self.recent.get(v.shape[0])
            found = _project_rows(v, last)
            for a in found:
                a.setflags(write=False)
            self.found[key] = found
            # (kept per row where this call found none: the checks' points inside K or its polar)
            self.recent[v.shape[0]] = np.where(found[1] >= _FACE, found[2], np.nan if last is None else last)
            for kept in (self.found, self.recent):
                while len(kept) > self.SIZE:
                    del kept[next(iter(kept))]
        return found


def _projection(v: np.ndarray, memo: Memo | None = None):
    """``(Π_K(v), piece, ρ, s, μ)`` for the rows of ``v`` ``(k, 3)``; ``ρ, s, μ`` hold the
    boundary pieces' coordinates (v / max|v| = s a(ρ) + μ b(ρ)), ``piece`` says which formula gave
    each row (:data:`_DIFFCP`: none verified; diffcp's point, lifted onto K, or the face's).
    With a ``memo``, read-only arrays kept there."""
    v = np.ascontiguousarray(v, dtype=float)
    return _project_rows(v, None) if memo is None else memo.projection(v)


def _project_rows(v: np.ndarray, recent: np.ndarray | None):
    """:func:`_projection`'s result, computed; ``recent``: a ρ per row to start from too (NaN: none)."""
    out = np.empty_like(v)
    r, s, t = v[:, 0], v[:, 1], v[:, 2]
    k = v.shape[0]
    piece, rho_all, s_all, mu_all = np.full(k, _BOUNDARY), np.zeros(k), np.zeros(k), np.zeros(k)
    with np.errstate(all="ignore"):
        in_k = ((s > 0) & (s * np.exp(r / s) <= t)) | ((r <= 0) & (s == 0) & (t >= 0))
        in_polar = ((r > 0) & (r * np.exp(s / r) + np.e * t <= 0)) | ((r == 0) & (s <= 0) & (t <= 0))
        quadrant = ~in_k & ~in_polar & (r <= 0) & (s <= 0)
        out[in_k] = v[in_k]
        out[in_polar] = 0.0
        out[quadrant] = np.stack([r, np.zeros_like(r), np.maximum(t, 0.0)], 1)[quadrant]
        piece[in_k], piece[in_polar], piece[quadrant] = _INSIDE, _POLAR, _QUADRANT
        rest = ~(in_k | in_polar | quadrant)
        if not rest.any():
            return out, piece, rho_all, s_all, mu_all
        # At unit size (the projection is positively homogeneous; diffcp's tolerances are
        # absolute): Newton from the point's own guesses, all at once (one numpy call per
        # step, not one per guess: the arrays are small, each call ~10 us), then from
        # diffcp's point where none verifies, then from the nearest ray of a grid, bracketed.
        scale = np.abs(v[rest]).max(1, keepdims=True)
        vr = v[rest] / scale
        guesses = _guesses(vr)
        if recent is not None:
            guesses = np.concatenate([guesses, recent[rest][None]])
        rho, p, ok, sc, mu = _first_verified(vr, guesses)
        pr = np.zeros_like(vr)
        if not ok.all():  # diffcp's point: its ratio (the guesses miss far along the boundary)
            redo = np.nonzero(~ok)[0]
            pr[redo] = cone_lib.pi(vr[redo].ravel(), [(cone_lib.EXP, redo.size)], dual=False).reshape(-1, 3)
            start = np.where(pr[redo, 1] > 0, pr[redo, 0] / pr[redo, 1], 0.0)
            found = _first_verified(vr[redo], np.where(np.isfinite(start), start, 0.0)[None])
            for mine, theirs in zip((rho, p, ok, sc, mu), found):
                mine[redo] = theirs
        far = np.zeros_like(ok)
        if not ok.all():
            redo = ~ok
            rho[redo], step = _bracketed(vr[redo])
            p[redo], ok[redo], sc[redo], mu[redo] = _on_boundary(vr[redo], rho[redo], step)
            # Rays beyond ρ ≈ 36 are the face's direction (0, 0, 1) to rounding: where the
            # nearest grid ray is that far out (r > 0 > s with r ≪ |s|: the root lies at
            # ρ ≈ 1 − s/r), the face's projection is the projection to rounding.
            far = ~ok & (rho > _FAR)
        # A verified boundary point satisfies the projection's optimality conditions: it is
        # the projection; so is the face's where the ray is far out. Elsewhere (none seen)
        # the nearer of two points in K: diffcp's, lifted onto K where its tolerances left
        # it outside, and the face s = 0's projection.
        if not ok.all():
            face = np.stack([np.minimum(vr[:, 0], 0.0), np.zeros(len(vr)), np.maximum(vr[:, 2], 0.0)], 1)
            lifted = np.where((pr[:, 1] > 0)[:, None], pr, face)
            lifted[:, 2] = np.maximum(lifted[:, 2],
                                      np.where(pr[:, 1] > 0, pr[:, 1] * np.exp(pr[:, 0] / pr[:, 1]), 0.0))
            closer = far | (np.linalg.norm(vr - face, axis=1) <= np.linalg.norm(vr - lifted, axis=1))
            p = np.where(ok[:, None], p, np.where(closer[:, None], face, lifted))
        out[rest] = p * scale
        piece[rest] = np.where(ok, _BOUNDARY, np.where(far, _FACE, _DIFFCP))
        rho_all[rest], s_all[rest], mu_all[rest] = rho, sc, mu  # (at unit size: D Π is scale-free)
    return out, piece, rho_all, s_all, mu_all


def project_exp(v: np.ndarray, dual: bool = False, memo: Memo | None = None) -> np.ndarray:
    """Projection of each row of ``v`` ``(k, 3)`` onto the exponential cone (``dual``: its
    dual cone, :math:`\\Pi_{K^*}(v) = v + \\Pi_K(-v)`)."""
    v = np.asarray(v, dtype=float).reshape(-1, 3)
    if dual:
        return v + _projection(-v, memo)[0]
    return _projection(v, memo)[0].copy()


def projection_derivative(v: np.ndarray, dual: bool = False, memo: Memo | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(D, known)``: the derivative ``(k, 3, 3)`` of :func:`project_exp` at the rows of ``v``,
    and where it is known (not for a row left at diffcp's point).

    On the boundary piece, :math:`v = s\\,a(\\rho) + \\mu\\,b(\\rho)` is a local change of
    coordinates with Jacobian :math:`J = [a, b, s a' + \\mu b']`, and :math:`\\Pi(v) = s\\,a(\\rho)`,
    so :math:`D\\Pi = [a, 0, s a'] J^{-1}`; inside K it is I, on the polar 0, on the
    quadrant :math:`r, s \\le 0` diag(1, 0, [t > 0]), where the boundary ray is the face's
    direction to rounding diag(0, 0, [t > 0]).
    ``dual``: :math:`D\\Pi_{K^*}(v) = I - D\\Pi_K(-v)`."""
    v = np.asarray(v, dtype=float).reshape(-1, 3)
    if dual:
        D, known = projection_derivative(-v, memo=memo)
        return np.eye(3) - D, known
    _, piece, rho, s, mu = _projection(v, memo)
    k = v.shape[0]
    D = np.zeros((k, 3, 3))
    D[piece == _INSIDE] = np.eye(3)
    up = (v[:, 2] > 0).astype(float)
    D[piece == _QUADRANT] = np.stack([np.ones(k), np.zeros(k), up], 1)[piece == _QUADRANT][:, :, None] * np.eye(3)
    D[piece == _FACE] = np.stack([np.zeros(k), np.zeros(k), up], 1)[piece == _FACE][:, :, None] * np.eye(3)
    on = piece == _BOUNDARY
    if on.any():
        rh, sc, m = rho[on], s[on], mu[on]
        e, z, one = np.exp(rh), np.zeros(on.sum()), np.ones(on.sum())
        a = np.stack([rh, one, e], 1)
        b = np.stack([e, (1 - rh) * e, -one], 1)
        da, db = np.stack([one, z, e], 1), np.stack([e, -rh * e, z], 1)
        J = np.stack([a, b, sc[:, None] * da + m[:, None] * db], 2)
        det = np.linalg.det(J)
        fine = np.isfinite(det) & (det != 0)  # (else diffcp's derivative stays: known False)
        Jinv = np.zeros_like(J)
        Jinv[fine] = np.linalg.inv(J[fine])
        D[on] = np.stack([a, np.zeros_like(a), sc[:, None] * da], 2) @ Jinv
        piece = piece.copy()
        piece[np.nonzero(on)[0][~fine]] = _DIFFCP
    known = (piece != _DIFFCP) & np.isfinite(D).all((1, 2))
    return np.where(known[:, None, None], D, 0.0), known


def projection_piece(v: np.ndarray) -> np.ndarray:
    """Which smooth piece of :func:`project_exp` each row of ``v`` ``(k, 3)`` lies on ``(k,)``:
    inside K, on its polar, on the quadrant :math:`r, s \\le 0` with :math:`t > 0` or with
    :math:`t \\le 0` (diag(1, 0, [t > 0]) there), or on the boundary ray's (the face's
    direction and diffcp's point count as that one). The projection has a kink between two
    points on different pieces: its derivative jumps across every border (:mod:`.kinks`)."""
    v = np.asarray(v, dtype=float).reshape(-1, 3)
    piece = _projection(v)[1]
    piece = np.where((piece == _FACE) | (piece == _DIFFCP), _BOUNDARY, piece)
    return np.where((piece == _QUADRANT) & ~(v[:, 2] > 0), -1, piece)


def has_exp(cones: list) -> bool:
    """Whether diffcp's parsed cone list holds an exponential cone (or its dual)."""
    return any(kind in (cone_lib.EXP, cone_lib.EXP_DUAL) and size for kind, size in cones)


def _exp_blocks(cones: list) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (k, 3), primal (k,))``: each exponential cone's rows in diffcp's parsed list,
    and whether it is the cone itself (else its dual)."""
    kinds = (cone_lib.EXP, cone_lib.EXP_DUAL)
    found = [(at, kind == cone_lib.EXP) for kind, at, _ in cone_blocks(cones) if kind in kinds]
    starts = np.array([at for at, _ in found], dtype=np.int64)
    return starts[:, None] + np.arange(3), np.array([p for _, p in found], dtype=bool)


def project_cones(x: np.ndarray, cones: list, dual: bool, memo: Memo | None = None) -> np.ndarray:
    """diffcp's projection of ``x`` onto the cones of its parsed list (or their duals), with
    :func:`project_exp`'s exponential-cone blocks; diffcp's own projection is not computed
    there (one call per cone in a Python loop): those rows go through as a zero cone's."""
    if not has_exp(cones):
        return cone_lib.pi(x, cones, dual=dual)
    kinds = (cone_lib.EXP, cone_lib.EXP_DUAL)
    rows_only = [(cone_lib.ZERO, 3 * int(size)) if kind in kinds else (kind, size) for kind, size in cones]
    out = cone_lib.pi(x, rows_only, dual=dual)
    rows, primal = _exp_blocks(cones)
    for kind in (True, False):
        sel = rows[primal == kind]
        if sel.size:  # onto K_exp* for a cone's dual, and for a dual cone itself
            out[sel] = project_exp(x[sel], dual=kind == dual, memo=memo)
    return out


def derivative_correction(v: np.ndarray, cones: list, dprojection, memo: Memo | None = None) -> sp.csr_matrix | None:
    """:math:`\\Delta D`, the derivative of :func:`project_cones`' projection onto
    :math:`K^*` minus diffcp's ``dprojection`` (an operator, at the same ``v``), as a sparse
    ``(m, m)`` matrix: nonzero on the exponential cones' 3×3 blocks only (diffcp's there is
    that of its own, ~1e-8 accurate, projection); ``None`` without exponential cones."""
    if not has_exp(cones):
        return None
    rows3, primal = _exp_blocks(cones)
    starts = rows3[:, 0]
    theirs = np.empty((starts.size, 3, 3))
    for c in range(3):  # column c of every block at once
        e = np.zeros(v.size)
        e[starts + c] = 1.0
        theirs[:, :, c] = dprojection.matvec(e)[rows3]
    ours = np.empty_like(theirs)
    known = np.empty(starts.size, dtype=bool)
    for kind in (True, False):  # (onto K_exp* for a cone, K_exp for a dual cone)
        sel = primal == kind
        if sel.any():
            ours[sel], known[sel] = projection_derivative(v[rows3[sel]], dual=kind, memo=memo)
    delta = np.where(known[:, None, None], ours - theirs, 0.0)
    # CSR arrays directly (the triplets' conversion was a third of this call): the blocks lie
    # in increasing rows, so row-major ``delta`` is already in CSR order, 3 entries a row.
    indptr = np.zeros(v.size + 1, dtype=np.int64)
    indptr[rows3.ravel() + 1] = 3
    indices = np.repeat(rows3, 3, axis=0).ravel()
    return sp.csr_matrix((delta.ravel(), indices, np.cumsum(indptr)), shape=(v.size, v.size))
