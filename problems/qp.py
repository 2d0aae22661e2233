"""Dense quadratic programs (the OptNet layer, Amos & Kolter, ICML 2017)."""
from __future__ import annotations

import decimal
import numbers
import reprlib
import sys
from typing import Any

import numpy as np

from convexddn._checks import check_dense, check_size
from convexddn._lazy import cvxpy as cp
from convexddn._lazy import torch
from convexddn.convex.registry import real_option, register
from convexddn.errors import OptionError

QP_DATA = ("L", "q", "G", "h", "A", "b")


def _blocks(option: str, value: Any) -> tuple[str, ...]:
    """``"Gh"``, ``("G", "h")`` or ``""`` -> the block names, checked."""
    if isinstance(value, str):
        names = tuple(value)  # "Lqh" splits into its letters
    elif isinstance(value, (tuple, list)) and all(isinstance(k, str) for k in value):
        names = tuple(value)
    else:
        raise OptionError(f"{option} must be a string such as 'Gh' or a tuple of block names, got {value!r}")
    bad = [k for k in names if k not in QP_DATA]
    if bad:
        raise OptionError(f"{option} must name blocks among {list(QP_DATA)}, got {bad}")
    twice = sorted({k for k in names if names.count(k) > 1}, key=QP_DATA.index)
    if twice:  # ("LL" for "Lh": a typo would otherwise drop the block meant)
        raise OptionError(f"{option} must name each block once, got {value!r} (twice or more: {twice})")
    return names


# The option giving the number of rows of each constraint block.
_ROWS = {"G": "n_ineq", "h": "n_ineq", "A": "n_eq", "b": "n_eq"}


def _fixed(name: str, value: Any, shape: tuple[int, ...], learned: bool = False) -> np.ndarray:
    """The value of block ``name`` as a float64 array of ``shape``: a constant of the
    problem, or the initial value of a learned block (``learned``)."""
    expected = f"an array of real numbers of shape {shape}"
    # A tensor implies torch is imported: no import here (building the problem needs none).
    torch_ = sys.modules.get("torch")
    if torch_ is not None and isinstance(value, torch_.Tensor):
        # A constant block is data of the CVXPY problem: no gradient can reach it, so a
        # tensor that requires grad is refused rather than detached, which would drop its
        # gradient silently (as real_option refuses tensors). A learned block's value only
        # initialises the layer's own nn.Parameter, which gets the gradient: detached.
        if value.requires_grad and not learned:
            raise OptionError(
                f"option {name} must be {expected} (a constant of the problem), got a tensor that "
                f"requires grad, whose gradient would be dropped; pass {name}.detach() for a constant, "
                f"learn='{name}' to learn it from this value, or inputs='{name}' to pass it at call time")
        check_dense(f"option {name}", value)  # .numpy() raised torch's own error for these
        if value.is_complex():
            raise OptionError(f"option {name} must be {expected}, got a complex tensor ({value.dtype}); "
                              "pass its real part if the imaginary part is zero")
        value = value.detach().to(device="cpu", dtype=torch_.float64).numpy()
    try:
        raw = np.asarray(value)
    # Ragged nesting (numpy names the broken level), or a list of tensors that require grad.
    except (TypeError, ValueError, RuntimeError) as err:
        raise OptionError(f"option {name} must be {expected}, got a {type(value).__name__} "
                          f"that is not one ({err})") from None
    # np.asarray(..., dtype=float64) dropped an imaginary part with a mere warning, and
    # raised its own ValueError / TypeError for strings and objects.
    if raw.dtype.kind == "c":
        raise OptionError(f"option {name} must be {expected}, got complex values ({raw.dtype}); "
                          "pass its real part if the imaginary part is zero")
    if raw.dtype.kind == "O":  # mixed entries ([1, None]) or one object: numbers are read
        # (decimal.Decimal is a number but not a numbers.Real; float() reads it exactly enough)
        bad = [v for v in raw.flat if not isinstance(v, (numbers.Real, decimal.Decimal))]
        if bad:
            raise OptionError(f"option {name} must be {expected}, got an entry {reprlib.repr(bad[0])} "
                              f"of type {type(bad[0]).__name__}")
    elif raw.dtype.kind not in "biuf":
        kind = {"U": "strings", "S": "bytes", "M": "datetimes", "m": "timedeltas"}.get(raw.dtype.kind,
                                                                                       str(raw.dtype))
        raise OptionError(f"option {name} must be {expected}, got {kind}: {reprlib.repr(value)}")
    arr = raw.astype(np.float64)
    if arr.shape != shape:
        hint = ""
        if name in _ROWS and arr.ndim == len(shape) and arr.shape[1:] == shape[1:]:
            # Only the number of rows differs: n_ineq / n_eq is the likelier mistake.
            rows = _ROWS[name]
            hint = f" ({name} has {arr.shape[0]} row(s) but {rows}={shape[0]}: pass {rows}={arr.shape[0]})"
        raise OptionError(f"option {name} must have shape {shape}, got {arr.shape}{hint}")
    if not np.all(np.isfinite(arr)):
        raise OptionError(f"option {name} must be finite")
    return arr


