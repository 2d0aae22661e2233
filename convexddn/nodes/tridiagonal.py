r"""Batched tridiagonal linear systems as a differentiable node.

.. math::

    x = A^{-1} d, \qquad
    A = \begin{pmatrix} b_1 & c_1 & & \\ a_2 & b_2 & \ddots & \\ & \ddots & \ddots & c_{n-1} \\
    & & a_n & b_n \end{pmatrix}

(``diag`` :math:`= b`, ``lower`` :math:`= (a_2, \dots, a_n)`, ``upper`` :math:`= (c_1, \dots,
c_{n-1})`, ``rhs`` :math:`= d`: the argument order of the DDN reference's ``tridiagsolve(b, a, c,
d)``). The minimiser of :math:`\tfrac12 x^\top A x - d^\top x` for symmetric positive definite
:math:`A`, and the linear solve inside TV-, spline- and diffusion-type layers.

**Solver** (:mod:`._tridiagonal_solver`): cyclic reduction or the Thomas algorithm, all batch
elements in one tensor, unpivoted and so fast; each element's answer is then checked (its
componentwise backward error, formed in exponent-split form where a plain evaluation would
under- or overflow), refined once where the check fails, for 16/32-bit inputs solved again
unpivoted in float64 where it still fails (checked against float32's ε, as everywhere, and accepted
where the matrix's estimated condition number is below 1/ε), and solved again, equilibrated by
powers of two and with partial pivoting (LAPACK ``gtsv``'s algorithm), where it still fails,
that answer checked the same way (refined up to twice): an element never returns an unchecked
answer. A matrix
singular to working precision (a pivot of that factorisation at rounding level against the
terms that formed it) raises a ``SolverError`` naming the batch elements.

**Derivatives** (implicit, hand-written). From :math:`A x = d`, :math:`dA\,x + A\,dx = dd`:
with :math:`w = A^{-\top} g` (:math:`A^\top` is tridiagonal with ``lower`` and ``upper``
swapped: the same checked solver),

.. math::

    \bar d = w, \quad \bar b_i = -\textstyle\sum_k w_{ik} x_{ik}, \quad
    \bar a_{i} = -\textstyle\sum_k w_{i+1,k} x_{ik}, \quad \bar c_{i} = -\textstyle\sum_k w_{ik} x_{i+1,k}

(:math:`\bar a_i` for the entry :math:`(i+1, i)`, :math:`\bar c_i` for :math:`(i, i+1)`),
summed over broadcast dimensions; forward mode: :math:`\dot x = A^{-1}(\dot d - \dot A x)`.
The products and sums are formed plainly and, where that overflows (one host read), again in split
form (:func:`._tridiagonal_scaled.product_sum`, :func:`~._tridiagonal_scaled.split_sum_to`,
:func:`~._tridiagonal_scaled.scaled_residual`: powers of two, exact), so that a derivative within
the dtype's range comes out right and one beyond it is ±Inf with a ``GradientWarning`` naming the
argument (vmapped cotangents and tangents: the plain form, unchecked).
These solves take the forward's route per element (refined, wide, pivoted) and make no singularity
verdict of their own (the forward's stands: a derivative that misses accuracy or overflows is a
``GradientWarning``). Under a vmap of the cotangents or tangents (``torch.func.jacrev``,
``jacfwd``, ``jacobian(vectorize=True)``), whose values allow no host decision, that route is
reproduced without their own check; ``torch.func.grad``, ``vjp`` and ``jvp`` (not vmapped) are
checked. float16 and bfloat16 results and derivatives are checked on the cast back: a forward
that overflows it raises, as in float32, a derivative warns. Second derivatives
raise :class:`~convexddn.errors.DoubleBackwardError`; ``torch.func.vmap`` over the inputs
raises a ``ProblemError`` (the batch dims do that job).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._anchor import graph_anchor
from .._autograd import BatchShape, any_batched, bind_fast, may_carry_tangents, refuse_vmap, save_plain
from .._checks import check_device, check_finite, check_tensor
from .._first_order import first_order, first_order_jvp
from ..errors import DTypeError, ShapeError
from ._overflow import all_finite, warn_cast_overflow, warn_gradient_overflow
from ._tridiagonal_scaled import product_sum, scaled_residual, split_form, split_sum_to, unscale
from ._tridiagonal_solver import check_cast, multiply, solve_checked

__all__ = ["TridiagonalSolve", "tridiagonal_solve"]

_NAME = "tridiagonal_solve"
_ARGS = ("diag", "lower", "upper", "rhs")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 are solved in float32 (their 3–4 digits would not survive the
    elimination), and the answer rounded once; float32 and float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _flat(t: torch.Tensor, batch: tuple, tail: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``t`` broadcast to ``batch + tail`` and flattened to ``(M, *tail)`` in ``dtype``
    (``math.prod``, not -1: an empty batch)."""
    return t.to(dtype).expand(*batch, *tail).reshape(math.prod(batch), *tail)


