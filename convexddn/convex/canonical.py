"""A DPP problem canonicalised once into :class:`~.cone_data.ConeData` (filled per call in torch).

cvxpylayers canonicalises a DPP problem (with the quadratic objective kept, as its
Clarabel/Moreau interfaces do) into a cone program whose data are linear in the
parameter vector :math:`p = (\\theta, 1)`:

.. math::

    \\min_x \\tfrac12 x^T P(p) x + q(p)^T x \\quad\\text{s.t.}\\quad A(p) x + s = b(p),
    \\; s \\in \\{0\\}^z \\times \\mathbb{R}^l_+ \\times Q^{q_1} \\times \\dots

:func:`canonicalise` turns each datum's sparse map into index arrays of a
:class:`~.cone_data.ConeData` and detects the KKT structure of the reduced program.

**Presolve.** CVXPY introduces an auxiliary variable :math:`u = Lx + c` with an equality
row for every quadratic term (``sum_squares(L @ x)`` becomes :math:`\\|u\\|^2`), which
doubles the variables and adds as many equality rows. A variable that appears in
exactly one constraint row, an equality with a constant coefficient :math:`a \\ne 0`, is
eliminated: with :math:`x = (x_K, x_U)`, :math:`x_U = u_0 - M x_K`,
:math:`u_0 = b_R / a`, :math:`M = A_{RK} / a`,

.. math::

    P' = P_{KK} - P_{KU} M - M^T P_{UK} + M^T P_{UU} M, \\qquad
    q' = q_K + P_{KU} u_0 - M^T (q_U + P_{UU} u_0),

the rows :math:`R` disappear, and their multipliers are recovered from stationarity,
:math:`z_R = -(P_{U\\cdot} x + q_U) / a`. All of it is torch, so gradients flow through.
"""
from __future__ import annotations

from typing import Any, Sequence

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch
from cvxpylayers.interfaces.base import SolverInterface

from .cone_data import ConeData, _Map, _Var
from .consistent_rows import reduce_maps, reduced_dual_rows
from .kkt import KKTStructure
from .symmetric_cones import ConeLayout
from ..errors import NotDPPError, OptionError, ProblemError
from .validation import describe_failure

__all__ = ["ConeData", "UnsupportedProblem", "batched_refusal", "canonicalise"]


class UnsupportedProblem(Exception):
    """The problem needs what the batched solver does not cover (exp/PSD/power cones…)."""


class _CanonOnly(SolverInterface):
    """Asks cvxpylayers for Clarabel's canonicalisation with the quadratic term kept."""

    canon_solver = "CLARABEL"
    supports_quad_obj = True

    def solve_torch_batch(self, *args: Any) -> Any:  # never called: canonicalisation only
        raise NotImplementedError

    def derivative_torch_batch(self, *args: Any) -> Any:
        raise NotImplementedError


def _other_cones(dims: Any) -> str:
    """The cones of CVXPY's ``ConeDims`` that the batched solver does not take, in words
    ("" if none): their kinds, counts and sizes, and the atoms that usually bring them."""
    found = []
    if dims.exp:
        found.append(f"{dims.exp} exponential cone(s) (from atoms such as log, exp, entr, rel_entr, kl_div, "
                     "log_sum_exp, logistic)")
    if dims.psd:
        found.append(f"{len(dims.psd)} PSD cone(s) of order {list(dims.psd)} (from PSD constraints or "
                     "variables, lambda_max, sigma_max, normNuc, log_det ...)")
    for attr in ("p3d", "pnd"):
        if getattr(dims, attr, None):
            found.append(f"{len(getattr(dims, attr))} power cone(s) (cp.PowCone3D / PowConeND constraints)")
    return " and ".join(found)


