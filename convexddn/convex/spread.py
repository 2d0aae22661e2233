"""Which per-element results are in doubt: the residual check of a per-element solve does
not bound its error on badly scaled data, nor after a polish left above rounding level.

:func:`in_doubt` picks them for the batched path's second opinion (equilibrated, with an
error estimate; :meth:`~.layer.ConvexLayer.forward`); :func:`warn_unchecked_spread` says
where none could be had.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp

from .._warn import warn
from ..errors import SolverWarning
from .cone import ILL_CONDITIONED, POLISH_ABOVE
from .status import element_list, name_elements

__all__ = ["HINT_SPREAD", "SPREAD_DOUBT", "data_spread", "in_doubt", "scale_hint", "warn_unchecked",
           "warn_unchecked_spread", "warn_unconfirmed"]

#: Data spread (see :func:`data_spread`) above which a per-element result is in doubt:
#: the solvers were exact at 1e10 and wrong at 1e12 on min (a x - 1)^2.
SPREAD_DOUBT = 1e10


#: A failed element whose data's nonzero magnitudes span more than this is named badly scaled in its
#: status (and so in the SolverError): a log barrier with a constraint row of 1e8 beside b = 1 failed
#: with Clarabel and SCS, and the error did not say so.
HINT_SPREAD = 1e6


def scale_hint(status: str, kind: str, A: sp.csc_matrix, b: np.ndarray, c: np.ndarray) -> str:
    """``status`` of a failed element, with "the data may be badly scaled" and its spread
    (:func:`data_spread`) appended where it failed without a certificate (``kind`` "other") and
    that spread exceeds :data:`HINT_SPREAD`, unless it says so already."""
    if kind != "other" or "badly scaled" in status:
        return status
    spread = data_spread(A, b, c)
    return status if not spread > HINT_SPREAD else (
        f"{status}; the data may be badly scaled (nonzero magnitudes spanning {spread:.0e})")


def data_spread(A: sp.csc_matrix, b: np.ndarray, c: np.ndarray) -> float:
    """Largest over smallest nonzero magnitude in one cone program's data ``[A | b]``, ``c``.

    The solvers' relative KKT residuals measure against ``1 + |b|``, ``1 + |c|``: beside
    data of unit size an entry of 1e-12 moves them by 1e-12 whatever the solution, so a
    residual check passes points that are far off (min (a x - 1)^2 with a = 1e-12: SCS
    and ECOS returned a x = 2e-16, Clarabel at a = 1e-18, each at residual 1e-12,
    "solved").
    """
    mags = np.abs(np.concatenate([A.data, b, c]))
    mags = mags[mags > 0]
    if not mags.size:
        return 1.0
    # (A subnormal smallest entry overflows the quotient: inf, the widest spread there is,
    # without numpy's RuntimeWarning reaching the caller.)
    with np.errstate(over="ignore"):
        return float(mags.max() / mags.min())


def in_doubt(info: dict, refine: int) -> tuple[list[int], list[bool]]:
    """``(doubt, wide)``: the per-element results in doubt, and which elements are solved
    on data spread over more than :data:`SPREAD_DOUBT` (``info``: the per-element path's
    lists ``solved``, ``residuals``, ``spreads``; ``refine``: its Newton steps).

    In doubt: not solved; left by the Newton polish above rounding level (on the
    second-order-cone form of a squared objective the solution error goes like the
    residual's square root: tests/convex/test_reliability.py's badly scaled QP came back
    4.9e-3 off at residual 2.4e-9, 6.6e4 off at 8.2e-7, and a bounded problem was called
    unbounded); polished along directions of condition above :data:`~.cone.ILL_CONDITIONED`
    (:func:`ill_conditioned`); or solved on wide data (:func:`data_spread`).
    """
    wide = [ok and r > SPREAD_DOUBT for ok, r in zip(info["solved"], info["spreads"])]
    ill = ill_conditioned(info)
    doubt = [i for i, (ok, r) in enumerate(zip(info["solved"], info["residuals"]))
             if not ok or (refine > 0 and r > POLISH_ABOVE) or wide[i] or ill[i]]
    return doubt, wide


def ill_conditioned(info: dict) -> list[bool]:
    """Which solved elements the polish solved along directions of condition above
    :data:`~.cone.ILL_CONDITIONED` (``info["conditions"]``)."""
    return [ok and c > ILL_CONDITIONED for ok, c in zip(info["solved"], info["conditions"])]


def warn_unchecked_spread(where: tuple[Sequence[int], tuple[int, ...]], idx: list[int],
                          spreads: Sequence[float]) -> None:
    """The SolverWarning for per-element results ``idx`` whose data spread over more than
    :data:`SPREAD_DOUBT` and that no batched form could check."""
    if idx:
        warn(
            f"ConvexLayer, {name_elements(where, idx)}: the data spans {max(spreads[i] for i in idx):.0e} "
            "(largest over smallest nonzero magnitude of the cone program's data), beyond which the "
            "per-element solvers' residual check does not bound the error (a result off by 100 % passed "
            "it), and no batched form could check it: rescale the problem's data nearer unit size",
            SolverWarning, elements=element_list(where, idx))


def warn_unconfirmed(where: tuple[Sequence[int], tuple[int, ...]], idx: list[int], residuals: Sequence[float],
                     batched_failed: bool, conditions: Sequence[float]) -> None:
    """The SolverWarning for per-element results ``idx`` left by the Newton polish above
    rounding that nothing confirmed: ``batched_failed``, the batched path tried them and
    did not certify them (ill-conditioned, or not converged: a least-squares fit with
    cond(A) = 1e4 beside a bound of 1e6 came back 2e-2 off at residual 5e-10, "solved"),
    else no batched form could check them. Those polished to rounding whose polish was
    ill-conditioned (``conditions``, see :func:`ill_conditioned`) are named for that."""
    why = "the batched path did not certify them" if batched_failed else "no batched form could check them"
    ill = [i for i in idx if residuals[i] <= POLISH_ABOVE and conditions[i] > ILL_CONDITIONED]
    if ill:
        warn(
            f"ConvexLayer, {name_elements(where, ill)}: the per-element solver's result is polished to rounding "
            f"level, but along directions whose condition reaches {max(conditions[i] for i in ill):.0e} (e.g. "
            f"nearly parallel active constraints, or data far from unit size: the cone program's constraints "
            f"include those CVXPY writes for norms and other atoms), where that residual does not bound the error "
            f"of the solution or its gradient, and {why}; rescale the data nearer unit size or reformulate the "
            f"problem, or check the result",
            SolverWarning, elements=element_list(where, ill))
    idx = [i for i in idx if i not in ill]
    if idx:
        warn(
            f"ConvexLayer, {name_elements(where, idx)}: the per-element solver's result passed its residual "
            f"check (up to {max(residuals[i] for i in idx):.1e}) but the Newton polish left it above rounding "
            f"level and {why}: on an ill-conditioned or badly scaled program that residual does not bound "
            "the error of the solution or its gradient; rescale the data nearer unit size or check the result",
            SolverWarning, elements=element_list(where, idx))


def warn_unchecked(where: tuple[Sequence[int], tuple[int, ...]], doubt: list[int], checked: list[int],
                   wide: list[bool], info: dict, batched_tried: bool) -> None:
    """The warnings for the per-element results ``doubt`` (:func:`in_doubt`) that the
    batched path did not confirm (``checked``: those it did; ``batched_tried``: it had a
    form for them): :func:`warn_unchecked_spread` for those on wide data, else
    :func:`warn_unconfirmed`, whether a batched form existed or not: a solved result is in
    doubt here only where the polish left it above :data:`~.cone.POLISH_ABOVE`. (Without a
    batched form that was warned about only above 1e-8, the floor of diffcp's
    exponential-cone projection, which the exact one of :mod:`.exp_cone` replaced; a point
    the polish could not improve then passed silently: ``-H(x) - qᵀx + λ‖x‖²`` at λ = 3e-10,
    residual 3e-10 = λ, the epigraph of ``‖x‖²`` left slack, gave d/dλ = 0.18 against −0.11.)"""
    confirmed = set(checked)
    unchecked = [i for i in doubt if i not in confirmed and info["solved"][i]]
    warn_unchecked_spread(where, [i for i in unchecked if wide[i]], info["spreads"])
    warn_unconfirmed(where, [i for i in unchecked if not wide[i]], info["residuals"], batched_tried,
                     info["conditions"])
