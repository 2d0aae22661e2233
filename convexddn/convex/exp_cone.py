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

Newton's method on :math:`g` from diffcp's point (its :math:`r/s`, or the point's own where
diffcp's tolerant tests put it on the cone or at 0) converges quadratically; each result
is kept only if it verifies (:math:`s > 0`, :math:`\\mu \\ge 0`, :math:`v` reconstructed to
rounding), else diffcp's stands. The exact membership tests decide the other cases.
"""
from __future__ import annotations

import numpy as np
from diffcp import cones as cone_lib

__all__ = ["project_exp", "replace_exp_blocks"]

_NEWTON_STEPS = 8


def _g(v: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(g, g')`` at ``rho``, both scaled by :math:`e^{-2\\max(\\rho, 0)}` (their ratio is
    Newton's step; no overflow for large :math:`\\rho`)."""
    r, s, t = v[:, 0], v[:, 1], v[:, 2]
    w = np.exp(-2.0 * np.maximum(rho, 0.0))
    e1, e2 = np.exp(rho) * w, np.exp(2.0 * rho) * w
    g = -r * (w + (1.0 - rho) * e2) + s * (e2 + rho * w) - t * (rho * rho - rho + 1.0) * e1
    dg = -r * (1.0 - 2.0 * rho) * e2 + s * (2.0 * e2 + w) - t * (rho * rho + rho) * e1
    return g, dg


def _on_boundary(v: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The projection ``s a(ρ)`` and whether it verifies: ``s > 0``, ``μ ≥ 0`` and
    ``v = s a + μ b`` to rounding (a, b orthogonal: s, μ are v's coordinates)."""
    e = np.exp(rho)
    a = np.stack([rho, np.ones_like(rho), e], 1)
    b = np.stack([e, (1.0 - rho) * e, -np.ones_like(rho)], 1)
    s = np.einsum("ij,ij->i", v, a) / np.einsum("ij,ij->i", a, a)
    mu = np.einsum("ij,ij->i", v, b) / np.einsum("ij,ij->i", b, b)
    p = s[:, None] * a
    err = np.abs(v - p - mu[:, None] * b).max(1)
    ok = np.isfinite(err) & (s > 0) & (mu >= 0) & (err <= 64 * np.finfo(float).eps * np.abs(v).max(1))
    return p, ok


def project_exp(v: np.ndarray, dual: bool = False) -> np.ndarray:
    """Projection of each row of ``v`` ``(k, 3)`` onto the exponential cone (``dual``: its
    dual cone, :math:`\\Pi_{K^*}(v) = v + \\Pi_K(-v)`)."""
    if dual:
        return v + project_exp(-v)
    v = np.asarray(v, dtype=float).reshape(-1, 3)
    out = cone_lib.pi(v.ravel(), [(cone_lib.EXP, v.shape[0])], dual=False).reshape(-1, 3)
    r, s, t = v[:, 0], v[:, 1], v[:, 2]
    with np.errstate(all="ignore"):
        in_k = ((s > 0) & (s * np.exp(r / s) <= t)) | ((r <= 0) & (s == 0) & (t >= 0))
        in_polar = ((r > 0) & (r * np.exp(s / r) + np.e * t <= 0)) | ((r == 0) & (s <= 0) & (t <= 0))
        quadrant = ~in_k & ~in_polar & (r <= 0) & (s <= 0)
        out[in_k] = v[in_k]
        out[in_polar] = 0.0
        out[quadrant] = np.stack([r, np.zeros_like(r), np.maximum(t, 0.0)], 1)[quadrant]
        rest = ~(in_k | in_polar | quadrant)
        if not rest.any():
            return out
        vr, pr = v[rest], out[rest]
        # Start: diffcp's ratio where it found a boundary point, else the point's own.
        rho = np.where(pr[:, 1] > 0, pr[:, 0] / pr[:, 1], np.where(vr[:, 1] > 0, vr[:, 0] / vr[:, 1], 0.0))
        rho = np.where(np.isfinite(rho), rho, 0.0)
        for _ in range(_NEWTON_STEPS):
            g, dg = _g(vr, rho)
            step = np.where(dg != 0, g / dg, 0.0)
            rho = np.where(np.isfinite(step), rho - step, rho)
        p, ok = _on_boundary(vr, rho)
        # A verified boundary point satisfies the projection's optimality conditions: it is
        # the projection. Elsewhere the nearer of two points in K: diffcp's, lifted onto K
        # where its tolerances left it outside, and the face s = 0's projection (the
        # boundary's limit ρ → ∞: the answer for e.g. r > 0 > s, where diffcp's has r > 0).
        face = np.stack([np.minimum(vr[:, 0], 0.0), np.zeros(len(vr)), np.maximum(vr[:, 2], 0.0)], 1)
        lifted = np.where((pr[:, 1] > 0)[:, None], pr, face)
        lifted[:, 2] = np.maximum(lifted[:, 2], np.where(pr[:, 1] > 0, pr[:, 1] * np.exp(pr[:, 0] / pr[:, 1]), 0.0))
        closer = np.linalg.norm(vr - face, axis=1) <= np.linalg.norm(vr - lifted, axis=1)
        pr = np.where(closer[:, None], face, lifted)
        pr[ok] = p[ok]
        out[rest] = pr
    return out


def replace_exp_blocks(out: np.ndarray, x: np.ndarray, cones: list, dual: bool) -> np.ndarray:
    """``out`` (a projection of ``x`` onto the cones of diffcp's parsed list, or their duals)
    with its exponential-cone rows replaced by :func:`project_exp`'s."""
    at = 0
    for kind, size in cones:
        rows = (3 * int(size) if kind in (cone_lib.EXP, cone_lib.EXP_DUAL) else
                sum(size) if kind == cone_lib.SOC else sum(k * (k + 1) // 2 for k in size) if kind == cone_lib.PSD
                else int(size))
        if kind in (cone_lib.EXP, cone_lib.EXP_DUAL) and rows:
            # onto K_exp* for an exponential cone's dual, and for a dual exponential cone itself
            out[at:at + rows] = project_exp(x[at:at + rows].reshape(-1, 3), dual=(kind == cone_lib.EXP) == dual).ravel()
        at += rows
    return out