def _plain_grad(pair, w: torch.Tensor, batch: tuple, shape: torch.Size) -> torch.Tensor:
    r"""A gradient of :func:`_TridiagonalFn.backward`: :math:`-\sum_k u_{ik} v_{ik}` for
    ``pair = (u, v)`` (``(M, L, K)``), ``w`` itself for ``None`` (rhs), summed over the broadcast
    batch to ``shape``, plainly."""
    t = w if pair is None else -(pair[0] * pair[1]).sum(-1)
    return t.reshape(*batch, *t.shape[1:]).sum_to_size(shape)


def _split_grad(pair, w: torch.Tensor, batch: tuple, shape: torch.Size) -> torch.Tensor:
    r""":func:`_plain_grad` in split form (:func:`._tridiagonal_scaled.product_sum`,
    :func:`~._tridiagonal_scaled.split_sum_to`: powers of two, exact): no product or partial sum
    overflows, so the result is ±Inf only where the gradient is beyond the dtype's range."""
    mant, exp = split_form(w) if pair is None else product_sum(*pair)
    mant = mant if pair is None else -mant
    tail = mant.shape[1:]
    return split_sum_to(mant.reshape(*batch, *tail), exp.reshape(*batch, *tail), tuple(shape))


def _saved(ctx) -> tuple[torch.Tensor, ...]:
    """The saved ``(b, a, c, x, route)`` as the forward solved them: ``(M, N)``, ``(M, N-1)``,
    ``(M, N-1)`` and ``(M, N, K)`` in the work dtype (views where the inputs need no broadcast or
    cast)."""
    diag, lower, upper, x, routed = ctx.saved_tensors
    flat = (_flat(t, ctx.batch, (t.shape[-1],), x.dtype) for t in (diag, lower, upper))
    return *flat, x.reshape(math.prod(ctx.batch), *x.shape[-2:]), routed


