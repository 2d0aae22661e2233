"""The batched backend: a DPP problem solved for a whole batch at once, in torch.

:class:`BatchedProgram` canonicalises once (:mod:`.canonical`), then each call fills the
dense data of every element from the parameters, solves all of them together with the
interior-point method of :mod:`.interior_point` on the parameters' device, and maps the
solutions back to the requested variables. Gradients come from implicit
differentiation of the optimality conditions at the solution (:func:`.vjp.cone_vjp`), never
from unrolling the iterations.

The backward (implicit differentiation at the solution, the autograd Function) is in
:mod:`.vjp`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Sequence

import cvxpy as cp
import torch

from .._autograd import may_carry_tangents
from .._checks import check_tolerance
from ..errors import DTypeError, InputError, OptionError, ShapeError
from .canonical import UnsupportedProblem, canonicalise
from .cone_solution import INCONSISTENT
from .consistent_rows import allowed, disagreement
from .interior_point import SOLVED, STATUS_NAMES
from .resolution import moved_columns
from .second_opinion import clarabel_points
from .cone_solve import ConeSolve
from .vjp import cone_vjp

__all__ = ["BatchedProgram", "BatchedSolveInfo", "UnsupportedProblem", "cone_vjp"]

# The batched path factorises dense (B, k, k) systems; a call needing more than this many
# bytes (estimated by BatchedProgram.memory_estimate) is solved in chunks that fit; if
# one element does not (BatchedProgram.fits), ConvexLayer(solver="auto") uses the
# per-element path.
_BATCHED_MAX_BYTES = {"cpu": 4 << 30, "cuda": 16 << 30}
# ... and above this much dense work per element and iteration (flops_per_iteration):
# (nearly separable programs, other programs). The crossover was measured on 2 CPU cores,
# batched against per-element time at batches 2-4, for dense QPs, lassos, QPs with sparse
# constraints, constrained MPCs and L1-ball projections: the table in docs/which-path.md
# (the one place its figures are kept; dense programs up to 8.5e7 ran 250-540× faster
# batched, nearly separable ones from ~1e7 slower).
_BATCHED_MAX_FLOPS = {"cpu": (1e7, 1e9), "cuda": (1e10, 1e10)}


@dataclass
class BatchedSolveInfo:
    """Per-element outcome of a :class:`BatchedProgram` call (all tensors ``(B,)``).

    ``status`` holds codes of :attr:`names`; ``residual`` the relative KKT residual of
    the returned point (see :func:`~.interior_point.kkt_measures`, cone violations
    included); ``solved`` is ``status == 0`` (residual <= ``tol_accept`` and estimated
    error <= ``tol_error``); ``iterations`` counts interior-point iterations; ``error``
    is the estimated relative error of the solution (one Newton step's size; not finite where
    no estimate can be formed: equality rows too nearly dependent, a singular limit system);
    ``points`` whether the returned point is primal and/or dual feasible in the
    caller's units (bits :data:`~.measures.FEASIBLE_PRIMAL`, :data:`~.measures.FEASIBLE_DUAL`),
    whether no residual check can vouch for it (:data:`~.measures.UNVERIFIABLE`), and whether it
    failed only for want of an estimate at a degenerate vertex (:data:`~.measures.DEGENERATE`);
    ``opinion``, with ``second_opinion``, what Clarabel said of the element
    (:func:`~.second_opinion.clarabel_points`' codes: solved, a claim whose ray verifies,
    an unboundedness it did not confirm at its ray's reach, or none), ``-1`` without;
    ``gap`` how far dependent equality rows disagree (:mod:`.consistent_rows`; 0 if not).
    """

    status: torch.Tensor
    residual: torch.Tensor
    solved: torch.Tensor
    iterations: torch.Tensor
    error: torch.Tensor | None = None
    points: torch.Tensor | None = None
    opinion: torch.Tensor | None = None
    gap: torch.Tensor | None = None
    names: ClassVar[dict[int, str]] = STATUS_NAMES

    def status_names(self) -> list[str]:
        """The status of each element as a string (a host transfer)."""
        gaps = [0.0] * len(self.status) if self.gap is None else self.gap.tolist()
        return [disagreement(g) if s == INCONSISTENT else self.names[s] for s, g in zip(self.status.tolist(), gaps)]


def _step(data, p: torch.Tensor, requires: list[bool], idx: torch.Tensor):
    """``(dP, dq, dA, db, A)`` of the elements ``idx``: the change of their data along
    :meth:`~.cone_data.ConeData.tangent_direction` restricted to the parameters
    ``requires`` flags, and their A."""
    sub = p.index_select(0, idx)
    step = data.tangent_direction(sub) * data.columns_of(requires, sub)
    P, q, A, b = data.fill(torch.cat([sub + step, sub]))[:4]  # one fill for both ends
    k = idx.numel()
    return P[:k] - P[k:], q[:k] - q[k:], A[:k] - A[k:], b[:k] - b[k:], A[k:]


class _Moves:
    """How the parameters requiring grad move the data of the elements ``idx``, for the
    backward's checks: called, the columns they move (:func:`~.resolution.moved_columns`
    of :func:`_step`); :meth:`each`, one data step per such parameter. (An object, not a
    closure, so that saved-tensor hooks reach its ``p``: .saved_state.)"""

    def __init__(self, data, p: torch.Tensor, requires: list[bool]) -> None:
        self.data, self.p, self.requires = data, p, requires

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return moved_columns(*_step(self.data, self.p, self.requires, idx))

    def each(self, idx: torch.Tensor) -> list[tuple]:
        flags = self.requires
        return [_step(self.data, self.p, [j == i for j in range(len(flags))], idx)[:4]
                for i, on in enumerate(flags) if on]


class _Secant(_Moves):
    """Called, ``idx -> (dP, dq)``: how the elements ``idx``'s P and q move along the
    parameters' direction (:func:`_step`)."""

    def __call__(self, idx: torch.Tensor) -> tuple:
        return _step(self.data, self.p, self.requires, idx)[:2]


