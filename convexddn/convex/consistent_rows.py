"""Equality rows with constant coefficients that are linearly dependent, removed once.

A transport-type constraint written the natural way, ``P @ 1 == a, P.T @ 1 == b``, has
equality rows :math:`A_E x = b_E` that are linearly dependent (the row sums and the column
sums both sum :math:`P`'s entries): the program is feasible only when :math:`b_E` lies in
:math:`\\operatorname{range}(A_E)`, here ``sum(a) == sum(b)`` exactly, which data rounded to
float64, let alone float32, rarely are. Where :math:`A_E` does not depend on the parameters
(the canonical affine maps give its entries no parameter column; decided once, at
construction), and has rank :math:`r < p` (an SVD, with numpy's ``matrix_rank`` threshold
:math:`\\sigma_i > \\max(p, n)\\,\\epsilon\\,\\sigma_1`), :func:`dependent_rows` computes once
an orthonormal basis :math:`Q` of :math:`\\operatorname{range}(A_E)`, the projector
:math:`\\Pi = QQ^T` and a basis :math:`N` of its complement. Per call, each element's
inconsistency is :math:`y = (I - \\Pi) b_E` (:math:`\\|y\\| = \\|N^T b_E\\|`):

* :math:`\\|y\\| \\le \\text{tol} \\cdot \\|b_E\\|` (:func:`allowed`: the layer's ``tol`` on either
  path, and at least 16 rounding units of the least precise input ``b_E`` reads): the
  element is solved with :math:`A_E x = b_E` replaced by :math:`S A_E x = S \\Pi b_E`, ``S``
  selecting :math:`r` independent rows of :math:`A_E` (a pivoted QR): full row rank,
  unique multipliers, the rows' sparsity kept. The multipliers of all :math:`p` rows are
  returned as the minimum-norm ones, :math:`z_E = T z_S` with :math:`T = (A_E^+)^T
  (S A_E)^T` (in :math:`\\operatorname{range}(A_E)`). The derivative flows through
  :math:`\\Pi`: :math:`\\partial L / \\partial b_E` has no component along :math:`y`'s
  directions, along which the program is infeasible and no derivative exists.
* beyond it the element is infeasible: :math:`y` is an exact Farkas certificate
  (:math:`A_E^T y = 0`, :math:`b_E^T y = \\|y\\|^2 > 0`), and the element fails with
  :func:`disagreement` as its status (an ``InfeasibleError`` if every failed element is).

The batched path applies it to the canonical maps (:func:`reduce_maps`, in torch, on the
caller's device), the per-element path to each element's data (:class:`ElementRows`); both
from the one :func:`dependent_rows`. Equality rows whose coefficients move with the
parameters are left as they are (rank varies per element). Rows with more than
:data:`_MAX_ENTRIES` dense entries are left as they are too (one SVD too large).
"""
from __future__ import annotations

import contextvars
import dataclasses
from contextlib import AbstractContextManager

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch

from .._context import bound

__all__ = ["DISAGREEMENT", "DependentRows", "ElementRows", "allowed", "dependent_rows", "disagreement",
           "input_precision", "least_precise", "read_by_rows", "reduce_maps"]

# The dense A_E (rows × the columns it touches) one SVD takes at most.
_MAX_ENTRIES = 4_000_000
# Rounding units of the inputs' dtype that an inconsistency may be (softmax marginals in
# float32: sums 1 ± a few 1e-7).
_ROUNDING_UNITS = 16
# The least precise floating input of this call that b_E reads, and the layer's tol (ConvexLayer.forward
# sets them: a float16 cost beside float32 marginals let 1 % of mass disagree, silently).
_INPUT_EPS: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "convexddn_input_eps", default=(float(torch.finfo(torch.float64).eps), 0.0))


@dataclasses.dataclass(frozen=True)
class DependentRows:
    """What :func:`dependent_rows` found of ``p`` dependent rows of rank ``r``: ``keep`` (r,)
    the independent rows kept; ``project`` (r, p) their rows of :math:`\\Pi`; ``null``
    (p, p - r) :math:`N`; ``duals`` (p, r) :math:`T`."""

    keep: np.ndarray
    project: np.ndarray
    null: np.ndarray
    duals: np.ndarray

    @property
    def p(self) -> int:
        return self.null.shape[0]

    @property
    def r(self) -> int:
        return self.keep.size


