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
from typing import TYPE_CHECKING, Any

import clarabel
import numpy as np
import scipy.sparse as sp
import torch

from .._autograd import refuse_transforms
from .._process_settings import solver_warnings_ignored
from .cone_solution import DUAL_INFEASIBLE, EXACT_RAY, INCONSISTENT, NUMERICAL, PRIMAL_INFEASIBLE, SOLVED, STATUS_NAMES
from .equilibration import Scaled
from .kkt import row_inf
from .measures import DEGENERATE
from .per_element import SOLVER_DEFAULTS
from .rays import verified_rays
from .status import demote, doubt_certificates, element_list, merge_resolved, name_elements, status_kind
from .symmetric_cones import ConeLayout
from .validation import element_subset

if TYPE_CHECKING:  # (batched imports this module)
    import cvxpy as cp

    from .batched import BatchedProgram

__all__ = ["clarabel_points", "equilibrated_start", "solve_with_opinion", "unsettled", "weigh_unbounded"]

# Clarabel's statuses whose point is a ray (an infeasibility certificate), not a
# candidate solution. Any other finite point is handed on, whatever the status: the
# polish and the checks decide (Clarabel stopped with "InsufficientProgress" 0.94 off
# on the badly scaled QP at s = 100, and the polish makes that point exact).
_RAYS = {"PrimalInfeasible", "DualInfeasible", "AlmostPrimalInfeasible", "AlmostDualInfeasible"}
_SOLVED = {"Solved", "AlmostSolved"}
_UNBOUNDED = {"DualInfeasible", "AlmostDualInfeasible"}
# clarabel_points' opinion where Clarabel claimed unboundedness with an approximate ray and,
# solved again at the ray's reach (_row_reach), did not claim it there.
UNCONFIRMED = max(STATUS_NAMES) + 1  # (not a status code)

# Why an element with the DEGENERATE bit was not certified (appended to its status).
DEGENERATE_WHY = ("a degenerate vertex: more constraints active than variables, its error not estimable "
                  "on the batched path")

# The per-element path's tight Clarabel settings (one source for the tolerances).
_SETTINGS = {**SOLVER_DEFAULTS["Clarabel"], "verbose": False}
_EPS = np.finfo(np.float64).eps


def _cones(layout: ConeLayout) -> list:
    cones = []
    if layout.zero:
        cones.append(clarabel.ZeroConeT(layout.zero))
    if layout.nonneg:
        cones.append(clarabel.NonnegativeConeT(layout.nonneg))
    cones.extend(clarabel.SecondOrderConeT(k) for k in layout.soc)
    return cones


