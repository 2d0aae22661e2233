"""Checked solves of cone programs, plugged into cvxpylayers as its solver.

cvxpylayers canonicalises a DPP problem into a parametrized cone program

.. math::

    \\min_x c^T x \\quad \\text{s.t.}\\quad A x + s = b,\\; s \\in K

and hands us, per batch element, the nonzero values of ``[A | b]`` and ``[c | c0]``.
We solve each element with diffcp (Clarabel by default), **verify** the returned
primal-dual triple against the KKT conditions ourselves (diffcp does not check
Clarabel's status at all), try a fallback solver where the first one fails, and
differentiate with diffcp's adjoint in a mode picked for the problem size: the
dense mode is exact, while LSQR's tolerance caps the gradient's accuracy (measured:
gradient errors of order 1 on an L1-ball projection with cvxpylayers' defaults).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import diffcp
import numpy as np
import scipy.sparse as sp
import torch
from cvxpy.reductions.solvers.conic_solvers.scs_conif import dims_to_solver_dict
from cvxpylayers.interfaces.base import SolverInterface
from diffcp import cones as cone_lib
from diffcp.cone_program import solve_and_derivative_internal, solve_internal

from .errors import SolverWarning

SOLVERS = ("Clarabel", "SCS", "ECOS")
MODES = ("auto", "dense", "lsmr", "lsqr")

# Tight defaults: the layer promises float64 solutions to ~1e-7 or better.
_SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {
    "Clarabel": {
        "tol_gap_abs": 1e-10,
        "tol_gap_rel": 1e-10,
        "tol_feas": 1e-10,
        "tol_ktratio": 1e-8,
        "max_iter": 500,
    },
    "SCS": {"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 200_000},
    "ECOS": {"abstol": 1e-10, "reltol": 1e-10, "feastol": 1e-10},
}

# The dense adjoint factorises an (N, N) matrix, N = rows + columns + 1 of the cone
# program; above this size LSMR (run to 1e-10) is faster and still accurate.
_DENSE_MAX_N = 1200


def canonical_solver_name(name: str) -> str:
    """Map a case-insensitive solver name to diffcp's spelling, or raise KeyError."""
    for s in SOLVERS:
        if s.lower() == str(name).lower():
            return s
    raise KeyError(name)


class ConeSolveFailure(Exception):
    """Raised inside the solver with flat batch indices; ConvexLayer re-raises it."""

    def __init__(self, indices: list[int], statuses: list[str]) -> None:
        super().__init__(f"failed at {indices}: {statuses}")
        self.indices = indices
        self.statuses = statuses


@dataclasses.dataclass
class SolveInfo:
    """What the last call solved: per-element solver, status and KKT residual."""

    solvers: list[str]
    statuses: list[str]
    residuals: list[float]


def kkt_residual(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, cones: list,
                 x: np.ndarray, y: np.ndarray, s: np.ndarray) -> float:
    """Largest relative violation of primal/dual feasibility, cone membership and gap."""
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(s))):
        return float("inf")
    Ax = A @ x
    ATy = A.T @ y
    cx, by = float(c @ x), float(b @ y)

    def inf(v: np.ndarray) -> float:
        return float(np.max(np.abs(v))) if v.size else 0.0

    primal = inf(Ax + s - b) / (1.0 + max(inf(b), inf(Ax), inf(s)))
    dual = inf(ATy + c) / (1.0 + max(inf(c), inf(ATy)))
    gap = abs(cx + by) / (1.0 + abs(cx) + abs(by))
    s_cone = inf(s - cone_lib.pi(s, cones, dual=False)) / (1.0 + inf(s))
    y_cone = inf(y - cone_lib.pi(y, cones, dual=True)) / (1.0 + inf(y))
    return max(primal, dual, gap, s_cone, y_cone)