@bind_fast
class _TridiagonalFn(torch.autograd.Function):
    """Checked solve forward; the implicit derivatives of the module docstring."""

    # torch.func.jacfwd vmaps the jvp over its tangents (the primals stay unbatched).
    generate_vmap_rule = True

    @staticmethod
    def forward(diag, lower, upper, rhs, shape):  # type: ignore[override]
        n, k, batch = *rhs.shape[-2:], shape.dims
        work = _work_dtype(diag.dtype)
        b, a, c = (_flat(t, batch, (t.shape[-1],), work) for t in (diag, lower, upper))
        x, route = solve_checked(b, a, c, _flat(rhs, batch, (n, k), work), _NAME, batch)
        out = x.to(rhs.dtype)
        if out.dtype != x.dtype:  # (float16, bfloat16: the rounding to the caller's dtype may overflow)
            check_cast(_NAME, x, out, batch)
        # (Not a view where the batch is one dimension, else cloned by the caller: an output that is a
        # view made inside a custom Function refuses in-place edits.)
        return (out if out.shape == (*batch, n, k) else out.reshape(*batch, n, k)), route

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        diag, lower, upper, rhs, shape = inputs
        x, routed, batch = *output, shape.dims
        ctx.mark_non_differentiable(routed)
        work = _work_dtype(diag.dtype)
        # The inputs and the solution themselves, flattened where read (_saved): views of them made
        # here (under no_grad) turned an input changed in place before the backward into torch's
        # "view created in no_grad mode" error, not its version error, and a broadcast or float16
        # input's flattened copy held more memory to the backward than the input.
        x = x if x.dtype == work else x.detach().to(work)  # (a float16 x: its rounded value, in float32)
        save_plain(ctx, diag, lower, upper, x, routed)
        ctx.save_for_forward(diag, lower, upper, x, routed)
        ctx.set_materialize_grads(False)
        ctx.batch, ctx.shapes = batch, [t.shape for t in inputs[:4]]
        ctx.dtypes = [t.dtype for t in inputs[:4]]
        # The inputs' graph, not rhs itself (not read by the derivatives), for a second differentiation's
        # error (see first_order); held, rhs outlived a checkpointed forward (convexddn._anchor)
        ctx.anchors = graph_anchor(diag, lower, upper, rhs)

    @staticmethod
    @first_order(_NAME)
    def backward(ctx, grad_x, _gr):  # type: ignore[override]
        if grad_x is None:
            return None, None, None, None, None
        b, a, c, x, routed = _saved(ctx)
        m, n, k = x.shape
        g = grad_x.to(x.dtype).reshape(m, n, k)
        # Aᵀ: lower and upper swapped; the forward's route per element (refined, pivoted) taken,
        # and no singularity verdict of its own (strict=False: Aᵀ is singular with A, which the
        # forward accepted). Cotangents batched by a vmap (torch.func.jacrev,
        # jacobian(vectorize=True)) allow no host decision on their values: the forward's route
        # is then reproduced unchecked; unbatched ones (torch.func.grad, vjp) are checked.
        check = not any_batched(grad_x)
        w, _ = solve_checked(b, c, a, g, _NAME, ctx.batch, route=routed, check=check, strict=False)
        # Each formed only where its input needs it: plainly, and in split form where that overflowed
        # (products of ±1e200 summed to NaN for a gradient of 0; -Inf for one beyond the range, silently).
        pairs = {"diag": (w, x), "lower": (w[:, 1:], x[:, :-1]), "upper": (w[:, :-1], x[:, 1:]), "rhs": None}
        needed = [(name, shape) for name, need, shape in zip(_ARGS, ctx.needs_input_grad, ctx.shapes) if need]
        grads = {name: _plain_grad(pairs[name], w, ctx.batch, shape) for name, shape in needed}
        if check and grads and not all_finite(list(grads.values())):
            grads = {name: _split_grad(pairs[name], w, ctx.batch, shape) for name, shape in needed}
            given = torch.where(torch.isfinite(g).flatten(1).all(1), 0.0, math.nan).reshape(*ctx.batch, 1)
            warn_gradient_overflow(_NAME, given, [(name, t.flatten(-2) if name == "rhs" else t)
                                                  for name, t in grads.items()], (-1,))
        out, casts = [], []
        for name, dtype in zip(_ARGS, ctx.dtypes):
            out.append(grads[name].to(dtype) if name in grads else None)
            if name in grads:
                casts.append((name, grads[name], out[-1], 2 if name == "rhs" else 1))
        if check and casts and ctx.dtypes[0] != x.dtype:  # (float16, bfloat16: the same rule as the forward's)
            warn_cast_overflow(_NAME, casts)  # (each in its input's shape: named in it)
        return (*out, None)

    @staticmethod
    @first_order_jvp(_NAME)
    def jvp(ctx, diag_t, lower_t, upper_t, rhs_t, _batch):  # type: ignore[override]
        r""":math:`\dot x = A^{-1}(\dot d - \dot A x)`, the forward's pivoted elements pivoted."""
        b, a, c, x, routed = _saved(ctx)
        m, n, k = x.shape
        r = x.new_zeros(x.shape) if rhs_t is None else _flat(rhs_t, ctx.batch, (n, k), x.dtype)
        # Under torch.func.jacfwd the tangents are batched: no host decision on their values,
        # so the forward's route per element is reproduced unchecked (torch.func.jvp: checked).
        check = not any_batched(diag_t, lower_t, upper_t, rhs_t)
        scale = None
        if diag_t is not None or lower_t is not None or upper_t is not None:  # (else no -dA x to form)
            zero_b, zero_o = torch.zeros_like(b), torch.zeros_like(a)
            db, da, dc = (zero if t is None else _flat(t, ctx.batch, (t.shape[-1],), x.dtype)
                          for t, zero in ((diag_t, zero_b), (lower_t, zero_o), (upper_t, zero_o)))
            plain = r - multiply(db, da, dc, x)
            if check and not all_finite([plain]):  # (dA x overflowed: formed again scaled, x_t = A⁻¹r · 2^s)
                given = torch.stack([t.isfinite().flatten(1).all(1) for t in (db, da, dc, r)]).all(0)
                r, scale = scaled_residual(r, db, da, dc, x)
            else:
                r = plain
        x_t, _ = solve_checked(b, a, c, r, _NAME, ctx.batch, route=routed, check=check, strict=False)
        if scale is not None:
            x_t = unscale(x_t, scale)
            # (in the caller's batch shape, to name its elements so)
            given = torch.where(given, 0.0, math.nan).reshape(*ctx.batch, 1, 1)
            warn_gradient_overflow(f"{_NAME} (forward mode)", given, [("the solution", x_t.reshape(*ctx.batch, n, k))],
                                   (-2, -1), tangent=True)
        out = x_t.to(ctx.dtypes[3])
        if check and out.dtype != x_t.dtype:
            warn_cast_overflow(_NAME, [("the solution", x_t.reshape(*ctx.batch, n, k), out.reshape(*ctx.batch, n, k),
                                        2)], tangent=True)
        return out.reshape(*ctx.batch, n, k), None


