"""Spread over seeds: mean, standard deviation, 95 % intervals and paired differences.

Every experiment repeats its whole protocol (data, initialisation, batch order,
corruption) once per seed, and every variant of one seed sees the same data. A
variant's result is summarised by the mean and the sample standard deviation over
seeds, and two variants are compared *paired* by seed: the 95 % Student-t interval of
the per-seed differences. A difference "exceeds the spread" when that interval
excludes zero. With three seeds the t quantile is 4.30, so only consistent
differences qualify; that is the intended, conservative reading.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from ..errors import DTypeError, NonFiniteError, ShapeError

__all__ = ["t_quantile_975", "summarize", "paired_difference", "format_mean_std"]


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (two-sided 95 %)."""
    from scipy.stats import t  # scipy is a dependency; imported late, it is slow to load

    return float(t.ppf(0.975, df))


def _finite(name: str, values: Sequence[float]) -> list[float]:
    """``values`` as floats; ``DTypeError`` for a value that is not a real number,
    ``NonFiniteError`` for NaN or ±Inf (naming ``name`` and the index)."""
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise DTypeError(f"{name}[{i}] must be a real number, got {v!r} ({type(v).__name__})")
        v = float(v)
        if not math.isfinite(v):
            raise NonFiniteError(f"{name}[{i}] must be finite, got {v!r}")
        out.append(v)
    return out


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and 95 % half-width of the mean over seeds.

    .. math::

        \\bar v = \\frac1n \\sum_i v_i, \\qquad
        s = \\sqrt{\\tfrac{1}{n-1} \\sum_i (v_i - \\bar v)^2}, \\qquad
        h_{95} = t_{0.975,\\,n-1}\\, s / \\sqrt n .

    Returns:
        ``{"mean", "std", "ci95", "n"}``; with one value ``std`` is 0 and ``ci95`` is
        ``None`` (no interval from one sample).

    Raises:
        DTypeError: a value that is not a real number. NonFiniteError: NaN or ±Inf (a
            NaN seed gave a NaN mean, which the reports printed as a figure).
    """
    vals = _finite("values", values)
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci95": None, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return {"mean": mean, "std": std, "ci95": t_quantile_975(n - 1) * std / math.sqrt(n), "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Compare two variants seed by seed: summary of ``a_i - b_i`` and whether it is real.

    Returns:
        :func:`summarize` of the differences plus ``"exceeds_spread"``: ``True`` when
        the 95 % interval ``mean ± ci95`` excludes 0, ``False`` when it contains 0,
        ``None`` with fewer than two seeds or when every seed gives the same nonzero
        difference (no spread to judge by: a zero-width interval would call any difference
        real, e.g. two seeds each one test cloud apart); ``False`` when every difference is 0.

    Raises:
        ShapeError: if ``a`` and ``b`` differ in length (they must be paired by seed).
        DTypeError, NonFiniteError: as :func:`summarize`, naming ``a`` or ``b`` (a NaN
            seed made ``exceeds_spread`` False, printed as "within the spread").
    """
    if len(a) != len(b):
        raise ShapeError(f"paired_difference: a and b must be paired by seed (equal lengths), "
                         f"got {len(a)} and {len(b)} values")
    a, b = _finite("a", a), _finite("b", b)
    s = summarize([x - y for x, y in zip(a, b)])
    # "The same difference" up to rounding: accuracies are fractions k / n, whose
    # differences agree only to ~1e-16.
    flat = s["ci95"] is not None and s["std"] <= 1e-12 * (1.0 + abs(s["mean"]))
    if flat and abs(s["mean"]) <= 1e-12:
        s["exceeds_spread"] = False  # no difference at all: nothing to exceed
    elif s["ci95"] is None or flat:
        s["exceeds_spread"] = None
    else:
        s["exceeds_spread"] = abs(s["mean"]) > s["ci95"]
    return s


def format_mean_std(summary: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """``"83.0 ± 1.2"`` from a :func:`summarize` dict (scaled, e.g. fractions to %)."""
    if summary["mean"] is None:
        return "–"
    mean = scale * summary["mean"]
    if summary["n"] < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * summary['std']:.{digits}f}"
