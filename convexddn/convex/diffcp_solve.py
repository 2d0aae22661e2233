"""One cone program solved through diffcp's ``solve_internal``, its Clarabel solution in SCS's row order.

diffcp takes and returns cone programs in SCS's convention, where a semidefinite block of
size ``n`` is the lower triangle of the matrix, column by column (scaled by √2 off the
diagonal). Clarabel takes the upper triangle column by column, so diffcp permutes the block's
rows of ``A`` and ``b`` by a permutation ``F`` (SCS row ``k`` becomes Clarabel row ``F[k]``)
before the solve, and must give back Clarabel's ``y`` and ``s`` by its inverse,
``y_scs[k] = y_clarabel[F[k]]``. diffcp 1.1.9 gives them back by ``G`` (``y[k] =
y_clarabel[G[k]]``) with ``G = F⁻¹`` — the same permutation only for ``n <= 3``: from a 4x4
block on (``lambda_max`` of a 4x4, ``log_det`` of a 3x3, whose cone block is 6x6) Clarabel's
correct ``x`` came with ``y`` and ``s`` that left a KKT residual of ~1, so every such element
failed with ``fallback=None`` (a verified infeasibility certificate did not verify) and needed
SCS otherwise. Both ``F`` and ``G`` are read here from diffcp's own permutation functions
applied to index vectors, and ``y``, ``s`` are reordered by ``G⁻¹ ∘ F``: the identity where
a diffcp release gives them back right (the reordered solution is verified in any case).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import scipy.sparse as sp
from diffcp import cone_program
from diffcp.cone_program import solve_internal

__all__ = ["inf_norm", "pow2_above", "psd_reorder", "solve_cone_program"]


@functools.lru_cache(maxsize=64)
def psd_reorder(offset: int, sizes: tuple[int, ...]) -> np.ndarray | None:
    """Indices ``idx`` with ``y[idx]`` (``s[idx]``) Clarabel's ``y`` (``s``) in SCS's row order,
    given diffcp's; ``None`` where they already are (or diffcp no longer has the functions).

    ``offset`` is the first semidefinite row (after the zero, nonnegative and second-order
    cone rows), ``sizes`` the blocks' matrix sizes, as in the cone dictionary's ``"s"``;
    diffcp permutes the blocks one after the other from ``offset``, and so does this.
    """
    m = offset + sum(k * (k + 1) // 2 for k in sizes)
    try:
        forward = sp.identity(m, format="csc")  # column k's one entry: where SCS row k goes
        rows = np.arange(m, dtype=np.float64)
        y, s = rows.copy(), rows.copy()
        start = offset
        for k in sizes:
            forward, _ = cone_program.permute_psd_rows(forward, rows, k, start)
            y, s = cone_program.inverse_permute_psd_solution(y, s, k, start)
            start += k * (k + 1) // 2
    except (AttributeError, TypeError, ValueError, IndexError):  # a diffcp without them
        return None
    forward = sp.csc_matrix(forward)
    forward.sort_indices()
    f = np.empty(m, dtype=np.int64)
    f[np.repeat(np.arange(m), np.diff(forward.indptr))] = forward.indices
    g = y.astype(np.int64)  # diffcp's y[k] = Clarabel's y[g[k]]
    if np.any(np.sort(f) != np.arange(m)) or np.any(np.sort(g) != np.arange(m)) or np.any(s != y):
        return None  # not permutations (a diffcp whose functions mean something else): leave its order
    g_inv = np.empty(m, dtype=np.int64)
    g_inv[g] = np.arange(m)
    idx = g_inv[f]
    if np.array_equal(idx, np.arange(m)):
        return None
    idx.setflags(write=False)
    return idx


def solve_cone_program(method: str, cone_dict: dict, A: sp.csc_matrix, b: np.ndarray, c: np.ndarray,
                       kwargs: dict[str, Any], warm_start=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``(x, y, s, status)`` of ``min cᵀx s.t. Ax + s = b, s ∈ K`` (K: ``cone_dict``, SCS's
    order) by ``method`` through diffcp, never raising on a failed solve (the status says).
    ``x`` has ``A``'s columns, ``y`` and ``s`` its rows, in SCS's row order.

    The solver sees ``b / β`` and ``c / γ``, β and γ powers of two near ``‖b‖∞`` and ``‖c‖∞``
    where those are below 1/16 (:func:`_unit`), and its point is scaled back, ``(βx, γy,
    βs)``: exact in floating point, and the same program for every cone (each is closed
    under positive scaling; certificates are rays). The solvers' tolerances hold a "1 +"
    (Clarabel's ``max(1, ‖b‖ + ‖x‖ + ‖s‖)``): on data of 1e-7 that is an absolute
    tolerance, and a box LP's point came back 0.3 off in its own units (then re-solved by
    SCS, with a warning); an entropy-regularised simplex with its objective × 1e-8 failed.
    Above 1 those tests are relative already, and large data are left as they are here: scaled
    down, the unit constants of CVXPY's epigraphs beside them (a squared norm's cone rows)
    went to 1e-6, and an exponential-cone projection of a point of 1e6 failed there. Only an
    element whose first solve failed, or left its curved cones' multipliers and slacks far
    apart, is solved again in a unit of its own data (:mod:`.own_unit`), large ones included."""
    beta, gamma = _unit(b), _unit(c)
    if warm_start is not None and (beta != 1.0 or gamma != 1.0):
        xw, yw, sw = warm_start
        warm_start = (xw / beta, yw / gamma, sw / beta)
    res = solve_internal(A.copy(), b / beta, c / gamma, cone_dict, solve_method=method, warm_start=warm_start,
                         raise_on_error=False, **kwargs)
    status = str(res.get("info", {}).get("status", "unknown"))
    x, y, s = (np.asarray(res[k], dtype=np.float64) * f for k, f in (("x", beta), ("y", gamma), ("s", beta)))
    sizes = tuple(int(k) for k in cone_dict.get("s", ()))
    if method == "Clarabel" and sizes:
        offset = (int(cone_dict.get("z", 0)) + int(cone_dict.get("f", 0)) + int(cone_dict.get("l", 0))
                  + int(sum(cone_dict.get("q", ()))))
        idx = psd_reorder(offset, sizes)
        if idx is not None and idx.size <= min(y.size, s.size):  # (exponential-cone rows follow: kept)
            y = np.concatenate([y[idx], y[idx.size:]])
            s = np.concatenate([s[idx], s[idx.size:]])
    return x, y, s, status


def inf_norm(v: np.ndarray) -> float:
    """``‖v‖∞`` (0 for an empty ``v``)."""
    return float(np.max(np.abs(v), initial=0.0))


def pow2_above(top: float) -> float:
    """The power of two just above ``top`` (> 0, finite): an exact scale factor."""
    return float(np.ldexp(1.0, int(np.frexp(top)[1])))


def _unit(v: np.ndarray) -> float:
    """A power of two near ``‖v‖∞`` where that is below 1/16 (and nonzero), else 1."""
    top = inf_norm(v)
    return pow2_above(top) if 0 < top < 0.0625 else 1.0