def _check_inputs(diag, lower, upper, rhs) -> tuple[torch.Tensor, bool, tuple]:
    """The checks of :func:`tridiagonal_solve`: ``(rhs as (*, N, K), vector, batch shape)``."""
    for name, t in (("lower", lower), ("upper", upper), ("rhs", rhs)):
        if t.dtype != diag.dtype:
            raise DTypeError(f"{name} must have diag's dtype {diag.dtype}, got {t.dtype}")
        check_device(name, t, diag, "diag")
    if diag.ndim < 1 or diag.shape[-1] == 0:
        raise ShapeError(f"diag must have shape (*, N) with N >= 1, got shape {tuple(diag.shape)}")
    n = diag.shape[-1]
    for name, t in (("lower", lower), ("upper", upper)):
        if t.ndim < 1 or t.shape[-1] != n - 1:
            raise ShapeError(f"{name} must have shape (*, N-1) = (*, {n - 1}) for diag of shape "
                             f"{tuple(diag.shape)}, got shape {tuple(t.shape)}")
    if rhs.ndim == diag.ndim and rhs.ndim >= 1:
        vector, rm = True, rhs.unsqueeze(-1)
    elif rhs.ndim == diag.ndim + 1:
        vector, rm = False, rhs
    else:
        raise ShapeError(f"rhs must have shape (*, N) (as many dims as diag, {diag.ndim}) or (*, N, K) (one more), "
                         f"got shape {tuple(rhs.shape)}")
    if rm.shape[-2] != n:
        raise ShapeError(f"rhs must have N={n} rows like diag {tuple(diag.shape)}, got shape {tuple(rhs.shape)}")
    try:
        batch = tuple(torch.broadcast_shapes(diag.shape[:-1], lower.shape[:-1], upper.shape[:-1], rm.shape[:-2]))
    except RuntimeError:
        raise ShapeError(f"the batch shapes of diag {tuple(diag.shape[:-1])}, lower {tuple(lower.shape[:-1])}, "
                         f"upper {tuple(upper.shape[:-1])} and rhs {tuple(rm.shape[:-2])} do not broadcast") from None
    tensors = (diag, lower, upper, rhs)
    if not bool(torch.isfinite(torch.stack([t.detach().sum() for t in tensors])).all()):
        # (one host read in the common case: a NaN or Inf makes its tensor's sum non-finite;
        # a sum that overflows sends here too, and check_finite clears it)
        for name, t in zip(("diag", "lower", "upper", "rhs"), tensors):
            check_finite(name, t)
    return rm, vector, batch


