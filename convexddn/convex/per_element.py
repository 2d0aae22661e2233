"""The per-element backend: checked solves of cone programs, one batch element at a time.

cvxpylayers canonicalises a DPP problem into a parametrized cone program

.. math::

    \\min_x c^T x \\quad \\text{s.t.}\\quad A x + s = b,\\; s \\in K

and hands us, per batch element, the nonzero values of ``[A | b]`` and ``[c | c0]``. For each element we
solve with a solver reached through diffcp (Clarabel by default), polish the solution with Newton steps on
the residual map of the cone program, **verify** the result against the KKT conditions ourselves (diffcp
does not check Clarabel's status), try a fallback solver where the first one fails, and differentiate by
the adjoint of that residual map (Agrawal et al., "Differentiating through a cone program", 2019) with
diffcp's operators: densely for small programs, by a sparse LU or LSMR for large ones (cvxpylayers' SCS
at 1e-4 and LSQR: gradients off by O(1) on an L1 ball).
"""
from __future__ import annotations

import threading
from typing import Any

import diffcp
import numpy as np
import scipy.sparse as sp
import torch
from cvxpy.reductions.solvers.conic_solvers.scs_conif import dims_to_solver_dict
from cvxpylayers.interfaces.base import SolverInterface
from diffcp import cones as cone_lib

from .._autograd import refuse_batched
from .._process_settings import single_threaded_blas, solver_warnings_ignored
from .._warn import warn
from ..errors import GradientWarning, OptionError, ProblemError
from .bordered import probes
from .cone import POLISH_ABOVE, ResidualMap, auto_mode
from .cone_checks import data_scale_residual, verify_certificate
from .diffcp_solve import solve_cone_program
from .dissent import Run, claims_solved, within_reach
from .element_result import ElementInfo, SavedStates, Solved
from .consistent_rows import ElementRows, allowed, disagreement
from .parametric import parameter_columns, parametric_entries, requiring_grad
from .own_unit import in_unit, try_in_unit
from .reach import exact_claim
from .rescues import warn_rescued
from .solve_chain import after_failure
from .solver_args import check_solver_cones
from .spread import data_spread, scale_hint
from .status import element_list, name_elements, status_kind
from .upstream import poison, split_nonfinite
from .validation import describe_failure
from .worker_pool import WorkerPool, chunks
from .zero_rows import warn_zero_rows

SOLVERS = ("Clarabel", "SCS", "ECOS")
MODES = ("auto", "dense", "sparse", "lsmr", "lsqr")

SOLVER_DEFAULTS: dict[str, dict[str, Any]] = {
    "Clarabel": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "tol_ktratio": 1e-8, "max_iter": 500},
    "SCS": {"eps_abs": 1e-7, "eps_rel": 1e-7, "max_iters": 100_000},
    "ECOS": {"abstol": 1e-10, "reltol": 1e-10, "feastol": 1e-10},
}


