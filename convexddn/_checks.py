"""Validation of user input shared by every layer and node.

Each check raises an error from :mod:`convexddn.errors` naming the argument, what was
expected and what came. The checks run on any device: the finiteness test reduces on
the tensor's own device and only the final boolean crosses to the host.
"""
from __future__ import annotations

import contextvars
from contextlib import AbstractContextManager
import math
import numbers
import sys
from typing import Any, Iterable

from ._lazy import torch

from .errors import DTypeError, InputError, NonFiniteError, OptionError, ShapeError
from ._int_checks import MAX_ITERATIONS, MAX_SIZE, check_count, check_int, check_size  # noqa: F401 (re-exported)
from ._context import bound


def check_tensor(name: str, value: Any) -> torch.Tensor:
    """Return ``value`` if it is a dense floating-point tensor with data, as
    :func:`tracked` hands it on: callers solve with the returned tensor.

    Raises:
        DTypeError: not a tensor, or not float16/bfloat16/float32/float64.
        InputError: a sparse (or other non-strided) or nested tensor, or one on the ``meta``
            device (no data to solve with): torch's own errors name neither the argument
            nor the fix.
    """
    if not isinstance(value, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_dense(name, value)
    # is_floating_point() holds for the float8 types too, which few torch ops implement.
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise DTypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64), got {value.dtype}"
        )
    return tracked(value)


def tracked(value: torch.Tensor) -> torch.Tensor:
    """``value``, or ``value.clone()`` where it is an inference tensor (made under
    ``torch.inference_mode()``, such as a Parameter built there) that requires grad while
    autograd records (grad enabled, so outside inference mode).

    Outside inference mode torch drops ``requires_grad`` on views of an inference tensor
    (``broadcast_to``, ``reshape``, ``permute``: its gradient was silently lost) and refuses
    ``out=`` ops on it (a raw ``RuntimeError``); a clone is an ordinary tensor whose
    gradient autograd carries back to ``value``. Every other tensor is returned as it is
    (so is every tensor while ``torch.compile`` traces: dynamo cannot trace
    ``is_inference()``). The copy is made only for such a tensor, at the call.
    (:func:`convexddn._autograd.plain` copies the inference tensors a backward saves.)
    """
    if value.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and value.is_inference():
        return value.clone()
    return value


def check_dense(name: str, value: torch.Tensor) -> None:
    """Raise ``InputError`` unless the tensor ``value`` is dense (strided, not nested) and
    holds data (not on the ``meta`` device), whatever its dtype: the part of
    :func:`check_tensor` for tensors read as data of any dtype (a problem's constants)."""
    if value.layout != torch.strided:
        raise InputError(f"{name} must be a dense (strided) tensor, got layout {value.layout}; "
                         "call .to_dense() on it first")
    if value.is_nested:  # (a nested tensor reports the strided layout)
        raise InputError(f"{name} must be a dense tensor, got a nested tensor; pad it to one shape "
                         "(torch.nested.to_padded_tensor) first")
    if value.is_meta and not _BUILDING.get():
        raise InputError(f"{name} is on the meta device (shape and dtype only, no data to solve with)")


_BUILDING = contextvars.ContextVar("convexddn_building", default=False)  # (see building)


def building() -> AbstractContextManager[None]:
    """Where a node Module checks its options at construction (``@building()`` on ``__init__``): a tensor
    option on the ``meta`` device (a model built under ``torch.device("meta")``, given data
    later by ``to_empty`` and ``load_state_dict(assign=True)``, as ``nn.PReLU`` is) has no
    values, so its value checks (:func:`unread`) are passed over there and run at the
    call, which refuses a meta tensor as ever (:func:`check_dense`)."""
    return bound(_BUILDING, True)


def unread(value: Any) -> bool:
    """Whether a value check passes over ``value``: a meta tensor inside :func:`building`."""
    return isinstance(value, torch.Tensor) and value.is_meta and _BUILDING.get()


def check_device(name: str, value: Any, x: torch.Tensor, x_name: str = "x") -> None:
    """Raise ``InputError`` where the tensor ``value`` is not on ``x``'s device, naming the
    argument and both devices. Refused, not moved: a copy between devices at every call
    would be hidden (and a learned option's gradient would cross back each step). A
    non-tensor passes."""
    if isinstance(value, torch.Tensor) and value.device != x.device:
        raise InputError(f"{name} must be on {x_name}'s device {x.device}, got {value.device}")


