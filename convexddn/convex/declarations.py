"""Declared attributes of parameters, checked on the tensors that fill them.

CVXPY canonicalises a problem assuming what each ``cp.Parameter`` declares (a ``nonneg``
λ makes ``λ‖x‖₁`` convex, a ``boolean`` one is taken as nonneg); a value that breaks it
gives a wrong answer or a misleading diagnosis ("unbounded"), so
:func:`check_parameter_attributes` refuses it, naming the parameter: signs, integer and
boolean entries per entry, ``bounds=[lo, hi]`` per entry (CVXPY refuses such a value:
"Parameter value must be in bounds"), symmetric and PSD/NSD matrices each at its own
scale, on the tensors' own device.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError
from .tensor_cache import cached

__all__ = ["SYMMETRIC_ATTRIBUTES", "check_parameter_attributes", "parameter_label", "psd_rounding"]


# The entrywise declarations and what violates them (CVXPY takes a boolean as nonneg).
_ENTRYWISE = {"nonneg": lambda v: v < 0, "nonpos": lambda v: v > 0, "pos": lambda v: v <= 0, "neg": lambda v: v >= 0,
              "integer": lambda v: v != torch.round(v), "boolean": lambda v: (v != 0) & (v != 1)}
SYMMETRIC_ATTRIBUTES = ("symmetric", "PSD", "NSD")
_CHECKED_ATTRIBUTES = (*_ENTRYWISE, "bounds", *SYMMETRIC_ATTRIBUTES)


def _bound_text(bound: np.ndarray) -> str:
    return f"{float(bound):g}" if np.ndim(bound) == 0 else f"an array of shape {np.shape(bound)}"


# Each parameter's bounds as tensors, per (device, dtype of the values): built from its
# numpy (or sparse) arrays once, not on every call. Keyed by the object's id for its lifetime
# (a WeakKeyDictionary compares keys with ==, which a cp.Parameter answers with a
# constraint; CVXPY's own id survives pickling, so another process's parameter can hold it).
_BOUNDS: dict[int, dict] = {}


def _bound_tensors(param: cp.Parameter, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(lo, hi, lo - eps·|lo|, hi + eps·|hi|)``, float64 on ``value``'s device, ``eps``
    that of ``value``'s dtype (the widening differs per dtype: the key holds both)."""
    def build() -> tuple[torch.Tensor, ...]:
        eps = torch.finfo(value.dtype).eps
        lo, hi = (torch.as_tensor(b.toarray() if sp.issparse(b) else np.asarray(b), dtype=torch.float64,
                                  device=value.device) for b in param.attributes["bounds"])
        return lo, hi, lo - eps * lo.abs(), hi + eps * hi.abs()
    cache = _BOUNDS.get(id(param))
    if cache is None:
        cache = _BOUNDS.setdefault(id(param), {})
        weakref.finalize(param, _BOUNDS.pop, id(param), None)
    return cached(cache, (str(value.device), value.dtype), build)


def _out_of_bounds(value: torch.Tensor, param: cp.Parameter) -> tuple[torch.Tensor, Callable[[], str]]:
    """Entries of ``value`` outside the parameter's ``bounds = [lo, hi]`` (numbers or arrays
    of its shape, ±inf for a missing side: CVXPY's numeric ``bounds``), and the first one,
    with its bounds. A bound rounded to the value's dtype passes: each side widens by
    ``eps·|bound|`` (a float32 0.1 lies 1.5e-9 above the float64 bound 0.1)."""
    lo, hi, lo_wide, hi_wide = _bound_tensors(param, value)
    wide = value.double()
    mask = (wide < lo_wide) | (wide > hi_wide)

    def why() -> str:
        first = tuple(int(i) for i in torch.nonzero(mask)[0])
        # (the entry's own bounds: lo and hi broadcast over the batch dimensions in front)
        lo_i, hi_i = (float(b.expand(value.shape)[first]) for b in (lo, hi))
        return f"the first, at index {first}, is {float(wide[first]):.6g}, outside [{lo_i:.6g}, {hi_i:.6g}]"
    return mask, why


def psd_rounding(eps: float, n: int) -> float:
    """How far below 0, relative to an ``n``-square matrix's scale, a PSD matrix's smallest
    eigenvalue may lie once rounded to a dtype of machine epsilon ``eps``: ``max(64·floor, n·eps)``,
    ``floor`` 1e-12 for float64 and 1e-6 for the less precise (see :func:`_violations`;
    :func:`.nonconvex.explain_nonconvex` takes it for the least precise dtype the parameters came
    in, so that a matrix this check passes is not refused as nonconvex after the solve)."""
    return max(64 * (1e-12 if eps <= torch.finfo(torch.float64).eps else 1e-6), n * eps)


