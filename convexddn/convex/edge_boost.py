"""Lorentz boosts of second-order-cone blocks: the frame in which a program stretched along a cone's
edge by its solution's size is of balanced scale again.

A second-order cone ``Q = {(v₀, v̄): v₀ >= ‖v̄‖}`` is mapped onto itself by the boost along a unit
direction ``e`` with factor ``k > 0``: in light-cone coordinates ``p = v₀ + eᵀv̄``, ``m = v₀ − eᵀv̄``
and ``v̄⊥ = v̄ − (eᵀv̄) e``,

.. math::

    B_k:\\; (p, m, v̄_⊥) \\mapsto (k p,\\; m / k,\\; v̄_⊥), \\qquad
    p m - ‖v̄_⊥‖^2 = v₀^2 - ‖v̄‖^2 \\text{ unchanged},

a symmetric matrix with ``B_k⁻¹ = B_{1/k}``. Boosting the rows of a block (``A' = B A``,
``b' = B b``) gives an equivalent program: ``s' = B s``, and the dual ``y = B y'`` (``Aᵀy = A'ᵀy'``,
``yᵀs = y'ᵀs'``, ``B`` maps ``Q = Q*`` onto itself).

Why: CVXPY writes ``t >= ‖u‖²`` as ``(1 + t, 1 − t, 2u) ∈ Q``. Its column ``t`` moves the block
along the edge ``(1, −1, 0)``: ``m = 2t`` grows with the solution while ``p = 2`` stays. The
projection of ``a ~ 1e6`` onto the exponential cone has ``t = 6.03e11``: the block's light-cone
coordinates are ``2`` and ``1.2e12`` at the solution, its dual's ``6e11`` and ``1`` (the multiplier
``((1 + t)/2, (t − 1)/2, a − y)``), a program within ``2e-12`` of an infeasible one that Clarabel
called infeasible. Scaling the column ``t`` by its reach (:func:`.reach.reach_scaling`) left the
block as unbalanced; Clarabel stopped there after 3 iterations ("InsufficientProgress") and where
its last iterate fell depended on the last bit of the scaling (OpenBLAS's dot kernel, per CPU).
Boosted by ``k = √(m/p) = 7.7e5`` both coordinates are ``1.5e6``, the size of ``2u``, and Clarabel
solved 40 of 40 perturbed copies ("Solved").

Computed in light-cone coordinates, not with the matrix: ``cosh θ`` and ``sinh θ`` at ``k = 7.7e5``
are both ``3.9e5``, and the column ``(−1, 1)`` they map to ``(−1/k, 1/k)`` lost five digits.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from diffcp import cones as cone_lib

from .cone_checks import cone_blocks

__all__ = ["Boost", "boost_frame", "edge_boost"]

# The least stretch m/p worth a boost (below it the block is as balanced as the solvers need).
_MIN_STRETCH = 1e4
# How near a light ray the block's motion must be: v₀ − ‖v̄‖ <= _RAY v₀.
_RAY = 1e-6


class Boost:
    """Boosts of some second-order-cone blocks of a program's rows (``blocks``: ``(start, size, e, k)``)."""

    def __init__(self, blocks: list[tuple[int, int, np.ndarray, float]]) -> None:
        self.blocks = blocks

    @property
    def label(self) -> str:
        """What it does, for messages."""
        return f"second-order cone rows boosted by up to {max(k for *_, k in self.blocks):.1e}"

    def rows(self, M, inverse: bool = False):
        """``B M`` (``B⁻¹ M`` if ``inverse``) of a vector or a sparse matrix with the program's rows."""
        sparse = sp.issparse(M)
        M = sp.csr_matrix(M, dtype=np.float64) if sparse else np.asarray(M, dtype=np.float64)
        parts, last = [], 0
        for at, q, e, k in self.blocks:
            f = 1.0 / k if inverse else k
            block = M[at:at + q].toarray() if sparse else M[at:at + q].reshape(q, -1)
            head, tail = block[0], block[1:]
            along = e @ tail  # (eᵀv̄, per column)
            p, m = f * (head + along), (head - along) / f
            # (v̄⊥ + e eᵀv̄', not v̄ + e (eᵀv̄' − eᵀv̄): an edge column's 1 − 1 + 1/k kept 1/k to 1e-11 only)
            new = np.vstack([0.5 * (p + m), (tail - np.outer(e, along)) + np.outer(e, 0.5 * (p - m))])
            parts += [M[last:at], sp.csr_matrix(new) if sparse else new.reshape(M[at:at + q].shape)]
            last = at + q
        parts.append(M[last:])
        return sp.csc_matrix(sp.vstack(parts)) if sparse else np.concatenate(parts)

    def touches(self, A: sp.csc_matrix) -> np.ndarray:
        """Whether each column of ``A`` has an entry in a boosted block."""
        rows = np.concatenate([np.arange(at, at + q) for at, q, *_ in self.blocks])
        return sp.csc_matrix(A)[rows].getnnz(axis=0) > 0

    def program(self, A: sp.csc_matrix, b: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray]:
        """The boosted data ``(B A, B b)``."""
        return self.rows(A), self.rows(b)

    def back(self, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The boosted program's ``(y', s')`` in the program's own frame: ``(B y', B⁻¹ s')``."""
        return self.rows(y), self.rows(s, inverse=True)


def edge_boost(A: sp.csc_matrix, b: np.ndarray, cones: list, x: np.ndarray) -> Boost | None:
    """The boosts that balance the second-order-cone blocks the point ``x`` stretches along an edge,
    or ``None`` where it stretches none.

    ``x`` is where a certificate's reach lies (:func:`.reach.reach_point`). In a block ``(b₀, b̄)``
    of ``b − Ax``, each column ``j`` moves the slack by ``v = −A_{qj} x_j``; where ``v`` is within
    ``1e-6`` of a light ray (``v₀ − ‖v̄‖ <= 1e-6 v₀``), ``e = −v̄/‖v̄‖``: ``v`` has ``p = 0``, the block's
    ``p`` is ``b``'s (``p_b``), and ``m = m_b + v₀ − eᵀv̄``. Boosted along the column that stretches it
    most by ``k = √(m/p_b)``, where that stretch exceeds 1e4 and ``p_b > 0`` (a block whose ``b`` is not
    on the inner side of the edge has no scale to return to). Column by column: a ray inaccurate
    enough to set the reach of the projection's ``y`` too (within 10x of ``t``'s) moved the block off
    any edge as a whole.
    """
    if not np.all(np.isfinite(x)) or not np.any(x):
        return None
    A = sp.csc_matrix(A)
    moved = np.flatnonzero(x)
    blocks = []
    for kind, at, q in cone_blocks(cones):
        if kind != cone_lib.SOC or q < 2:
            continue
        bq = b[at:at + q]
        best = None
        Aq = A[at:at + q][:, moved].toarray()
        for col, xj in zip(Aq.T, x[moved]):
            v = -col * xj
            norm = float(np.linalg.norm(v[1:]))
            if not (v[0] > 0 and norm > 0 and v[0] - norm <= _RAY * v[0]):
                continue
            e = -v[1:] / norm
            p = float(bq[0] + e @ bq[1:])
            m = float(bq[0] - e @ bq[1:]) + float(v[0] - e @ v[1:])
            if p > 0 and m > _MIN_STRETCH * p and (best is None or m / p > best[1]):
                best = (e, m / p)
        if best is not None:
            blocks.append((at, q, best[0], float(np.sqrt(best[1]))))
    return Boost(blocks) if blocks else None


def boost_frame(A: sp.csc_matrix, b: np.ndarray, cones: list, x: np.ndarray | None) -> tuple | None:
    """``(D, boost, label)``: the frame in which to look for a solution beyond a dual ray's reach
    ``x`` (:func:`.reach.reach_point`), the second-order cone blocks ``x`` stretches along an edge
    boosted (:func:`edge_boost`) and ``D`` scaling the reach's columns that touch none of them
    (``x = D x'``); ``None`` where ``x`` stretches none."""
    boost = None if x is None else edge_boost(A, b, cones, x)
    if boost is None:
        return None
    D = np.where(boost.touches(A) | (x == 0), 1.0, np.abs(x))
    return D, boost, boost.label + (f", columns scaled up to {D.max():.1e}" if D.max() > 1 else "")