def _coo(mat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    coo = sp.coo_matrix(mat)
    return coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data.astype(np.float64)


def _csc_entry_cols(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def canonicalise(problem: cp.Problem, parameters: Sequence[cp.Parameter],
                 variables: Sequence[cp.Variable], presolve: bool = True) -> ConeData:
    """Canonicalise once (cvxpylayers, quadratic objective kept) and presolve.

    Raises:
        UnsupportedProblem: cones other than zero/nonnegative/second-order, symmetric
            or PSD variables, or anything cvxpylayers cannot canonicalise this way.
    """
    import cvxpylayers.utils.parse_args as pa

    try:
        ctx = pa.parse_args(problem, list(variables), list(parameters), None, custom_solver=_CanonOnly())
    except (ValueError, NotImplementedError, AssertionError, KeyError, IndexError, TypeError,
            cp.error.DCPError) as err:
        # (KeyError etc.: cvxpylayers' own failures on edge cases, e.g. a zero-size parameter.)
        raise UnsupportedProblem(f"cvxpylayers cannot canonicalise this problem: {describe_failure(err)}") from err
    dims = ctx.cone_dims
    other = _other_cones(dims)
    if other:
        raise UnsupportedProblem(f"it takes zero, nonnegative and second-order cones only, and this problem's cone "
                                 f"program has {other}")
    variables_out = []
    for i, rec in enumerate(ctx.var_recover):
        if rec.unpack_fn != "reshape":
            raise UnsupportedProblem(
                f"it cannot return variables[{i}] ({variables[i].name()}, declared symmetric or PSD: CVXPY "
                "stores it by one triangle); return a plain variable X with the constraint X == X.T instead")
        sl = rec.primal if rec.source == "primal" else rec.dual
        variables_out.append(_Var(rec.source, sl.start, sl.stop, tuple(rec.shape)))
    layout = ConeLayout(int(dims.zero), int(dims.nonneg), tuple(int(k) for k in dims.soc))

    # Parameter columns, in the order cvxpylayers stacks them (θ in CVXPY's column order, then 1).
    sizes = [len(t[0]) if t is not None else p.size for p, t in zip(parameters, ctx.param_triu_indices)]
    order = list(ctx.user_order_to_col_order)
    param_cols = [(order[i], sizes[i], tuple(p.shape)) for i, p in enumerate(parameters)]
    # Host-side index arrays are made on the CPU whatever the default device: under
    # torch.device("meta") (or a CUDA default) they were made there, then refused by .numpy().
    triu = [None if t is None else (torch.tensor(t[0], device="cpu"), torch.tensor(t[1], device="cpu"))
            for t in ctx.param_triu_indices]

    if ctx.reduced_A.problem_data_index is None:
        # No constraints at all: an unconstrained QP has no rows (n from q's rows: x, then
        # 1); an unconstrained LP is unbounded or has no unique solution (not batched).
        m, n = 0, int(ctx.q.shape[0]) - 1
        if n <= 0 or ctx.reduced_P.reduced_mat is None or ctx.reduced_P.reduced_mat.nnz == 0:
            raise UnsupportedProblem("the cone program has no constraints and no quadratic term")
        e_row = e_col = r = c = np.zeros(0, dtype=np.int64)
        v = np.zeros(0)
    else:
        idx, ptr, shape = ctx.reduced_A.problem_data_index
        m, n = int(shape[0]), int(shape[1]) - 1
        e_row = np.asarray(idx, dtype=np.int64)
        e_col = _csc_entry_cols(np.asarray(ptr))
        r, c, v = _coo(ctx.reduced_A.reduced_mat)
    a_row, a_col, is_b = e_row[r], e_col[r], e_col[r] == n
    coef = np.where(is_b, v, -v)  # ours: A = -A_cvxpy, b = b_cvxpy

    if ctx.reduced_P.reduced_mat is not None and ctx.reduced_P.problem_data_index is not None:
        pidx, pptr, _ = ctx.reduced_P.problem_data_index
        pr, pc, pv = _coo(ctx.reduced_P.reduced_mat)
        p_row, p_col, p_par = np.asarray(pidx, dtype=np.int64)[pr], _csc_entry_cols(np.asarray(pptr))[pr], pc
    else:
        p_row = p_col = p_par = np.zeros(0, dtype=np.int64)
        pv = np.zeros(0)
    qr, qc, qv = _coo(ctx.q)
    q_keep = qr < n

    # Presolve: variables with one A entry, in an equality row, with a constant coefficient.
    A_entries = np.flatnonzero(e_col < n)
    per_col = np.bincount(e_col[A_entries], minlength=n)
    elim, elim_rows, elim_coef = [], [], []
    if presolve and m:
        const_col = ctx.reduced_A.reduced_mat.shape[1] - 1
        csr = ctx.reduced_A.reduced_mat.tocsr()
        used_rows: set[int] = set()
        for k in A_entries:
            j, i = int(e_col[k]), int(e_row[k])
            if per_col[j] != 1 or i >= layout.zero or i in used_rows or len(elim) >= n - 1:
                continue
            lo, hi = csr.indptr[k], csr.indptr[k + 1]
            if hi - lo != 1 or csr.indices[lo] != const_col or csr.data[lo] == 0:
                continue
            used_rows.add(i)
            elim.append(j)
            elim_rows.append(i)
            elim_coef.append(-float(csr.data[lo]))  # ours = -cvxpy
    elim_a = np.array(elim, dtype=np.int64)
    keep_a = np.setdiff1d(np.arange(n), elim_a)
    rows_elim = np.array(elim_rows, dtype=np.int64)
    rows_keep = np.setdiff1d(np.arange(m), rows_elim)
    nK, nU = keep_a.size, elim_a.size
    kpos = np.full(n, -1)
    kpos[keep_a] = np.arange(nK)
    upos = np.full(n, -1)
    upos[elim_a] = np.arange(nU)
    rpos = np.full(m, -1)
    rpos[rows_keep] = np.arange(rows_keep.size)
    epos = np.full(m, -1)
    epos[rows_elim] = np.arange(nU)
    ecoef = np.zeros(m)
    ecoef[rows_elim] = elim_coef

    def mk(sel, pos, col, cf, size) -> _Map:
        return _Map(torch.as_tensor(pos[sel], device="cpu"), torch.as_tensor(col[sel], device="cpu"),
                    torch.as_tensor(cf[sel], dtype=torch.float64, device="cpu"), int(size))

    maps: dict[str, _Map] = {}
    pk, pu = kpos[p_row], upos[p_row]
    ck, cu = kpos[p_col], upos[p_col]
    maps["PKK"] = mk((pk >= 0) & (ck >= 0), pk * nK + ck, p_par, pv, nK * nK)
    uu = (pu >= 0) & (cu >= 0)
    puu_diag = bool(np.all(p_row[uu] == p_col[uu]))
    if puu_diag:
        maps["PUU"] = mk(uu, pu, p_par, pv, nU)
    else:
        maps["PUU"] = mk(uu, pu * nU + cu, p_par, pv, nU * nU)
    ku = (pk >= 0) & (cu >= 0)
    pku_zero = not bool(np.any(ku))
    maps["PKU"] = mk(ku, pk * nU + cu, p_par, pv, nK * nU)
    maps["qK"] = mk(q_keep & (kpos[np.minimum(qr, n - 1)] >= 0), kpos[np.minimum(qr, n - 1)], qc, qv, nK)
    maps["qU"] = mk(q_keep & (upos[np.minimum(qr, n - 1)] >= 0), upos[np.minimum(qr, n - 1)], qc, qv, nU)
    rk, re_ = rpos[a_row], epos[a_row]
    colk = kpos[np.minimum(a_col, n - 1)]
    mr = rows_keep.size
    maps["A"] = mk(~is_b & (rk >= 0) & (colk >= 0), rk * nK + colk, c, coef, mr * nK)
    maps["b"] = mk(is_b & (rk >= 0), rk, c, coef, mr)
    scale = np.where(re_ >= 0, 1.0 / np.where(ecoef[a_row] != 0, ecoef[a_row], 1.0), 0.0)
    maps["M"] = mk(~is_b & (re_ >= 0) & (colk >= 0), re_ * nK + colk, c, coef * scale, nU * nK)
    maps["u0"] = mk(is_b & (re_ >= 0), re_, c, coef * scale, nU)
    # Dependent equality rows with constant coefficients: removed once (.consistent_rows).
    zr = layout.zero - nU
    rows_extra = reduce_maps(maps, zr, nK, mr, int(ctx.reduced_A.reduced_mat.shape[1]) - 1) if m else None
    if rows_extra is not None:
        maps, rows_extra = rows_extra
        mr += rows_extra["rows_r"] - zr
    reduced = ConeLayout(mr - layout.nonneg - sum(layout.soc), layout.nonneg, layout.soc)
    data = ConeData(maps, reduced, nK, nU, keep_a, elim_a, rows_keep, rows_elim, np.array(elim_coef),
                    puu_diag, pku_zero, n, m, param_cols, triu, variables_out)
    data.structure, data.separable = _structure(maps, reduced, nK, nU, mr, puu_diag)
    for key, value in (rows_extra or {}).items():
        setattr(data, key, value)
    # The reduced variables the requested outputs depend on (for the error estimate).
    wanted = np.zeros(n, dtype=bool)
    rows = np.zeros(m, dtype=bool)
    for v in variables_out:
        if v.source == "primal":
            wanted[v.start:v.stop] = True
        else:
            rows[v.start:v.stop] = True
    # An eliminated output (a variable, or the multiplier of a removed row, recovered
    # from stationarity) depends on every kept variable.
    every = wanted[elim_a].any() or rows[rows_elim].any()
    data.error_cols = None if every else torch.as_tensor(kpos[wanted], dtype=torch.long, device="cpu")
    duals = rpos[rows & (rpos >= 0)]
    if rows_extra is not None:
        duals = reduced_dual_rows(duals, zr, rows_extra["rows_r"])
    data.error_duals = torch.as_tensor(duals, dtype=torch.long, device="cpu") if rows.any() else None
    return data


def _parametric_quad_forms(objective: Any) -> list[str]:
    """The ``quad_form(x, P)`` terms of ``objective`` whose ``P`` holds a parameter, written out."""
    from cvxpy.atoms.quad_form import QuadForm

    found, stack = [], [objective]
    while stack:
        node = stack.pop()
        if isinstance(node, QuadForm) and node.args[1].parameters():
            names = ", ".join(p.name() for p in node.args[1].parameters())
            found.append(f"quad_form({node.args[0]}, {node.args[1]}) of parameter {names}")
        else:
            stack.extend(node.args)
    return found


def batched_refusal(problem: cp.Problem, solver: str, why: Exception, qp_only: bool) -> ProblemError | OptionError:
    """The error for a problem the batched solver cannot take (``why``) where only it may
    solve it: with ``solver='batched'`` an ``OptionError`` (the choice is wrong); with
    ``quad_form(x, P)`` of a parameter ``P`` in the objective (``qp_only``) a
    ``NotDPPError`` naming those terms, since no solver takes the problem: the batched
    solver keeps ``P`` as the quadratic term, a per-element one writes the term as a
    second-order cone, where a parameter ``P`` is not DPP."""
    if not qp_only:
        return OptionError(f"solver={solver!r}: the batched solver cannot solve this problem: {why}")
    terms = "; ".join(_parametric_quad_forms(problem.objective)) or "quad_form(x, P) of a parameter P"
    return NotDPPError(
        f"solver={solver!r}: no solver can take this problem. The objective's {terms} requires the batched "
        "solver (it keeps P as the quadratic term; a per-element solver writes the term as a second-order cone, "
        f"where a parameter P is not DPP), and the batched solver cannot solve this problem: {why}. Write the "
        "term as cp.sum_squares(L @ x) with a parameter L (P = LᵀL), which every solver takes, or make P a "
        "constant")


# Rows of A touching more than two variables that a nearly separable program may have.
_COUPLING_ROWS = 4


def _pattern(mp: _Map, rows: int, cols: int) -> np.ndarray:
    pat = np.zeros(rows * cols, dtype=bool)
    pat[mp.pos.numpy()] = True
    return pat.reshape(rows, cols)


def _meets(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pattern of ``a @ b`` for boolean patterns ``a``, ``b`` (entries where some
    term is nonzero), as a sparse product: numpy's integer matmul has no BLAS, and an
    L1-ball projection with n = 512 (1025 variables) spent 13 s of its construction in
    one such product."""
    return (sp.csr_matrix(a, dtype=np.float32) @ sp.csr_matrix(b, dtype=np.float32)).toarray() > 0


def _structure(maps: dict[str, _Map], layout: ConeLayout, nK: int, nU: int, mr: int,
               puu_diag: bool) -> tuple[KKTStructure, bool]:
    """Which terms of the reduced KKT matrix S can be nonzero (see :class:`KKTStructure`),
    and whether the program is nearly separable: P diagonal and at most
    :data:`_COUPLING_ROWS` rows of A touching more than two variables (an L1-ball
    projection in epigraph form: one row couples the rest). A sparse per-element solve
    then beats dense batched factorisation from moderate sizes on (see
    :meth:`~.batched.BatchedProgram.fits`)."""
    P = _pattern(maps["PKK"], nK, nK)
    if nU:
        M = _pattern(maps["M"], nU, nK)
        PUU = np.diag(_pattern(maps["PUU"], 1, nU)[0]) if puu_diag else _pattern(maps["PUU"], nU, nU)
        P = P | _meets(_meets(M.T, PUU), M)
        cross = _meets(_pattern(maps["PKU"], nK, nU), M)
        P = P | cross | cross.T
    A = _pattern(maps["A"], mr, nK)
    separable = not (P & ~np.eye(nK, dtype=bool)).any() and int((A.sum(1) > 2).sum()) <= _COUPLING_ROWS
    curved = np.diag(P).copy()
    S = P.copy()
    rows = A[layout.zero:layout.zero + layout.nonneg]
    curved |= rows.any(0)
    S |= _meets(rows.T, rows)
    start = layout.zero + layout.nonneg
    for k in layout.soc:  # a second-order cone couples every variable it touches
        touched = A[start:start + k].any(0)
        curved |= touched
        S |= np.outer(touched, touched)
        start += k
    off = S & ~np.eye(nK, dtype=bool)
    if bool(layout.zero) and (off.any() or not curved.all()):
        # Dense S. Curvature that only cone rows give vanishes where those rows are
        # inactive at the solution (H⁻¹ → 0 in the limit scaling the error estimate and
        # the backward factorise): there only P keeps S definite, so the ρ term is added
        # wherever P leaves a variable flat. (A Huber loss with equalities, data ~1e4:
        # S at the solution had pivots from 1e-9 to 3e11, its Cholesky failed and a
        # feasible element ended in a SolverError on every path.)
        return KKTStructure(rho=not bool(np.diag(P).all())), separable
    if off.any():
        return KKTStructure(rho=False), separable
    cone_rows = A[layout.zero:]
    cols = np.where(cone_rows.any(1), cone_rows.argmax(1), 0)
    start = layout.nonneg
    for k in layout.soc:  # one column per cone, also on its empty rows
        block = cone_rows[start:start + k]
        cols[start:start + k] = block.any(0).argmax() if block.any() else 0
        start += k
    return KKTStructure(rho=False, diagonal=True, cols=tuple(int(c) for c in cols)), separable
