"""Constraint rows that are zero in an element: where no derivative in their data exists.

A parameter may make a row of a cone program :math:`Ax + s = b` vanish in some element,
:math:`A_i = 0`. The row then reads ``0 = b_i`` (an equality) or ``0 <= b_i`` (a nonnegative
row), and with :math:`b_i = 0` it holds at every point: its slack is 0 and its multiplier
any, so the program's optimality conditions do not decide it. Moved along any direction
:math:`(\\epsilon g, \\epsilon h)` of its data it becomes :math:`g^\\top x = h` (or
:math:`\\le`, or :math:`\\ge` for :math:`\\epsilon < 0`): a new constraint, under which the
solution jumps unless it satisfies it already (projection onto :math:`\\{y_1 + y_2 + y_3 = 1\\}`
at :math:`x = (1, 2, 3)`: :math:`y_0 = -2/3`, and :math:`y_0 = 0` for every :math:`E_{1} =
\\epsilon e_0`, :math:`\\epsilon \\ne 0`), or the program infeasible (:math:`0 = \\epsilon h`).
No derivative in that row's data exists, on either path. With :math:`b_i > 0` a nonnegative
row is inactive and stays so (a derivative of 0); with :math:`b_i \\ne 0` an equality, or a
nonnegative row with :math:`b_i < 0`, is infeasible, which the forward refuses. A
second-order cone's row is a coordinate of its slack, not a constraint: a zero one is not
tested here.

"Zero" is relative to the element's data (:data:`ZERO_ROW`): data computed from the
parameters carry the rounding of the terms they cancel.

The batched path tests the rows that hold for being moved inconsistently in
:func:`~.uniqueness.limit_inconsistency` (a zero row is the extreme dependent row) and
names the elements by :func:`moved_zero_rows`; the per-element path finds them rank-deficient
(:func:`~.parametric.unique_anyway`) and names the reason by :func:`moves_zero_row`; both
warn with :func:`warn_zero_rows`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from diffcp import cones as cone_lib

from .._warn import warn
from ..errors import GradientWarning
from .cone_checks import cone_blocks
from .kkt import row_inf
from .status import element_list, name_elements

__all__ = ["ZERO_ROW", "held_zero_rows", "moved_zero_rows", "moves_zero_row", "warn_zero_rows", "zero_rows"]

# A row whose data, its equilibration undone, is at most this fraction of the element's
# largest is zero: data computed from the parameters carry a few ulps of the terms they
# cancel; a row 1e-10 of the others is a constraint (with a derivative ~1e10).
ZERO_ROW = 1024 * torch.finfo(torch.float64).eps


def zero_rows(d, layout, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(zero, holds)`` ``(B, z0 + k)``: the equality and nonnegative rows of the equilibrated
    data ``d`` (:class:`~.equilibration.Scaled`) whose :math:`A_i` is zero relative to the
    element's rows (2-norms, at most :data:`ZERO_ROW` of the largest, each row's equilibration
    :math:`E_i` undone: Ruiz scales a row of 1e-17 up to 1e-5), and those of them whose
    :math:`b_i` is zero too, relative to the constraints' terms :math:`\\max_k |b_k| +
    \\|A_k\\|\\,\\|x\\|_\\infty` (``x`` ``(B, n)`` equilibrated): they hold at every point
    (see the module docstring)."""
    z0, k = layout.zero, layout.nonneg
    size = d.A.norm(dim=-1) / d.E  # (B, m)
    zero = size[:, :z0 + k] <= ZERO_ROW * size.amax(1, keepdim=True)
    terms = (d.b.abs() / d.E + size * row_inf(x)[:, None]).amax(1, keepdim=True)
    return zero, zero & (d.b[:, :z0 + k].abs() / d.E[:, :z0 + k] <= ZERO_ROW * terms)


def held_zero_rows(sol, layout) -> torch.Tensor:
    """``(B, m)`` the rows of a batched solution ``sol`` (:class:`~.interior_point.ConeSolution`)
    that are zero and hold (:func:`zero_rows`); False on the other rows."""
    d, z0k = sol.scaled, layout.zero + layout.nonneg
    held = torch.zeros(d.A.shape[:2], dtype=torch.bool, device=d.A.device)
    if z0k and d.A.shape[0]:
        held[:, :z0k] = zero_rows(d, layout, sol.x / (d.sigma[:, None] * d.D))[1]
    return held


def moved_zero_rows(sol, layout, rz: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the elements of a batched solution ``sol`` with a zero row that holds
    (:func:`held_zero_rows`) which ``rz`` ``(B, m)`` moves (how a direction of the parameters
    moves :math:`b - Ax`, in any positive scaling of the rows): there no derivative exists,
    unless that move is at rounding (:func:`~.uniqueness.limit_inconsistency` decides). A
    constant zero row does not move."""
    return (held_zero_rows(sol, layout) & (rz != 0)).any(1)


def moves_zero_row(A: sp.spmatrix, b: np.ndarray, cones: list, x: np.ndarray, par) -> bool:
    """Whether a zero-cone or nonnegative row of one program :math:`Ax + s = b` (diffcp's
    form, ``cones`` its parsed list) is zero with :math:`b_i = 0`, as :func:`zero_rows` decides
    in the caller's units (no equilibration here), at the solution ``x`` ``(n,)``, and the
    parameters move its data (``par``: :class:`~.parametric.Parametric`)."""
    lin = np.zeros(b.size, dtype=bool)
    for kind, at, q in cone_blocks(cones):
        lin[at:at + q] = kind in (cone_lib.ZERO, cone_lib.POS)
    A = sp.csr_matrix(A)
    size = np.sqrt(np.asarray(A.multiply(A).sum(1))).ravel()
    terms = (np.abs(b) + size * np.abs(x).max(initial=0.0)).max(initial=0.0)
    holds = lin & (size <= ZERO_ROW * size.max(initial=0.0)) & (np.abs(b) <= ZERO_ROW * terms)
    moves = np.asarray(abs(par.ab_map).sum(1)).ravel() > 0  # (A's structural entries, then b's)
    n_a = par.rows.size
    return bool(holds[par.rows[moves[:n_a]]].any() or holds[par.b_rows[moves[n_a:]]].any())


def warn_zero_rows(mode: str, where: tuple[Sequence[int], tuple[int, ...]] | None, idx: list[int],
                   returned: str) -> None:
    """The GradientWarning naming the elements ``idx`` of a solve (``where``: their place in
    the caller's batch) with a zero row that the parameters move; ``mode`` e.g. ``"backward
    (batched)"``, ``returned`` what their gradient or tangent is instead."""
    if idx:
        warn(f"ConvexLayer {mode}: {len(idx)} batch element(s) ({name_elements(where, idx)}) have a constraint "
             "row that is zero in this element (A_i = 0, b_i = 0: '0 = 0' or '0 <= 0', true for every solution, its "
             "multiplier any) and whose data the parameters move: any move adds a constraint (the solution jumps) "
             f"or makes the program infeasible, so no derivative in that row's data exists; {returned}",
             GradientWarning, elements=element_list(where, idx))