def clarabel_points(P: torch.Tensor, q: torch.Tensor, A: torch.Tensor, b: torch.Tensor, layout: ConeLayout,
                    opinions: bool = False) -> tuple[torch.Tensor, ...]:
    """Clarabel's solution of each element of a batch of cone programs.

    Shape:
        ``P (B, n, n), q (B, n), A (B, m, n), b (B, m)`` -> ``x (B, n), s (B, m),
        z (B, m), usable (B,)`` [, ``opinion (B,)``], on the data's device and dtype.

    Returns:
        The points (zeros where Clarabel raised, returned a non-finite point or an
        infeasibility ray) and a bool mask of the others. With ``opinions``, also what
        Clarabel says of each element, as a status code of
        :data:`~.cone_solution.STATUS_NAMES`: ``SOLVED`` where it reports the problem
        solved (``Solved``, ``AlmostSolved``), ``PRIMAL_INFEASIBLE`` (``DUAL_INFEASIBLE``)
        where it claims infeasibility (unboundedness) with a ray that verifies in the units
        given (:func:`~.rays.verified_rays`), :data:`UNCONFIRMED` (not a status code) where
        its approximate unboundedness ray, solved again at the ray's reach, gave no ray
        there (a point it reports solved there counts as ``SOLVED``, which the checks of
        that point then judge), ``NUMERICAL`` otherwise (no opinion). Never raises for one
        element.
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
    rx, rz = np.zeros((B, n)), np.zeros((B, m))  # the rays Clarabel claims, where it claims one
    usable = np.zeros(B, dtype=bool)
    said = np.full(B, NUMERICAL)
    for i in range(B):
        Pi = sp.triu(sp.csc_matrix(0.5 * (Pn[i] + Pn[i].T)), format="csc")
        got = _solve(Pi, qn[i], An[i], bn[i], cones, settings)
        if got is None:
            continue  # this element stays unusable; the per-element path comes next
        status, xi, si, zi = got
        finite = _finite(xi, si, zi)
        D = _row_reach(An[i], Pn[i], qn[i], layout, xi) if finite and status in _UNBOUNDED else None
        if D is not None:
            # An approximate ray: Clarabel again on the rows scaled by their reach, where the
            # dual points it does not exclude are of unit size (x unchanged, s / D, z D).
            again = _solve(Pi, qn[i], D[:, None] * An[i], D * bn[i], cones, settings)
            if again is None:
                said[i] = UNCONFIRMED
                continue
            status, xi, si, zi = again
            si, zi = si / D, zi * D
            if status not in _UNBOUNDED:  # (a ray that verifies there confirms it, checked below)
                said[i] = UNCONFIRMED
            finite = _finite(xi, si, zi)
        if status in _RAYS:
            if finite:
                rx[i], rz[i] = xi, zi
                said[i] = PRIMAL_INFEASIBLE if "Primal" in status else DUAL_INFEASIBLE
        elif finite:
            x[i], s[i], z[i], usable[i] = xi, si, zi, True
            said[i] = SOLVED if status in _SOLVED else said[i]
    to = dict(device=dev, dtype=dtype)
    out = (torch.from_numpy(x).to(**to), torch.from_numpy(s).to(**to), torch.from_numpy(z).to(**to),
           torch.from_numpy(usable).to(dev))
    if not opinions:
        return out
    claimed = bool(np.isin(said, (PRIMAL_INFEASIBLE, DUAL_INFEASIBLE)).any())  # (on the host: no sync)
    said = torch.from_numpy(said).to(dev)
    if claimed:  # (a claimed ray is an opinion only where it verifies)
        infeasible, unbounded = verified_rays(P.detach(), q.detach(), A.detach(), b.detach(), layout,
                                              torch.from_numpy(rx).to(**to), torch.from_numpy(rz).to(**to))
        real = ((said == PRIMAL_INFEASIBLE) & infeasible) | ((said == DUAL_INFEASIBLE) & unbounded)
        said = torch.where((said == SOLVED) | (said == UNCONFIRMED) | real, said, NUMERICAL)
    return (*out, said)


def _solve(P: sp.csc_matrix, q: np.ndarray, A: np.ndarray, b: np.ndarray, cones: list,
           settings) -> tuple[str, np.ndarray, np.ndarray, np.ndarray] | None:
    """Clarabel's ``(status, x, s, z)`` on one program, ``None`` where it raised."""
    try:
        with solver_warnings_ignored():  # (catch_warnings is not thread-safe)
            sol = clarabel.DefaultSolver(P, q, sp.csc_matrix(A), b, cones, settings).solve()
    except BaseException as err:  # noqa: B036 (a Rust panic is a BaseException)
        if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        return None
    return str(sol.status), *(np.asarray(v, dtype=np.float64) for v in (sol.x, sol.s, sol.z))


def _finite(*vs: np.ndarray) -> bool:
    """Whether every entry of ``vs`` is finite."""
    return all(np.isfinite(v).all() for v in vs)


def _outside(A: np.ndarray, layout: ConeLayout, d: np.ndarray) -> np.ndarray:
    """``(m,)``: how far :math:`-A_i d` lies outside K, row by row (zero rows :math:`|A_i d|`,
    nonnegative rows :math:`(A_i d)_+`, a second-order cone's rows its :math:`(\\|u\\| - t)_+`
    for :math:`-A d = (t, u)`), 0 within rounding: of the row's terms, or of the row at the
    ray's scale (:math:`\\|A_i\\|_\\infty \\|d\\|_\\infty`: a least squares' projection leaves
    1e-35 on a row whose support d meets only in that noise, whose terms then say 1e-48)."""
    w = -(A @ d)
    c0 = layout.zero + layout.nonneg
    parts = [np.abs(w[:layout.zero]), np.maximum(-w[layout.zero:c0], 0.0)]
    for k in layout.soc:
        parts.append(np.full(k, max(np.linalg.norm(w[c0 + 1:c0 + k]) - w[c0], 0.0)))
        c0 += k
    e = np.concatenate(parts)
    rows = np.abs(A).max(axis=1, initial=0.0)  # (0 on a program without columns)
    scale = np.maximum(np.abs(A) @ np.abs(d), rows * np.max(np.abs(d), initial=0.0))
    return np.where(e <= 64 * _EPS * scale, 0.0, e)


