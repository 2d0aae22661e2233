"""The batched backend: a DPP problem solved for a whole batch at once, in torch.

:class:`BatchedProgram` canonicalises once (:mod:`.canonical`), then each call fills the
dense data of every element from the parameters, solves all of them together with the
interior-point method of :mod:`.interior_point` on the parameters' device, and maps the
solutions back to the requested variables. Gradients come from implicit
differentiation of the optimality conditions at the solution (:func:`cone_vjp`), never
from unrolling the iterations.

**Backward.** At the solution :math:`(x, z)` with slack :math:`s`, the interior point
satisfies :math:`Px + A^T z + q = 0`, :math:`Ax + s = b` and, to first order along the
central path, :math:`ds = -H\\,dz` with :math:`H = W^T W` the Nesterov–Todd scaling
(:math:`H = 0` on equality rows; on a nonnegative row :math:`H = s/z`, which tends to
0 on active and ∞ on inactive constraints). Differentiating,

.. math::

    K \\begin{bmatrix} dx \\\\ dz \\end{bmatrix} = -\\begin{bmatrix} dP\\,x + dq + dA^T z
    \\\\ dA\\,x - db \\end{bmatrix}, \\qquad K = \\begin{bmatrix} P & A^T \\\\ A & -H
    \\end{bmatrix},

the differentiated KKT system with complementarity of OptNet (Amos & Kolter, 2017),
written for symmetric cones (on a second-order cone :math:`H` takes its limit on the
tangent space of the boundary, see :class:`~.symmetric_cones.NTScaling`). With
:math:`K u = (\\bar x, \\bar z)` for the cotangents, :math:`\\bar q = -u_x`,
:math:`\\bar b = u_z`, :math:`\\bar P = -\\tfrac12(u_x x^T + x u_x^T)`,
:math:`\\bar A = -(z u_x^T + u_z x^T)`. :math:`K` is the matrix the forward factors at
every iteration; it factors it once more at the solution (its Newton step there is the
error estimate that certifies each element), and the backward reuses that
factorisation: one batched solve, no new factorisation. We chose this over the residual-map
derivative (Agrawal et al., 2019) because it keeps the quadratic term, stays symmetric
(Cholesky instead of LU of an :math:`(n+m+1)`-square matrix) and reuses the solver.
Where no derivative exists the backward warns (``GradientWarning``) and names the
elements: a complementary pair undecided, a derivative system that amplifies the
cotangent like 1/δ (a non-unique solution), or a derivative along a fixed direction of
the parameters that blows up the same way (one unrefined probe solve): a degenerate
vertex, more active rows than the solution's dimension, which the parameters move apart
(constraints with constant data do not move: a fixed polytope's vertex stays smooth).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import ClassVar, Sequence

import cvxpy as cp
import torch

from .._autograd import first_order
from .._checks import check_tolerance
from ..errors import DTypeError, GradientWarning, InputError, OptionError, ShapeError
from .canonical import UnsupportedProblem, canonicalise
from .interior_point import SOLVED, STATUS_NAMES, ConeSolution, solve_cone_batch
from .kkt import bmv, row_inf
from .second_opinion import clarabel_points
from .status import name_elements

__all__ = ["BatchedProgram", "BatchedSolveInfo", "UnsupportedProblem", "cone_vjp"]

# The batched path factorises dense (B, k, k) systems; a call needing more than this many
# bytes (estimated by BatchedProgram.memory_estimate) is solved in chunks that fit; if
# one element does not (BatchedProgram.fits), ConvexLayer(solver="auto") uses the
# per-element path.
_BATCHED_MAX_BYTES = {"cpu": 4 << 30, "cuda": 16 << 30}
# ... and above this much dense work per element and iteration (flops_per_iteration):
# (nearly separable programs, other programs). Measured on 2 CPU cores, batched against
# per-element time at batches 2-4: dense QPs with n = 100, 200, 400 (1.3e6, 1.1e7,
# 8.5e7) ran 6×, 250× and 540× faster batched (the per-element path's LSMR polish
# crawls on dense data), a lasso with n = 200, 400 11× and 19×, a QP with 3 % dense
# constraints, n = 200, 400, 3.7× and 2.6×, a constrained MPC in the form of
# cvxpylayers' example (8 states, 3 inputs) over 30, 60, 100 steps (1.1e7, 8.6e7, 4.0e8
# once its equalities are eliminated) 12×, 9× and 1.5×; but L1-ball projections in
# R^64, 96, 128, 256 (nearly separable: 2.8e6, 9.5e6, 2.2e7, 1.8e8) 3.7×, 0.83×, 0.54×
# and 0.13×.
_BATCHED_MAX_FLOPS = {"cpu": (1e7, 1e9), "cuda": (1e10, 1e10)}


@dataclass
class BatchedSolveInfo:
    """Per-element outcome of a :class:`BatchedProgram` call (all tensors ``(B,)``).

    ``status`` holds codes of :attr:`names`; ``residual`` the relative KKT residual of
    the returned point (see :func:`~.interior_point.kkt_measures`, cone violations
    included); ``solved`` is ``status == 0`` (residual <= ``tol_accept`` and estimated
    error <= ``tol_error``); ``iterations`` counts interior-point iterations; ``error``
    is the estimated relative error of the solution (one Newton step's size).
    """

    status: torch.Tensor
    residual: torch.Tensor
    solved: torch.Tensor
    iterations: torch.Tensor
    error: torch.Tensor | None = None
    names: ClassVar[dict[int, str]] = STATUS_NAMES

    def status_names(self) -> list[str]:
        """The status of each element as a string (a host transfer)."""
        return [self.names[int(s)] for s in self.status.tolist()]


def cone_vjp(sol: ConeSolution, layout, gx: torch.Tensor, gz: torch.Tensor, refine: int = 3,
             tangent: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Vector–Jacobian product of a batched cone solve; see the module docstring.

    Args:
        sol: a solution from ``solve_cone_batch(..., keep_state=True)``.
        gx, gz: cotangents of ``sol.x`` ``(B, n)`` and ``sol.z`` ``(B, m)``.
        tangent: ``(dA, db)``, how a fixed, generic direction of the parameters moves the
            constraints; where the derivative along it grows by more than
            :data:`PROBE_GAIN` (a degenerate vertex: more active rows than the solution's
            dimension, moved apart), none exists.

    Returns:
        ``(gP, gq, gA, gb, not_differentiable, nonunique)``: the gradients, exactly zero
        for elements that are not solved, whose cotangent is zero, whose final KKT matrix
        could not be factorised or whose solution is not unique; ``(B,)`` masks of the
        solved elements whose solution is not unique (``nonunique``: the derivative
        system amplifies the cotangent by more than :data:`AMPLIFICATION`) and, including
        those, whose derivative does not exist (``not_differentiable``: also a
        complementary pair with ``s_i ≈ z_i ≈ 0``, see :data:`~.certify.RESOLVED`, or a
        degenerate vertex, see ``tangent``).
    """
    d, kkt = sol.scaled, sol.kkt  # factorised at the solution by the forward
    rc = d.c.sqrt()[:, None]

    def equilibrated(vx, vz):  # right-hand sides in the factorised system's units
        return (rc * d.D * vx).unsqueeze(-1), (d.E * vz / rc).unsqueeze(-1)

    rx, rz = equilibrated(gx, gz)
    ux, uz, _ = kkt.solve(rx, rz, refine, until=BACKWARD_RTOL)
    vertex = torch.zeros_like(sol.status, dtype=torch.bool)
    if tangent is not None:
        # The derivative of (x, z) along the tangent: K (dx, dz) = (-dAᵀz, db - dA x) (the
        # objective's part left out: it cannot make the linearised active rows
        # inconsistent). Unrefined: only a blow-up by ~1/δ matters.
        dA, db = tangent
        px, pz = equilibrated(-bmv(dA.mT, sol.z), db - bmv(dA, sol.x))
        size = torch.maximum(row_inf(px), row_inf(pz))
        du, dz, _ = kkt.solve(px, pz, 0)
        gain = torch.maximum(row_inf(du), row_inf(dz)) / size.clamp_min(torch.finfo(size.dtype).tiny)
        vertex = (size > 0) & (gain > PROBE_GAIN)
    # How much the (equilibrated) derivative system amplifies the cotangent: O(1)-O(10)
    # where the solution is unique and differentiable, ~1/δ (δ the 1e-12 lift of
    # the polished slacks) along a direction of non-uniqueness (measured: 2e9 on an LP
    # with two equal costs, at most 4 on the OptNet QPs).
    amplification = (torch.maximum(row_inf(ux), row_inf(uz))
                     / torch.maximum(row_inf(rx), row_inf(rz)).clamp_min(torch.finfo(rx.dtype).tiny))
    ux = rc * d.D * ux.squeeze(-1)  # K⁻¹ = V⁻¹ K̃⁻¹ V⁻¹ with V⁻¹ = diag(√c D, E/√c)
    uz = d.E * uz.squeeze(-1) / rc
    # (A solved element's KKT matrix was factorised: its failure would have made the
    # error estimate infinite and the element unsolved.)
    ok = ((sol.status == SOLVED) & ~kkt.failed & ((gx != 0).any(1) | (gz != 0).any(1)))[:, None]
    # A non-unique solution's "gradient" is the cotangent amplified by ~1/δ (2e9 on an LP
    # with two equal costs): no derivative exists; it is replaced by zero.
    nonunique = ok[:, 0] & (amplification > AMPLIFICATION)
    not_differentiable = ok[:, 0] & (sol.undecided | nonunique | vertex)
    ok = ok & ~nonunique[:, None]
    ux = torch.where(ok, ux, 0.0)
    uz = torch.where(ok, uz, 0.0)
    x, z = torch.where(ok, sol.x, 0.0), torch.where(ok, sol.z, 0.0)
    # Sums of two outer products as one batched product each (one pass over the output
    # instead of four): gP = -½ [u_x x] [x u_x]ᵀ, gA = -[z u_z] [u_x x]ᵀ.
    left = torch.stack([ux, x], -1)
    gP = torch.bmm(left, torch.stack([x, ux], 1)).mul_(-0.5)
    gA = torch.bmm(torch.stack([z, uz], -1), left.mT).neg_()
    return gP, -ux, gA, uz, not_differentiable, nonunique


# Relative residual the backward's KKT solve is refined to beyond its fixed steps
# (KKTSystem.solve's ``until``): an MPC's gradient 7e-7 off finite differences (4e-3 after
# 3 steps); the n = 50 QP's backward at batch 1024 106-123 -> 127-166 ms (1e-11: 220-252).
BACKWARD_RTOL = 1e-9
# Amplification of the derivative system above which the gradient is reported as not
# existing (between ~10 for unique solutions and ~1e9 for non-unique ones; 1/√eps ≈ 7e7).
AMPLIFICATION = 1e7
# The same for the probe along a parameter direction: measured in a gradient fuzz, at most
# 1.7e2 on 659 elements where central differences agree with the gradient to 1e-6, at
# least 2.3e7 on the 20 where they disagree by more than 1e-4, 7.9e6 on one more.
PROBE_GAIN = 1e6


class _ConeSolve(torch.autograd.Function):
    """(P, q, A, b) -> (x, z) of the cone program, differentiated by :func:`cone_vjp`."""

    @staticmethod
    def forward(P, q, A, b, layout, options, needs_grad, tangent, where):
        # Inference mode: no version counters or autograd bookkeeping on the ~400 small
        # ops of an iteration (measured: forward 8-10 % faster on the n = 50 QP at batch
        # 64). The outputs are cloned into normal tensors; the kept state is only read,
        # by the backward, with autograd off.
        with torch.inference_mode():
            sol = solve_cone_batch(P.detach(), q.detach(), A.detach(), b.detach(), layout,
                                   keep_state=needs_grad, **options)
        state = (sol, layout, options.get("refine", 1), tangent, where) if needs_grad else None
        return (*(v.clone() for v in (sol.x, sol.z, sol.status, sol.residual, sol.iterations, sol.error)),
                state)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.state = output[6]
        ctx.mark_non_differentiable(*output[2:6])

    @staticmethod
    @first_order("BatchedProgram")
    def backward(ctx, gx, gz, *_):
        if ctx.state is None:
            return (None,) * 9
        sol, layout, refine, tangent, where = ctx.state
        gx = torch.zeros_like(sol.x) if gx is None else gx
        gz = torch.zeros_like(sol.z) if gz is None else gz
        gP, gq, gA, gb, flagged, zeroed = cone_vjp(sol, layout, gx, gz, refine + 2, tangent)
        counts = torch.stack([flagged.sum(), zeroed.sum()]).tolist()
        if counts[0]:  # one host sync per backward
            idx = torch.nonzero(flagged).squeeze(1).tolist()
            zero = (f"; {counts[1]} of them have a solution that is not unique (the derivative "
                    f"system amplifies their cotangent by more than {AMPLIFICATION:.0e}), and their "
                    "gradient is set to zero") if counts[1] else ""
            warnings.warn(
                f"ConvexLayer backward (batched): the solution of {len(idx)} batch element(s) "
                f"({name_elements(where, idx)}) is not unique or not differentiable "
                "(a constraint active with a zero multiplier, a derivative system that is singular: "
                "e.g. a degenerate LP, or more active constraints than the solution's dimension: a "
                f"degenerate vertex); their gradient is a one-sided limit's blend{zero}",
                GradientWarning, stacklevel=3)
        return gP, gq, gA, gb, None, None, None, None, None


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
        """Rough peak bytes of one forward + backward at this batch size."""
        n, m = self.sizes
        item = torch.finfo(self.dtype).bits // 8
        return int(batch * item * (8 * n * n + 6 * m * n + 40 * (n + m)))

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
                 where: tuple[Sequence[int], tuple[int, ...]] | None = None
                 ) -> tuple[tuple[torch.Tensor, ...], BatchedSolveInfo]:
        """Solve every element; never raises for a per-element failure.

        With ``second_opinion``, each element is solved by Clarabel on the same program
        instead of the batched iterations (a host loop; for the few elements those did
        not certify, see :mod:`.second_opinion`), then polished, checked and
        differentiated as usual. ``where`` (the elements' flat positions in a caller's
        batch, and its shape) makes the backward's warnings name those positions.

        Shape:
            ``values[i]``: ``(B, *param_i.shape)`` or ``param_i.shape`` (shared) ->
            one ``(B, *var.shape)`` tensor per variable (``B = 1`` if none is batched).

        Returns:
            ``(outputs, info)``: outputs connected to autograd (failed elements: finite
            values, exactly zero gradient), and a :class:`BatchedSolveInfo`.
        """
        B = self._batch(values)
        values = [v.to(self.dtype) for v in values]
        needs_grad = torch.is_grad_enabled() and any(v.requires_grad for v in values)
        data = self.data
        if B == 0:
            z = sum(v.sum() for v in values) * 0
            outs = tuple(values[0].new_zeros((0,) + v.shape) + z for v in data.variables)
            e = values[0].new_zeros(0)
            return outs, BatchedSolveInfo(e.long(), e, e.bool(), e.long(), e)
        chunk = max(1, self.max_batch(values[0].device))
        if B > chunk:
            # More than the memory budget holds (a large program at a large batch): in
            # chunks that fit, not per element (a constrained MPC over 30 steps: 13×).
            parts = [self(*self._chunk(values, lo, min(lo + chunk, B)), second_opinion=second_opinion,
                          where=None if where is None else (where[0][lo:lo + chunk], where[1]))
                     for lo in range(0, B, chunk)]
            outs = tuple(torch.cat(o) for o in zip(*(part[0] for part in parts)))
            return outs, BatchedSolveInfo(*(torch.cat([getattr(part[1], f.name) for part in parts])
                                            for f in fields(BatchedSolveInfo)))
        p = data.parameter_vector(values, B)
        P, q, A, b, extra = data.fill(p)
        options = dict(tol=self.tol, tol_accept=self.tol_accept, tol_error=self.tol_error,
                       max_iter=self.max_iter, refine=self.refine,
                       polish=self.polish, structure=data.structure, error_cols=data.on_device("error_cols", p),
                       error_duals=data.on_device("error_duals", p))
        if second_opinion:
            options["start"] = clarabel_points(P, q, A, b, data.layout)[:3]
        # How a generic direction of the parameters moves the constraints: the backward
        # probes for degenerate vertices along it.
        tangent = data.constraint_tangent(p) if needs_grad else None
        x, z, status, residual, iterations, error, _ = _ConeSolve.apply(P, q, A, b, data.layout, options,
                                                                         needs_grad, tangent, where)
        xf, zf = data.recover(x, z, extra)
        solved = status == SOLVED
        outs = []
        for out in data.outputs(xf, zf):
            # Failed elements: keep their (finite) values but cut them off the graph.
            mask = solved.view((-1,) + (1,) * (out.dim() - 1))
            outs.append(torch.where(mask, out, out.detach()) if needs_grad else out)
        return tuple(outs), BatchedSolveInfo(status, residual, solved, iterations, error)