class CheckedDiffcp(SolverInterface):
    """cvxpylayers solver interface: diffcp per element, every solve verified.

    Args:
        solver: first solver, one of ``"Clarabel"``, ``"SCS"``, ``"ECOS"``.
        fallback: solver tried on the elements where ``solver`` fails, or ``None``.
        mode: diffcp adjoint mode; ``"auto"`` picks ``"dense"`` for cone programs
            with at most 1200 rows + columns, ``"lsmr"`` above.
        tol: largest accepted relative KKT residual (see :func:`kkt_residual`).
        solver_args: keyword arguments for the first solver, over our defaults.
    """

    canon_solver = "DIFFCP"
    supports_quad_obj = False

    def __init__(self, solver: str = "Clarabel", fallback: str | None = "SCS",
                 mode: str = "auto", tol: float = 1e-6,
                 solver_args: dict[str, Any] | None = None) -> None:
        self.solver = solver
        self.fallback = fallback
        self.mode = mode
        self.tol = tol
        self.solver_args = dict(solver_args or {})
        self.last_info: SolveInfo | None = None

    def setup(self, ctx: Any) -> None:
        indices, indptr, (m, np1) = ctx.reduced_A.problem_data_index
        self._indices = np.asarray(indices)
        self._indptr = np.asarray(indptr)
        self._shape = (m, np1)
        self._cols = np.repeat(np.arange(np1), np.diff(self._indptr))
        n_a = int(self._indptr[-2])
        self._n_a = n_a  # structure entries of A proper; the rest are b's
        self._b_rows = self._indices[n_a:]
        self._cone_dict = dims_to_solver_dict(ctx.cone_dims)
        self._cones = cone_lib.parse_cone_dict(self._cone_dict)
        n_rows_cols = m + np1
        self._mode = self.mode if self.mode != "auto" else (
            "dense" if n_rows_cols <= _DENSE_MAX_N else "lsmr")

    # cvxpylayers pickles nothing of ours, but deepcopy/pickle of the layer do.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["last_info"] = None
        return state

    def _problem(self, q: np.ndarray, a: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
        aug = sp.csc_matrix((a, self._indices, self._indptr), shape=self._shape)
        A = sp.csc_matrix(-aug[:, :-1])
        b = np.asarray(aug[:, -1].todense()).ravel()
        return A, b, np.array(q[:-1], dtype=np.float64)

    def _try(self, method: str, args: dict[str, Any], A, b, c, needs_grad: bool):
        kwargs = {**_SOLVER_DEFAULTS[method], **args}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if needs_grad:
                    res = solve_and_derivative_internal(
                        A.copy(), b, c, self._cone_dict, solve_method=method,
                        mode=self._mode, raise_on_error=False, **kwargs)
                else:
                    res = solve_internal(A.copy(), b, c, self._cone_dict, solve_method=method,
                                         raise_on_error=False, **kwargs)
        except (diffcp.SolverError, ValueError, RuntimeError, ArithmeticError) as err:
            return None, f"{method}: {err}"
        status = str(res.get("info", {}).get("status", "unknown"))
        x, y, s = (np.asarray(res[k], dtype=np.float64) for k in ("x", "y", "s"))
        r = kkt_residual(A, b, c, self._cones, x, y, s)
        if r > self.tol:
            return None, f"{method}: {status} (KKT residual {r:.1e} > tol {self.tol:.0e})"
        return (x, y, s, res.get("DT"), status, r), None

    def solve_torch_batch(self, P, q, A, dims, solver_args, needs_grad):
        if P is not None:  # DIFFCP canonicalisation never keeps a quadratic term
            raise RuntimeError("unexpected quadratic objective in the cone program")
        q_np = q.detach().cpu().double().numpy()
        a_np = A.detach().cpu().double().numpy()
        call_args = {**self.solver_args, **(solver_args or {})}
        xs, ys, adjoints, failed, statuses = [], [], [], [], []
        info = SolveInfo([], [], [])
        for i in range(q_np.shape[0]):
            Ai, bi, ci = self._problem(q_np[i], a_np[i])
            out, why = self._try(self.solver, call_args, Ai, bi, ci, needs_grad)
            used = self.solver
            if out is None and self.fallback is not None and self.fallback != self.solver:
                out, why2 = self._try(self.fallback, {}, Ai, bi, ci, needs_grad)
                used = self.fallback
                if out is not None:
                    warnings.warn(f"batch element {i}: {why}; solved by the fallback "
                                  f"{self.fallback}", SolverWarning, stacklevel=4)
                else:
                    why = f"{why}; fallback {why2}"
            if out is None:
                failed.append(i)
                statuses.append(why)
                xs.append(np.zeros(Ai.shape[1]))
                ys.append(np.zeros(Ai.shape[0]))
                adjoints.append(None)
                continue
            x, y, s, DT, status, r = out
            xs.append(x)
            ys.append(y)
            adjoints.append((DT, bi.size))
            info.solvers.append(used)
            info.statuses.append(status)
            info.residuals.append(r)
        if failed:
            raise ConeSolveFailure(failed, statuses)
        self.last_info = info
        primal = torch.from_numpy(np.stack(xs)).to(q.dtype)
        dual = torch.from_numpy(np.stack(ys)).to(q.dtype)
        return primal, dual, adjoints

    def derivative_torch_batch(self, dprimal, ddual, saved_state):
        dx_all = dprimal.detach().cpu().double().numpy()
        dy_all = ddual.detach().cpu().double().numpy()
        rows_a = self._indices[: self._n_a]
        cols_a = self._cols[: self._n_a]
        dqs, das = [], []
        for i, (DT, m) in enumerate(saved_state):
            dA, db, dc = DT(dx_all[i], dy_all[i], np.zeros(m))
            # Read dA at our structure's positions: diffcp drops explicit zeros of A,
            # so its own .data ordering may not match the structure.
            dA_vals = np.asarray(sp.csr_matrix(dA)[rows_a, cols_a]).ravel()
            das.append(np.concatenate([-dA_vals, db[self._b_rows]]))
            dqs.append(np.concatenate([dc, [0.0]]))
        dq = torch.from_numpy(np.stack(dqs)).to(dprimal.dtype)
        dA_t = torch.from_numpy(np.stack(das)).to(dprimal.dtype)
        return None, dq, dA_t