def constant_rows(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, p: int) -> np.ndarray | None:
    """The dense ``(p, columns touched)`` block of the entries ``values`` at ``(rows, cols)``, or
    None where it is larger than :data:`_MAX_ENTRIES` (then left as it is)."""
    used, where = np.unique(cols, return_inverse=True)
    if p * used.size > _MAX_ENTRIES:
        return None
    A_E = np.zeros((p, used.size))
    np.add.at(A_E, (rows, where.ravel()), values)
    return A_E


def dependent_rows(A_E: np.ndarray | None) -> DependentRows | None:
    """The dependent rows of the constant equality block ``A_E`` (p, n), or None where it
    has full row rank, rank 0 (zero rows: :mod:`.zero_rows`) or is too large."""
    if A_E is None or A_E.shape[0] < 2:
        return None
    used = np.flatnonzero(np.abs(A_E).sum(0) > 0)
    A = A_E[:, used]
    # The singular values alone first (full-rank blocks, an MPC's dynamics, are the common
    # case: 808 rows x 1100 columns took 0.4 s with U and V, to find nothing); U's complement
    # N needs the full U only where there are more rows than columns.
    if _rank(scipy.linalg.svdvals(A), A.shape) in (0, A.shape[0]):
        return None
    U, S, Vt = scipy.linalg.svd(A, full_matrices=A.shape[0] > A.shape[1])
    r = _rank(S, A.shape)
    if r == 0 or r == A.shape[0]:
        return None
    Q, N = U[:, :r], U[:, r:]
    piv = scipy.linalg.qr(A.T, mode="r", pivoting=True)[1]
    keep = np.sort(piv[:r])
    if np.linalg.matrix_rank(A[keep]) < r:  # (the pivoted QR did not reveal the rank: left as it is)
        return None
    pinv_t = Q @ np.diag(1.0 / S[:r]) @ Vt[:r]  # (A⁺)ᵀ (p, n')
    return DependentRows(keep, (Q[keep] @ Q.T), N, pinv_t @ A[keep].T)


def _rank(S: np.ndarray, shape: tuple[int, int]) -> int:
    """The numerical rank of a matrix of ``shape`` with singular values ``S`` (descending):
    numpy's ``matrix_rank`` threshold, ``max(shape)·eps·σ₁``."""
    return int((S > S[0] * max(shape) * np.finfo(np.float64).eps).sum()) if S.size and S[0] > 0 else 0


def allowed(tol: float) -> float:
    """The inconsistency, relative to :math:`\\|b_E\\|`, that a path with feasibility
    tolerance ``tol`` accepts: ``tol`` or, within a layer's call, the layer's ``tol`` (the
    batched path certifies to less, 1e-8, but the layer accepts residuals up to its ``tol``
    on either path), and at least :data:`_ROUNDING_UNITS` rounding units of the least precise
    floating input of the call that ``b_E`` reads (:func:`input_precision`)."""
    eps, layer_tol = _INPUT_EPS.get()
    return max(float(tol), layer_tol, _ROUNDING_UNITS * (eps() if callable(eps) else eps))


