"""Equality constraints eliminated by a null-space basis before the interior-point iterations.

For :math:`\\min \\tfrac12 x^T P x + q^T x` s.t. :math:`A_E x = b_E,\\ A_I x + s = b_I,\\
s \\in K` with :math:`A_E` (p × n) of full row rank, :math:`p < n`, the QR factorisation
:math:`A_E^T = [Q_1\\ Q_2] \\begin{bmatrix} R \\\\ 0 \\end{bmatrix}` gives every solution
of the equalities as

.. math::

    x = x_p + Q_2 y, \\qquad x_p = Q_1 R^{-T} b_E \\quad\\text{(the least-norm one)},

and the program in :math:`y \\in \\mathbb{R}^{n-p}`

.. math::

    \\min_y \\tfrac12 y^T (Q_2^T P Q_2) y + (Q_2^T (P x_p + q))^T y
    \\quad\\text{s.t.}\\quad (A_I Q_2)\\, y + s = b_I - A_I x_p,\\ s \\in K

has no equality rows. Each interior-point iteration then factors one (n − p)-square
matrix instead of an n-square one and the p-square Schur complement of the equalities,
and each KKT solve takes two triangular solves instead of four: on the n = 50 QP with
10 equalities (float64, 2 cores, A/B medians) the iterations took 38 ms instead of 58
at batch 64 for the same iteration counts, and the layer's forward pass 45 ms instead
of 55 (0.75 s instead of 1.09 at batch 1024). :math:`Q_2` has orthonormal columns, so
the equilibrated units stay as they were.

Back (:meth:`Reduction.lift`): :math:`x = x_p + Q_2 y`; :math:`s` and :math:`z_I` as
they are; :math:`z_E` from the stationarity rows along :math:`\\operatorname{range}(A_E^T)
= \\operatorname{range}(Q_1)`, :math:`R z_E = -Q_1^T (P x + q + A_I^T z_I)`. For an
infeasibility certificate (:math:`(A_I Q_2)^T z_I \\approx 0`) the same with the
objective terms dropped leaves :math:`A^T z` no part along :math:`\\operatorname{range}
(Q_1)`, so its residual is the reduced certificate's; for an unboundedness certificate
the ray is :math:`Q_2 y`. The polish, the error estimate and the implicit backward after the
iterations solve the full program's KKT systems through the same factorisation
(:class:`ReducedSystems`); the final checks (:mod:`.certify`) measure the full program,
as always.

Where it does not apply — no equalities, a separable (diagonal) structure whose KKT
solves are elementwise anyway, :math:`p \\ge n`, or :math:`A_E` of some element
rank-deficient or nearly so (duplicated rows; :math:`R`'s diagonal spread above
``1/RANK_TOL``) — :func:`reduce` returns ``None`` and the iterations keep the equality
rows, regularised. Where it applies to some elements of a batch and not to others,
:func:`reduce` says which (a mask), and the caller solves the two groups apart
(:class:`SplitKKT` holds their systems for the backward): an element's numbers are those
it gets alone, not its neighbours' form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .equilibration import Scaled
from .data_ops import _mm
from .kkt import DENSE, DataOps, KKTStructure, KKTSystem, PatchedKKT, bmv, constant_part
from .symmetric_cones import ConeLayout, NTScaling

if TYPE_CHECKING:  # (the derivative's scaling, built by certify)
    from .limit_scaling import LimitScaling

__all__ = ["NEARLY_DEPENDENT", "RANK_TOL", "ReducedSystems", "Reduction", "SplitKKT", "gather", "reduce",
           "unverifiable"]

# Smallest |R_ii| relative to the largest, per element, for the elimination (float64; 1e3
# eps in lower precision): x_p and z_E are solves with R, whose errors grow with its
# condition number, like the solution's own sensitivity to the rows. Nearly dependent
# rows are still far better served here than by the regularised KKT form, which loses
# their difference below δ: at 1e-6 (the limit before) rows parallel to 1e-7 and 1e-8
# ended 0.02 to 1.7 off there.
RANK_TOL = 1e-12
# ... and below this the rows count as nearly dependent: their multipliers (~1/spread)
# round the dual residual of even a right point above tol_accept (1e-9: 2.8e-8), while
# another solver's point 0.4 to 1.7 off passed a residual check (see unverifiable).
NEARLY_DEPENDENT = 1e-6


@dataclass
class Reduction:
    """The null-space basis of one batch's equality rows (equilibrated units).

    Attributes:
        Q1, N: ``(B, n, p)``, ``(B, n, n − p)``: orthonormal bases of
            :math:`\\operatorname{range}(A_E^T)` and of the null space of :math:`A_E`.
        R: ``(B, p, p)`` upper triangular, :math:`A_E^T = Q_1 R`.
        AN: ``(B, m − p, n − p)`` the cone rows in the basis, :math:`A_I N` (the data's
            ``A`` never changes after equilibration).
        xp: ``(B, n)`` least-norm solution of the equalities at solution scale ``sigma``.
        sigma: ``(B,)`` the solution scale σ of the data ``xp`` was computed from.
        layout: the cones of the reduced program (no zero cone).
        Pr, c: ``(B, n − p, n − p)`` :math:`N^T P N` at cost scale ``c`` ``(B,)`` (P ∝ c).
    """

    Q1: torch.Tensor
    N: torch.Tensor
    R: torch.Tensor
    AN: torch.Tensor
    xp: torch.Tensor
    sigma: torch.Tensor
    layout: ConeLayout
    Pr: torch.Tensor
    c: torch.Tensor

    def lift(self, d: Scaled, reduced: Scaled, y: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
             infeasible: torch.Tensor, unbounded: torch.Tensor):
        """The reduced program's ``(y, s, z)`` as ``(x, s, z)`` of the full one.

        ``d`` is the full program at the reduced one's solution scale (the iterations may
        refine σ, which rescales :math:`x_p`, and with it the cost scale c, which scales
        z); ``infeasible`` / ``unbounded`` ``(B,)`` mark elements whose point is a
        certificate.

        Shape:
            ``y (B, n − p), s (B, m − p), z (B, m − p)`` -> ``(B, n), (B, m), (B, m)``.
        """
        p = self.R.shape[-1]
        xp = self.xp * (self.sigma / d.sigma)[:, None]  # x_p ∝ b_E / σ
        x = bmv(self.N, y) + torch.where(unbounded[:, None], 0.0, xp)
        zI = z * (d.c / reduced.c)[:, None]  # ẑ = c z / (σ E): the two programs' c differ
        AI = d.A[:, p:]
        g = bmv(AI.mT, zI) + torch.where(infeasible[:, None], 0.0, bmv(d.P, x) + d.q)
        zE = -_range_coefficients(self.Q1, self.R, g.unsqueeze(-1)).squeeze(-1)
        return x, torch.cat([s.new_zeros(s.shape[0], p), s], 1), torch.cat([zE, zI], 1)


class ReducedSystems:
    """KKT systems of the full program (the interface of :class:`~.kkt.KKTSystem` that the
    polish, the error estimate and the backward use: ``solve``, ``failed``), factorised
    through the reduced one: an (n − p)-square Cholesky factor instead of an n-square one
    and the p-square Schur complement of the equalities.

    A solve of :math:`K [x; z_E; z_I] = [r_x; r_E; r_I]` takes
    :math:`x_E = Q_1 R^{-T} r_E`, solves the reduced system for :math:`(y, z_I)` with
    right-hand sides :math:`(N^T (r_x - P x_E),\\ r_I - A_I x_E)`, and returns
    :math:`x = x_E + N y` and :math:`z_E = R^{-1} Q_1^T (r_x - P x - A_I^T z_I)`.

    Where the reduced factorisation fails for some element, that element's solves go
    through the full form's (:class:`~.kkt.KKTSystem` with ``structure``): at a
    non-unique solution (an LP with a free direction) the limit scaling's ~1e12 rows,
    mixed by :math:`N` into the flat direction's pivot, broke the reduced Cholesky, while
    the full form's variable order kept them apart.

    Args:
        red: the reduction (its bases; the data's ``A`` never changes after it).
        d: the equilibrated full program now (its ``P`` at the current cost scale).
        ops: :class:`~.kkt.DataOps` of ``d``.
        structure: the full form's :class:`~.kkt.KKTStructure`.
    """

    def __init__(self, red: Reduction, d: Scaled, ops: DataOps, structure: KKTStructure = DENSE) -> None:
        p = red.R.shape[-1]
        self.red, self.ops, self.p, self.structure = red, ops, p, structure
        self._full_base: torch.Tensor | None = None
        Pr = red.Pr * (d.c / red.c)[:, None, None]  # at the cost scale of now (P ∝ c)
        self.ops_r = DataOps(Pr, red.AN, red.layout, DENSE)
        self.base = constant_part(Pr, red.AN, red.layout, DENSE)

    def __call__(self, scaling: NTScaling | LimitScaling | None, retry: bool = False):
        kkt = _ReducedKKT(self, KKTSystem(self.ops_r, scaling, self.base, DENSE, retry))
        if not bool(kkt.failed.any()):
            return kkt
        if self._full_base is None:
            self._full_base = constant_part(self.ops.P, self.ops.A, self.ops.layout, self.structure)
        full = KKTSystem(self.ops, scaling, self._full_base, self.structure, retry)
        return PatchedKKT(kkt, torch.nonzero(kkt.failed).squeeze(1), full, part_is_batch=True)

    def select(self, idx: torch.Tensor, d: Scaled) -> "ReducedSystems":
        """The systems of the elements ``idx`` (``d``: their data)."""
        pick = lambda v: v.index_select(0, idx)  # noqa: E731
        red = self.red
        part = Reduction(*(pick(v) for v in (red.Q1, red.N, red.R, red.AN, red.xp, red.sigma)), red.layout,
                         pick(red.Pr), pick(red.c))
        return ReducedSystems(part, d, DataOps(d.P, d.A, self.ops.layout, self.structure), self.structure)


class _ReducedKKT:
    """One full KKT system solved through a reduced one (see :class:`ReducedSystems`)."""

    def __init__(self, systems: ReducedSystems, kkt: KKTSystem) -> None:
        self.systems, self.kkt, self.failed = systems, kkt, kkt.failed
        self.solve_residual = self.solve_error = self.solve_estimate = None  # (as KKTSystem's)

    @property
    def limit(self):
        """The reduced system's :attr:`~.kkt.KKTSystem.limit` (its cone rows are the full one's)."""
        return self.kkt.limit

    @limit.setter
    def limit(self, rows) -> None:
        self.kkt.limit = rows

    def solve(self, rx: torch.Tensor, rz: torch.Tensor, refine: int = 1, scaled: bool = False,
              until: float | None = None):
        sy, red = self.systems, self.systems.red
        p, ops = sy.p, sy.ops
        rE, rI = rz[:, :p], rz[:, p:]
        xE = _least_norm(red.Q1, red.R, rE)
        AxE = _mm(ops.A[:, p:], xE)
        if scaled:  # the cone rows hold W⁻¹ r_I: subtract W⁻¹ A_I x_E
            AxE = self.kkt.scaling.apply_inv(AxE)
        y, zI, zh = self.kkt.solve(_mm(red.N.mT, rx - ops.Pmv(xE)), rI - AxE, refine, scaled, until)
        # (the reduced system's: the one solved; x = x_E + N y with N orthonormal, z_I as
        # they are, z_E exact given them)
        self.solve_residual, self.solve_error, self.solve_estimate = (self.kkt.solve_residual, self.kkt.solve_error,
                                                                     self.kkt.solve_estimate)
        x = xE + _mm(red.N, y)
        g = rx - ops.Pmv(x) - _mm(ops.A[:, p:].mT, zI)
        zE = _range_coefficients(red.Q1, red.R, g)
        return x, torch.cat([zE, zI], 1), zh


def reduce(d: Scaled, layout: ConeLayout, structure: KKTStructure) -> tuple[Scaled, Reduction] | torch.Tensor | None:
    """The equality-free program of the module docstring, ``None`` where it applies to no
    element, or where it applies to some only, the ``(B,)`` mask of those.

    Shape:
        ``d`` with ``P (B, n, n), A (B, m, n)``, ``p = layout.zero`` ->
        ``P (B, n − p, n − p), q (B, n − p), A (B, m − p, n − p), b (B, m − p)``.
    """
    p = layout.zero
    B, m, n = d.A.shape
    if structure.diagonal or not 0 < p < n:
        return None
    AE, AI = d.A[:, :p], d.A[:, p:]
    Q, R = torch.linalg.qr(AE.mT, mode="complete")
    R = R[:, :p]
    diag = R.diagonal(dim1=1, dim2=2).abs()
    limit = max(RANK_TOL, 1e3 * torch.finfo(R.dtype).eps)  # float32: 1.2e-4
    ok = diag.amin(1) > limit * diag.amax(1)
    if not bool(ok.all()):
        return ok if bool(ok.any()) else None
    Q1, N = Q[:, :, :p], Q[:, :, p:]
    xp = _least_norm(Q1, R, d.b[:, :p].unsqueeze(-1)).squeeze(-1)
    AN = AI @ N
    qr = bmv(N.mT, bmv(d.P, xp) + d.q)
    Pr = _projected(d.P, N)
    reduced = Scaled(Pr, qr, AN, d.b[:, p:] - bmv(AI, xp), d.D.new_ones(B, n - p), d.E.new_ones(B, m - p), d.c,
                     d.sigma)
    # Kept on the layout: a cone layout caches its index tensors.
    layout_r = layout._cache.setdefault("reduced", ConeLayout(0, layout.nonneg, layout.soc))
    return reduced, Reduction(Q1, N, R, AN, xp, d.sigma, layout_r, Pr, d.c)


def unverifiable(error: torch.Tensor, red: Reduction | None) -> torch.Tensor:
    """``(B,)`` elements whose point no residual check can vouch for: the error estimate
    could not be formed (NaN: nearly dependent equality rows kept in the regularised KKT
    form), or the reduction's rows are nearly dependent (R's diagonal spread below
    :data:`NEARLY_DEPENDENT`). Another solver's result for them is not to be trusted
    on its residual alone."""
    flag = torch.isnan(error)
    if red is not None and red.R.shape[-1]:
        diag = red.R.diagonal(dim1=1, dim2=2).abs()
        flag = flag | (diag.amin(1) < NEARLY_DEPENDENT * diag.amax(1))
    return flag


def _least_norm(Q1: torch.Tensor, R: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The least-norm x with A_E x = r, A_Eᵀ = Q1 R: ``(B, n, p), (B, p, p), (B, p, k) -> (B, n, k)``."""
    return _mm(Q1, torch.linalg.solve_triangular(R.mT, r, upper=False))


