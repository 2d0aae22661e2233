"""Least-squares pooling: fit a linear model to a set of feature vectors.

.. math::

    (\\beta, \\beta_0) = \\operatorname*{argmin}_{u, u_0}
        \\sum_{t=1}^{T} w_t\\, (x_t^\\top u + u_0 - y_t)^2 + \\rho \\|u\\|_2^2

The layer form of :func:`convexddn.nodes.least_squares.least_squares` (the reference's
basic and weighted least-squares layers; with the time index as target it is rank
pooling): :func:`linear_fit` builds :math:`A = [x^\\top, \\mathbf 1]` and the ridge
:math:`(\\rho, \\dots, \\rho, 0)`, so the intercept is not regularised, and the node's
implicit backward reaches the features, the targets, the weights and the ridge.

Public names: :func:`linear_fit`, :class:`LinearFit`, :class:`LeastSquares`,
:class:`WeightedLeastSquares`.

References:
    B. Fernando and S. Gould, "Learning End-to-end Video Classification with
    Rank-Pooling", ICML 2016.
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .._autograd import called_as
from .._checks import building, cast_checked, check_bool, check_device, check_finite, check_number, check_tensor, unread
from ..errors import NonFiniteError, OptionError, ShapeError, SolverError
from ._repr import format_option
from ._module_options import store_option
from ._overflow import option_cast
from .least_squares import least_squares

__all__ = ["linear_fit", "LinearFit", "LeastSquares", "WeightedLeastSquares"]


class LinearFit(NamedTuple):
    """Output of :func:`linear_fit`: ``coef (*, C)`` and ``intercept (*)``."""

    coef: torch.Tensor
    intercept: torch.Tensor


def linear_fit(
    x: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    ridge: float | torch.Tensor = 1e-3,
    bias: bool = True,
) -> LinearFit:
    r"""Fit a linear model to a set of feature vectors: least-squares pooling.

    .. math::

        (\beta, \beta_0) = \operatorname*{argmin}_{u, u_0}
            \sum_{t=1}^{T} w_t\, (x_t^\top u + u_0 - y_t)^2 + \rho \|u\|_2^2

    over the T feature vectors :math:`x_t \in \mathbb{R}^C` (the columns of ``x``),
    with targets :math:`y_t` (e.g. the time index for rank pooling) and the intercept
    :math:`u_0` left unregularised. A thin wrapper of :func:`least_squares` with
    :math:`A = [x^\top, \mathbf 1]` and ridge :math:`(\rho, \dots, \rho, 0)`; gradients
    reach ``x``, ``target``, ``weights`` and a tensor ``ridge``.

    Args:
        x: features ``(*, C, T)``.
        target: targets ``(*, T)``; batch dims broadcast (``(1, T)`` or ``(T,)`` shares
            one target, e.g. a learnable one, across the batch). Cast to ``x``'s dtype
            (a float32 time index serves float64 features), differentiably; on ``x``'s
            device (not moved: ``torch.arange(T, device=x.device)`` for a time index).
        weights: nonnegative weights ``(*, T)`` or ``None``, on ``x``'s device.
            Default: ``None``.
        ridge: :math:`\rho \ge 0`, a number or a tensor broadcastable to the batch
            shape ``(*)`` on ``x``'s device. Default: ``1e-3`` (as the reference's layers).
        bias: fit the intercept :math:`u_0` (else it is 0). Default: ``True``.

    Shape:
        - Input: ``x (*, C, T)``, ``target (*, T)``, ``weights (*, T)``.
        - Output: :class:`LinearFit` ``coef (*, C)``, ``intercept (*)``.

    Raises:
        DTypeError, ShapeError, SolverError: as :func:`least_squares` (``A`` there is
            ``x`` transposed, with a column of ones for the intercept); fewer vectors than
            unknowns with ``ridge = 0``, batch shapes of ``x``, ``target``, ``weights`` and
            ``ridge`` that do not broadcast and, with ``bias`` and a ridge > 0, weights that
            are all zero (the intercept is not regularised) are said in ``linear_fit``'s terms.
        NonFiniteError: ``x``, ``target``, ``weights`` or ``ridge`` holds NaN or Inf (named).
        OptionError: a non-bool ``bias``; a numeric ``ridge`` that is not finite and >= 0.
        InputError: negative ``weights`` or a negative tensor ``ridge``; ``target``,
            ``weights`` or a tensor ``ridge`` not on ``x``'s device; a finite ``target``
            entry beyond the range of ``x``'s dtype, which the cast would make Inf (float64
            1e40 for float32 ``x``, float32 7e4 for float16 ``x``).

    Examples::

        >>> x = torch.randn(8, 16, 10)          # 8 sequences of 10 16-D features
        >>> t = torch.arange(10.0)               # rank pooling: fit the time index
        >>> fit = linear_fit(x, t, ridge=1e-2)
        >>> fit.coef.shape, fit.intercept.shape
        (torch.Size([8, 16]), torch.Size([8]))
    """
    x = check_tensor("x", x)
    target = check_tensor("target", target)
    ridge = _check_layer_options(ridge, bias)
    given = (("x", x), ("target", target), ("weights", weights), ("ridge", ridge))
    # Refused, not moved (as least_squares and the other nodes do): a copy between
    # devices at every call would be hidden, and least_squares' own error names b and A.
    for name, t in given[1:]:
        check_device(name, t, x)
    if x.ndim < 2:
        raise ShapeError(f"x must have shape (*, C, T), got shape {tuple(x.shape)}")
    c = x.shape[-2]
    A = x.mT
    r: Any = ridge
    if bias:  # (a column of ones even where C = 0: the fit is then the intercept alone)
        A = torch.cat([A, A.new_ones(*A.shape[:-1], 1)], -1)
    if isinstance(ridge, torch.Tensor):  # (checked by _check_layer_options)
        # In float64, the solve's, before the expand: its gradient is summed there (_overflow;
        # the float32 cast of a ridge of 1e39 was Inf).
        rr = option_cast("linear_fit", "ridge", ridge, torch.float64).unsqueeze(-1)
        if bias:
            rr = torch.cat([rr.expand(*rr.shape[:-1], c), torch.zeros_like(rr)], -1)
        r = rr
    elif bias and ridge > 0:
        # float64, the solve's working dtype (least_squares' own numeric ridge is too).
        r = torch.full((c + 1,), float(ridge), dtype=torch.float64, device=x.device)
        r[-1] = 0.0
    if target.ndim < 1 or target.shape[-1] != x.shape[-1]:
        raise ShapeError(
            f"target must have shape (*, T) with T={x.shape[-1]} like x {tuple(x.shape)}, "
            f"got shape {tuple(target.shape)}"
        )
    _check_batch_shapes(given)
    # The documented cast, checked here: an entry beyond x's dtype's range became Inf,
    # which least_squares then reported as its b of the reshaped shape (1, T).
    target = cast_checked("target", target, x.dtype)
    # least_squares tells b's vector form by its rank: give A and target equal batch ranks.
    extra = target.ndim - (A.ndim - 1)
    if extra > 0:
        A = A.reshape((1,) * extra + A.shape)
    elif extra < 0:
        target = target.reshape((1,) * -extra + target.shape)
    if (r is None or (not isinstance(r, torch.Tensor) and r == 0)) and x.shape[-1] < A.shape[-1]:
        raise ShapeError(
            f"linear_fit needs at least C{' + 1' if bias else ''} = {A.shape[-1]} vectors (T) with "
            f"ridge = 0, got x of shape {tuple(x.shape)}; pass ridge > 0")
    try:
        with called_as("linear_fit"):  # (its refusals, now or in the backward, name linear_fit)
            sol = least_squares(A, target, weights, r)
    except NonFiniteError:
        # least_squares names its own A and b (x transposed, the ones column): name ours.
        for name, t in given:
            if isinstance(t, torch.Tensor):
                check_finite(name, t)
        raise
    except SolverError as err:
        # With a ridge > 0 only the intercept is unregularised, but the design is singular
        # to working precision for other reasons too (a constant feature beside the
        # intercept with a ridge too small to register, 1e-33): "all zero" is read from the
        # weights themselves, and the ridge in float64 (a float32 cast made 1e-300 zero).
        positive = ridge is not None and bool((torch.as_tensor(ridge, dtype=torch.float64, device="cpu") > 0).all())
        if not (bias and positive and "rank deficient" in str(err)):
            raise
        if x.shape[-1] == 0:
            what = "there are no vectors (T = 0)"
        elif _all_zero_weights(weights, err.indices):
            what = "the weights are all zero"
        else:
            raise
        raise SolverError(
            f"linear_fit: {what} for {len(err.indices)} batch element(s) (indices into the batch of x, "
            f"weights and ridge {err.indices[:8]}), which leaves the intercept undetermined (it is not regularised, so "
            "no ridge helps; bias=False fits without it)",
            indices=err.indices, statuses=err.statuses) from None
    if bias:
        return LinearFit(sol[..., :c], sol[..., c])
    return LinearFit(sol, sol.new_zeros(sol.shape[:-1]))


def _all_zero_weights(weights: Any, indices: list) -> bool:
    """Whether ``weights`` ``(*, T)`` are all zero for every batch index in ``indices``
    (tuples into the broadcast batch shape, as least_squares reports them)."""
    if not isinstance(weights, torch.Tensor):
        return False
    zero = (weights == 0).all(-1)
    for idx in indices:
        tail = tuple(idx)[len(idx) - zero.ndim:] if zero.ndim else ()
        if not bool(zero[tuple(i if n > 1 else 0 for i, n in zip(tail, zero.shape))]):
            return False
    return True


def _check_batch_shapes(given: tuple[tuple[str, Any], ...]) -> None:
    """Raise ``ShapeError`` unless the batch shapes ``(*)`` of x ``(*, C, T)``, target
    ``(*, T)``, weights ``(*, T)`` and a tensor ridge ``(*)`` broadcast, naming them with
    the shapes the caller passed (least_squares' own error names its A and b, reshaped)."""
    rest = {"x": 2, "target": 1, "weights": 1, "ridge": 0}
    named = [(name, t, t.shape[:t.ndim - rest[name]]) for name, t in given
             if isinstance(t, torch.Tensor) and t.ndim >= rest[name]]  # (others: least_squares names them)
    if all(s == named[0][2] for _, _, s in named):  # (broadcast_shapes costs ~30 µs)
        return
    try:
        torch.broadcast_shapes(*(s for _, _, s in named))
    except RuntimeError:
        batches = ", ".join(f"{name} {tuple(s)}" for name, _, s in named)
        forms = {"x": "(*, C, T)", "target": "(*, T)", "weights": "(*, T)", "ridge": "(*)"}
        passed = ", ".join(f"{name} {tuple(t.shape)} = {forms[name]}" for name, t, _ in named)
        raise ShapeError(f"the batch shapes (*) of {batches} do not broadcast (shapes passed: {passed})") from None


def _check_layer_options(ridge: Any, bias: Any, construction: bool = False) -> Any:
    """Check ``bias`` and ``ridge``; returns the ridge (a tensor as ``check_tensor`` returns it)."""
    check_bool("bias", bias)
    if isinstance(ridge, torch.Tensor):
        ridge = check_tensor("ridge", ridge)
        if construction and ridge.numel() and not unread(ridge):
            # Calls check a tensor ridge with the solve's one host sync; a module checks
            # its own once, when built (as it does a numeric one).
            check_finite("ridge", ridge)
            low = float(ridge.detach().amin())
            if low < 0:
                raise OptionError(f"ridge must be >= 0 everywhere, got a minimum of {low:g}")
    else:
        check_number("ridge", ridge, at_least=0, hint=" (or pass a tensor)")  # NumPy scalars too
    return ridge


class LeastSquares(nn.Module):
    r"""Least-squares pooling: fit :math:`y_t \approx x_t^\top\beta + \beta_0` to a set.

    .. math::

        (\beta, \beta_0) = \operatorname*{argmin}_{u, u_0}
            \sum_t (x_t^\top u + u_0 - y_t)^2 + \rho \|u\|_2^2

    The module form of :func:`linear_fit` without weights (the reference's basic
    least-squares layer, whose name it keeps); :class:`WeightedLeastSquares` takes
    per-item weights. Not a module form of :func:`least_squares` (``argmin ‖A u − b‖``
    for given ``A``, ``b``), which is a function only.

    Args:
        ridge: :math:`\rho \ge 0`, a number or a tensor (an ``nn.Parameter`` is
            learned; another tensor is stored as a buffer). Default: ``1e-3``.
        bias: fit the intercept. Default: ``True``.

    Shape:
        - Input: ``x (*, C, T)``, ``target (*, T)``.
        - Output: :class:`LinearFit` ``coef (*, C)``, ``intercept (*)``.

    Raises:
        OptionError: invalid ``ridge`` or ``bias`` at construction; calls raise as
            :func:`linear_fit`.
        DTypeError: at construction, an integer tensor ``ridge``.

    Examples::

        >>> pool = LeastSquares(ridge=1e-2)
        >>> pool(torch.randn(4, 32, 12), torch.linspace(0, 1, 12)).coef.shape
        torch.Size([4, 32])
    """

    @building()
    def __init__(self, ridge: float | torch.Tensor = 1e-3, bias: bool = True) -> None:
        super().__init__()
        _check_layer_options(ridge, bias, construction=True)
        store_option(self, "ridge", ridge)
        self.bias = bias

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> LinearFit:
        return linear_fit(x, target, None, self.ridge, self.bias)

    def extra_repr(self) -> str:
        return f"ridge={format_option(self.ridge)}, bias={self.bias}"


class WeightedLeastSquares(LeastSquares):
    r"""Weighted least-squares pooling: :class:`LeastSquares` with per-item weights.

    .. math::

        (\beta, \beta_0) = \operatorname*{argmin}_{u, u_0}
            \sum_t w_t (x_t^\top u + u_0 - y_t)^2 + \rho \|u\|_2^2

    Args:
        ridge: :math:`\rho \ge 0`. Default: ``1e-3``.
        bias: fit the intercept. Default: ``True``.

    Shape:
        - Input: ``x (*, C, T)``, ``target (*, T)``, ``weights (*, T)`` (nonnegative).
        - Output: :class:`LinearFit` ``coef (*, C)``, ``intercept (*)``.

    Raises:
        OptionError: invalid ``ridge`` or ``bias`` at construction.
        DTypeError, ShapeError, NonFiniteError, SolverError: as :class:`LeastSquares`.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
    ) -> LinearFit:
        return linear_fit(x, target, weights, self.ridge, self.bias)