def least_precise(values) -> float:
    """The machine epsilon of the least precise floating tensor among ``values`` (float64's at least)."""
    eps = [torch.finfo(v.dtype).eps for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return max(eps + [float(torch.finfo(torch.float64).eps)])


def read_by_rows(program, values: list) -> list:
    """The inputs ``values`` that ``b_E`` of ``program``'s dependent equality rows reads (a
    :class:`~.batched.BatchedProgram`; :meth:`~.cone_data.ConeData.equality_parameters`), all of
    them where that is not known (no batched form): their rounding is what those rows may
    disagree by (the least precise of all, a float16 cost beside float32 marginals, let masses 1 %
    apart solve, silently)."""
    rows = None if program is None else program.data.equality_parameters()
    return values if rows is None else [values[i] for i in rows]


def input_precision(values, tol: float = 0.0) -> AbstractContextManager[None]:
    """Within it, :func:`allowed` knows the rounding of the floating tensors ``values``
    (the layer's inputs that ``b_E`` reads, :meth:`~.cone_data.ConeData.equality_parameters`,
    or all of them where that is not known; before they are widened to float64) and the
    layer's ``tol``. ``values`` may be a function returning them, called only where
    :func:`allowed` is (where dependent rows exist: finding which inputs they read may cost a
    canonicalisation)."""
    eps = (lambda: least_precise(values())) if callable(values) else least_precise(values)
    return bound(_INPUT_EPS, (eps, float(tol)))


#: The status of such an element, without its figure (:func:`disagreement` adds it).
DISAGREEMENT = "infeasible: the equality constraints are linearly dependent and their right-hand sides disagree"


def disagreement(gap: float) -> str:
    """The status of an element whose dependent equality rows disagree by ``gap``."""
    return (f"{DISAGREEMENT} by {gap:.3g} (‖(I − Π) b_E‖, Π the projector onto the range of their constant "
            "coefficients: an exact Farkas certificate)")


# ---------------------------------------------------------------- the batched path's maps

def reduce_maps(maps: dict, zr: int, nK: int, mr: int, const_col: int) -> tuple[dict, dict] | None:
    """The batched path's maps (:class:`~.cone_data._Map`, reduced rows ``mr`` of which the
    first ``zr`` equalities, ``nK`` variables) with the dependent equality rows removed, and
    the tensors :class:`~.cone_data.ConeData` keeps for them (``rows_*``); None where the
    equality coefficients move with the parameters or are independent."""
    from .cone_data import _Map

    if zr < 2:
        return None
    A, b = ({k: getattr(maps[name], k).numpy() for k in ("pos", "col", "coef")} for name in ("A", "b"))
    rows, cols = A["pos"] // nK, A["pos"] % nK
    eq = rows < zr
    if bool((A["col"][eq] != const_col).any()):
        return None
    dep = dependent_rows(constant_rows(rows[eq], cols[eq], A["coef"][eq], zr))
    if dep is None:
        return None
    r = dep.r
    rowmap = np.full(mr, -1, dtype=np.int64)
    rowmap[dep.keep] = np.arange(r)
    rowmap[zr:] = np.arange(r, r + mr - zr)
    ka = rowmap[rows] >= 0
    beq = b["pos"] < zr
    used, inv = np.unique(b["col"][beq], return_inverse=True)
    B_E = np.zeros((zr, used.size))
    np.add.at(B_E, (b["pos"][beq], inv.ravel()), b["coef"][beq])
    WB = dep.project @ B_E  # (r, k): the kept rows of Π b_E
    i, j = np.nonzero(WB)
    rest = ~beq
    # (host tensors whatever the default device, as canonicalise's own: .numpy() above)
    cpu = lambda v, **kw: torch.as_tensor(np.ascontiguousarray(v), device="cpu", **kw)  # noqa: E731
    new_A = _Map(cpu(rowmap[rows[ka]] * nK + cols[ka]), cpu(A["col"][ka]), cpu(A["coef"][ka]), (mr - zr + r) * nK)
    new_b = _Map(cpu(np.concatenate([i, rowmap[b["pos"][rest]]])), cpu(np.concatenate([used[j], b["col"][rest]])),
                 cpu(np.concatenate([WB[i, j], b["coef"][rest]]), dtype=torch.float64), mr - zr + r)
    extra = {"rows_cols": cpu(used), "rows_bE": cpu(B_E.T), "rows_null": cpu((dep.null.T @ B_E).T),
             "rows_T": cpu(dep.duals)}
    return {**maps, "A": new_A, "b": new_b}, {**extra, "rows_zr": zr, "rows_r": r}


def reduced_dual_rows(duals: np.ndarray, zr: int, r: int) -> np.ndarray:
    """The rows of the reduced program that the multipliers of rows ``duals`` (of the
    program before the removal) depend on: all kept equalities for a dependent one."""
    eq = duals < zr
    return np.concatenate([np.arange(r) if eq.any() else np.zeros(0, dtype=np.int64), duals[~eq] - zr + r])


def expand_duals(z: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """``(B, zr + rest)``: the multipliers of every equality row (:math:`T z_S`) from the
    reduced program's ``z`` ``(B, r + rest)``."""
    r = T.shape[1]
    return torch.cat([z[:, :r] @ T.mT, z[:, r:]], 1)


def inconsistency(p: torch.Tensor, cols: torch.Tensor, bE: torch.Tensor, null: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖y‖, ‖b_E‖)`` ``(B,)`` of each element from its parameter vector ``p`` ``(B, n_cols)``
    (``bE``, ``null``: :func:`reduce_maps`' ``rows_bE``, ``rows_null`` on ``p``'s device)."""
    pu = p.index_select(1, cols)
    return (pu @ null).norm(dim=1), (pu @ bE).norm(dim=1)


# ---------------------------------------------------------------- the per-element path's data

class ElementRows:
    """The per-element path's dependent equality rows (diffcp's form ``Ax + s = b``, the
    zero cone's ``z`` rows first, ``m`` rows in all; cvxpylayers' structure entries of ``[A | b]``,
    ``n_a`` of them ``A``'s): each element's program with them removed, and its gradients,
    cotangents and multipliers mapped between the two programs. ``par``: the reduced
    program's :class:`~.parametric.Parametric` (the projected map :math:`S\\Pi b_E(\\theta)`)."""

    def __init__(self, dep: DependentRows, z: int, m: int, indices: np.ndarray, cols: np.ndarray, n_a: int,
                 par) -> None:
        from .parametric import Parametric

        self.dep, self.z, self.m, self.r = dep, z, m, dep.r
        self.keep_rows = np.concatenate([dep.keep, np.arange(z, m)])
        rowmap = np.full(m, -1)
        rowmap[self.keep_rows] = np.arange(self.keep_rows.size)
        rows_a = indices[:n_a]
        self.a_keep = rowmap[rows_a] >= 0
        self.a_rows, self.a_cols = rowmap[rows_a[self.a_keep]], cols[:n_a][self.a_keep]
        b_rows = indices[n_a:]
        eqb = b_rows < z
        self.be_entries, self.be_rows = n_a + np.flatnonzero(eqb), b_rows[eqb]
        ab = sp.csr_matrix(par.ab_map)
        place = sp.csr_matrix((np.ones(self.be_rows.size), (self.be_rows, np.arange(self.be_rows.size))),
                              shape=(z, self.be_rows.size))
        B_E = sp.csr_matrix(dep.project) @ (place @ ab[self.be_entries])  # (r, k): S Π b_E(θ)
        ab_map = sp.vstack([ab[:n_a][self.a_keep], B_E, ab[n_a:][~eqb]]).tocsr()
        b_new = np.concatenate([np.arange(self.r), rowmap[b_rows[~eqb]]])
        self.par = Parametric(self.a_rows, self.a_cols, b_new, ab_map, par.c_map)

    @classmethod
    def build(cls, ctx, indices: np.ndarray, cols: np.ndarray, n_a: int, z: int, m: int,
              par) -> "ElementRows | None":
        """From cvxpylayers' context ``ctx`` where its equality coefficients are constant and
        dependent (``par``: :func:`~.parametric.parametric_entries`' map), else None."""
        if par is None or z < 2:
            return None
        eq = np.flatnonzero(indices[:n_a] < z)
        if abs(par.ab_map[eq]).sum() > 0:  # (A's entries moved by a parameter)
            return None
        const = np.asarray(sp.csr_matrix(ctx.reduced_A.reduced_mat)[:, -1].todense()).ravel()
        dep = dependent_rows(constant_rows(indices[eq], cols[eq], -const[eq], z))  # (A = -aug)
        return None if dep is None else cls(dep, z, m, indices, cols, n_a, par)

    def cone_dict(self, cones: dict) -> dict:
        return {**cones, "z" if "z" in cones else "f": self.r}  # (SCS < 3 named the zero cone "f")

    def reduce(self, A: sp.spmatrix, b: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray]:
        """One element's program with the dependent rows removed, its b_E projected."""
        return (sp.csc_matrix(sp.csr_matrix(A)[self.keep_rows]),
                np.concatenate([self.dep.project @ b[:self.z], b[self.z:]]))

    def gaps(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(‖(I - Π) b_E‖, ‖b_E‖)`` ``(B,)`` from the elements' structure values ``a``."""
        bE = np.zeros((a.shape[0], self.z))
        bE[:, self.be_rows] = a[:, self.be_entries]
        return np.linalg.norm(bE @ self.dep.null, axis=1), np.linalg.norm(bE, axis=1)

    def full_dual(self, y: np.ndarray) -> np.ndarray:
        """The multipliers of every row (:math:`T z_S` on the equalities)."""
        return np.concatenate([self.dep.duals @ y[:self.r], y[self.r:]])

    def reduced_cotangent(self, dy: np.ndarray) -> np.ndarray:
        return np.concatenate([self.dep.duals.T @ dy[:self.z], dy[self.z:]])

    def full_grads(self, dA: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The gradients of every structure entry of ``A`` (0 on the removed rows' constant
        entries) and of every row of ``b`` (through Π on the equalities)."""
        full = np.zeros(self.a_keep.size)
        full[self.a_keep] = dA
        return full, np.concatenate([self.dep.project.T @ db[:self.r], db[self.r:]])
