"""The batched KKT system of an interior-point step, solved by Cholesky factorisations.

Every linear system the interior-point method (and its implicit backward) solves is

.. math::

    K \\begin{bmatrix} \\Delta x \\\\ \\Delta z \\end{bmatrix}
    = \\begin{bmatrix} r_x \\\\ r_z \\end{bmatrix}, \\qquad
    K = \\begin{bmatrix} P & A_E^T & A_I^T \\\\ A_E & 0 & 0 \\\\ A_I & 0 & -H \\end{bmatrix}

with :math:`A_E` the zero-cone (equality) rows, :math:`A_I` the cone rows and
:math:`H = W^T W` the Nesterov–Todd scaling. It is quasi-definite only after
regularisation, so instead of an :math:`LDL^T` of the :math:`(n + m)`-square matrix we
eliminate :math:`\\Delta z_I = H^{-1}(A_I \\Delta x - r_I)` and factor two symmetric
positive definite Schur complements by batched Cholesky,

.. math::

    S = P + \\delta I + \\rho A_E^T A_E + (W^{-1} A_I)^T (W^{-1} A_I), \\qquad
    M = A_E S^{-1} A_E^T + \\delta I.

The :math:`\\rho A_E^T A_E` term is added to both sides (an exact reformulation, as in
CVXOPT's ``chol2``) where some variable would otherwise have no curvature in
:math:`S` (e.g. an LP variable that appears only in equalities), so :math:`S` stays
positive definite whenever :math:`K` is nonsingular. The only approximation is
:math:`\\delta` (static regularisation, as in Clarabel); iterative refinement against
the exact :math:`K` removes it.

When :math:`S` is structurally diagonal (separable problems: projections onto boxes,
simplices, orthants; known from the sparsity pattern at canonicalisation, see
:class:`KKTStructure`) the "Cholesky factor" is a vector and every triangular solve a
division: batched LAPACK calls cost a few microseconds per matrix on a CPU, which for
1024 16×16 systems outweighs the arithmetic a hundredfold.

Batch elements whose factorisation fails are reported in ``failed``, never raised;
their (garbage) numbers stay in their own rows of the batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .cholesky import chol, chol_solve, proportional_retry
from .data_ops import DENSE, DataOps, KKTStructure, _mm, bmv
from .stall import refinement_error, stall_error
from .symmetric_cones import ConeLayout, NTScaling

if TYPE_CHECKING:  # (the derivative's scaling, built by certify)
    from .limit_scaling import LimitScaling

__all__ = ["DENSE", "DataOps", "KKTFactory", "KKTStructure", "KKTSystem", "PatchedKKT", "bmv", "constant_part",
           "row_inf"]

# Static regularisation and equality penalty, in the equilibrated problem's units (O(1)).
_DELTA = 1e-9
_RHO = 1.0


def constant_part(P: torch.Tensor, A: torch.Tensor, layout: ConeLayout,
                  structure: KKTStructure = DENSE) -> torch.Tensor:
    """P + δ I (+ ρ A_Eᵀ A_E): the part of S that does not change between iterations.

    Shape:
        ``(B, n, n)``, or its diagonal ``(B, n)`` for a diagonal structure.
    """
    if structure.diagonal:
        return P.diagonal(dim1=1, dim2=2) + _DELTA
    base = P + _DELTA * torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    if layout.zero and structure.rho:
        AE = A[:, : layout.zero]
        base = torch.baddbmm(base, AE.mT, AE, alpha=_RHO)
    return base


# Most refinement steps of a solve with a residual target; steps its best must halve in.
MAX_REFINE, _REFINE_WINDOW = 30, 3


def row_inf(*vs: torch.Tensor) -> torch.Tensor:
    """(B,) largest |entry| of each batch element over the tensors ``(B, ...)``; 0 if empty."""
    if len(vs) > 1:
        return torch.stack([row_inf(v) for v in vs]).amax(0)
    v = vs[0].flatten(1)
    return v.abs().amax(1) if v.shape[1] else v.new_zeros(v.shape[0])


class KKTSystem:
    """Factorisation of the KKT matrix at one interior point, for a batch.

    Args:
        ops: the data ``P (B, n, n)`` (symmetric positive semidefinite) and ``A (B, m, n)``
            (rows in the cone's order), with their products.
        scaling: NT scaling of the cone rows; ``None`` means :math:`H = I` there
            (used for the initial point).
        base: :func:`constant_part` of ``(P, A)`` with the same ``structure``.
        structure: dense or diagonal :math:`S`, with or without the ρ term.

    Attributes:
        failed: ``(B,)`` bool, elements whose Cholesky factorisation broke down. Their
            solutions are garbage (confined to their own rows of the batch); callers
            freeze them.
        regularisation_effect: ``(B,)`` :math:`\\delta` over the smallest eigenvalue of
            the regularised matrices, about the relative change of a solve by the
            regularisation, where the pivots are those eigenvalues (diagonal :math:`S`,
            at most one equality row); else ``None`` (not known cheaply).
    """

    def __init__(self, ops: DataOps, scaling: NTScaling | LimitScaling | None, base: torch.Tensor,
                 structure: KKTStructure = DENSE, retry: bool = False) -> None:
        self.ops, self.layout, self.scaling = ops, ops.layout, scaling
        self.diagonal, self.rho = structure.diagonal, structure.rho and not structure.diagonal
        z = self.layout.zero
        P = ops.P
        if self.diagonal:
            # W⁻¹ A_I keeps one value per cone row (a cone touches one variable).
            self.at = ops.a if scaling is None else scaling.apply_inv(ops.a)
            S = ops.rows_add(base, self.at * self.at)
            failed = ~(S > 0).all(1)
            self.L = torch.sqrt(torch.where(S > 0, S, 1.0))[:, :, None]  # (B, n, 1)
            # The pivots are S's eigenvalues here (and M's, when it is 1×1).
            pivot_min = S.amin(1) if S.shape[1] else None
        else:
            pivot_min = None  # Cholesky pivots do not bound the smallest eigenvalue
            At = ops.A[:, z:]
            self.At = At if scaling is None else scaling.apply_inv(At)  # W⁻¹ A_I
            self.AtT = self.At.mT
            S = torch.baddbmm(base, self.AtT, self.At)
            L, info = torch.linalg.cholesky_ex(S)
            failed = (info != 0) | ~torch.isfinite(L.diagonal(dim1=1, dim2=2)).all(1)
            if retry and bool(failed.any()):
                L, failed = proportional_retry(S, L, failed)
            self.L = L
        if z:
            self.Y = self._lower(ops.AET)  # L⁻¹ A_Eᵀ
            self.YT = self.Y.mT
            eye = torch.eye(z, dtype=P.dtype, device=P.device)
            self.LM, failed_m = chol(_DELTA * eye + self._yt(self.Y))
            failed = failed | failed_m
            if pivot_min is not None:
                pivot_min = torch.minimum(pivot_min, self.LM[:, 0, 0] ** 2) if z == 1 else None
        self.failed = failed
        self.regularisation_effect = None if pivot_min is None else _DELTA / pivot_min
        # (B,) relative residual of the last solve refined ``until`` a target (see solve).
        self.solve_residual: torch.Tensor | None = None
        # (B,) where that solve stalled, the estimated distance ‖(x, z)‖∞ of its answer from
        # the exact system's, else 0 (see :mod:`.stall`).
        self.solve_error: torch.Tensor | None = None
        # (B,) that solve's relative error as its own corrections estimate it (:func:`.stall.refinement_error`).
        self.solve_estimate: torch.Tensor | None = None
        # The parts of the cone rows whose limit scaling is exactly H = 0 or ∞ (decided
        # active, inactive; a LimitRows): set by the error estimate for the backward's
        # refinement, see :meth:`solve`.
        self.limit = None

    def _yt(self, v: torch.Tensor) -> torch.Tensor:  # Yᵀ v
        return _mm(self.YT, v, self.Y)

    def _y(self, v: torch.Tensor) -> torch.Tensor:  # Y v
        return _mm(self.Y, v, self.YT)

    def _at_mv(self, x: torch.Tensor) -> torch.Tensor:  # W⁻¹A_I x
        return self.ops.rows_mv(self.at, x) if self.diagonal else _mm(self.At, x, self.AtT)

    def _at_tmv(self, t: torch.Tensor) -> torch.Tensor:  # (W⁻¹A_I)ᵀ t
        return self.ops.rows_tmv(self.at, t) if self.diagonal else _mm(self.AtT, t, self.At)

    def _lower(self, v: torch.Tensor) -> torch.Tensor:
        return v / self.L if self.diagonal else torch.linalg.solve_triangular(self.L, v, upper=False)

    def _upper(self, v: torch.Tensor) -> torch.Tensor:
        return v / self.L if self.diagonal else torch.linalg.solve_triangular(self.L.mT, v, upper=True)

    def _solve_regularised(self, rx, rE, t):
        """(x, z_E, ẑ, W⁻¹A_I x) of the regularised scaled system; cone rows W⁻¹A_I x − ẑ = t."""
        rhs = rx + self._at_tmv(t)
        if self.layout.zero:
            if self.rho:
                rhs = rhs + _RHO * self.ops.e_tmv(rE)
            w1 = self._lower(rhs)
            zE = chol_solve(self.LM, self._yt(w1) - rE)
            w1 = w1 - self._y(zE)
        else:
            zE = rE
            w1 = self._lower(rhs)
        x = self._upper(w1)
        atx = self._at_mv(x)
        return x, zE, atx - t, atx

    def residual(self, rx, rE, t, point, lim, atx=None):
        """``(e_x, e_E, e_t)``: the scaled system's residual at ``point`` = ``(x, z_E, ẑ)``,
        against the exact limit rows ``lim`` (``None``: the factorised system's; ``atx``:
        :math:`W^{-1} A_I x` if formed already)."""
        x, zE, zh = point
        ex = rx - self.ops.Pmv(x) - self._at_tmv(zh if lim is None else lim.held(zh))
        if self.layout.zero:
            ex = ex - self.ops.e_tmv(zE)
        eE = rE - self.ops.e_mv(x) if self.layout.zero else rE
        atx = self._at_mv(x) if atx is None else atx
        return ex, eE, t + (zh if lim is None else lim.kept(zh)) - atx

    def solve(self, rx: torch.Tensor, rz: torch.Tensor, refine: int = 1, scaled: bool = False,
              until: float | None = None, product: bool = False, mask: torch.Tensor | None = None):
        """Solve K [x; z] = [rx; rz] for ``(B, n, k)``, ``(B, m, k)`` right-hand sides.

        With :math:`\\hat z = W z_I` the cone rows become :math:`W^{-1} A_I x - \\hat z =
        W^{-1} r_I`, a system whose matrix holds :math:`W^{-1} A_I` (the very matrix that
        was factorised) and an identity, never :math:`H = W^2`, whose entries reach
        1e20 when iterates near the boundary are off-centre. Refinement residuals are
        taken in that scaled system, so they are consistent with the factorisation.
        ``scaled=True`` says the cone rows of ``rz`` already hold :math:`W^{-1} r_I` (the
        interior-point method forms them without ever multiplying by :math:`W`).
        ``until``: after the ``refine`` steps, refine on (a host sync per step, at most
        :data:`MAX_REFINE`) each element whose relative residual is above this and still
        falls (halves within a few steps); each keeps its best iterate, and one that stops stays
        stopped (its answer is the one it gets alone, however long the others go on). Where κ(K)·δ nears 1
        a step gains only a constant factor (a constrained MPC's derivative: residual 2e-4,
        gradient 4e-3 off finite differences after 3 steps; 2e-8 and 2e-6 after 12). Where
        it gains nothing at a small residual (:mod:`.stall`), ``solve_residual`` is ∞ and
        ``solve_error`` the estimated error; ``solve_estimate`` is each answer's relative
        error as its last two corrections estimate it (:func:`~.stall.refinement_error`).

        ``product`` (without ``until``): also return :math:`W^{-1} A_I x`, from the
        products the solve formed (the last step's correction added: equal to a fresh
        product to rounding). ``mask`` ``(B,)``: the refinement's corrections are applied
        only there (the interior-point iterations compute them for the batch when some element
        needs them, and each takes them by its own rule, as it would alone).

        Returns:
            ``(x, z, ẑ)``: the solution and :math:`\\hat z = W z_I` ``(B, mc, k)``
            (and :math:`W^{-1} A_I x` ``(B, mc, k)`` with ``product``).
        """
        if product and until is not None:
            raise ValueError("KKTSystem.solve: product is the last iterate's, not the best one until= returns")
        z = self.layout.zero
        rE, t = (rz[:, :z], rz[:, z:]) if z else (rz[:, :0], rz)
        if self.scaling is not None and not scaled:
            t = self.scaling.apply_inv(t)
        x, zE, zh, atx = self._solve_regularised(rx, rE, t)
        last = atx
        # With a residual target (the backward), refinement is against the exact limit
        # system (``limit``, a LimitRows): along H = 0 (decided active) the cone rows
        # read W⁻¹A_I x = t, with no ẑ term: the factorisation's lifted slack (1e-12) is 0
        # only in O(1) units, and an SOCP with rows 1e-4 next to 1e4 in one cone (one Ruiz
        # factor per cone) kept its active bounds soft beside the cone's stiffness:
        # gradients 0.2 off for a true 2e-7. Along H = ∞ (decided inactive: z = 0) ẑ leaves
        # the first block row: the factorisation keeps those parts at H = 1/δ, which adds
        # δ·A_iᵀA_i to the curvature, and where the program's own curvature is far below
        # that (x ~ 1e5 under quadratics divided by 1e6) the gradient moved by 1.6e10·δ,
        # 1.7 % at δ = 1e-12. Their cone rows stay regularised: a variable that only they
        # hold (an epigraph variable of an inactive bound) is not unique, and its row of
        # the first block is 0 = 0 in the limit.
        lim = None if until is None else self.limit
        if until is not None:
            size, best, trail = row_inf(rx, rE, t).clamp_min(torch.finfo(rx.dtype).tiny), None, []
        # on: the elements still refined (None: all); prev_: the correction before step_ (first, the answer)
        step_, prev_, on = None, (x, zE, zh), mask
        for step in range(refine if until is None else MAX_REFINE):
            # (W⁻¹A_I x: on the first step the regularised solve's own product of this x)
            ex, eE, et = self.residual(rx, rE, t, (x, zE, zh), lim, atx)
            if until is not None:  # each element keeps its best (residual, x, z_E, ẑ)
                res = row_inf(ex, eE, et) / size
                best = (res, x, zE, zh) if best is None else tuple(
                    torch.where(((res < best[0]) & (True if on is None else on)).view(-1, *(1,) * (v.dim() - 1)), v, w)
                    for v, w in zip((res, x, zE, zh), best))
                trail.append(best[0])
                # On while above the target and its best halved in _REFINE_WINDOW steps; once
                # stopped, for good: as alone, however long the others go on.
                back = trail[max(0, len(trail) - 1 - _REFINE_WINDOW)]
                if step >= refine:
                    on = (best[0] > until) & (best[0] < 0.5 * back) & (True if on is None else on)
                    if not bool(on.any()):
                        break
            d = self._solve_regularised(ex, eE, et)
            # W⁻¹A_I x of the new x: the product this step's residual used (``atx``, or on
            # later steps the one ``last`` carried) plus the correction's (refine >= 2 added
            # None: a TypeError); the next step's residual forms a fresh one.
            new = (x + d[0], zE + d[1], zh + d[2], (last + d[3]) if product else None)
            if on is not None:  # corrected only where this element's own rule refines (exactly as alone)
                keep = on.view(-1, 1, 1)
                new = tuple(v if v is None else torch.where(keep, v, w) for v, w in zip(new, (x, zE, zh, last)))
                if until is not None:  # (each element's last two steps, read by stall_error, refinement_error)
                    if step_ is not None:
                        prev_ = tuple(torch.where(keep, v, w) for v, w in zip(step_, prev_))
                    d = tuple(torch.where(keep, v, w) for v, w in zip(d[:3], step_ or (0.0,) * 3))
            elif step_ is not None:
                prev_ = step_
            (x, zE, zh, last), step_, atx = new, d[:3], None
        x, zE, zh = (x, zE, zh) if until is None else best[1:]
        zI = zh if self.scaling is None else self.scaling.apply_inv(zh)
        if until is not None:
            # (B,) each element's relative residual, read by the backward; inf where the
            # refinement stalled far from the exact system's solution, at the estimated
            # distance solve_error (see :mod:`.stall`)
            self.solve_error = stall_error(self, (rx, rE, t), lim, (x, zE, zh), step_, row_inf(x, zE, zI))
            self.solve_residual = torch.where(self.solve_error > 0, torch.inf, best[0])
            self.solve_estimate = refinement_error(self, prev_, step_, row_inf(x, zE, zI))
        zs = torch.cat([zE, zI], 1) if z else zI
        return (x, zs, zh, last) if product else (x, zs, zh)

    def solve_columns(self, columns, refine: int = 1, product: bool = False, mask: torch.Tensor | None = None):
        """``[(x, z, ẑ[, W⁻¹A_I x])]`` of the scaled system for each ``(r_x, r_z)`` ``(B, n), (B, m)``
        in ``columns`` (cone rows of ``r_z`` already scaled; ``mask`` as in :meth:`solve`).

        One ``(B, ·, 1)`` solve per column, not one ``(B, ·, k)`` solve: batched LAPACK/BLAS
        calls with two right-hand sides cost 2–3× those with one (CPU, B = 64, n = 40:
        triangular solve 33 µs against 100, product 20 against 50; the same at n = 50…400,
        B = 1…1024), and on a diagonal system torch's elementwise kernels do not vectorise
        over an innermost dimension of 2 (31 µs against 4 at B = 1024, n = 16).
        """
        return [tuple(v.squeeze(-1) for v in self.solve(rx.unsqueeze(-1), rz.unsqueeze(-1), refine, scaled=True,
                                                         product=product, mask=mask))
                for rx, rz in columns]


class PatchedKKT:
    """A batch's KKT system whose elements ``idx`` are solved by another one, ``part``:
    the interface the polish, the error estimate and the backward use (``solve``,
    ``failed``). ``part`` holds only those elements, or (``part_is_batch``) the whole
    batch, of which only the rows ``idx`` are taken.
    """

    def __init__(self, base, idx: torch.Tensor, part, part_is_batch: bool = False) -> None:
        self.base, self.idx, self.part, self.part_is_batch = base, idx, part, part_is_batch
        part_failed = part.failed.index_select(0, idx) if part_is_batch else part.failed
        self.failed = base.failed.index_copy(0, idx, part_failed)
        self.solve_residual = self.solve_error = self.solve_estimate = None  # (as KKTSystem's)

    @property
    def limit(self):
        """As :attr:`KKTSystem.limit`, of the whole batch (``None`` where a part has none);
        set, it gives each part its rows."""
        base, part = self.base.limit, self.part.limit
        if base is None or part is None:
            return None
        return base.patched(self.idx, part.select(self.idx) if self.part_is_batch else part)

    @limit.setter
    def limit(self, rows) -> None:
        self.base.limit = rows
        self.part.limit = rows if self.part_is_batch else rows.select(self.idx)

    def solve(self, rx: torch.Tensor, rz: torch.Tensor, refine: int = 1, scaled: bool = False,
              until: float | None = None, product: bool = False):
        out = self.base.solve(rx, rz, refine, scaled, until)
        if self.part_is_batch:
            sub = (v.index_select(0, self.idx) for v in self.part.solve(rx, rz, refine, scaled, until))
        else:
            sub = self.part.solve(rx.index_select(0, self.idx), rz.index_select(0, self.idx), refine, scaled, until)
        out = tuple(v.index_copy(0, self.idx, w) for v, w in zip(out, sub))
        if until is not None:
            for name in ("solve_residual", "solve_error", "solve_estimate"):
                part = getattr(self.part, name)
                part = part.index_select(0, self.idx) if self.part_is_batch else part
                setattr(self, name, getattr(self.base, name).index_copy(0, self.idx, part))
        return out


class KKTFactory:
    """The KKT systems of one batch of data at any scaling: ``factory(W) -> KKTSystem``
    (``None``: :math:`H = I`); ``select`` gives those of some elements. The polish, the
    error estimate and the backward take one of these (or the null-space form's,
    :class:`~.nullspace.ReducedSystems`, with the same interface)."""

    def __init__(self, ops: DataOps, base: torch.Tensor, structure: KKTStructure = DENSE) -> None:
        self.ops, self.base, self.structure = ops, base, structure

    def __call__(self, scaling: NTScaling | LimitScaling | None, retry: bool = False) -> KKTSystem:
        return KKTSystem(self.ops, scaling, self.base, self.structure, retry)

    def select(self, idx: torch.Tensor, d) -> "KKTFactory":
        """The systems of the elements ``idx`` (``d``: their data, with ``P`` and ``A``)."""
        return KKTFactory(DataOps(d.P, d.A, self.ops.layout, self.structure), self.base.index_select(0, idx),
                          self.structure)