def _range_coefficients(Q1: torch.Tensor, R: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """z_E with A_Eᵀ z_E the part of g in range(A_Eᵀ): ``(B, n, k) -> (B, p, k)``."""
    return torch.linalg.solve_triangular(R, _mm(Q1.mT, g), upper=True)


def _projected(P: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """:math:`N^T P N`, symmetric to rounding: ``(B, n, n), (B, n, k) -> (B, k, k)``."""
    Pr = N.mT @ (P @ N)
    return 0.5 * (Pr + Pr.mT)


def gather(B: int, parts) -> torch.Tensor:
    """``(B, ...)`` from ``[(idx, v)]``, ``v`` the values of the elements ``idx`` (together all ``B``)."""
    v0 = parts[0][1]
    out = v0.new_zeros((B, *v0.shape[1:]))
    for idx, v in parts:
        out = out.index_copy(0, idx, v)
    return out


class SplitKKT:
    """A batch's KKT systems at its solutions held in parts ``[(idx, kkt)]`` that cover its
    ``B`` elements once each (those in the null-space form and the others, solved apart):
    the interface the backward uses (``solve``, ``failed``, ``limit``; as
    :class:`~.kkt.PatchedKKT`)."""

    def __init__(self, B: int, parts) -> None:
        self.B, self.parts = B, parts
        self.failed = gather(B, [(idx, kkt.failed) for idx, kkt in parts])
        self.solve_residual = self.solve_error = self.solve_estimate = None  # (as KKTSystem's)

    @property
    def limit(self):
        """As :attr:`KKTSystem.limit`, of the whole batch (``None`` where a part has none)."""
        rows = [kkt.limit for _, kkt in self.parts]
        if any(r is None for r in rows):
            return None
        whole = rows[0].select(self.failed.new_zeros(self.B, dtype=torch.long))  # (each row replaced below)
        for (idx, _), r in zip(self.parts, rows):
            whole = whole.patched(idx, r)
        return whole

    @limit.setter
    def limit(self, rows) -> None:
        for idx, kkt in self.parts:
            kkt.limit = rows.select(idx)

    def solve(self, rx: torch.Tensor, rz: torch.Tensor, refine: int = 1, scaled: bool = False,
              until: float | None = None):
        outs = [(idx, kkt.solve(rx.index_select(0, idx), rz.index_select(0, idx), refine, scaled, until))
                for idx, kkt in self.parts]
        if until is not None:
            for name in ("solve_residual", "solve_error", "solve_estimate"):
                setattr(self, name, gather(self.B, [(idx, getattr(kkt, name)) for idx, kkt in self.parts]))
        return tuple(gather(self.B, [(idx, out[k]) for idx, out in outs]) for k in range(len(outs[0][1])))