def per_element_layer(problem, parameters: list, variables: list, backend: "CheckedDiffcp", gp: bool):
    """cvxpylayers' ``CvxpyLayer`` of the problem, solving with ``backend`` (checked)."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    try:
        layer = CvxpyLayer(problem, parameters=parameters, variables=variables, solver=backend, gp=gp)
    except (ProblemError, OptionError):
        raise  # our own refusals (setup), already precise
    except (ValueError, NotImplementedError, AssertionError, KeyError, IndexError, TypeError,
            cp.error.SolverError) as err:
        # (KeyError etc.: cvxpylayers' edge cases; SolverError: no constraints, an affine objective.)
        bare = isinstance(err, cp.error.SolverError) and not problem.constraints
        why = describe_failure(err) + (" (no constraints and an affine objective: unbounded for any nonzero "
                                       "cost; add constraints or a strictly convex term)" if bare else "")
        raise ProblemError(f"cvxpylayers cannot use this problem: {why}") from err
    # cvxpylayers' sparse CSR buffers (its GPU path's) break deepcopy, DDP and .to(): drop them.
    for name in ("P", "q", "A"):
        layer._buffers.pop(name, None)
        object.__setattr__(layer, name, None)
    return layer


class CheckedDiffcp(SolverInterface):
    """cvxpylayers solver interface: diffcp per element, every solve verified.

    Args:
        solver: first solver, one of ``"Clarabel"``, ``"SCS"``, ``"ECOS"``.
        fallback: solver tried on the elements where ``solver`` fails, or ``None``.
        mode: how the adjoint and refinement systems are solved; ``"auto"``: ``"dense"``
            up to 400 rows + columns, above ``"sparse"`` (one sparse LU per system, see
            :mod:`.bordered`) where the derivative stays sparse, else ``"lsmr"``.
        tol: largest accepted relative KKT residual (see :func:`.cone_checks.kkt_residual`).
        solver_args: keyword arguments for the first solver, over our defaults.
        refine: Newton steps polishing each solution (see :class:`.cone.ResidualMap`).
        workers: processes solving and differentiating chunks of the batch; 1 solves in
            this process (processes: the solvers hold the GIL, threads gain nothing).
    """

    canon_solver = "DIFFCP"
    supports_quad_obj = False

    def __init__(self, solver: str = "Clarabel", fallback: str | None = "SCS", mode: str = "auto", tol: float = 1e-6,
                 solver_args: dict[str, Any] | None = None, refine: int = 5, workers: int = 1) -> None:
        self.refine, self.workers, self._workers = refine, workers, WorkerPool(workers)
        self.solver, self.fallback, self.mode, self.tol = solver, fallback, mode, tol
        self.solver_args = dict(solver_args or {})
        self._init_unpicklable()

    def _init_unpicklable(self) -> None:
        self._local = threading.local()  # per-thread last-call info (threads must not read each other's)

    @property
    def last_info(self) -> ElementInfo | None:
        """This thread's last call: per-element solver, status, KKT residual, solved flag."""
        return getattr(self._local, "info", None)

    def setup(self, ctx: Any) -> None:
        indices, indptr, (m, np1) = ctx.reduced_A.problem_data_index
        self._indices = np.asarray(indices)
        self._indptr = np.asarray(indptr)
        self._shape = (m, np1)
        self._cols = np.repeat(np.arange(np1), np.diff(self._indptr))
        n_a = int(self._indptr[-2])
        self._n_a = n_a  # structure entries of A proper; the rest are b's
        self._b_rows = self._indices[n_a:]
        dims = ctx.cone_dims
        if getattr(dims, "p3d", None) or getattr(dims, "pnd", None):
            # diffcp's cone dictionary has no power cones: it dropped them, and every call failed (Clarabel's bare
            # Exception). ConvexLayer states exact ones in SOCs first (.power_cones): these came from elsewhere.
            raise ProblemError("the problem needs power cones that the layer does not state in second-order cones "
                               "(.power_cones rewrites cp.PowCone3D/PowConeND and power/pnorm/geo_mean with approx="
                               "False of exact rational exponents), which neither path takes; write those atoms "
                               "with approx=True (their second-order-cone form, CVXPY's default)")
        check_solver_cones(dims, solver=self.solver, fallback=self.fallback)
        parametric = parametric_entries(ctx, self._indices, self._cols, n_a)
        # Dependent equality rows with constant coefficients: removed (.consistent_rows).
        self._rows = rows = ElementRows.build(ctx, self._indices, self._cols, n_a, int(dims.zero), m, parametric)
        self._cone_dict = dims_to_solver_dict(dims) if rows is None else rows.cone_dict(dims_to_solver_dict(dims))
        self._cones = cone_lib.parse_cone_dict(self._cone_dict)
        self._cones_cpp = cone_lib.parse_cone_dict_cpp(self._cones)
        self._parametric = parametric if rows is None else rows.par
        # (each parameter's columns of θ: the backward judges uniqueness in those requiring grad)
        self._theta_cols = None if self._parametric is None else parameter_columns(ctx, self._parametric.c_map.shape[1])
        self._mode = self.mode if self.mode != "auto" else auto_mode(self._cones, self._indices.size, m + np1)
        self._colours = probes(self._cones) if self._mode == "sparse" else None

    # cvxpylayers pickles nothing of ours, but deepcopy/pickle of the layer do.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_local", "_cones_cpp"):  # per thread; C++ objects rebuilt
            state.pop(key, None)
        return state  # (the worker pool pickles without its processes)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"_colours": None, "_rows": None, **state})  # (a pickle from before the sparse mode)
        if "_workers" not in state:  # (a pickle from before the worker pool had its class)
            self._workers = WorkerPool(self.workers)
        self._init_unpicklable()
        if "_cones" in state:
            self._cones_cpp = cone_lib.parse_cone_dict_cpp(self._cones)

    def _problem(self, q: np.ndarray, a: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
        aug = sp.csc_matrix((a, self._indices, self._indptr), shape=self._shape)
        A = sp.csc_matrix(-aug[:, :-1])
        b = np.asarray(aug[:, -1].todense()).ravel()
        if self._rows is not None:
            A, b = self._rows.reduce(A, b)
        return A, b, np.array(q[:-1], dtype=np.float64)

    def _solve_with(self, method: str, args: dict[str, Any], A, b, c, warm_start=None):
        kwargs = {**SOLVER_DEFAULTS[method], **args}
        with solver_warnings_ignored():  # (catch_warnings is not thread-safe)
            return solve_cone_program(method, self._cone_dict, A, b, c, kwargs, warm_start)

    def _polish(self, program: ResidualMap, x, y, s):
        """``program.refine`` of a solver's point; residual inf, unpolished, where it is not finite.

        SCS returns NaN for the half of its point that an infeasibility (x) or unboundedness (y) certificate leaves
        undefined, also warm-started from Clarabel's point; polished, the NaN reached the projection onto a PSD cone,
        whose eigh raised numpy's "Eigenvalues did not converge", replacing the status and verified certificate.
        """
        if not all(np.all(np.isfinite(v)) for v in (x, y, s)):
            return x, y, s, float("inf")
        return program.refine(x, y, s, self.refine)

    def _try(self, method: str, args: dict[str, Any], A, b, c):
        program = ResidualMap(A, b, c, self._cones, self._cones_cpp, self._mode, self._colours)
        try:
            x, y, s, status = self._solve_with(method, args, A, b, c)
        except (diffcp.SolverError, ValueError, RuntimeError, ArithmeticError) as err:
            return None, (f"{method}: {err}", "other", "other", None)
        x0, y0, claimed = x, y, status  # the solver's own point: a certificate when it claims one
        run = Run(method, status_kind(status), status, points=[(status, x0, y0)])
        try:
            x, y, s, r = self._polish(program, x, y, s)
        except (ValueError, RuntimeError, ArithmeticError) as err:  # (its status and certificate still count)
            r, status = float("inf"), f"{status} (not polished: {err})"
        else:  # (unpolished, the point is points[0] already)
            run.points.append((status, x, y))
        claim = status_kind(claimed)  # the certificate checked is that solver's point
        # Believe an infeasibility or unboundedness status only with its certificate (badly scaled
        # data provoke them on well-posed problems), and no point polished from a verified one (an
        # infeasible LP: ‖x‖ 5.8e15, rows off by 1.8, passed relative to its own size).
        verified = claim != "other" and verify_certificate(A, b, c, self._cones, x0, y0, claim)
        run.ray, run.verified = (y0 if claim == "infeasible" else x0), verified
        # A verified ray exact to rounding decides the element whatever another run shows (.reach.exact_claim):
        # no SCS run from its point; a dual one no fallback either, an inexact one another solver's opinion.
        run.exact = verified and exact_claim(A, b, self._cones, claim, x0, y0)
        rescued = None  # where the first solver failed outright and SCS from its point solved: a fallback
        if (r > POLISH_ABOVE and np.isfinite(r) and method != "SCS" and self.refine > 0
                and self.fallback is not None and not run.exact):
            # An interior point can sit where R is not smooth; SCS from it lands on faces (not if fallback=None).
            # Its failure leaves this attempt as it was: its certificate is still checked below.
            try:
                x2, y2, s2, status2 = self._solve_with("SCS", {}, A, b, c, warm_start=(x, y, s))
                x2, y2, s2, r2 = self._polish(program, x2, y2, s2)
                run.also.append(status2)
                run.points.append((status2, x2, y2))
            except (diffcp.SolverError, ValueError, RuntimeError, ArithmeticError):
                r2 = float("inf")
            if r2 < r:  # the point returned is SCS's: last_solve says so (a SolverWarning if it rescued a failure)
                x, y, s, r = x2, y2, s2, r2
                rescued = None if claims_solved(status) else f"{method}: {status}; solved by SCS from its point"
                method, status = f"{method}→SCS", f"{status}; SCS from its point: {status2}"
        if r <= self.tol:
            # Judged (and reported) in its rows' own scale too (.cone_checks.kkt_residual's own_scale): the
            # polish's merit measures a box of 1e-6 beside CVXPY's epigraph constants against 1, and an
            # infeasible QP's point 5e-6 off its bounds passed at 5e-12, silently.
            r = max(r, program.own_scale_residual(x, y, s))
        if r <= self.tol and verified:  # (the certificate stands where it accounts for the point: .dissent)
            stands = within_reach(A, b, c, self._cones, run, x, y, r)
            return None, (f"{method}: {status}; its {claim} certificate verifies, and a point polished from it "
                          f"(‖x‖∞ {np.abs(x).max():.1e}) passes " + ("only by the violation it proves (within "
                          f"its reach; residual {r:.1e})" if stands else "relative to its size"),
                          claim if stands else "other", claim, run)
        if r <= self.tol and claim != "other":
            # Claimed, not verified (badly scaled data provoke such claims on well-posed problems, where the
            # polished point is the solution): the point must also pass in the data's own scale, not only its terms'.
            rd = data_scale_residual(A, b, c, x, y, s)
            if not rd <= self.tol:
                return None, (f"{method}: {status}; its {claim} certificate does not verify, and the point "
                              f"polished from its iterate (‖x‖∞ {np.abs(x).max(initial=0):.1e}) passes only "
                              f"relative to its own size (residual in the data's scale {rd:.1e})", "other", claim, run)
        if not r <= self.tol:
            why = f"{method}: {status} (KKT residual {r:.1e} > tol {self.tol:.0e})"
            if verified:
                exact = " (exact to rounding: no other solver run)" if run.exact else ""
                return None, (why + "; certificate verified" + exact, claim, claim, run)
            if claim != "other":
                why += (f"; its {claim} certificate does not verify: the data may be badly scaled "
                        f"(largest |b| {np.abs(b).max(initial=0):.1e}, |c| {np.abs(c).max(initial=0):.1e}, "
                        f"|A| {abs(A).max() if A.nnz else 0:.1e})")
            return None, (why, "other", claim, run)
        return (program, x, y, s, status, r, method, rescued), None

    def solve_one(self, q: np.ndarray, a: np.ndarray, args: dict[str, Any]) -> Solved:
        """Solve one batch element with the solver, then the fallback; never raises."""
        A, b, c = self._problem(q, a)
        # (failed without a verified certificate, or y and s far apart: the same solver in its own unit)
        out, fail = try_in_unit(self, self.solver, args, A, b, c)
        used, note, cause = self.solver, None, None  # cause: the note without this element's numbers (.rescues)
        if out is None:  # (the fallback, another solver's opinion on an inexact certificate, the verdict)
            out, fail, used, note, cause = after_failure(self, args, A, b, c, fail)
        if out is None:
            return Solved(None, None, None, None, used, scale_hint(fail[0], fail[1], A, b, c), float("inf"), None,
                          fail[1])
        program, x, y, s, status, r, used, rescued = out  # (rescued: "<solver>: <status>; ..." has no numbers)
        return Solved(program, x, y, s, used, status, r, note or rescued, "solved", data_spread(A, b, c),
                      cause if note else rescued, program.condition, getattr(program, "unit", None))

    def solve_torch_batch(self, P, q, A, dims, solver_args, needs_grad):
        if P is not None:  # DIFFCP canonicalisation never keeps a quadratic term
            raise RuntimeError("unexpected quadratic objective in the cone program")
        q_np, a_np = (v.detach().cpu().double().numpy() for v in (q, A))
        args = {**self.solver_args, **(solver_args or {})}
        batch = q_np.shape[0]
        far = {}  # dependent equality rows disagreeing beyond tolerance: infeasible (.consistent_rows)
        if self._rows is not None:
            gap, scale = self._rows.gaps(a_np)
            far = {int(i): float(gap[i]) for i in np.flatnonzero(gap > allowed(self.tol) * scale)}
        good = np.array([i for i in range(batch) if i not in far], dtype=np.int64)
        pool = self._workers.get(good.size)
        if pool is None:
            # Small dense factorisations: BLAS threads only fight torch's pool (a 326² solve: 150 ms, not 1).
            solved = _solve_chunk(self, q_np[good], a_np[good], args)
        else:
            solved = self._workers.gather(pool, [(_solve_chunk, self, q_np[good[ix]], a_np[good[ix]], args)
                                                 for ix in chunks(good.size, self.workers)])
        results = [Solved(None, None, None, None, self.solver, disagreement(far[i]), float("inf"), None, "infeasible")
                   if i in far else None for i in range(batch)]
        for i, r in zip(good.tolist(), solved):
            results[i] = r
        # Failed elements are reported, not raised: the layer decides; outputs 0, gradients exactly 0.
        n, m = self._shape[1] - 1, self._shape[0]
        self._local.info = ElementInfo([r.solver for r in results], [r.status for r in results],
                                       [r.residual for r in results], [r.x is not None for r in results],
                                       [r.kind for r in results], [r.spread for r in results],
                                       [r.condition for r in results])
        where = getattr(self._local, "where", None)
        warn_rescued(where, [r.note for r in results], [r.cause for r in results])  # (a failed one has no note)
        primal = torch.from_numpy(np.stack([np.zeros(n) if r.x is None else r.x for r in results])).to(q.dtype)
        full = (lambda y: y) if self._rows is None else self._rows.full_dual
        dual = torch.from_numpy(np.stack([np.zeros(m) if r.y is None else full(r.y) for r in results])).to(q.dtype)
        if not needs_grad:
            return primal, dual, None
        if pool is None:
            state = SavedStates(None if r.x is None else ("local", r.program, r.x, r.y, r.s) for r in results)
        else:
            state = SavedStates(None if r.x is None else ("remote", q_np[i], a_np[i], r.x, r.y, r.s, r.unit)
                                for i, r in enumerate(results))
        state.where = where
        state.needs = getattr(self._local, "needs", None)  # (which parameters require grad, set by the layer)
        return primal, dual, state

    def vjp_one(self, item, dx: np.ndarray, dy: np.ndarray, parametric) -> tuple:
        """Gradient of one element's (q, A-values) given the solution's cotangent, whether it is
        degenerate (1; 2: a zero row moved, :meth:`~.cone.ResidualMap.adjoint`) and inaccurate;
        ``parametric``: how the parameters that require grad move the data, which decide the
        first (:func:`~.parametric.requiring_grad`)."""
        if item is None:  # an element that was not solved: no gradient flows to it
            return np.zeros(self._shape[1]), np.zeros(self._indices.size), False, 0.0
        if item[0] == "local":
            _, program, x, y, s = item
        else:  # (a pickle's unit: the program solved in its own unit, .own_unit)
            _, q, a, x, y, s, *unit = item
            program = in_unit(self, *self._problem(q, a), unit[0] if unit else None)
        rows = self._rows  # (not None: the program without the dependent rows; cotangent in, gradients out, mapped)
        args = (dy, self._indices[: self._n_a], self._cols[: self._n_a]) if rows is None else (
            rows.reduced_cotangent(dy), rows.a_rows, rows.a_cols)
        dA, db, dc = program.adjoint(x, y, s, parametric)(dx, *args)
        if rows is not None:
            dA, db = rows.full_grads(dA, db)
        # cvxpylayers' data are [A | b] with A = -aug[:, :-1], b = aug[:, -1].
        return (np.concatenate([dc, [0.0]]), np.concatenate([-dA, db[self._b_rows]]),
                int(getattr(program, "degenerate", False)) + getattr(program, "zero_row", False), program.inaccurate)

    def derivative_torch_batch(self, dprimal, ddual, saved_state):
        refuse_batched("ConvexLayer", dprimal, ddual)  # (torch.func.jacrev: solved in numpy)
        # A NaN or Inf cotangent (upstream's, e.g. an fp16 overflow): the adjoint solves zero there (NaN
        # gave NaN silently, Inf numpy's overflow warning), that element's gradients are NaN (upstream.py).
        (dprimal, ddual), bad = split_nonfinite((dprimal, ddual))
        dx_all, dy_all = (v.detach().cpu().double().numpy() for v in (dprimal, ddual))
        batch = dx_all.shape[0]
        remote = any(item is not None and item[0] == "remote" for item in saved_state)
        pool = self._workers.get(batch) if remote else None
        # Only the parameters that require grad decide whether the gradient is unique (.parametric.requiring_grad)
        par = requiring_grad(self._parametric, getattr(self, "_theta_cols", None), getattr(saved_state, "needs", None))
        if pool is None:
            grads = _vjp_chunk(self, saved_state, dx_all, dy_all, par)
        else:
            grads = self._workers.gather(pool, [(_vjp_chunk, self, [saved_state[i] for i in ix], dx_all[ix],
                                                 dy_all[ix], par) for ix in chunks(batch, self.workers)])
        where = getattr(saved_state, "where", None)
        warn_zero_rows("backward", where, [i for i, g in enumerate(grads) if g[2] == 2],  # (2: vjp_one's zero row)
                       "their gradient is the minimum-norm one of many")
        degenerate = [i for i, g in enumerate(grads) if g[2] == 1]
        if degenerate:
            warn(f"ConvexLayer backward: the solution of {len(degenerate)} batch element(s) "
                 f"({name_elements(where, degenerate)}) is not unique or not differentiable (the derivative system is "
                 "rank-deficient: e.g. a degenerate LP, or a constraint active with a zero multiplier); their "
                 "gradient is the minimum-norm one of many", GradientWarning, elements=element_list(where, degenerate))
        inaccurate = [i for i, g in enumerate(grads) if g[3] > 0]
        if inaccurate:
            warn(f"ConvexLayer backward: the sparse or iterative adjoint solve of {len(inaccurate)} batch element(s) "
                 f"({name_elements(where, inaccurate)}) stopped at a relative residual of up to "
                 f"{max(grads[i][3] for i in inaccurate):.1e}: their gradient may be inaccurate (the problem is too "
                 "large for the dense fallback; solver='auto' solves it batched where it fits)",
                 GradientWarning, elements=element_list(where, inaccurate))
        # (dq, dA) per element (B, ...), NaN where bad: cvxpylayers then sums a shared parameter's, NaN as in torch
        return None, *poison(bad, [torch.from_numpy(np.stack([g[k] for g in grads])).to(dprimal.dtype) for k in (0, 1)])


def _solve_chunk(solver: CheckedDiffcp, q: np.ndarray, a: np.ndarray, args: dict) -> list[Solved]:
    with single_threaded_blas():
        return [solver.solve_one(q[i], a[i], args) for i in range(q.shape[0])]


def _vjp_chunk(solver: CheckedDiffcp, items: list, dx: np.ndarray, dy: np.ndarray, parametric) -> list:
    with single_threaded_blas():
        return [solver.vjp_one(item, dx[i], dy[i], parametric) for i, item in enumerate(items)]