class BatchedProgram:
    """A DPP problem, canonicalised once, solved for a batch of parameters in torch.

    .. math::

        y(\\theta_i) = \\operatorname*{argmin}_x \\tfrac12 x^T P(\\theta_i) x +
        q(\\theta_i)^T x \\ \\text{s.t.}\\ A(\\theta_i) x + s = b(\\theta_i),\\ s \\in K
        \\qquad i = 1, \\dots, B

    with :math:`K` a product of zero, nonnegative and second-order cones (LPs, QPs,
    SOCPs); all elements iterate together on the parameters' device. The object holds
    the options and the canonical data only (plain tensors: deep-copyable, picklable).

    Args:
        problem, parameters, variables: as for :class:`~convexddn.ConvexLayer` (the
            problem is assumed DCP and DPP; variables may be constraint duals).
        tol: interior-point target tolerance (relative, equilibrated units).
        tol_accept: largest relative KKT residual reported as solved.
        tol_error: largest estimated relative solution error reported as solved (the
            size of one Newton step at the solution, equilibrated units).
        max_iter: interior-point iterations at most.
        refine: iterative-refinement steps per KKT solve (once the iterates are close).
        polish: Newton steps on the exact KKT conditions after the iterations:
            ``"auto"`` (programs with second-order cones, and elements left above
            ``tol``), ``"always"`` (solutions to ~1e-15, ~20 % slower on QPs) or
            ``"never"``.
        presolve: eliminate CVXPY's auxiliary variables (see :mod:`.canonical`).
        dtype: the precision of the solve (float64 by default; float32 needs
            ``tol_accept >= 1e-6`` and ``tol_error >= 1e-4``, and its gradients are
            ~1e-3 accurate relative to their size).

    Raises:
        UnsupportedProblem: exponential, PSD or power cones, symmetric variables.
        OptionError: an invalid option.
    """

    def __init__(self, problem: cp.Problem, parameters: Sequence[cp.Parameter],
                 variables: Sequence[cp.Variable], *, tol: float = 1e-10,
                 tol_accept: float = 1e-8, tol_error: float = 1e-7, max_iter: int = 100, refine: int = 1,
                 polish: str = "auto", presolve: bool = True, dtype: torch.dtype = torch.float64) -> None:
        tol, tol_accept, tol_error = (check_tolerance(name, v) for name, v in
                                      (("tol", tol), ("tol_accept", tol_accept), ("tol_error", tol_error)))
        if dtype == torch.float32 and (tol_accept < 1e-6 or tol_error < 1e-4):
            raise OptionError(f"dtype=torch.float32 cannot certify residuals below ~1e-6 nor errors "
                              f"below ~1e-4: pass tol_accept >= 1e-6 and tol_error >= 1e-4 (and tol to "
                              f"match), got tol_accept={tol_accept!r}, tol_error={tol_error!r}")
        for name, v, lo in (("max_iter", max_iter, 1), ("refine", refine, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise OptionError(f"{name} must be an integer >= {lo}, got {v!r}")
        if polish not in ("auto", "always", "never"):
            raise OptionError(f"polish must be 'auto', 'always' or 'never', got {polish!r}")
        if dtype not in (torch.float32, torch.float64):
            raise OptionError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.tol, self.tol_accept, self.tol_error = float(tol), float(tol_accept), float(tol_error)
        self.max_iter, self.refine = max_iter, refine
        self.dtype, self.polish = dtype, polish
        self.parameter_names = [p.name() for p in parameters]
        self.parameter_shapes = [tuple(p.shape) for p in parameters]
        self.data = canonicalise(problem, list(parameters), list(variables), presolve)

    def __repr__(self) -> str:
        n, m = self.sizes
        return (f"BatchedProgram(n={n}, m={m}, cone={self.data.layout}, tol={self.tol:g}, "
                f"tol_accept={self.tol_accept:g}, max_iter={self.max_iter}, refine={self.refine}, "
                f"polish={self.polish!r})")

    @property
    def sizes(self) -> tuple[int, int]:
        """(variables, constraint rows) of the dense program each element solves."""
        return self.data.n, self.data.layout.m

    @property
    def flops_per_iteration(self) -> int:
        """Arithmetic of one interior-point iteration per element (factorisation and
        products): ~n³/3 + m n² dense, with n and m less the equalities that the
        iterations eliminate (:mod:`.nullspace`); ~m + n for a diagonal KKT structure."""
        n, m = self.sizes
        if self.data.structure.diagonal:
            return 20 * (n + m)
        p = self.data.layout.zero
        if p < n:
            n, m = n - p, m - p
        return n ** 3 // 3 + m * n * n + 20 * (n + m)

    def memory_estimate(self, batch: int) -> int:
        """Rough peak bytes of one forward + backward at this batch size:

        .. math::

            B \\cdot \\text{itemsize} \\cdot \\big(8 n^2 + 6 m n + 40 (n + m)
            \\;[+\\; 2 (n + m)^2]\\big)

        The first terms are the iterations' and the backward's ``(B, n, n)`` and
        ``(B, m, n)`` tensors (P, S and its Cholesky factor, A, W⁻¹A_I, their products;
        measured 0.8–1.2× on LPs and QPs). The bracket is the Newton polish's, where it
        takes LU steps on every element (programs with second-order cones, or
        ``polish="always"``; see :mod:`.polish`): its matrix K ``(B, n + m, n + m)`` and
        K's LU factors, held together while it factorises. It is most of the estimate for a
        second-order cone over many rows (``‖Ax‖₂ ≤ 1``, A 100×10: 2.2× the rest; without
        it, the chunks the budget allowed peaked at 7× the estimate). The LU steps an LP or
        QP takes on its elements left rough or undecided (:func:`.certify.finish`) are not
        counted: they are few, unless most of a batch is degenerate.
        """
        n, m = self.sizes
        item = torch.finfo(self.dtype).bits // 8
        lu_polish = self.polish == "always" or (self.polish == "auto" and bool(self.data.layout.soc))
        newton = 2 * (n + m) ** 2 if lu_polish else 0
        return int(batch * item * (8 * n * n + 6 * m * n + 40 * (n + m) + newton))

    def fits(self, device: torch.device) -> bool:
        """Whether dense batched factorisation pays for this program on ``device``: its
        work per iteration is below the device's cap and one element within its memory
        budget (a larger batch is solved in chunks that fit, :meth:`max_batch` each)."""
        separable, coupled = _BATCHED_MAX_FLOPS.get(device.type, _BATCHED_MAX_FLOPS["cpu"])
        work = separable if self.data.separable else coupled
        return self.max_batch(device) >= 1 and self.flops_per_iteration <= work

    def max_batch(self, device: torch.device) -> int:
        """The most elements one call's memory budget on ``device`` holds."""
        return _BATCHED_MAX_BYTES.get(device.type, _BATCHED_MAX_BYTES["cpu"]) // self.memory_estimate(1)

    def _batch(self, values: Sequence[torch.Tensor]) -> int:
        names, shapes = self.parameter_names, self.parameter_shapes
        if len(values) != len(names):
            raise ShapeError(f"expected {len(names)} tensor(s), one per parameter {names}, got {len(values)}")
        sizes = set()
        for i, (v, name, shape) in enumerate(zip(values, names, shapes)):
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise DTypeError(f"parameter {i} ({name}) must be a floating-point tensor, "
                                 f"got {type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype}")
            if tuple(v.shape) == shape:
                continue
            if v.dim() != len(shape) + 1 or tuple(v.shape[1:]) != shape:
                raise ShapeError(f"parameter {i} ({name}) must have shape {shape} or "
                                 f"(B, {', '.join(map(str, shape))}), got {tuple(v.shape)}")
            sizes.add(v.shape[0])
        if len(sizes) > 1:
            raise ShapeError(f"batched parameters must share one batch size, got {sorted(sizes)}")
        if len({v.device for v in values}) > 1:
            raise InputError(f"all parameters must be on one device, got {sorted({str(v.device) for v in values})}")
        return sizes.pop() if sizes else 1

    def _chunk(self, values: Sequence[torch.Tensor], lo: int, hi: int) -> list[torch.Tensor]:
        """The elements ``lo:hi`` of the batched values (shared ones stay shared)."""
        return [v[lo:hi] if v.dim() > len(shape) else v for v, shape in zip(values, self.parameter_shapes)]

    def __call__(self, *values: torch.Tensor, second_opinion: bool = False,
                 where: tuple[Sequence[int], tuple[int, ...]] | None = None, decide_pairs: bool = False,
                 per_element_next: bool = False) -> tuple[tuple[torch.Tensor, ...], BatchedSolveInfo]:
        """Solve every element; never raises for a per-element failure.

        With ``second_opinion``, each element is solved by Clarabel on the same program
        instead of the batched iterations (a host loop; for the few elements those did
        not certify, see :mod:`.second_opinion`), then polished, checked and
        differentiated as usual. ``where`` (the elements' flat positions in a caller's
        batch, and its shape) makes the backward's warnings name those positions.
        ``decide_pairs``: the iterations go on until each complementary pair is decided in
        its own units (:mod:`.pairs`; for elements the checks failed). ``per_element_next``: the
        caller solves per element what stays unsolved (no active-set steps cycling at a degenerate
        vertex first, :func:`~.active_set.settle_signs`).

        Shape:
            ``values[i]``: ``(B, *param_i.shape)`` or ``param_i.shape`` (shared) ->
            one ``(B, *var.shape)`` tensor per variable (``B = 1`` if none is batched).

        Returns:
            ``(outputs, info)``: outputs connected to autograd (failed elements: finite
            values, exactly zero gradient), and a :class:`BatchedSolveInfo`.
        """
        B = self._batch(values)
        values = [v.to(self.dtype) for v in values]
        # (forward mode needs the kept state too: the tangents are solved with it)
        reverse = torch.is_grad_enabled() and any(v.requires_grad for v in values)
        needs_grad = reverse or may_carry_tangents(*values)
        data = self.data
        if B == 0:
            z = sum(v.sum() for v in values) * 0
            outs = tuple(values[0].new_zeros((0,) + v.shape) + z for v in data.variables)
            e = values[0].new_zeros(0)
            return outs, BatchedSolveInfo(e.long(), e, e.bool(), e.long(), e, e.long(), e.long(), e)
        chunk = max(1, self.max_batch(values[0].device))
        if B > chunk:
            # More than the memory budget holds (a large program at a large batch): in
            # chunks that fit, not per element (a constrained MPC over 30 steps: 13×).
            parts = [self(*self._chunk(values, lo, min(lo + chunk, B)), second_opinion=second_opinion,
                          where=None if where is None else (where[0][lo:lo + chunk], where[1]),
                          decide_pairs=decide_pairs, per_element_next=per_element_next)
                     for lo in range(0, B, chunk)]
            outs = tuple(torch.cat(o) for o in zip(*(part[0] for part in parts)))
            return outs, BatchedSolveInfo(*(torch.cat([getattr(part[1], f.name) for part in parts])
                                            for f in fields(BatchedSolveInfo)))
        p = data.parameter_vector(values, B)
        P, q, A, b, extra = data.fill(p)
        options = dict(tol=self.tol, tol_accept=self.tol_accept, tol_error=self.tol_error,
                       max_iter=self.max_iter, refine=self.refine,
                       polish=self.polish, structure=data.structure, error_cols=data.on_device("error_cols", p),
                       error_duals=data.on_device("error_duals", p), decide_pairs=decide_pairs,
                       per_element_next=per_element_next)
        opinion = torch.full((B,), -1, dtype=torch.long, device=p.device)
        if second_opinion:
            *start, _, opinion = clarabel_points(P, q, A, b, data.layout, opinions=True)
            options["start"] = tuple(start)
        # How a generic direction of the parameters requiring grad moves the data: the
        # backward probes along it for degenerate vertices, for null directions the
        # parameters reach and for dependent rows they move apart.
        requires = [v.requires_grad for v in values]
        tangent = data.parameter_tangent(p, requires) if reverse else None  # (forward mode: its own tangents)
        pd = p.detach()  # (one tensor for all who keep it: saved-tensor hooks save it once)
        if tangent is not None:
            # Eliminated variables: P and q are products of maps of p; their secant along
            # the direction is a direction they move in all the same (formed in the
            # backward, for the elements that need it).
            tangent = (*tangent, None if tangent[0] is not None else _Secant(data, pd, requires))
        # Which columns the parameters requiring grad move: where the solve leaves one
        # unresolved (a weight far below the program's scale), the backward warns.
        moved = _Moves(data, pd, requires) if reverse else None
        x, z, status, residual, iterations, error, points, _ = ConeSolve.apply(
            P, q, A, b, data.layout, options, needs_grad, tangent, where, moved)
        xf, zf = data.recover(x, z, extra)
        gap = torch.zeros_like(residual)
        rows = data.inconsistency(pd)
        if rows is not None:
            # Dependent equality rows: solved with b_E projected; beyond tolerance, infeasible.
            far = rows[0] > allowed(self.tol_accept) * rows[1]
            status, gap = torch.where(far, INCONSISTENT, status), torch.where(far, rows[0].to(gap.dtype), gap)
            points = torch.where(far, 0, points)  # (its point is feasible for the projected b_E only)
        solved = status == SOLVED
        outs = []
        for out in data.outputs(xf, zf):
            # Failed elements: keep their (finite) values but cut them off the graph.
            mask = solved.view((-1,) + (1,) * (out.dim() - 1))
            outs.append(torch.where(mask, out, out.detach()) if needs_grad else out)
        return tuple(outs), BatchedSolveInfo(status, residual, solved, iterations, error, points, opinion, gap)