def _may_break_graph() -> bool:
    """:func:`convexddn._compile.may_break_graph`, imported when first asked (inside a
    torch.compile trace): a compiled graph that may break reads on the host, as eager code
    does, and raises the same precise error; one that must not (``fullgraph=True``,
    ``torch.export``) gets an asynchronous assert, a ``RuntimeError`` naming the argument
    (a bare ``RuntimeError`` came from ``torch.compile(project_lp)`` with a radius of -1,
    and robust_pool's alpha, which ``except OptionError`` missed)."""
    from ._compile import may_break_graph

    return may_break_graph()


def check_finite(name: str, value: torch.Tensor, in_graph: bool = False) -> None:
    """Raise ``NonFiniteError`` naming how many entries of ``value`` are NaN or Inf.

    Under ``torch.compile`` too: its host read breaks the graph there, and the error is the
    same as eagerly (an asynchronous assert gave a bare ``RuntimeError`` in robust_pool,
    project_lp(p=1), tv_denoise, sinkhorn and a DeclarativeNode, which ``except
    NonFiniteError`` or ``ValueError`` missed). ``in_graph``: the caller's graph must not
    break (a closed form under ``fullgraph=True`` or ``torch.export``:
    :func:`convexddn._compile.may_break_graph`); there, inside a compiled graph, the check
    is an asynchronous assert (a ``RuntimeError`` naming the argument, without the counts).
    """
    if value.numel() == 0:
        return
    if in_graph and torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(value).all(), f"{name} must be finite (NaN or Inf found)")
        return
    # One reduction first: a NaN or Inf anywhere makes the sum non-finite (a finite sum
    # clears the tensor); only a non-finite sum, NaN/Inf or overflow, needs the count.
    if value.is_floating_point() and bool(torch.isfinite(value.sum())):
        return
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        n_nan = int(torch.isnan(value).sum())
        n_inf = int(bad.sum()) - n_nan
        raise NonFiniteError(
            f"{name} must be finite, got {n_nan} NaN and {n_inf} Inf value(s) "
            f"among {value.numel()} (shape {tuple(value.shape)})"
        )


def cast_checked(name: str, value: torch.Tensor, dtype: torch.dtype, into: str = "x's dtype",
                 fix: str = "pass x in a wider dtype") -> torch.Tensor:
    """``value.to(dtype)`` (differentiably), refusing a finite entry that the cast would turn
    into ±Inf: a later finiteness check (or a solver) would blame that Inf on the tensor it
    was handed on as (least squares' ``b`` of shape ``(1, T)`` for linear_fit's ``target (T,)``).

    Checked only where ``dtype``'s range is narrower than ``value``'s (float64 → float32,
    float32 → float16 or bfloat16): one reduction and one host read then, none otherwise
    (inside a ``torch.compile`` graph that must not break, an asynchronous assert without
    the counts: :func:`_may_break_graph`). ``into`` says
    whose dtype it is (``"x's dtype"``) and ``fix`` what to do, for the message.

    Raises:
        NonFiniteError: ``value`` holds NaN or Inf (as :func:`check_finite`, naming it).
        InputError: an entry beyond ``±finfo(dtype).max``, naming the argument, the dtype
            and its range, how many entries and the largest magnitude, with the shape as passed.
    """
    out = value.to(dtype)
    if value.numel() == 0 or torch.finfo(dtype).max >= torch.finfo(value.dtype).max:
        return out
    if torch.compiler.is_compiling() and not _may_break_graph():
        torch._assert_async(torch.isfinite(out).all(), f"{name} must fit {into} {dtype}")
        return out
    if bool(torch.isfinite(out).all()):
        return out
    check_finite(name, value)  # a NaN or Inf that came in is named as such
    over = ~torch.isfinite(out.detach())  # (value is finite here: these are the cast's overflows)
    raise InputError(
        f"{name} must fit {into} {dtype} (it is cast to it), whose range is ±{torch.finfo(dtype).max:.6g}; "
        f"got {int(over.sum())} of {value.numel()} entries beyond it (largest magnitude "
        f"{float(value.detach().abs().amax()):.4g}) in {name} of shape {tuple(value.shape)} and dtype "
        f"{value.dtype}; {fix} or rescale {name}")