def _exact_part(A: np.ndarray, P: np.ndarray, q: np.ndarray, layout: ConeLayout, d: np.ndarray) -> bool:
    """Whether the ray ``d`` (normalised), made exact on the zero and nonnegative rows it
    nearly meets (:math:`|A_i d|` within 1e-6 of :math:`\\|A_i\\|_\\infty`) and on P (projected
    onto their null space, a least squares), is a ray to rounding: :math:`-Ad' \\in K` and
    :math:`Pd' = 0` to the rounding of their terms, :math:`q^T d' < 0`. A solver's ray of an
    unbounded program along an open slab carries its tolerance across the slab's rows
    (parallel exactly); along a slab that closes (rows parallel to 1e-8) nothing is left."""
    c0 = layout.zero + layout.nonneg
    rows = np.abs(A).max(axis=1, initial=0.0)
    near = np.zeros(A.shape[0], dtype=bool)
    near[:c0] = np.abs(A[:c0] @ d) <= 1e-6 * rows[:c0]
    M = np.concatenate([A[near], P])
    if M.size:
        d = d - np.linalg.lstsq(M, M @ d, rcond=None)[0]
    top = np.max(np.abs(d))
    if not top > 0:
        return False
    d = d / top
    flat = np.all(np.abs(P @ d) <= 64 * _EPS * (np.abs(P) @ np.abs(d)))
    return bool(flat and not np.any(_outside(A, layout, d) > 0) and float(q @ d) < 0)


def _row_reach(A: np.ndarray, P: np.ndarray, q: np.ndarray, layout: ConeLayout, ray: np.ndarray) -> np.ndarray | None:
    """The row scaling at which to solve again a program claimed unbounded along ``ray``,
    or ``None`` where the ray is exact, or has an exact part (:func:`_exact_part`): no row
    limits its reach.

    With :math:`d` the ray normalised and :math:`e_i` how far :math:`-A_i d` lies outside K
    (:func:`_outside`), any dual point :math:`y \\in K^*` with residual :math:`r = A^T y + q`
    has :math:`q^T d \\ge r^T d - y^T e`, so the ray excludes only the dual points with
    :math:`|y_i| < R_i = |q^T d| / e_i` on some row. The rows within a factor 10 of the
    least reach are scaled by it, the others by 1 (a cone's rows alike: D keeps K).
    """
    top = np.max(np.abs(ray))
    if not top > 0:
        return None
    d = ray / top
    e = _outside(A, layout, d)
    if not np.any(e > 0) or _exact_part(A, P, q, layout, d):
        return None
    with np.errstate(divide="ignore"):
        reach = abs(float(q @ d)) / e
    return np.where(reach <= 10 * reach.min(), reach, 1.0) if reach.min() > 0 else None


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
                       where: tuple[Sequence[int], tuple[int, ...]], per_element_next: bool = False
                       ) -> tuple[list[torch.Tensor], dict]:
    """The batched iterations on ``flat`` (one tensor per parameter, batched along dim 0;
    ``where``: the elements' flat positions in the caller's batch and its shape), then a
    second opinion on what they do not certify: Clarabel on the same program, P kept, its
    points polished, checked and differentiated by the batched path.

    ``per_element_next``: the caller solves what stays unsettled per element next (not in forward
    mode, nor for a program the per-element path cannot take); then an element flagged
    :data:`~.measures.DEGENERATE` skips the retries below and goes there at once, and the batched
    attempts stop their active-set steps where these cycle at such a vertex (no certificate there).

    Returns:
        ``(solutions, info)``: the variables' tensors, and per element lists ``backend``,
        ``solvers``, ``statuses``, ``residuals``, ``solved``, ``kinds`` and ``points``
        (the batched checks' bits, kept through merges).
    """
    sols, binfo = program(*flat, where=where, per_element_next=per_element_next)
    sols, n = list(sols), len(binfo.status)
    statuses, solved = binfo.status_names(), binfo.solved.tolist()
    info = {"backend": ["batched"] * n, "solvers": ["batched"] * n, "statuses": statuses,
            "residuals": binfo.residual.tolist(), "solved": solved,
            "kinds": ["solved" if ok else status_kind(st) for ok, st in zip(solved, statuses)],
            "points": binfo.points.tolist()}  # (not an INFO_KEYS entry: kept through merges)

    def retry(redo: list[int], solver: str, **options) -> tuple[list[bool], Any]:
        """The elements ``redo`` through ``program`` again with ``options``, merged where
        they are solved now; returns which were, and the call's info."""
        fixed, finfo = program(*element_subset(parameters, flat, redo), where=([where[0][i] for i in redo], where[1]),
                               per_element_next=per_element_next, **options)
        for i, bits in zip(redo, finfo.points.tolist()):
            info["points"][i] |= bits
        took = finfo.solved.tolist()
        part = {"backend": ["batched"] * len(redo), "solvers": [solver] * len(redo),
                "statuses": finfo.status_names(), "residuals": finfo.residual.tolist(),
                "solved": took, "kinds": ["solved"] * len(redo)}
        merge_resolved(sols, info, redo, fixed, part, take=took)
        return took, finfo

    redo = unsettled(info)
    # A degenerate vertex whose error no estimate reached (DEGENERATE): the iterations again and
    # Clarabel's point nearly always end at the same vertex, each after the same failed polishes
    # and active-set steps (a 15 × 15 assignment LP at batch 8: three attempts, 42 LU
    # factorisations, 20× the per-element path), so where that path comes next they go there at
    # once. Only there: the retries did certify 3 of 159 such elements of small assignment LPs,
    # which forward mode (batched only) then differentiates.
    stuck = [i for i in redo if info["points"][i] & DEGENERATE] if per_element_next else []
    for i in stuck:
        info["statuses"][i] += f" ({DEGENERATE_WHY})"
    redo = [i for i in redo if i not in stuck]
    if redo:
        # First the iterations again, on until every pair is decided in its own units (.pairs):
        # a constraint far below the program's scale met tol undecided (a ball of radius 1e-7
        # around a centre of size 10: the centre came back, and from Clarabel's point too).
        # Not for a certificate: its iterations would end in it again (Clarabel weighs it below).
        failed = [i for i in redo if info["kinds"][i] == "other"]
        if failed:
            took, _ = retry(failed, "batched", decide_pairs=True)
            now = {i for i, ok in zip(failed, took) if ok}
            redo = [i for i in redo if i not in now]
    if redo:
        # (Refused under torch.func, which cannot run its numpy: the refusal names the elements and
        # what the iterations said of them, e.g. an infeasible one in a mixed batch.)
        said = "; ".join(f"{e}: {info['statuses'][i]}" for e, i in zip(element_list(where, redo[:4]), redo[:4]))
        refuse_transforms(f"ConvexLayer: Clarabel's second look at {name_elements(where, redo)}, which the batched "
                          f"iterations did not certify ({said}{'; ...' if len(redo) > 4 else ''})",
                          "it solves in numpy")
        _, finfo = retry(redo, "Clarabel (batched form)", second_opinion=True)
        # A verdict of the iterations is weighed against the second opinion: what the
        # checked point shows, then what Clarabel claims.
        doubt_certificates(info, redo, [info["points"][i] for i in redo])
        weigh_unbounded(info, redo, finfo.opinion.tolist())
    return sols, info


