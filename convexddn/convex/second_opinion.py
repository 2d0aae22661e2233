"""A second opinion for elements the batched interior point could not certify.

The batched iterations can end short of a certified point on badly scaled data (a
quadratic term of size 1e14 beside an O(1) linear one). The per-element path behind it
solves cvxpylayers' DIFFCP form, where the quadratic objective has become a second-order
cone: its entries are the squares of the data's (s⁴ for data of size s), and on such
data it returned points off by 5e-3 to 7e4 with small residuals there, or called a
bounded problem unbounded (``tests/convex/test_reliability.py``'s badly scaled QP).

So first, each such element is solved by Clarabel on the *same* program the batched
path solves, with :math:`P` kept,

.. math::

    \\min_x \\tfrac12 x^T P x + q^T x \\quad\\text{s.t.}\\quad Ax + s = b,\\ s \\in K,

and its point is handed back to the batched path, which polishes it, estimates its error,
checks it in the equilibrated and in the caller's units (:func:`~.interior_point.solve_cone_batch`
with ``start``) and differentiates it implicitly like any batched solution. Only what
that does not certify goes on to the per-element path.

This is a host loop over the elements that need it (CPU, float64), like the per-element
path it comes before; the batched path itself never reaches it. :func:`solve_with_opinion`
is the batched path with this second opinion, as :class:`~.layer.ConvexLayer` calls it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import clarabel
import numpy as np
import scipy.sparse as sp
import torch

from .._autograd import refuse_transforms
from .._process_settings import solver_warnings_ignored
from .equilibration import Scaled
from .kkt import row_inf
from .per_element import SOLVER_DEFAULTS
from .status import merge_resolved, status_kind
from .symmetric_cones import ConeLayout
from .validation import element_subset

if TYPE_CHECKING:  # (batched imports this module)
    import cvxpy as cp

    from .batched import BatchedProgram

__all__ = ["clarabel_points", "equilibrated_start", "solve_with_opinion"]

# Clarabel's statuses whose point is a ray (an infeasibility certificate), not a
# candidate solution. Any other finite point is handed on, whatever the status: the
# polish and the checks decide (Clarabel stopped with "InsufficientProgress" 0.94 off
# on the badly scaled QP at s = 100, and the polish makes that point exact).
_RAYS = {"PrimalInfeasible", "DualInfeasible", "AlmostPrimalInfeasible", "AlmostDualInfeasible"}

# The per-element path's tight Clarabel settings (one source for the tolerances).
_SETTINGS = {**SOLVER_DEFAULTS["Clarabel"], "verbose": False}


def _cones(layout: ConeLayout) -> list:
    cones = []
    if layout.zero:
        cones.append(clarabel.ZeroConeT(layout.zero))
    if layout.nonneg:
        cones.append(clarabel.NonnegativeConeT(layout.nonneg))
    cones.extend(clarabel.SecondOrderConeT(k) for k in layout.soc)
    return cones


def clarabel_points(P: torch.Tensor, q: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                    layout: ConeLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clarabel's solution of each element of a batch of cone programs.

    Shape:
        ``P (B, n, n), q (B, n), A (B, m, n), b (B, m)`` -> ``x (B, n), s (B, m),
        z (B, m), usable (B,)``, on the data's device and dtype.

    Returns:
        The points (zeros where Clarabel raised, returned a non-finite point or an
        infeasibility ray) and a bool mask of the others. Never raises for one element.
    """
    # (torch's "Cannot access data pointer" at the numpy copy)
    refuse_transforms("ConvexLayer: Clarabel's second look at elements the batched iterations did not certify",
                      "it solves in numpy")
    dev, dtype = q.device, q.dtype
    Pn, qn, An, bn = (v.detach().to("cpu", torch.float64).numpy() for v in (P, q, A, b))
    B, m, n = An.shape
    cones = _cones(layout)
    settings = clarabel.DefaultSettings()
    for key, value in _SETTINGS.items():
        setattr(settings, key, value)
    x, s, z = np.zeros((B, n)), np.zeros((B, m)), np.zeros((B, m))
    usable = np.zeros(B, dtype=bool)
    for i in range(B):
        Pi = sp.triu(sp.csc_matrix(0.5 * (Pn[i] + Pn[i].T)), format="csc")
        try:
            with solver_warnings_ignored():  # (catch_warnings is not thread-safe)
                sol = clarabel.DefaultSolver(Pi, qn[i], sp.csc_matrix(An[i]), bn[i], cones, settings).solve()
        except BaseException as err:  # noqa: B036 (a Rust panic is a BaseException)
            if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            continue  # this element stays unusable; the per-element path comes next
        xi, si, zi = (np.asarray(v, dtype=np.float64) for v in (sol.x, sol.s, sol.z))
        if str(sol.status) not in _RAYS and np.isfinite(xi).all() and np.isfinite(si).all() and np.isfinite(zi).all():
            x[i], s[i], z[i], usable[i] = xi, si, zi, True
    to = dict(device=dev, dtype=dtype)
    return (torch.from_numpy(x).to(**to), torch.from_numpy(s).to(**to), torch.from_numpy(z).to(**to),
            torch.from_numpy(usable).to(dev))


