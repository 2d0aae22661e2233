"""A per-element cone program solved again in its own unit, where its first solve failed.

The program ``min cᵀx s.t. Ax + s = b, s ∈ K`` is the same, point for point, as

.. math::

    \\min_{x'} (c/\\gamma)^T x' \\quad \\text{s.t.}\\quad A x' + s' = b/\\beta,\\; s' \\in K,
    \\qquad x = \\beta x',\\; s = \\beta s',\\; y = \\gamma y'

for any β, γ > 0 (each cone is closed under positive scaling; ``A`` is untouched). Powers of
two make the change exact in floating point. Why it matters: the Newton polish and the adjoint
(:class:`~.cone.ResidualMap`) project ``v = y − s`` onto K*, and diffcp's second-order-cone
projection returns ``v`` unchanged within ``1e-5`` (relative) of the cone's boundary, so
where ``‖s‖ ≪ ‖y‖`` the slack is lost: the projection onto the PSD cone written
``cp.norm(X - M, 'fro')`` with ``M`` of 1e-6 (``s`` ~1e-6, ``y`` ~1) came back from Clarabel at
KKT residual 1.7e-12 and left the polish at 0.34, on every element. Clarabel's own tolerances
and equilibration have the same blind spot on the other side: with ``cp.sum_squares(X - M)``
and ``M`` of 1e6 (``s`` and ``y`` ~1e12 beside CVXPY's epigraph constants 1) it ended in
"Failure"; in the unit β = γ ≈ ‖b‖∞ the same solver solves it to 4e-16.

:func:`units` proposes the units, :func:`retry_in_unit` solves there, and
:class:`UnitProgram` gives the solution's adjoint back in the caller's units. An element
whose first solve succeeded is not touched (no cost on well-scaled data).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import scipy.sparse as sp
from diffcp import cones as cone_lib

from .cone import ResidualMap
from .cone_checks import cone_blocks, kkt_residual
from .diffcp_solve import inf_norm, pow2_above
from .parametric import Parametric

__all__ = ["IMBALANCE", "UnitProgram", "imbalance", "in_unit", "retry_in_unit", "try_in_unit", "units", "within_unit"]


#: ``‖y‖∞ / ‖s‖∞`` over the curved cones' rows beyond which a solved element is solved again in its own
#: unit: diffcp's band is 1e-5 relative, and the PSD projection of the norm form at data of 1e8 (ratio 1e-8)
#: passed the check 8e-8 off with a gradient off by 2.6, at 1e6 (1e-6) 4e-8 off in its gradient.
IMBALANCE = 1e3
#: A unit closer than 2^_MIN_SHIFT to (1, 1) in β and γ is the same program to the solver (its
#: tolerances and equilibration see the same sizes): a 1.5-entmax of 100 scores, failed by Clarabel
#: and certified to 2e-15 by the later rescues, was accepted in the unit (2, 1) at a residual of
#: 3e-8, 1.2e-8 off.
_MIN_SHIFT = 4


def imbalance(cones: list, y: np.ndarray, s: np.ndarray) -> float:
    """``‖y‖∞ / ‖s‖∞`` over the rows of the curved cones (second-order, PSD, exponential, power:
    those whose projection of ``y − s`` mixes both); 1 where there are none, or either is 0 there
    (complementary, a polyhedral row has one of the two at 0 by itself)."""
    rows = [np.arange(at, at + q) for kind, at, q in cone_blocks(cones) if kind not in (cone_lib.ZERO, cone_lib.POS)]
    if not rows:
        return 1.0
    idx = np.concatenate(rows)
    ny, ns = inf_norm(y[idx]), inf_norm(s[idx])
    return ny / ns if ny > 0 and ns > 0 and np.isfinite(ny / ns) else 1.0


def within_unit(cones: list, x: np.ndarray, y: np.ndarray, s: np.ndarray) -> bool:
    """Whether a solved point's multipliers and slacks are within :data:`IMBALANCE` of each other."""
    return 1.0 / IMBALANCE <= imbalance(cones, y, s) <= IMBALANCE


def units(A: sp.csc_matrix, b: np.ndarray, x: np.ndarray | None, y: np.ndarray | None,
          cones: list) -> list[tuple[float, float]]:
    """Candidate units ``(β, γ)`` of the program ``(A, b, ·)`` given a failed solve's point ``(x, y)``
    (its solver's own, before any polish; ``None`` where it gave none), most likely first.

    1. β from the data, ``‖b‖∞``, and γ so that the point's multipliers come out as large as its
       slacks, ``γ = β ‖y‖∞ / ‖s‖∞`` with ``s = b − Ax`` (:func:`imbalance`): the polish projects
       ``y − s``, which needs both in one unit (and where the point has none, ``γ = β``).
    2. The point's own unit, β from ``max(‖x‖∞, ‖s‖∞)``, γ from ``‖y‖∞`` (a program whose
       ``b`` holds constants beside its data: its size does not follow them).

    Units within a factor 2^:data:`_MIN_SHIFT` of ``(1, 1)`` in both, repeats of an earlier one, and
    units that are not finite and positive are left out.
    """
    out: list[tuple[float, float]] = []

    def add(beta: float, gamma: float) -> None:
        if all(np.isfinite(v) and v > 0 for v in (beta, gamma)):
            unit = (pow2_above(beta), pow2_above(gamma))
            if max(abs(np.log2(unit[0])), abs(np.log2(unit[1]))) >= _MIN_SHIFT and unit not in out:
                out.append(unit)

    nb = inf_norm(b)
    usable = x is not None and y is not None and np.all(np.isfinite(x)) and np.all(np.isfinite(y))
    s = b - A @ x if usable else None
    if nb > 0:
        add(nb, nb * (imbalance(cones, y, s) if usable else 1.0))
    if usable:
        add(max(inf_norm(x), inf_norm(s)), inf_norm(y))
    return out