def real_number(value: numbers.Real) -> float:
    """``float(value)``, or ±inf for an integer beyond the float range (where ``float``
    raises ``OverflowError``): the range checks then refuse it with the option's name."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_number(name: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                 hint: str = "", constant_because: str = "") -> float:
    """A numeric option that is one constant: finite and ``> above`` (or ``>= at_least``), as a float.

    Python and NumPy scalars are accepted; tensors, bools and anything else raise
    :class:`~convexddn.errors.OptionError` naming the option, what it must be and what
    came (``hint`` is appended; ``constant_because`` says in the tensor's message why the
    option is a constant). A tensor is refused, not converted: its gradient would be
    dropped, and a tensor of several entries would be compared one by one. Options that
    may be learned (a tensor) are checked by :func:`check_scale` instead.
    """
    bound = f" > {above:g}" if above is not None else f" >= {at_least:g}" if at_least is not None else ""
    # A tensor implies torch is imported: no import here (the registry's options are
    # checked before torch is needed).
    torch_ = sys.modules.get("torch")
    if torch_ is not None and isinstance(value, torch_.Tensor):
        raise OptionError(
            f"{name} must be a number (a Python or NumPy scalar){bound}, got a tensor of shape "
            f"{tuple(value.shape)}: {constant_because + '; ' if constant_because else ''}"
            f"pass float(t) for a one-element tensor{hint}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{name} must be a number{bound}, got {value!r}{hint}")
    number = real_number(value)
    ok = math.isfinite(number) and (above is None or number > above) and (
        at_least is None or number >= at_least)
    if not ok:
        raise OptionError(f"{name} must be finite{' and' + bound if bound else ''}, got {value!r}{hint}")
    return number


def check_positive(name: str, value: Any) -> None:
    """Raise ``OptionError`` unless ``value`` (a number or tensor) is finite and > 0 (inside
    a ``torch.compile`` graph that must not break, an asynchronous assert: :func:`_may_break_graph`).
    A value of another kind is told both accepted kinds and shown with its type: "must be a
    positive number" alone hid that a tensor is taken, and a 0-d NumPy array holding 0.5
    read as "not a positive number"."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or unread(value):  # (a meta option of a Module being built)
            return
        if torch.compiler.is_compiling() and not _may_break_graph():
            torch._assert_async((torch.isfinite(value) & (value > 0)).all(),
                                f"{name} must be finite and > 0")
            return
        # One host read when the check passes (on CUDA, one sync): the values shown in
        # the message are read only when it fails.
        if not bool((torch.isfinite(value) & (value > 0)).all()):
            shown = value.detach().flatten()[:4].tolist()
            raise OptionError(f"{name} must be finite and > 0, got {shown!r}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = type(value)
        kind = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        array_like = isinstance(value, (list, tuple)) or hasattr(value, "__array__")  # (NumPy's, among others)
        hint = "; torch.as_tensor(...) makes a tensor of it" if array_like else ""
        raise OptionError(f"{name} must be a positive number or a tensor of positive numbers, got a {kind}: "
                          f"{value!r}{hint}")
    number = real_number(value)
    if not (math.isfinite(number) and number > 0):
        raise OptionError(f"{name} must be finite and > 0, got {value!r}")


def positive_range(name: str, value: Any) -> tuple[float, float] | None:
    """:func:`check_positive`, returning ``(min, max)`` of ``value`` read in the same one
    host read (callers choose a working dtype from them); ``None`` for an empty tensor or
    inside a compiled graph (no read there: the asynchronous check only)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or torch.compiler.is_compiling():
            check_positive(name, value)
            return None
        t = value.detach()
        ok, lo, hi = torch.stack([(torch.isfinite(t) & (t > 0)).all().to(t.dtype), t.amin(), t.amax()]).tolist()
        if not ok:
            check_positive(name, value)  # raises, showing the values
        return lo, hi
    check_positive(name, value)
    return float(value), float(value)


def check_tolerance(name: str, value: Any) -> float:
    """A relative tolerance: a real number (not a tensor) in (0, 1); returned as float.
    A relative error of 1 or more accepts any point: such a tolerance is refused, not
    met by stopping at once."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        one = isinstance(value, torch.Tensor) and value.numel() == 1
        hint = "; pass float(t) for a one-element tensor" if one else ""
        raise OptionError(f"{name} must be a number in (0, 1) (a Python or NumPy scalar: a constant), got {got}{hint}")
    number = real_number(value)
    if not 0 < number < 1:
        raise OptionError(f"{name} must be a number in (0, 1), got {value!r}")
    return number


def check_scale(name: str, value: Any) -> Any:
    """A positive scale option such as a penalty's alpha: a number (NumPy scalars
    included) or a floating-point tensor (it may be learned), finite and > 0; returned
    (a tensor as :func:`check_tensor` returns it)."""
    if isinstance(value, torch.Tensor):
        value = check_tensor(name, value)
    check_positive(name, value)
    return value


def check_bool(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``OptionError`` unless ``value`` is ``True`` or ``False`` (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        expected = "True, False or None" if allow_none else "True or False"
        raise OptionError(f"{name} must be {expected}, got {value!r}")


def check_flag(name: str, value: Any) -> bool:
    """A switch (a ``bool`` option, as cvxpylayers types its ``verbose``): ``True``/``False``,
    a NumPy bool, or a scalar equal to 0 or 1; returned as a bool. Anything else raises ``OptionError``:
    arrays and tensors among them, whose truth value is elementwise (``np.array([1.])``
    passed as True, a two-entry tensor raised torch's "ambiguous" error)."""
    np_ = sys.modules.get("numpy")  # a NumPy bool implies NumPy is imported
    if isinstance(value, bool) or np_ is not None and isinstance(value, np_.bool_):
        return bool(value)
    if isinstance(value, numbers.Real) and value in (0, 1):  # (arrays and tensors are not Real)
        return bool(value)
    raise OptionError(f"{name} must be True or False (or 0/1), got {value!r}")


def check_dim_option(name: str, dim: Any) -> None:
    """Raise ``OptionError`` unless ``dim`` is an int or a non-empty tuple of distinct ints
    (no bools). (Dims that coincide only once the tensor's rank is known, such as 1 and -2
    of a 3-d tensor, are refused at the call.)"""
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if not dims or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in dims):
        raise OptionError(f"{name} must be an int or a non-empty tuple of ints, got {dim!r}")
    if len(set(dims)) != len(dims):
        raise OptionError(f"{name} must not repeat a dim, got {dim!r}")


def check_choice(name: str, value: Any, valid: Iterable[Any], *, or_else: str = "") -> None:
    """Raise ``OptionError`` listing the valid choices when ``value`` is not one of them
    (``or_else`` names another kind of value accepted, such as ``" or a callable"``)."""
    valid = list(valid)
    # Arrays and tensors make ``in`` elementwise (a raw "truth value is ambiguous" error).
    if hasattr(value, "shape") and getattr(value, "ndim", 0) or not any(_same(value, v) for v in valid):
        raise OptionError(f"{name} must be one of {valid}{or_else}, got {value!r}")


def _same(value: Any, choice: Any) -> bool:
    try:
        return bool(value == choice)
    except (TypeError, ValueError, RuntimeError):
        return False


def check_stopping(tol: Any, max_iter: Any) -> None:
    """An iterative solver's stopping options: ``tol`` (relative, in (0, 1)) and
    ``max_iter`` >= 1, each or ``None`` (the solver's default). Both are constants: a
    tensor is refused (a several-entry one would reach the solver's comparisons)."""
    if tol is not None:
        check_tolerance("tol", tol)
    if max_iter is not None:
        check_count("max_iter", max_iter)


def check_choices(name: str, values: Iterable[Any], valid: Iterable[Any]) -> None:
    """Raise ``OptionError`` unless ``values`` names at least one of ``valid``, each
    one of them (listing the choices) and none twice."""
    valid = list(valid)
    # One name is not a list of names ("max" would be read as "m", "a", "x").
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise OptionError(f"{name} must be a list or tuple of names from {valid}, got {values!r}")
    values = list(values)
    if not values:
        raise OptionError(f"{name} must name at least one of {valid}, got {values!r}")
    for value in values:
        check_choice(name, value, valid)
    if any(_same(v, w) for i, v in enumerate(values) for w in values[:i]):
        raise OptionError(f"{name} must not repeat an entry, got {values!r}")


def normalize_dims(name: str, dim: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """Turn ``dim`` (an int or tuple, negative allowed) into sorted non-negative dims."""
    check_dim_option(name, dim)
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    out = []
    for d in dims:
        d = int(d)
        if not -ndim <= d < ndim:
            raise ShapeError(
                f"{name}={dim!r} is out of range for a tensor with {ndim} dimension(s)"
            )
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise OptionError(f"{name} must not repeat a dimension, got {dim!r}")
    return tuple(sorted(out))


#: The accepted spellings of p for Lp balls and spheres.
P_VALID = [1, 2, math.inf, "inf"]


def normalize_p(p: Any) -> float:
    """Map the accepted spellings of p (1, 2, inf, "inf") to 1, 2 or math.inf.

    Raises:
        OptionError: any other value (the message lists the valid ones).
    """
    # bool is an int subclass and tensors make ``in`` ambiguous: reject both up front.
    if isinstance(p, bool) or not isinstance(p, (numbers.Real, str)):
        raise OptionError(f"p must be one of {P_VALID}, got {p!r}")
    check_choice("p", p, P_VALID)
    if p == "inf":
        return math.inf
    return int(p) if isinstance(p, numbers.Integral) else float(p)  # numpy scalars as Python numbers
