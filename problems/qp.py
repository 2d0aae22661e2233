"""Dense quadratic programs (the OptNet layer, Amos & Kolter, ICML 2017)."""
from __future__ import annotations

from typing import Any

import cvxpy as cp
import numpy as np

from convexddn._checks import check_int
from convexddn.errors import OptionError
from convexddn.convex.registry import register

QP_DATA = ("L", "q", "G", "h", "A", "b")


def _fixed(name: str, value: Any, shape: tuple[int, ...], default: np.ndarray | None) -> np.ndarray:
    if value is None:
        if default is None:
            raise OptionError(
                f"{name} is not learned (not in `learn`), so a fixed value of shape {shape} "
                f"must be given as option {name}=...")
        return default
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise OptionError(f"option {name} must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise OptionError(f"option {name} must be finite")
    return arr


@register("qp", "dense QP: argmin_u ½‖Lᵀu‖² + ridge/2‖u‖² + qᵀu s.t. Gu ≤ h, Au = b")
def qp(n: int, n_ineq: int = 0, n_eq: int = 0, learn: str | tuple = ("L", "q", "G", "h", "A", "b"),
       ridge: float = 0.0, rank: int | None = None, L: Any = None, q: Any = None,
       G: Any = None, h: Any = None, A: Any = None, b: Any = None):
    """.. math::

        y = \\operatorname*{argmin}_u \\tfrac12\\|L^T u\\|^2 + \\tfrac{\\rho}{2}\\|u\\|^2 + q^T u
        \\quad\\text{s.t.}\\quad G u \\le h,\\; A u = b

    Args:
        n: number of variables. n_ineq, n_eq: number of inequality / equality rows.
        learn: which of L, q, G, h, A, b are parameters (a tuple of names or a string
            such as ``"Lqh"``); the others are constants given as options. Data of an
            empty block (n_ineq or n_eq = 0) is dropped. Every choice is DPP.
        ridge: ρ ≥ 0; ρ > 0 makes the problem strictly convex.
        rank: columns of L (default n).
        L, q, G, h, A, b: fixed values of the blocks not learned (defaults: L = I, q = 0).

    Parameters (in order): the learned blocks among L (n, rank), q (n,), G (n_ineq, n),
    h (n_ineq,), A (n_eq, n), b (n_eq,). Variable: ``y`` of shape ``(n,)``.
    """
    n = check_int("n", n, minimum=1)
    n_ineq = check_int("n_ineq", n_ineq, minimum=0)
    n_eq = check_int("n_eq", n_eq, minimum=0)
    rank = n if rank is None else check_int("rank", rank, minimum=1)
    learned = tuple(learn)  # a string such as "Lqh" splits into its letters
    bad = [k for k in learned if k not in QP_DATA]
    if bad:
        raise OptionError(f"learn must name blocks among {list(QP_DATA)}, got {bad}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise OptionError(f"ridge must be a number >= 0, got {ridge!r}")
    shapes = {"L": (n, rank), "q": (n,), "G": (n_ineq, n), "h": (n_ineq,), "A": (n_eq, n), "b": (n_eq,)}
    defaults = {"L": np.eye(n, rank), "q": np.zeros(n)}
    given = {"L": L, "q": q, "G": G, "h": h, "A": A, "b": b}
    active = [k for k in QP_DATA if not (k in "Gh" and n_ineq == 0) and not (k in "Ab" and n_eq == 0)]
    data, params = {}, []
    for k in active:
        if k in learned:
            data[k] = cp.Parameter(shapes[k], name=k)
            params.append(data[k])
        else:
            data[k] = _fixed(k, given[k], shapes[k], defaults.get(k))
    y = cp.Variable(n, name="y")
    objective = 0.5 * cp.sum_squares(data["L"].T @ y) + data["q"] @ y
    if ridge > 0:
        objective = objective + 0.5 * float(ridge) * cp.sum_squares(y)
    constraints = []
    if n_ineq:
        constraints.append(data["G"] @ y <= data["h"])
    if n_eq:
        constraints.append(data["A"] @ y == data["b"])
    return cp.Problem(cp.Minimize(objective), constraints), params, [y]
