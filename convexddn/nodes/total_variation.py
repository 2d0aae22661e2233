r"""1-D total variation denoising as a declarative node, solved exactly.

.. math::

    y(x, \lambda) = \operatorname*{argmin}_{u \in \mathbb R^n}
    \tfrac12 \|u - x\|_2^2 + \lambda \sum_{i=1}^{n-1} |u_{i+1} - u_i|

**Solver.** The dual is the box-constrained quadratic program
:math:`\min_{|z| \le \lambda} \tfrac12 \|x - D^\top z\|^2` (:math:`D` the difference
operator, :math:`y = x - D^\top z`), whose Hessian :math:`DD^\top` is a tridiagonal
M-matrix. It is solved by the primal–dual active-set method (Hintermüller, Ito &
Kunisch 2003): given the set of edges where :math:`z_i = \pm\lambda` (the jumps of
:math:`y`, with their signs :math:`\sigma_i`), the rest of the optimality conditions
say that :math:`y` is constant between jumps, so each segment
:math:`\{s, \dots, e\}` takes the value

.. math::

    y_{s..e} = \frac{1}{e - s + 1}\Big(\sum_{i=s}^{e} x_i + \lambda(\sigma_e - \sigma_{s-1})\Big)
    \qquad (\sigma_0 = \sigma_n = 0),

and :math:`z = \operatorname{cumsum}(y - x)`; the next active set is
:math:`\{i : |z_i + c\,(y_{i+1} - y_i)| > \lambda\}` with the sign of that quantity.
Each step is a handful of batched passes (segment sums by ``scatter_add``, one
``cumsum``) in buffers made once per call (``_tv_solver._Work``: time linear in n times the
steps, peak about 10 rows), every row of the batch still running at once (rows that finished leave
the batch once half have: a slow row does not make the others pay its steps). It stops
exactly, not at a tolerance: when the segment solution satisfies the optimality
conditions (:math:`|z_i| \le \lambda` on free edges, :math:`\sigma_i (y_{i+1} - y_i) \ge 0` on
jumps), which is then the exact minimiser up to rounding. Why this and not Condat's
direct algorithm or the taut string: those are exact and O(n) but sequential with
data-dependent backtracking, which torch cannot batch without a Python loop over
elements; the active-set steps are data-parallel, and with :math:`c = 1/4`
(:math:`1/\lambda_{\max}(DD^\top)`) they take 3–60 steps on noisy signals up to
n = 10⁴ (about 100 when λ is so large that only a few segments remain), but O(n) on
smooth noise-free ones, whose active set moves a bounded distance per step (a ramp of
10⁴ entries: 1953 steps; the default ``max_iter`` is therefore ``max(1000, 2n)``). Rows whose
iterates could overflow (:math:`4(n+1)\max(|x|, \lambda)` near the float64 limit) are
solved for :math:`(2^{-k}x, 2^{-k}\lambda)` and scaled back, exactly: :math:`y` is
positively homogeneous.

**Backward.** On the final segments :math:`y` is an affine function of :math:`x` and
:math:`\lambda`: :math:`\partial y/\partial x` averages over each segment (a symmetric
projection), and :math:`\partial y_{s..e}/\partial\lambda = (\sigma_e - \sigma_{s-1})/(e-s+1)`.
This is the exact derivative wherever the active set is stable; it does not exist
where an edge is at a tie (a free edge with :math:`|z_i| = \lambda`, or a jump of size 0),
which is detected (to a few ulps) and reported with a ``GradientWarning``; the
derivative used there is the one of the current segmentation. At :math:`\lambda = 0`
(the edge of the domain) :math:`y = x`, :math:`\partial y/\partial x = I`, and the
λ-derivative is the one-sided one at :math:`0^+`, whose segments are the runs of equal
entries of :math:`x`; where there are such runs and both :math:`x` and :math:`\lambda`
require grad, :math:`y` is not differentiable in the pair, which a ``GradientWarning`` says.
The backward applies the transpose of this Jacobian, forward-mode AD
(``torch.autograd.forward_ad``, ``torch.func.jvp``) the Jacobian itself:
:math:`\dot y = P\dot x + \dot\lambda\,Pt` (:math:`P` the segment average,
:math:`t_i = \sigma_i - \sigma_{i-1}`, :math:`\dot x` for :math:`P\dot x` where
:math:`\lambda = 0`), with the same warnings and the same values at ties.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from .._autograd import BatchShape, may_carry_tangents, outside_compile, refuse_vmap
from .._checks import (building, check_bool, check_count, check_device, check_finite, check_int, check_tensor,
                       normalize_dims, real_number, unread)
from ..errors import OptionError, ShapeError
from ._repr import format_option
from ._module_options import store_option
from ._overflow import option_cast
from ._tv_function import _TVFn
from ._tv_solver import _SAFE, _TINY, _solve
from .degeneracy import naming_batch

__all__ = ["TotalVariation1d", "tv_denoise"]


# --------------------------------------------------------------------------- public API


def _check_lam_option(lam: Any) -> Any:
    """Check λ; returns it (a tensor as ``check_tensor`` returns it)."""
    if isinstance(lam, torch.Tensor):
        lam = check_tensor("lam", lam)
        if lam.numel() and not unread(lam) and not bool((torch.isfinite(lam) & (lam >= 0)).all()):
            raise OptionError(
                f"lam must be finite and >= 0, got {lam.detach().flatten()[:4].tolist()}"
            )
        return lam
    # (real_number: an integer beyond the float range is refused here, not an OverflowError)
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (
        math.isfinite(real_number(lam)) and real_number(lam) >= 0
    ):
        raise OptionError(f"lam must be a finite number >= 0 or a tensor, got {lam!r}")
    return lam


def _check_max_iter(max_iter: Any) -> int | None:
    return None if max_iter is None else check_count("max_iter", max_iter)


def _default_steps(n: int) -> int:
    """max_iter's default: max(1000, 2n). Smooth noise-free signals move their active set
    a bounded distance per step and took O(n) steps (a ramp of 10⁴: 1953), which a fixed
    1000 refused; noisy ones take 3–60."""
    return max(1000, 2 * n)


@outside_compile
def _denoise_rows(x: torch.Tensor, lam: Any, rows: torch.Tensor, lam_rows: torch.Tensor, max_iter: int,
                  batch: tuple[int, ...]) -> torch.Tensor:
    """y for the (R, n) float64 ``rows`` and their λ (R, 1) (``x`` and ``lam``: the caller's,
    for the finiteness check and the forward-mode test): the host read, the scaling and the
    solve (:func:`_solve`, through :class:`_TVFn` where a gradient or tangent is wanted).

    Never traced by torch.compile (a clean graph break around it, as ``ConvexLayer.forward``
    has): traced, every host read broke the graph inside the solver's loop, and each resume
    function guarded on the values read, which change from call to call: the number of rows
    still running, whether the working set had been compacted (``idx is None``), the step
    count, and min λ (a learnable λ: a new value each training step, a float guard). So
    nearly every call recompiled; batch sizes alternating 16 and 9 hit dynamo's recompile
    limit (8) in ``_put``: 6 training steps of a TotalVariation1d alone compiled 28 graphs in
    15 s on a small CPU (now 7 graphs, 4.6 s, all in the first two steps, one per batch
    size). The solver's steps are small ops decided on the host; compiling them gains
    nothing. Run eagerly, the graph around the node is compiled once per input shape.
    """
    n = rows.shape[1]
    amax = rows.detach().abs().amax(1, keepdim=True)
    m, scale = torch.maximum(amax, lam_rows.detach()), None
    # One host read (the one a finite check costs) says whether x is finite, whether
    # the iterates, up to 4(n+1)·max(|x|, λ), could overflow, and whether some λ is 0.
    top, low, bottom = 0.0, 1.0, 1.0
    if rows.shape[0]:
        # (bottom over the rows that are not all 0: an all-zero row with λ = 0 beside a row
        # of 1e-313 turned the scale-up off for every row, and that one cycled: SolverError)
        top, low, bottom = torch.stack([m.max(), lam_rows.detach().min(),
                                        m.masked_fill(m == 0, math.inf).min()]).tolist()
    if not math.isfinite(top):
        check_finite("x", x)  # raises, counting the NaN and Inf
    if top * 4.0 * (n + 1) > _SAFE or 0.0 < bottom < _TINY:
        # Per row 2^-k: the least k ≥ 0 bringing it under _SAFE, or, for a row below
        # _TINY (not 0), k < 0 bringing it to about 1 (at most 2^1000): its rounding bounds,
        # eps times its magnitudes, underflowed to 0 and the active set cycled (x ~ 1e-310).
        e = torch.frexp(m)[1]
        k = (e + math.ceil(math.log2(4 * (n + 1))) - round(math.log2(_SAFE))).clamp(min=0)
        k = torch.where((m > 0) & (m < _TINY), e.clamp(min=-1000), k)
        scale = torch.ldexp(torch.ones_like(m), -k)  # from exponents: no overflow
    if (torch.is_grad_enabled() and (x.requires_grad or lam_rows.requires_grad)) or may_carry_tangents(x, lam):
        # Also for n = 1 or an empty batch, so that y stays in the graph of x and λ; and
        # under forward-mode AD, so that the tangent is the node's (its jvp), not the
        # solver's ops differentiated (one-sided at ties, with no warning).
        y = _TVFn.apply(rows, lam_rows, scale, low == 0, max_iter, BatchShape(batch))[0]
    else:
        with naming_batch(batch):  # (a failure names the signals in x's shape without dim)
            y = _solve(rows, lam_rows, max_iter, scale, low == 0)[0]
    return y


def tv_denoise(
    x: torch.Tensor, lam: float | torch.Tensor = 1.0, dim: int = -1, *, max_iter: int | None = None
) -> torch.Tensor:
    r"""1-D total variation denoising (the fused-lasso signal approximator), exact.

    .. math::

        y = \operatorname*{argmin}_u \tfrac12 \|u - x\|_2^2
        + \lambda \sum_i |u_{i+1} - u_i|

    over one dimension of ``x``. The result is piecewise constant; each segment holds
    the mean of ``x`` over it, moved by :math:`\lambda(\sigma_e - \sigma_{s-1})/\text{len}`
    towards its neighbours (:math:`\sigma = \pm 1` the signs of the jumps at its ends, 0
    at the ends of the signal). Solved exactly by a batched primal–dual active-set method
    on the dual (module docstring), in float64 whatever the input dtype. Gradients with
    respect to ``x`` (segment averages of the incoming gradient) and ``lam`` (when it is a
    tensor that requires grad) are exact, and so are forward-mode tangents (the same
    Jacobian); at ties (an edge exactly at the
    merge/split point) a ``GradientWarning`` says that the derivative does not exist.
    At ``lam = 0``, ``y = x`` exactly, :math:`\partial y/\partial x = I` and the ``lam``
    gradient is the one-sided derivative at :math:`0^+` (``lam >= 0`` is the domain).

    Args:
        x: signals, floating point.
        lam: :math:`\lambda \ge 0`: a number, or a tensor broadcastable to ``x``'s shape
            with ``dim`` removed (one λ per signal), learnable. Default: 1.0.
        dim: the dimension along which the signal runs. Default: -1.
        max_iter: most active-set steps; ``None`` for ``max(1000, 2n)``. Default: ``None``.

    Shape:
        - Input: :math:`(*, n, *)` with ``n`` at ``dim``.
        - Output: same shape, dtype and device as ``x``.

    Raises:
        DTypeError: ``x`` or a tensor ``lam`` is not floating point.
        NonFiniteError: ``x`` has NaN or Inf.
        ShapeError: ``dim`` out of range, ``x`` empty along ``dim``, or ``lam`` does not
            broadcast to the batch shape.
        InputError: a tensor ``lam`` not on ``x``'s device.
        OptionError: ``lam`` negative or not finite; ``max_iter`` or ``dim`` not ints.
        SolverError: the active-set method did not finish in ``max_iter`` steps (names
            the rows; not seen in testing at the default).

    Warns:
        GradientWarning: in the backward and in forward-mode AD, for rows at a tie, and for rows with ``lam = 0``
            and equal neighbours when both ``x`` and ``lam`` require grad (partials returned).

    References:
        Rudin, Osher & Fatemi, Physica D 1992. Condat, "A Direct Algorithm for 1-D
        Total Variation Denoising", IEEE SPL 2013. Hintermüller, Ito & Kunisch, "The
        primal-dual active set strategy as a semismooth Newton method", SIAM J. Optim.
        2003. Gould, Hartley & Campbell, "Deep Declarative Networks", TPAMI 2021.

    Examples::

        >>> x = torch.tensor([0.0, 0.1, 2.0, 2.1])
        >>> tv_denoise(x, lam=0.5)
        tensor([0.3000, 0.3000, 1.8000, 1.8000])
    """
    x = check_tensor("x", x)
    refuse_vmap("tv_denoise", x, lam)
    lam = _check_lam_option(lam)
    max_iter = _check_max_iter(max_iter)
    check_int("dim", dim)
    d = normalize_dims("dim", dim, x.ndim)[0]
    n = x.shape[d]
    max_iter = _default_steps(n) if max_iter is None else max_iter
    if n == 0:
        raise ShapeError(f"x must have at least one entry along dim={dim}, got shape {tuple(x.shape)}")
    batch = x.shape[:d] + x.shape[d + 1:]
    if isinstance(lam, torch.Tensor):
        try:
            ok = torch.broadcast_shapes(lam.shape, batch) == batch
        except RuntimeError:
            ok = False
        if not ok:
            raise ShapeError(
                f"lam must broadcast to the shape of x without dim={dim}, {tuple(batch)}, "
                f"got shape {tuple(lam.shape)}"
            )
        check_device("lam", lam, x)
    work = torch.float64
    xs = x.to(work).movedim(d, -1)
    rows = xs.reshape(math.prod(batch), n)  # (not -1: jacfwd's tangents on an empty batch have a vmap dim of 0)
    if isinstance(lam, torch.Tensor):
        lam_rows = option_cast("tv_denoise", "lam", lam, work).expand(batch).reshape(rows.shape[0], 1)
    else:
        lam_rows = torch.full((rows.shape[0], 1), float(lam), dtype=work, device=x.device)
    y = _denoise_rows(x, lam, rows, lam_rows, max_iter, tuple(batch))
    # Contiguous like a contiguous x (moved back from the last dim, y was strided).
    return y.reshape(xs.shape).movedim(-1, d).to(x.dtype).contiguous()


class TotalVariation1d(nn.Module):
    r"""Module form of :func:`tv_denoise`, with an optionally learnable :math:`\lambda`.

    .. math::

        y = \operatorname*{argmin}_u \tfrac12 \|u - x\|_2^2 + \lambda \sum_i |u_{i+1} - u_i|

    Args:
        lam: :math:`\lambda \ge 0`, a number or a tensor (one per signal); an
            :class:`~torch.nn.Parameter` is kept as it is and learned. Default: 1.0.
        learnable: store ``lam`` as an ``nn.Parameter`` and learn it. Default: False.
        dim: the dimension along which the signal runs. Default: -1.
        max_iter: most active-set steps; ``None`` for ``max(1000, 2n)``. Default: ``None``.

    Shape:
        - Input: :math:`(*, n, *)`; Output: same shape.

    Raises:
        OptionError: at construction for a negative ``lam`` or bad options; the call
            raises as :func:`tv_denoise` (including when training drove a learnable
            ``lam`` below 0).
        DTypeError: at construction, a ``lam`` tensor that is not floating point.

    Examples::

        >>> tv = TotalVariation1d(lam=0.5, learnable=True)
        >>> y = tv(torch.randn(8, 100))
        >>> y.sum().backward(); tv.lam.grad.shape
        torch.Size([])
    """

    @building()
    def __init__(
        self,
        lam: float | torch.Tensor = 1.0,
        learnable: bool = False,
        dim: int = -1,
        *,
        max_iter: int | None = None,
    ) -> None:
        super().__init__()
        _check_lam_option(lam)
        check_bool("learnable", learnable)
        check_int("dim", dim)
        self.max_iter = _check_max_iter(max_iter)
        self.dim, self.learnable = dim, learnable or isinstance(lam, nn.Parameter)
        if isinstance(lam, nn.Parameter):
            # Kept as the caller's parameter, learnable, as every node's options are: it
            # was copied into a buffer unless learnable=True, and never learned.
            self.lam = lam
        elif learnable:
            # A number in float64, the dtype the node solves in: in the default float32
            # 1e40 became inf (then refused at the call) and 1e-50 silently 0.
            value = (lam.detach().clone() if isinstance(lam, torch.Tensor)
                     else torch.tensor(float(lam), dtype=torch.float64))
            self.lam = nn.Parameter(value if value.is_floating_point() else value.double())
        else:
            store_option(self, "lam", lam, as_float=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tv_denoise(x, self.lam, self.dim, max_iter=self.max_iter)

    def extra_repr(self) -> str:
        return (f"lam={format_option(self.lam)}, learnable={self.learnable}, dim={self.dim}, "
                f"max_iter={self.max_iter}")