def unsettled(info: dict) -> list[int]:
    """The elements of ``info`` (:func:`solve_with_opinion`'s) that another solver may still
    decide: not solved, and not unbounded along a ray exact to rounding (``EXACT_RAY``:
    p @ x + ||x||_1 at p0 = -1 - 1e-9, whose cost falls by 1e-9 per unit along (1, 0); SCS
    from Clarabel's point came back 'solved' at x0 = 1.6e-7, accepted with a warning)."""
    exact, decided = STATUS_NAMES[EXACT_RAY], STATUS_NAMES[INCONSISTENT]  # (the latter: an exact certificate)
    return [i for i, (ok, st) in enumerate(zip(info["solved"], info["statuses"]))
            if not ok and st != exact and not st.startswith(decided)]


def weigh_unbounded(info: dict, idx: Sequence[int], opinions: Sequence[int]) -> None:
    """Elements ``idx`` the batched iterations left unsolved as unbounded, weighed against
    Clarabel's ``opinions`` on the same program (:func:`clarabel_points`' codes, in the
    order of ``idx``), in place, as :func:`~.dissent.believed` weighs the per-element
    solvers' claims.

    A verified ray :math:`d` (:math:`-Ad + e \\in K`, :math:`e` within the test's relative
    tolerance) proves less than it seems: for any dual point :math:`y \\in K^*` with residual
    :math:`r = A^T y + q`, :math:`q^T d = r^T d + y^T(-Ad)`, so it excludes only the dual points
    with :math:`\\|y\\|_1 < |q^T d| / \\|e\\|_\\infty`. Two nearly parallel, opposite rows
    (a slab closing at 2e7, parallel to 1e-8) let an O(10) LP's ray verify at 1e-6, while its
    multipliers are ~1e8: the bounded LP was reported unbounded (UnboundedError). So the
    claim stands where Clarabel claims it too with a ray that verifies, says nothing (it
    failed) or reports a solution whose point failed the check; it falls (kind "other",
    the status saying why) where Clarabel claims it infeasible (its ray verified; a ray of
    each kind proves neither) or does not confirm it at its ray's reach. (A dual feasible
    point the second opinion reached is weighed before, by
    :func:`~.status.doubt_certificates`.)
    """
    for i, said in zip(idx, opinions):
        if info["solved"][i] or info["kinds"][i] != "unbounded":
            continue
        # (Not where Clarabel reports it solved: that point failed the check, or the element
        # would be solved -- x0 = -3.2e26 on an exactly unbounded LP, "Solved" at a scale.)
        if said == UNCONFIRMED:
            seen = "Clarabel, solving it again at its ray's reach (rows scaled), does not confirm it"
        elif said == PRIMAL_INFEASIBLE:
            seen = "Clarabel on the same program claims it infeasible (ray verified)"
        else:
            continue
        demote(info, i, f"{seen}: unbounded not certain (the data may be badly scaled or the solution very large)")