def tridiagonal_solve(diag: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, rhs: torch.Tensor
                      ) -> torch.Tensor:
    r"""Solve batched tridiagonal systems :math:`A x = d`, differentiably.

    .. math::

        A_{ii} = \text{diag}_i, \quad A_{i+1,i} = \text{lower}_i, \quad A_{i,i+1} = \text{upper}_i,
        \qquad x = A^{-1}\,\text{rhs}

    Solved by cyclic reduction or the Thomas algorithm (the faster for the shape), every
    element's answer checked by its componentwise backward error, refined once where that fails,
    (float32, float16, bfloat16) re-solved unpivoted in float64 where it still fails (that answer
    checked against float32's ε and accepted where the estimated condition number is
    below 1/ε), and re-solved, equilibrated by powers of two (exact) and with partial pivoting
    (as LAPACK ``gtsv``), where it still fails (that answer checked alike, refined up to twice): any
    nonsingular matrix is solved stably, diagonally dominant and SPD ones at the fast path's cost
    (module docstring of :mod:`convexddn.nodes._tridiagonal_solver`). O(N log N) work, O(log N)
    vectorised steps (cyclic reduction); the pivoted fallback is a loop over the N rows.
    Gradients and forward-mode tangents are implicit: one more (transposed) solve.

    Args:
        diag: the main diagonal :math:`b_1 \dots b_N`.
        lower: the sub-diagonal :math:`a_2 \dots a_N` (entries :math:`(i+1, i)`).
        upper: the super-diagonal :math:`c_1 \dots c_{N-1}` (entries :math:`(i, i+1)`).
        rhs: the right-hand side(s).

    Shape:
        - diag :math:`(*, N)`, lower and upper :math:`(*, N-1)` (empty for N = 1); their leading
          dims broadcast with each other and with rhs's.
        - rhs :math:`(*, N)` (as many dims as diag) or :math:`(*, N, K)` (one more: K right-hand sides).
        - Output: rhs's shape with the broadcast batch, in the inputs' dtype (float16 and bfloat16
          solved in float32) and device.

    Raises:
        DTypeError: an input is not a floating-point tensor, or not of diag's dtype.
        ShapeError: N = 0, lower/upper not of length N-1, rhs of the wrong rank or N, or batch
            shapes that do not broadcast.
        NonFiniteError: an input holds NaN or Inf.
        InputError: inputs on different devices.
        SolverError: :math:`A` is singular to working precision (a pivot of its row-scaled LU
            factorisation with partial pivoting 0, or at most 4ε times the larger of the two terms
            whose difference formed it: the message gives the ratio), or the solution overflows
            the dtype (float16's on the cast back too), or the pivoted answer's componentwise
            backward error stays above 64ε after two refinements (too ill-conditioned or too
            badly graded to certify), for some batch elements (named in the message and in
            ``indices``).

    Warns:
        GradientWarning: a gradient or tangent is beyond the dtype's range (the work dtype, or
            float16 on the cast back; products that overflow only on the way are formed scaled),
            or its solve misses working accuracy.

    References:
        R. W. Hockney and C. R. Jesshope, *Parallel Computers*, 1981 (cyclic reduction).
        N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, §9.6 (tridiagonal
        systems) and §12 (iterative refinement). LAPACK ``dgtsv``.

    Examples::

        >>> diag = torch.full((2, 4), 4.0); off = torch.ones(2, 3)
        >>> x = tridiagonal_solve(diag, off, off, torch.ones(2, 4))
        >>> x[0]
        tensor([0.2105, 0.1579, 0.1579, 0.2105])
    """
    tensors = [check_tensor(name, t) for name, t in (("diag", diag), ("lower", lower), ("upper", upper),
                                                     ("rhs", rhs))]
    refuse_vmap(_NAME, *tensors)
    diag, lower, upper, rhs = tensors
    rm, vector, batch = _check_inputs(diag, lower, upper, rhs)
    if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or may_carry_tangents(*tensors):
        x = _TridiagonalFn.apply(diag, lower, upper, rm, BatchShape(tuple(batch)))[0]  # (see BatchShape)
        x = x.clone() if x._is_view() else x  # (y += 1 on the result, as on any other node's)
    else:
        x = _TridiagonalFn.forward(diag, lower, upper, rm, BatchShape(tuple(batch)))[0]
    return x.squeeze(-1) if vector else x


class TridiagonalSolve(nn.Module):
    r"""Module form of :func:`tridiagonal_solve` (no options): ``forward(diag, lower, upper, rhs)``
    returns :math:`A^{-1}\,\text{rhs}` for the tridiagonal :math:`A` with those diagonals.

    Shape:
        - as :func:`tridiagonal_solve`: diag :math:`(*, N)`, lower and upper :math:`(*, N-1)`, rhs
          :math:`(*, N)` or :math:`(*, N, K)`; Output: rhs's shape with the broadcast batch.

    Examples::

        >>> solve = TridiagonalSolve()
        >>> x = solve(torch.full((8, 16), 3.0), torch.ones(8, 15), torch.ones(8, 15), torch.randn(8, 16))
        >>> x.shape
        torch.Size([8, 16])
    """

    def forward(self, diag: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, rhs: torch.Tensor
                ) -> torch.Tensor:
        return tridiagonal_solve(diag, lower, upper, rhs)