def _violations(value: torch.Tensor, attr: str) -> tuple[torch.Tensor, Callable[[], str]]:
    """Per-entry (or per-matrix) violation mask of one declared attribute, and what the
    first violating matrix gets wrong (asked only when there is one: a host sync).

    Matrices are judged each at its own scale (its largest entry): a batch-wide scale let
    an indefinite matrix pass beside one of 1e10 (and come back as a wrong "solved" point).

    Tolerances follow the dtype the values came in: rounding to it moves each entry by at
    most ``eps/2·m`` (``m`` the largest |entry|; or half the subnormal spacing ``s``), each
    eigenvalue by at most ``n·eps/2·m``. Symmetric: ``|v - vᵀ| <= 8·(max(floor, eps)·m + s)``;
    PSD (NSD): smallest (largest) eigenvalue beyond ``-(max(64·floor, n·eps)·m + n·s)``,
    ``floor`` 1e-12 for float64, 1e-6 otherwise: float64 and float32 as before (``n·eps``
    passes ``64·floor`` beyond n = 537 in float32); float16 and bfloat16 get the rounding
    bound with a margin of 2 (a -0.3·m indefinite matrix is still refused up to n = 300,
    38 in bfloat16; ``64·eps`` let bfloat16 pass -0.5·m).
    """
    if attr in _ENTRYWISE:
        return _ENTRYWISE[attr](value), lambda: ""  # the count says it all
    info, n = torch.finfo(value.dtype), value.shape[-1]
    floor, sub = (1e-12 if value.dtype == torch.float64 else 1e-6), info.eps * info.smallest_normal  # (s)
    scale = value.detach().abs().amax((-2, -1)).double()  # (double: no float16 overflow below)
    sym_tol = 8 * (max(floor, info.eps) * scale + sub)
    asym = ((value - value.transpose(-1, -2)).abs() > sym_tol[..., None, None]).flatten(-2).any(-1)
    if attr == "symmetric":
        def not_symmetric() -> str:
            first = tuple(int(i) for i in torch.nonzero(asym)[0])
            return f"the first, at batch index {first}, is not symmetric" if first else "it is not symmetric"
        return asym, not_symmetric
    # PSD/NSD: symmetric, and the smallest (largest) eigenvalue within rounding of >= 0 (<= 0).
    wide = value.double()  # (float16 entries of 40000 overflowed in value + valueᵀ)
    eig = torch.linalg.eigvalsh(0.5 * (wide + wide.transpose(-1, -2)))
    extreme = eig.amin(-1) if attr == "PSD" else eig.amax(-1)
    eig_tol = psd_rounding(info.eps, n) * scale + n * sub
    mask = asym | (extreme < -eig_tol if attr == "PSD" else extreme > eig_tol)

    def why() -> str:
        first = tuple(int(i) for i in torch.nonzero(mask)[0])
        which = f"the first, at batch index {first}," if first else "it"  # () for an unbatched matrix
        if bool(asym[first]):
            return f"{which} is not symmetric"
        dtype, tol = str(value.dtype).removeprefix("torch."), float(eig_tol[first])
        bound = f"down to -{tol:.3g}" if attr == "PSD" else f"up to {tol:.3g}"
        return (f"{which} has {'smallest' if attr == 'PSD' else 'largest'} "
                f"eigenvalue {float(extreme[first]):.3g} (largest |entry| {float(scale[first]):.3g}; "
                f"tolerance for {dtype}: {bound})")
    return mask, why


def parameter_label(i: int, param: cp.Parameter, labels: Sequence[str] | None = None) -> str:
    """How errors name the i-th parameter: ``labels[i]`` where a wrapper's call numbers its
    inputs otherwise (:class:`~.learned.LearnedLayer`), else ``parameter i (name)``."""
    return labels[i] if labels is not None else f"parameter {i} ({param.name()})"


def check_parameter_attributes(values: Sequence[torch.Tensor], parameters: Sequence[cp.Parameter],
                               labels: Sequence[str] | None = None) -> None:
    """Raise ``InputError`` where a tensor breaks an attribute its ``cp.Parameter`` declares.

    CVXPY canonicalises a problem assuming the declared attributes (a ``nonneg`` λ makes
    ``λ‖x‖₁`` convex); a value that breaks them gives a wrong answer or a misleading
    diagnosis ("unbounded"), so it is refused here, naming the parameter; a value outside
    its ``bounds=[lo, hi]`` too (as CVXPY refuses it), naming the first such entry and its
    bounds. One host sync per declared attribute.
    """
    for i, (value, param) in enumerate(zip(values, parameters)):
        for attr in _CHECKED_ATTRIBUTES:
            declared = param.attributes.get(attr)
            if not declared:
                continue
            if attr == "bounds":
                bad, why = _out_of_bounds(value, param)
                declared = f"bounds=[{_bound_text(declared[0])}, {_bound_text(declared[1])}]"
            else:
                bad, why = _violations(value, attr)
                declared = f"{attr}=True"
            n_bad = int(bad.sum())
            if n_bad:
                what = "matrices" if attr in SYMMETRIC_ATTRIBUTES else "entries"
                what += " outside them" if attr == "bounds" else " that are not"
                reason = why()
                raise InputError(
                    f"{parameter_label(i, param, labels)} is declared {declared}, got {n_bad} {what} "
                    f"(shape {tuple(value.shape)}{'; ' + reason if reason else ''}); pass "
                    "values that satisfy the declaration or drop it from the cp.Parameter")