# How far inside K a given start is moved (relative to its size; as a polished point).
_START_SHIFT = 1e-12


def equilibrated_start(d: Scaled, layout: ConeLayout, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                       rescale_below: float) -> tuple[Scaled, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A point of the caller's program in the equilibrated units of ``d``.

    Where the point comes out below ``rescale_below`` of the units' size (σ taken
    from the data, inflated by an inactive constraint with a huge right-hand side) σ
    is taken from the point instead, as the interior point's second solve does; the
    cone parts of ``s`` and ``z`` are moved onto K and just inside it (the KKT
    linearisation needs an interior point).

    Returns:
        ``(d, x̂, ŝ, ẑ)``: the data (σ possibly changed) and the point in its units.
    """
    xs, _, zs = d.scale(x, s, z)
    size = torch.maximum(row_inf(xs), row_inf(zs))
    small = (size < rescale_below) & (size > 0)
    d = d.with_sigma(torch.where(small, d.sigma * size, d.sigma))
    xs, ss, zs = d.scale(x, s, z)
    z0 = layout.zero
    ss = torch.cat([torch.zeros_like(ss[:, :z0]), layout.lift(ss[:, z0:], _START_SHIFT)], 1)
    zs = torch.cat([zs[:, :z0], layout.lift(zs[:, z0:], _START_SHIFT)], 1)
    return d, xs, ss, zs


def solve_with_opinion(program: BatchedProgram, parameters: list[cp.Parameter], flat: list[torch.Tensor],
                       where: tuple[Sequence[int], tuple[int, ...]]) -> tuple[list[torch.Tensor], dict]:
    """The batched iterations on ``flat`` (one tensor per parameter, batched along dim 0;
    ``where``: the elements' flat positions in the caller's batch and its shape), then a
    second opinion on what they do not certify: Clarabel on the same program, P kept, its
    points polished, checked and differentiated by the batched path.

    Returns:
        ``(solutions, info)``: the variables' tensors, and per element lists ``backend``,
        ``solvers``, ``statuses``, ``residuals``, ``solved``, ``kinds`` and ``points``
        (the batched checks' bits, kept through merges).
    """
    sols, binfo = program(*flat, where=where)
    sols, n = list(sols), len(binfo.status)
    statuses, solved = binfo.status_names(), binfo.solved.tolist()
    info = {"backend": ["batched"] * n, "solvers": ["batched"] * n, "statuses": statuses,
            "residuals": binfo.residual.tolist(), "solved": solved,
            "kinds": ["solved" if ok else status_kind(st) for ok, st in zip(solved, statuses)],
            "points": binfo.points.tolist()}  # (not an INFO_KEYS entry: kept through merges)
    redo = [i for i, ok in enumerate(info["solved"]) if not ok]
    if redo:
        fixed, finfo = program(*element_subset(parameters, flat, redo), second_opinion=True,
                               where=([where[0][i] for i in redo], where[1]))
        for i, bits in zip(redo, finfo.points.tolist()):
            info["points"][i] |= bits
        took = finfo.solved.tolist()
        part = {"backend": ["batched"] * len(redo), "solvers": ["Clarabel (batched form)"] * len(redo),
                "statuses": finfo.status_names(), "residuals": finfo.residual.tolist(),
                "solved": took, "kinds": ["solved"] * len(redo)}
        merge_resolved(sols, info, redo, fixed, part, take=took)
    return sols, info