def scaled_parametric(par: Parametric | None, n_a: int, beta: float, gamma: float) -> Parametric | None:
    """``par`` (how θ moves ``A``'s entries, then ``b``'s, and ``c``) for the program ``(A, b/β, c/γ)``."""
    if par is None:
        return None
    rows = np.ones(par.ab_map.shape[0])
    rows[n_a:] = 1.0 / beta
    return dataclasses.replace(par, ab_map=sp.csr_matrix(sp.diags(rows) @ par.ab_map), c_map=par.c_map / gamma)


class UnitProgram:
    """A :class:`~.cone.ResidualMap` of the program in the unit ``(β, γ)`` (see the module),
    seen from the caller's units: :meth:`adjoint` takes and returns those; the attributes the
    backward reads (``degenerate``, ``zero_row``, ``inaccurate``, ``condition``) are the inner map's."""

    def __init__(self, inner: Any, beta: float, gamma: float) -> None:
        self.inner, self.beta, self.gamma = inner, beta, gamma

    @property
    def unit(self) -> tuple[float, float]:
        return self.beta, self.gamma

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # (not yet set: unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def adjoint(self, x: np.ndarray, y: np.ndarray, s: np.ndarray, parametric: Parametric | None = None):
        """The caller's map ``(dx, dy, rows, cols) -> (dA, db, dc)``. With ``x = βx'(A, b/β, c/γ)``
        and ``y = γy'(…)`` (β, γ constants: the identity holds for every ``b``, ``c``), the cotangents
        of ``x'``, ``y'`` are ``β dx``, ``γ dy``, and the gradients ``dA = dA'``, ``db = db'/β``, ``dc = dc'/γ``."""
        beta, gamma = self.beta, self.gamma
        n_a = len(parametric.rows) if parametric is not None else 0
        inner = self.inner.adjoint(x / beta, y / gamma, s / beta, scaled_parametric(parametric, n_a, beta, gamma))

        def vjp(dx: np.ndarray, dy: np.ndarray, rows: np.ndarray, cols: np.ndarray):
            dA, db, dc = inner(beta * dx, gamma * dy, rows, cols)
            return dA, db / beta, dc / gamma

        return vjp


def in_unit(backend: Any, A: sp.csc_matrix, b: np.ndarray, c: np.ndarray, unit: tuple[float, float] | None):
    """The backend's residual map of ``(A, b, c)``, in the unit ``(β, γ)`` where one is given
    (a :class:`UnitProgram`: a worker's solution, differentiated in this process)."""
    beta, gamma = unit if unit is not None else (1.0, 1.0)
    program = ResidualMap(A, b / beta, c / gamma, backend._cones, backend._cones_cpp, backend._mode, backend._colours)
    return program if unit is None else UnitProgram(program, beta, gamma)


def retry_in_unit(backend: Any, method: str, args: dict[str, Any], A: sp.csc_matrix, b: np.ndarray, c: np.ndarray,
                  point: tuple | None) -> tuple | None:
    """``backend._try``'s solution of ``(A, b, c)`` solved by ``method`` in the first of
    :func:`units` where it passes, point and program in the caller's units (the residual: the
    larger of the unit's and the caller's, both must pass), or ``None`` where none does.
    ``point``: the first solve's ``(x, y)``, or a failed run's ``(status, x, y)``."""
    x0, y0 = point[-2:] if point is not None else (None, None)
    for beta, gamma in units(A, b, x0, y0, backend._cones):
        out, _ = backend._try(method, args, A, b / beta, c / gamma)
        if out is None:
            continue
        program, x, y, s, status, r, used, rescued = out
        x, y, s = beta * x, gamma * y, beta * s
        mine = kkt_residual(A, b, c, backend._cones, x, y, s, own_scale=True)
        if not max(r, mine) <= backend.tol:
            continue
        status = f"{status} (solved again in its own unit: b/{beta:.0e}, c/{gamma:.0e})"
        return UnitProgram(program, beta, gamma), x, y, s, status, max(r, mine), used, rescued
    return None


def try_in_unit(backend: Any, method: str, args: dict[str, Any], A: sp.csc_matrix, b: np.ndarray,
                c: np.ndarray) -> tuple[tuple | None, tuple | None]:
    """``backend._try(method, ...)``, and where it failed without a verified certificate, or solved
    with multipliers and slacks far apart (:func:`within_unit`), the same solver in its own unit
    (:func:`retry_in_unit`, from its point): ``(out, fail)`` as ``_try`` returns them (``fail`` the
    first run's where the retry solved it)."""
    out, fail = backend._try(method, args, A, b, c)
    if out is None and fail[1] == "other" or out is not None and not within_unit(backend._cones, *out[1:4]):
        point = out[1:3] if out else fail[3] and fail[3].points[0]
        out = retry_in_unit(backend, method, args, A, b, c, point) or out
    return out, fail
