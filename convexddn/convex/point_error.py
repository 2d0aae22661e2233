"""The forward error of a per-element point, coordinate by coordinate, for the kink test.

A point :math:`z = (x, y - s, 1)` of :class:`~.cone.ResidualMap` is off the solution
:math:`z^*` by about :math:`M^+ R(z)` (:math:`M` the residual map's derivative at ``z``,
:math:`M^+` its minimum-norm inverse: ``M`` is singular along ``z``). Its KKT residual does
not bound that in a row: :func:`~.cone_checks.kkt_residual` discounts 64 rounding levels of
each row's terms, and :math:`M^+` amplifies what is left by the program's conditioning. A
Clarabel point of a QP at n = 100 with 200 rows, its residual 0 by that measure, had
:math:`\\|R(z)\\|_\\infty` 1.8e-12 and a weakly active row's slack at 9.1e-12 (exactly 0 at
the solution), 8 times the tolerance its residual gave (:func:`~.kinks.pair_tolerances`):
"inactive", and the one-sided gradient came back without a warning.

The estimate is two solves with ``M``'s factorisation (one call where it is dense):

- the Newton step :math:`M^+ R(z)`, the error the residual shows (on that point: 9.11e-12
  in the row, 9.14e-12 measured against the exact solution);
- :math:`M^+ (g \\circ e)`, :math:`e = \\epsilon (|Q|\\,|\\Pi(z)| + |z|)` the rounding envelope
  of :math:`R`'s evaluation and :math:`g` a fixed standard normal vector: a typical error
  the residual cannot show (it is below its own rounding there).

Their magnitudes add, coordinate by coordinate.
"""
from __future__ import annotations

import numpy as np

from .bordered import Bordered
from .iterative import iterative_solve
from .min_norm import min_norm_solve

__all__ = ["point_error"]


def point_error(M, Q, z: np.ndarray, pi_z: np.ndarray, residual: np.ndarray, rtol: float,
                lsqr: bool = False) -> np.ndarray | None:
    """``(N,)`` the estimated error of each coordinate of ``z`` (module docstring), or None where a
    solve fails or is not finite.

    ``M``: the derivative at ``z`` as :class:`~.cone.ResidualMap` forms it (a dense ``(N, N)`` array,
    a :class:`~.bordered.Bordered` LU or an operator for LSMR, LSQR where ``lsqr``); ``Q`` the
    sparse skew data matrix; ``pi_z`` :math:`\\Pi(z)`; ``residual`` :math:`R(z)` ``(N,)``;
    ``rtol`` the dense solve's rank cut (:func:`~.min_norm.min_norm_solve`)."""
    envelope = np.finfo(np.float64).eps * (abs(Q) @ np.abs(pi_z) + np.abs(z))
    # (fixed seed: the same verdict on every call)
    rhs = np.column_stack([residual, np.random.default_rng(0).standard_normal(z.size) * envelope])
    try:
        if isinstance(M, np.ndarray):
            d = min_norm_solve(M, rhs, rtol)[0]
        elif isinstance(M, Bordered):
            d = np.column_stack([M.solve(col)[0] for col in rhs.T])
        else:
            d = np.column_stack([iterative_solve(M, col, False, lsqr)[0] for col in rhs.T])
    except (ValueError, RuntimeError, ArithmeticError):
        return None
    err = np.abs(d).sum(1)
    return err if np.all(np.isfinite(err)) else None
