"""How a layer's parameters move its cone program's data, and what that says about the
uniqueness of a per-element gradient (:class:`Parametric`, :func:`parametric_entries`).

The adjoint of :class:`~convexddn.convex.cone.ResidualMap` gives the gradient with
respect to the data ``(A, b, c)`` (:func:`data_grads`); cvxpylayers' affine maps take it
to the parameters θ (:func:`theta_grads`). Where the derivative system is
rank-deficient, :func:`unique_anyway` decides whether the gradient is unique all the same,
in the parameters that require grad (:func:`requiring_grad`: the others get no gradient).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from .min_norm import equilibrate

__all__ = ["Parametric", "data_grads", "data_tangent", "parameter_columns", "parametric_entries", "requiring_grad",
           "theta_grads", "unique_anyway"]


@dataclasses.dataclass(frozen=True)
class Parametric:
    """How the layer's parameters θ move the cone program's data (an affine map).

    ``rows, cols``: the positions of ``A``'s structural entries; ``b_rows``: ``b``'s.
    ``ab_map`` (``len(rows) + len(b_rows)``, k): the derivative of those entries, in
    that order, with respect to θ; ``c_map`` (n, k): of ``c``.
    """

    rows: np.ndarray
    cols: np.ndarray
    b_rows: np.ndarray
    ab_map: sp.csr_matrix
    c_map: sp.csr_matrix


# A null direction counts as reached when the cotangent's component along it, or a
# parameter's perturbation of R, is above this relative size (measured over the fuzz's
# rank-deficient elements, seeds 1-5: parameters' reach ≤ 5.4e-10 or ≥ 3.6e-6, the
# cotangent's ≤ 8e-15).
_UNIQUE_RTOL = 3e-8


def unique_anyway(M: np.ndarray, dz: np.ndarray, pi_z: np.ndarray, n: int, par: Parametric, rank: int) -> bool:
    r"""Whether the gradient is unique although ``M`` has more than one null direction
    (``rank``: the adjoint solve's, :func:`~.min_norm.min_norm_solve`).

    With :math:`N_r, N_l` bases of the right and left null spaces of :math:`M`, the
    derivative :math:`\mathrm{d}z` solves :math:`M\,\mathrm{d}z = -\partial_\theta R`
    up to :math:`N_r`, and the adjoint :math:`r` solves :math:`M^T r = \bar z` up to
    :math:`N_l`. The gradient does not depend on either choice when
    :math:`N_r^T \bar z = 0` (the cotangent does not see the solution set's directions,
    e.g. a non-unique multiplier or auxiliary variable that is no output) and
    :math:`N_l^T \partial_{\theta_k} R = 0` for every parameter (none moves the
    solution off the set: e.g. a redundant constraint whose bound moves with the
    others). The second is the adjoint's own formula with :math:`r` a left null vector,
    mapped to θ by the data's derivative. Otherwise the solution is not differentiable.
    """
    # The null directions are those the solve dropped: the last N − rank of the matrix it
    # decided the rank on, S = D_r M D_c (its units; M's null spaces are D_c N(S), D_r N(Sᵀ)).
    # A cut of its own, 1e-9 of M's largest singular value, in M's units, disagreed: with the
    # data b, c, t of an SOCP scaled by 1e3 (its objective's ½‖x‖² by 1e6), a direction the
    # solve kept (1.2e-10 of the largest here, 1.4e-6 in S) was called null, the cotangent
    # reached it (1e-7), and 10 of 16 elements warned "not unique", their gradients exact.
    rows, cols = equilibrate(M)
    U, _, Vt = scipy.linalg.svd(M * rows[:, None] * cols[None, :])
    right = _orthonormal(cols[:, None] * Vt[rank:].T).T
    left = _orthonormal(rows[:, None] * U[:, rank:])
    if np.abs(right @ dz).max() > _UNIQUE_RTOL * np.abs(dz).max():
        return False
    reach = theta_grads(par, *data_grads(left, pi_z, n, par.rows, par.cols))  # (k, null directions)
    size = max(1.0, np.abs(pi_z).max()) * max([abs(m).max() for m in (par.ab_map, par.c_map) if m.nnz] + [0.0])
    return np.abs(reach).max(initial=0.0) <= _UNIQUE_RTOL * size


def _orthonormal(basis: np.ndarray) -> np.ndarray:
    """An orthonormal basis (columns) of ``basis``' span (its columns independent)."""
    return np.linalg.qr(basis)[0] if basis.shape[1] else basis


def data_grads(r: np.ndarray, pi_z: np.ndarray, n: int, rows: np.ndarray, cols: np.ndarray):
    """(dA at (rows, cols), db, dc): the adjoint formula for the solution r of Mᵀ r = z̄."""
    m = pi_z.size - n - 1
    pi = pi_z.reshape(-1, *(1,) * (r.ndim - 1))  # r may hold several such solutions as columns
    dA = pi[cols] * r[rows + n] - pi[n + rows] * r[cols]
    db = pi[n:n + m] * r[-1] - pi[-1] * r[n:n + m]
    dc = pi[:n] * r[-1] - pi[-1] * r[:n]
    return dA, db, dc


def data_tangent(par: Parametric, pi_z: np.ndarray, n: int, omega: np.ndarray) -> np.ndarray:
    r"""The derivative of the residual map :math:`R(z) = Q \Pi(z) + z - \Pi(z)` along the parameters'
    direction ``omega`` ``(k,)``, at ``pi_z`` = :math:`\Pi(z)` ``(N,)`` (``n`` columns): the data move
    only :math:`Q`, so it is :math:`Q(\mathrm{d}A, \mathrm{d}b, \mathrm{d}c)\, \Pi(z)`,
    :math:`(\mathrm{d}A\, ^T\pi_y + \mathrm{d}c\, \pi_w,\; -\mathrm{d}A\, \pi_x + \mathrm{d}b\, \pi_w,\;
    -\mathrm{d}c^T \pi_x - \mathrm{d}b^T \pi_y)`. The transpose of :func:`data_grads` then
    :func:`theta_grads`: :math:`r^T` of it is minus their gradient's product with ``omega``."""
    m = pi_z.size - n - 1
    px, py, pw = pi_z[:n], pi_z[n:n + m], pi_z[-1]
    d, dc = par.ab_map @ omega, par.c_map @ omega
    dA, db = d[:par.rows.size], np.bincount(par.b_rows, d[par.rows.size:], minlength=m)
    gx = np.bincount(par.cols, dA * py[par.rows], minlength=n) + dc * pw
    gy = db * pw - np.bincount(par.rows, dA * px[par.cols], minlength=m)
    return np.concatenate([gx, gy, [-(dc @ px) - db @ py]])


def theta_grads(par: Parametric, dA, db, dc) -> np.ndarray:
    """The gradient with respect to the parameters θ from the data's (dA at ``par``'s entries)."""
    return par.ab_map.T @ np.concatenate([dA, db[par.b_rows]]) + par.c_map.T @ dc


def parametric_entries(ctx: Any, indices: np.ndarray, cols: np.ndarray, n_a: int) -> Parametric | None:
    """The derivative of the cone program's data with respect to the canonical
    parameters θ, from cvxpylayers' affine maps ``[A | b] = reduced_A @ [θ; 1]`` (the
    structure entries in problem-data order, ``A`` with the opposite sign) and
    ``[c; c0] = q @ [θ; 1]``; None where these are not available."""
    mat = getattr(ctx.reduced_A, "reduced_mat", None)
    q = getattr(ctx, "q", None)
    if mat is None or q is None:
        return None
    mat, q = sp.csr_matrix(mat), sp.csr_matrix(q)
    if mat.shape[0] != indices.size or q.shape[1] != mat.shape[1]:
        return None
    sign = np.where(np.arange(indices.size) < n_a, -1.0, 1.0)  # A = −aug[:, :-1], b = aug[:, -1]
    ab_map = sp.csr_matrix(sp.diags(sign) @ mat[:, :-1])
    return Parametric(indices[:n_a], cols[:n_a], indices[n_a:], ab_map, sp.csr_matrix(q[:-1, :-1]))


def parameter_columns(ctx: Any, k: int) -> list[np.ndarray] | None:
    """The columns of θ (``k`` of them) that each of the layer's parameters fills, in the
    layer's order: cvxpylayers' ``p_stack`` concatenates the parameters in its column order,
    a symmetric one by its upper triangle; None where the context does not say or the sizes
    do not add up to ``k``."""
    params, order = getattr(ctx, "parameters", None), getattr(ctx, "user_order_to_col_order", None)
    if params is None or order is None or len(order) != len(params):
        return None
    triu = getattr(ctx, "param_triu_indices", None) or (None,) * len(params)
    sizes = [len(t[0]) if t is not None else int(np.prod(p.shape, dtype=int)) for p, t in zip(params, triu)]
    by_col = sorted(range(len(params)), key=lambda i: order[i])
    starts = np.cumsum([0] + [sizes[i] for i in by_col])
    if starts[-1] != k:
        return None
    cols: list[np.ndarray] = [np.zeros(0, dtype=int)] * len(params)
    for j, i in enumerate(by_col):
        cols[i] = np.arange(starts[j], starts[j + 1])
    return cols


def requiring_grad(par: Parametric | None, columns: list[np.ndarray] | None, needs) -> Parametric | None:
    """``par`` restricted to the parameters whose ``needs`` (one flag per parameter, the
    layer's order; ``columns``: :func:`parameter_columns`) is true: the gradient reaches
    those only, so only they decide whether it is unique (:func:`unique_anyway`, the kinks'
    sides and the zero rows of :meth:`~.cone.ResidualMap.adjoint`; the batched path's probes
    move them alone too). A parameter that does not require grad and would move the solution off
    its solution set (the marginals of a transport plan at a degenerate vertex, beside its
    cost C) gets no gradient: its non-differentiability is not the gradient's. ``par``
    itself where any of the three is missing or they do not match."""
    if par is None or columns is None or needs is None or len(needs) != len(columns) or all(needs):
        return par
    keep = np.concatenate([c for c, w in zip(columns, needs) if w] + [np.zeros(0, dtype=int)])
    return dataclasses.replace(par, ab_map=sp.csr_matrix(par.ab_map[:, keep]), c_map=sp.csr_matrix(par.c_map[:, keep]))