def _randn(*shape: int) -> np.ndarray:
    # torch's global generator, so that torch.manual_seed makes a model reproducible,
    # as it does for nn.Linear's initial weights.
    return torch.randn(*shape, dtype=torch.float64, device="cpu").numpy()  # host-side, whatever the default device


def _initial_values(n: int, rank: int, learned: tuple[str, ...], values: dict[str, np.ndarray],
                    shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Initial values of the learned blocks: given ones, else strictly feasible defaults.

    L = I and q = 0; A and G have N(0, 1/n) entries. A point z0 is drawn from N(0, I),
    moved onto {A z = b} when b is a constant and, when h is a constant, projected onto
    {G z <= h - t/2} where t = min(1 + max|h|, the largest margin max_z min(h - G z)) (an
    ``OptionError`` where t <= 0: the constant constraints admit no strictly feasible
    point); z0 = 0 when A, G or h is an input (the one point independent of data seen only
    at call time: A 0 = 0 and G 0 = 0 for every A, G), which needs a constant b = 0 and a
    constant h > 0 when A or G is an input (an ``OptionError`` otherwise). Then b = A z0 and
    h = G z0 + 1, so that z0 satisfies the equalities and, with a margin, the inequalities.
    A learned A or b needs A (constant or initial) of full row rank n_eq <= n (an
    ``OptionError`` otherwise): with dependent rows A y = b is consistent only on a set of
    measure zero, which rounding and gradient steps leave.
    """
    init: dict[str, np.ndarray] = {}
    for k, default in (("L", lambda: np.eye(n, rank)), ("q", lambda: np.zeros(n)),
                       ("A", lambda: _randn(*shapes["A"]) / np.sqrt(n)),
                       ("G", lambda: _randn(*shapes["G"]) / np.sqrt(n))):
        if k in learned:
            init[k] = values[k] if k in values else default()
    A, G = init.get("A", values.get("A")), init.get("G", values.get("G"))
    n_eq = shapes["A"][0]
    b = values["b"] if n_eq and "b" in values and "b" not in learned else None  # a constant b
    passed = [k for k in "AGh" if shapes[k][0] and k not in learned and k not in values]  # inputs
    if A is not None and any(k in learned for k in "Ab"):
        _independent_rows(A, learned)
    if any(k in passed for k in "AG") and any(k in learned for k in "AbGh"):
        _zero_start(values, learned, passed)
    z0 = _randn(n)  # drawn in every case: the same seed gives the other blocks the same values
    if passed:
        z0 = np.zeros(n)  # e.g. A comes at call time: z = 0 satisfies A z = b for b = 0
    elif shapes["h"][0] and "h" in values and "h" not in learned and any(k in learned for k in "AbG"):
        # A random z0 ignored the constant G z <= h: learned b = A z0 made the first call
        # infeasible (h = -1, say), although the promise is a strictly feasible start.
        z0 = _strictly_feasible(z0, G, values["h"], A if b is not None else None, b,
                                [k for k in learned if k in "AbG"])
    elif b is not None:
        z0 = _on_equalities(z0, A, b, learned)
    if "b" in learned:
        init["b"] = values["b"] if "b" in values else (A @ z0 if A is not None else np.zeros(n_eq))
    if "h" in learned:
        init["h"] = values["h"] if "h" in values else (G @ z0 if G is not None else 0.0) + np.ones(shapes["h"])
    return init


def _independent_rows(A: np.ndarray, learned: tuple[str, ...]) -> None:
    """An ``OptionError`` where A (a constant, or a learned A's initial value) has linearly
    dependent rows while A or b is learned: A y = b is then consistent only for b in A's
    range, a set of measure zero that rounding to the parameters' dtype (float32: b = A z0
    missed it by 1e-8, a SolverError at every first call) and each gradient step leave.
    n_eq > n rows are always dependent."""
    n_eq, n = A.shape
    rank = int(np.linalg.matrix_rank(A))
    if rank == n_eq:
        return
    blocks = [k for k in learned if k in "Ab"]
    if n_eq > n and "A" in learned:
        raise OptionError(
            f"n_eq={n_eq} equality rows in n={n} unknowns with learned block(s) {blocks}: the rows of A are "
            f"linearly dependent, so A y = b holds only for b in A's range, which the stored parameters "
            f"(rounded to their dtype) and every gradient step leave: calls would be infeasible; pass n_eq <= n")
    own = "the initial value of A" if "A" in learned else "the constant A"
    raise OptionError(
        f"{own} has rank {rank} < n_eq={n_eq} (linearly dependent rows) with learned block(s) {blocks}: "
        f"A y = b holds only for b in A's range, which the stored parameters (rounded to their dtype) and "
        f"every gradient step leave: calls would be infeasible; drop the dependent rows of A (and n_eq)")


def _zero_start(values: dict[str, np.ndarray], learned: tuple[str, ...], passed: list[str]) -> None:
    """An ``OptionError`` where the constants exclude the start z0 = 0 that an input A or G
    forces: z0 must satisfy A z0 = b and G z0 < h for values seen only at call time, and
    A 0 = 0, G 0 = 0 whatever A and G, so a constant b must be 0 and a constant h > 0.
    (h = -1 with learned G, inputs A, b: 6 fresh layers in 10 were infeasible at the first
    call; no learned value can help, the product with z0 = 0 being 0.)"""
    bad = []
    h_min = values["h"].min() if "h" in values and "h" not in learned and values["h"].size else None
    b_max = np.abs(values["b"]).max() if "b" in values and "b" not in learned and values["b"].size else None
    if h_min is not None and not h_min > 0:
        bad.append(f"the constant h has an entry {h_min:.3g} <= 0, so G 0 = 0 < h fails (pass h > 0, "
                   "learn h, started at G z0 + 1, or make h an input)")
    if b_max is not None and b_max > 0:
        bad.append(f"the constant b is not 0 (max|b| = {b_max:.3g}), so A 0 = b fails (pass "
                   "b = 0, learn b, started at A z0, or make b an input)")
    if bad:
        blocks = [k for k in learned if k in "AbGh"]
        raise OptionError(
            f"with {[k for k in passed if k in 'AG']} among inputs, the learned block(s) {blocks} start at z0 = 0 "
            f"(the one point meeting A z = 0 and G z = 0 whatever the inputs' values), but " + "; and ".join(bad)
            + ": z0 = 0 is infeasible whatever the inputs, and no other start is feasible for all of them")


def _on_equalities(z: np.ndarray, A: np.ndarray, b: np.ndarray, learned: tuple[str, ...] | list[str]) -> np.ndarray:
    """The point of {A y = b} nearest ``z`` (least squares); an ``OptionError`` naming A and b
    where A y = b has no solution and a constraint block is learned: its start would be
    infeasible (learned h = G z + 1 with A z != b failed at the first call, InfeasibleError)."""
    pinv = np.linalg.pinv(A)
    z = pinv @ b + z - pinv @ (A @ z)
    residual = float(np.abs(A @ z - b).max()) if b.size else 0.0
    # Rounding of pinv: a few eps of the terms' size (the point is otherwise exact).
    scale = np.abs(b).max() + np.abs(A).max() * np.abs(z).max() if b.size else 0.0
    blocks = [k for k in learned if k in "AGh"]
    if blocks and not residual <= 1e-9 * (1.0 + scale):
        own = "the constant A" if "A" not in learned else "the initial value of A (random unless given)"
        raise OptionError(
            f"the equalities A y = b have no solution (least-squares residual max|A y - b| = {residual:.3g}), "
            f"so the learned block(s) {blocks} cannot start feasible: every call would be infeasible; "
            f"check the constant b and {own}")
    return z


def _strictly_feasible(z: np.ndarray, G: np.ndarray, h: np.ndarray, A: np.ndarray | None, b: np.ndarray | None,
                       learned: list[str]) -> np.ndarray:
    """The point nearest ``z`` with G z0 <= h - t/2 (and A z0 = b where given), t the
    largest margin of the inequalities capped at 1 + max|h| (h's own scale, above the
    tolerance test below: capped at 1, bounds of 1e7 were refused); ``OptionError`` where
    t is at the solver's tolerance or below."""
    if A is not None:  # the equalities alone first: their fault is A's and b's, not h's
        z = _on_equalities(z, A, b, learned)
    u, t = cp.Variable(z.shape[0]), cp.Variable()
    equal = [A @ u == b] if A is not None else []
    cp.Problem(cp.Maximize(t), [G @ u + t <= h, t <= 1.0 + np.abs(h).max()] + equal).solve()
    # t is None where the equalities alone are infeasible; a margin at the solver's
    # tolerance is no strictly feasible point.
    if t.value is None or not t.value > 1e-7 * (1.0 + np.abs(h).max()):
        what = "G y <= h" + (" and A y = b" if A is not None else "")
        margin = "none" if t.value is None else f"{float(t.value):.3g}"
        starts = [k for k in learned if k in "AG"]
        raise OptionError(
            f"the constraints {what} have no strictly feasible point (largest margin min(h - G y): {margin}), "
            f"so the learned block(s) {learned} cannot start strictly feasible; check the constant(s) "
            f"{'h and b' if A is not None else 'h'}" + (f" and the initial value(s) of {starts} (random "
                                                        "unless given)" if starts else ""))
    inside = u.value
    cp.Problem(cp.Minimize(cp.sum_squares(u - z)), [G @ u <= h - 0.5 * float(t.value)] + equal).solve()
    # Nearest the random point, so that the start stays random (torch.manual_seed);
    # the margin point itself should the projection fail.
    return np.asarray(u.value if u.value is not None else inside, dtype=np.float64)


@register("qp", "dense QP: argmin_u ½‖Lᵀu‖² + ridge/2‖u‖² + qᵀu s.t. Gu ≤ h, Au = b")
def qp(n: int, n_ineq: int = 0, n_eq: int = 0, learn: str = "", inputs: str | None = None,
       ridge: float = 0.0, rank: int | None = None, L: Any = None, q: Any = None,
       G: Any = None, h: Any = None, A: Any = None, b: Any = None):
    """.. math::

        y = \\operatorname*{argmin}_u \\tfrac12\\|L^T u\\|^2 + \\tfrac{\\rho}{2}\\|u\\|^2 + q^T u
        \\quad\\text{s.t.}\\quad G u \\le h,\\; A u = b

    Each data block L (n, rank), q (n,), G (n_ineq, n), h (n_ineq,), A (n_eq, n),
    b (n_eq,) is one of three kinds:

    - **learned** (named in ``learn``): an ``nn.Parameter`` of the layer that
      :func:`convexddn.layer` returns, initialised from the option's value if given, else
      L = I, q = 0, A and G with N(0, 1/n) entries, and b = A z0, h = G z0 + 1 for a
      random z0 (on {A z = b} when b is a constant; inside G z < h when h is a
      constant; 0 when A, G or h is an input), so that the initial constraints are
      strictly feasible (an ``OptionError`` where constant ones allow no such z0;
      with an input among A, G, h, where its value at call time allows z0 = 0, e.g.
      h > 0 for an input h; with an input A or G, z0 = 0 is the only start feasible
      whatever its value, so a constant h must be > 0 and a constant b = 0, else an
      ``OptionError``). A learned A or b needs A (constant or the initial value) of
      full row rank, so n_eq <= n: with dependent rows A y = b holds only for b in A's
      range, which rounding to float32 and gradient steps leave (``OptionError``).
      Drawn from torch's global generator (``torch.manual_seed``);
    - **an input** (named in ``inputs``): a tensor passed at call time, by position in
      the order L, q, G, h, A, b or by name;
    - **a constant**: the option's value, else L = I, q = 0 (G, h, A, b must be given).

    Args:
        n: number of variables. n_ineq, n_eq: number of inequality / equality rows.
        learn: the learned blocks, as a string such as ``"Gh"`` or a tuple of names
            (default ``""``: none).
        inputs: the blocks passed at call time. Default: every block not given a value
            when nothing is learned (``layer("qp", n=4, n_ineq=3)(L, q, G, h)``), none
            when ``learn`` is given.
        ridge: ρ ≥ 0; ρ > 0 makes the problem strictly convex.
        rank: columns of L (default n).
        L, q, G, h, A, b: values of the constant blocks, or initial values of learned
            ones: arrays, nested lists or tensors of real numbers (a tensor that requires
            grad only as a learned block's initial value: a constant gets no gradient).
            With n_ineq = 0 (n_eq = 0) there is no G, h (A, b): a value of theirs must
            then have 0 rows (a value with rows, or naming them in ``learn`` or
            ``inputs``, is an ``OptionError`` asking for n_ineq / n_eq, not a
            constraint dropped silently).

    Parameters (in order): the learned and input blocks among L, q, G, h, A, b (every
    choice is DPP). Variable: ``y`` of shape ``(n,)``.

    Raises:
        OptionError: an unknown block name, a block both learned and an input, an input
            also given a value, a constant with neither a value nor a default, a value of
            the wrong shape (m rows where n_ineq or n_eq != m: the message says which count
            to pass), not finite or not real numbers (strings, objects, complex), a block of
            an empty constraint (n_ineq or n_eq = 0) in ``learn`` or ``inputs``,
            a tensor that requires grad as a constant (a learned block's initial value
            is detached), ridge < 0; no block learned or an input (the solution would be a
            constant); a learned constraint block with constant A y = b that has no
            solution, or constant G y <= h, A y = b without a strictly feasible point, or,
            with an input A or G, a constant h with an entry <= 0 or a constant b != 0
            (they exclude the start z0 = 0); a learned A or b with A's rows linearly
            dependent (n_eq > n with learned A, or a constant A of rank < n_eq).
    """
    n = check_size("n", n, minimum=1)
    n_ineq = check_size("n_ineq", n_ineq, minimum=0)
    n_eq = check_size("n_eq", n_eq, minimum=0)
    rank = n if rank is None else check_size("rank", rank, minimum=1)
    learned = _blocks("learn", learn)
    ridge = real_option("ridge", ridge, at_least=0)
    shapes = {"L": (n, rank), "q": (n,), "G": (n_ineq, n), "h": (n_ineq,), "A": (n_eq, n), "b": (n_eq,)}
    given = {k: v for k, v in zip(QP_DATA, (L, q, G, h, A, b)) if v is not None}
    active = [k for k in QP_DATA if shapes[k][0] or k not in _ROWS]
    if inputs is None:
        passed = () if learned else tuple(k for k in active if k not in given)
    else:
        passed = _blocks("inputs", inputs)
    # The blocks of an empty constraint are dropped, but a value, learn or inputs naming
    # one means that the caller wrote a constraint: n_ineq / n_eq was forgotten (the
    # constraint was silently ignored). Only an empty value, of 0 rows, is dropped.
    for k in QP_DATA:
        if k not in active and k in given:
            _fixed(k, given[k], shapes[k], learned=k in learned)  # 0 rows expected: names the count
    for option, names in (("learn", learned), ("inputs", passed)):
        empty = [k for k in names if k not in active]
        if empty:
            counts = " and ".join(sorted({f"{_ROWS[k]}=0" for k in empty}))
            raise OptionError(
                f"{option} names block(s) {empty} of a constraint with no rows ({counts}); pass "
                f"{counts.replace('=0', '=m')} for m constraint rows, or drop {empty} from {option}")
    both = [k for k in active if k in learned and k in passed]
    if both:
        raise OptionError(f"block(s) {both} are both in learn and in inputs; name each in one of them")
    clash = [k for k in active if k in passed and k in given]
    if clash:
        raise OptionError(f"block(s) {clash} are inputs (passed at call time) and also given a "
                          "value; drop the value or the block from inputs")
    values = {k: _fixed(k, given[k], shapes[k], learned=k in learned) for k in active if k in given}
    defaults = {"L": np.eye(n, rank), "q": np.zeros(n)}
    data, params = {}, []
    for k in active:
        if k in learned or k in passed:
            data[k] = cp.Parameter(shapes[k], name=k)
            params.append(data[k])
        elif k in values:
            data[k] = values[k]
        elif k in defaults:
            data[k] = defaults[k]
        else:
            raise OptionError(
                f"{k} is not learned (not in `learn`) nor an input (not in `inputs`), so a fixed "
                f"value of shape {shapes[k]} must be given as option {k}=...")
    if not params:
        # (ConvexLayer's ProblemError asked to "declare ... cp.Parameter", which qp does itself.)
        raise OptionError(
            "qp has no learned or input block: every block among L, q, G, h, A, b is a constant, so its "
            "solution is a constant with nothing to pass in or learn; name at least one block in "
            "inputs= (a tensor at call time, e.g. inputs='q') or learn= (an nn.Parameter, e.g. learn='q')")
    y = cp.Variable(n, name="y")
    objective = 0.5 * cp.sum_squares(data["L"].T @ y) + data["q"] @ y
    if ridge > 0:
        objective = objective + 0.5 * ridge * cp.sum_squares(y)
    constraints = []
    if n_ineq:
        constraints.append(data["G"] @ y <= data["h"])
    if n_eq:
        constraints.append(data["A"] @ y == data["b"])
    learned_active = tuple(k for k in active if k in learned)
    init = _initial_values(n, rank, learned_active, values, shapes)
    return cp.Problem(cp.Minimize(objective), constraints), params, [y], init
