"""Weighted, ridge-regularised least squares as a declarative node.

.. math::

    x(A, b, w, \\rho) = \\operatorname*{argmin}_{u \\in \\mathbb{R}^N}
        \\tfrac12 \\|W^{1/2}(A u - b)\\|_2^2 + \\tfrac12 \\sum_n \\rho_n u_n^2,
    \\qquad W = \\operatorname{diag}(w),

solved by a Householder QR of the stacked matrix
:math:`[W^{1/2} A;\\ \\operatorname{diag}(\\rho)^{1/2}]` in float64 (float32 input is
promoted, so condition numbers up to ~1e6 keep float64-grade answers for small
residuals: QR's error grows like ``eps·cond`` where the normal equations' grows like
``eps·cond²``; a large residual adds the problem's own ``eps·cond²·tan θ``, estimated
and warned about above 1e-6).

The backward pass differentiates the optimality condition
:math:`H x = A^\\top W b`, :math:`H = A^\\top W A + \\operatorname{diag}(\\rho) = R^\\top R`
(Gould et al. 2021, Prop. 4.4). With the incoming gradient :math:`g`, one pair of
triangular solves gives :math:`v = H^{-1} g`; then, with the residual
:math:`r = b - A x`,

.. math::

    \\bar b = W A v, \\quad \\bar A = W (r v^\\top - A v x^\\top), \\quad
    \\bar w_m = (A v)_m\\, r_m, \\quad \\bar\\rho_n = -v_n x_n,

summed over the columns of ``b`` when it has several. No Jacobian is formed. Where
weights sort the rows (one over 1024× a data row), :math:`W A v` and :math:`W r` are
formed through the forward's Q (``_least_squares_factor.weighted_terms``), and the jvp's
:math:`H^{-1} A^\\top W d` as :math:`R^{-1} (Q^\\top W^{1/2} d)_{:n}`: a heavy row's
:math:`(A v)_m` is :math:`\\sim 1/w_m`, and formed directly it erred by eps times :math:`w_m`.

Public name: :func:`least_squares`; the least-squares pooling layers built on it are
in :mod:`convexddn.nodes.linear_fit`.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.
"""
from __future__ import annotations

from typing import Any

import torch

from .._autograd import any_batched, bind_fast, functorch_transforms, may_carry_tangents, refuse_vmap, save_plain
from .._anchor import graph_anchor
from .._first_order import first_order, first_order_jvp
from .._checks import check_device, check_number, check_tensor
from ..errors import DTypeError, ShapeError
from ._least_squares_factor import (apply_qt, backward_gain, check_solution, conditioning, factor, h_solve,
                                    power_of_two_scale, weighted_terms)
from ._overflow import may_overflow, option_cast, warn_gradient_overflow

__all__ = ["least_squares"]

_WORK = torch.float64
_NAMES = ("A", "b", "weights", "ridge")


class _Gate:
    """Whether the backward checks its gradients for overflow (set from the forward's gain);
    False before the call where no backward can follow (the forward skips the gain)."""

    __slots__ = ("check",)

    def __init__(self) -> None:
        self.check = True


# --------------------------------------------------------------------------- node


@bind_fast
class _LeastSquaresFunction(torch.autograd.Function):
    """x = argmin ½‖W^{1/2}(Au − b)‖² + ½ Σ ρ_n u_n² for A (…, M, N), b (…, M, K)."""

    generate_vmap_rule = True  # (torch.func.jacfwd: a vmap over the jvp, the primals unbatched)

    @staticmethod
    def forward(A, b, w, ridge, out_dtype, gate):  # type: ignore[override]
        A, b = A.to(_WORK), b.to(_WORK)
        w = None if w is None else w.to(_WORK)
        ridge = None if ridge is None else ridge.to(_WORK)
        a, tau, R, sw, columns, order, graded, rows = factor(A, w, ridge)
        bt = b if sw is None else sw * b
        qtb = apply_qt(a, tau, bt, order)
        x = torch.linalg.solve_triangular(R, qtb[..., :A.shape[-1], :], upper=True)
        # A copy even in float64: the returned x must not be the saved (non-differentiable)
        # x. The caller checks the rank mask and reads the gain (one host sync with its
        # input checks).
        d = torch.diagonal(R, dim1=-2, dim2=-1).abs()
        # (The gain matters only to a backward: none follows a call outside the Function.)
        singular, error, inv_sigma2 = conditioning(d, columns, R, qtb, graded,
                                                   None if order is None else (a, tau, rows, x))
        gain = backward_gain(d, x, bt, columns, inv_sigma2) if gate.check else d.new_zeros(())
        # Where weights sorted the rows (one over 1024× a data row), the derivatives also
        # use Q (the reflectors, the row order, Qᵀ b); within that spread the direct
        # formulas err by eps·w_max/w_min at most (2e-10), and cost an ormqr less.
        weighted = () if w is None or order is None else (a, tau, qtb, order)
        return (x.to(out_dtype, copy=True), R, x, singular, error, gain) + weighted

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        A, b, w, ridge, _, gate = inputs
        _, R, x, bad, error, gain, *weighted = output
        ctx.mark_non_differentiable(R, x, bad, error, gain, *weighted)
        save_plain(ctx, A, b, w, ridge, R, x, *weighted)  # (inference-mode inputs as plain copies)
        ctx.save_for_forward(A, b, w, ridge, R, x, *weighted)
        ctx.dtypes = [None if t is None else t.dtype for t in (A, b, w, ridge)]
        ctx.gate = gate  # set by the caller from the forward's host read
        ctx.anchors = graph_anchor(A, b, w, ridge)  # (their graph, not them: see first_order)
        # R, x, the rank mask and the gain are not differentiable: no zero gradients made for them.
        ctx.set_materialize_grads(False)

    @staticmethod
    @first_order("least_squares")
    def backward(ctx, g, _gR, _gx, _gbad, _gerror, _ggain, *_gq):
        A, b, w, ridge, R, x, *q = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g is None:  # (grads are not materialised: x itself was not used)
            return (None,) * 6
        A, b = A.to(_WORK), b.to(_WORK)
        # v = H⁻¹ g = R⁻¹ R⁻ᵀ g: two triangular solves with the forward's factor, R/c (a
        # power of two near its largest entry): v ~ g/c² left float64's range where the
        # gradients, ~g/c, do not (A ~ 1e-170: Inf; A ~ 1e200: 0). So yc = c R⁻ᵀ g and
        # vc = c·v, and each gradient is divided by c once more.
        c = power_of_two_scale(R)
        yc = torch.linalg.solve_triangular((R / c).mT, g.to(_WORK), upper=False)
        vc = torch.linalg.solve_triangular(R / c, yc, upper=True) / c
        Avc = A @ vc
        Av = Avc / c
        wcol = None if w is None else w.to(_WORK).unsqueeze(-1)
        grads: list[Any] = [None] * 6  # A, b, weights, ridge, out_dtype, gate
        if need[0] or need[2]:
            r = b - A @ x
        if q and (need[0] or need[1]):
            # W A v = W^{1/2} Q R⁻ᵀ g and W r = W^{1/2} r_w, r_w = Q [0; (Qᵀ W^{1/2} b) below n]
            # (the weighted residual): a heavy row's (A v)_m and r_m are ~1/w_m, and formed
            # directly they had an error of eps, times w_m (a weight of 1e16: dL/db 100 % off).
            u, rw = weighted_terms(q, yc, R.shape[-1], A.shape[-2])
            sw = wcol.sqrt()
            if need[1]:
                grads[1] = sw * u / c
            if need[0]:
                grads[0] = sw * (rw @ vc.mT - u @ x.mT) / c
        if need[0] and not q:
            gA = (r / c) @ vc.mT
            # r vᵀ − (Av) xᵀ with one product accumulated in place (the subtraction of two
            # (…, M, N) products was the backward's largest op at (64, 40, 12)). Not under a vmap
            # (jacrev): baddbmm_ has no batching rule, and its fallback fails on an empty batch.
            if gA.dim() == 3 and gA.shape[0] == Av.shape[0] == x.shape[0] and "Vmap" not in functorch_transforms():
                gA.baddbmm_(Av, x.mT, alpha=-1.0)
            else:
                gA = gA - Av @ x.mT
            grads[0] = gA if wcol is None else wcol * gA
        if need[1] and not q:
            grads[1] = Av if wcol is None else wcol * Av
        if need[2]:
            grads[2] = (Av * r).sum(-1)
        if need[3]:
            grads[3] = -(vc * x).sum(-1) / c.squeeze(-1)
        for i, t in enumerate((A, b, w, ridge)):
            if grads[i] is not None:
                grads[i] = grads[i].sum_to_size(t.shape).to(ctx.dtypes[i])
        # Finite inputs (checked in the forward) and a finite g give Inf only where the
        # gradient exceeds its dtype (float32 A ~ 1e-20: dA ~ 1e40): checked (a host read)
        # only where the forward's gain says it can happen. Laid out as (*, rows, cols) so
        # that the batch elements line up with g's.
        if ctx.gate.check:
            vec = [None if t is None else t.unsqueeze(-1) for t in grads[2:4]]
            warn_gradient_overflow("least_squares", g, list(zip(_NAMES, grads[:2] + vec)), (-2, -1))
        return tuple(grads)

    @staticmethod
    @first_order_jvp("least_squares")
    def jvp(ctx, A_t, b_t, w_t, ridge_t, _dtype_t, _gate_t):  # type: ignore[override]
        """Forward mode, the derivative of the normal equations H x = AᵀW b:
        H dx = dAᵀW r + AᵀW (db − dA x) + Aᵀ dW r − dρ∘x with r = b − Ax, solved with
        the forward's factor (H = RᵀR), scaled as in the backward: H = c² H', c a power of
        two near R's largest entry, so dx = H'⁻¹(rhs/c)/c (rhs ~ ‖A‖‖dA‖ left float64's
        range for A and dA ~ 1e200 where dx does not)."""
        A, b, w, ridge, R, x, *q = ctx.saved_tensors
        A, b = A.to(_WORK), b.to(_WORK)
        wcol = None if w is None else w.to(_WORK).unsqueeze(-1)
        weigh = (lambda t: t) if wcol is None else (lambda t: wcol * t)  # noqa: E731
        c = power_of_two_scale(R)
        rc = (b - A @ x) / c
        rhs, data = None, None  # data: what enters through AᵀW (db − dA x), see below

        def add(term: torch.Tensor) -> None:
            nonlocal rhs
            rhs = term if rhs is None else rhs + term

        if A_t is not None:
            A_t = A_t.to(_WORK)
            data = -(A_t @ x)
            # dAᵀW r = dAᵀ W^{1/2} r_w with the weighted residual r_w from Q (as the backward).
            wr = weigh(rc) if not q else wcol.sqrt() * weighted_terms(q, None, R.shape[-1], A.shape[-2])[1] / c
            add(A_t.mT @ wr)
        if b_t is not None:
            data = b_t.to(_WORK) if data is None else data + b_t.to(_WORK)
        if w_t is not None:
            add(A.mT @ (w_t.to(_WORK).unsqueeze(-1) * rc))
        if ridge_t is not None:
            add(-ridge_t.to(_WORK).unsqueeze(-1) * x / c)
        dx = torch.zeros_like(x)
        if data is not None and q:
            # H⁻¹ AᵀW d = R⁻¹ (Qᵀ W^{1/2} d) above n, as the forward solves (through H, a
            # heavy row's terms had errors of eps times its weight: dx/db 1e14 off at w = 1e30).
            # (narrow: a full slice [..., :n, :] is an alias, which autograd's vmap cannot batch)
            a, tau, _, *order = q
            z = apply_qt(a, tau, wcol.sqrt() * data, order[0] if order else None).narrow(-2, 0, R.shape[-1])
            dx = dx + torch.linalg.solve_triangular(R / c, z, upper=True) / c
        elif data is not None:
            add(A.mT @ weigh(data / c))
        if rhs is not None:
            dx = dx + h_solve(R / c, rhs.expand_as(x)) / c
        dx = dx.to(ctx.dtypes[0])
        # As the backward checks its gradients, but always (one host read): the jvp runs
        # inside the Function, before the forward's gain is read. Not where a vmap batches
        # the tangents (jacfwd, jacobian(vectorize=True)): no host read of them there.
        given = [t for t in (A_t, b_t, w_t, ridge_t) if isinstance(t, torch.Tensor)]
        sums = None if any_batched(*given) else torch.stack([t.detach().sum(dtype=torch.float64) for t in given])
        if sums is not None and bool(torch.isfinite(sums).all()):
            warn_gradient_overflow("least_squares (forward mode)", torch.zeros_like(dx), [("x", dx)], (-2, -1))
        return (dx,) + (None,) * (5 + len(q))


# --------------------------------------------------------------------------- validation


def _as_ridge(ridge: Any, n: int, like: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
    """The ridge as checked (a tensor as ``check_tensor`` returns it), and ``None`` for a
    zero scalar ridge, else a tensor broadcastable to (*, N)."""
    if isinstance(ridge, torch.Tensor):
        ridge = check_tensor("ridge", ridge)
        check_device("ridge", ridge, like, "A")
        # In the working dtype first: its gradient is summed there, cast back checked (_overflow).
        r = option_cast("least_squares", "ridge", ridge, _WORK)
        r = r if r.ndim > 0 else r.reshape(1)
        if r.shape[-1] not in (1, n):
            raise ShapeError(
                f"ridge must broadcast to (*, N) with N={n} (use shape (*, 1) for one ridge "
                f"per batch element), got shape {tuple(ridge.shape)}"
            )
        return ridge, r
    ridge = check_number("ridge", ridge, at_least=0, hint=" (or pass a tensor)")  # NumPy scalars too
    # In the working dtype: the solve runs there (a float32 A keeps 1/3 exact, and a
    # ridge beyond float32's range does not overflow).
    return ridge, None if ridge == 0 else torch.full((1,), float(ridge), dtype=_WORK, device=like.device)


def least_squares(
    A: torch.Tensor,
    b: torch.Tensor,
    weights: torch.Tensor | None = None,
    ridge: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    r"""Weighted ridge least squares, batched, with an implicit backward.

    .. math::

        x = \operatorname*{argmin}_{u} \|W^{1/2}(A u - b)\|_2^2 + \sum_n \rho_n u_n^2
          = (A^\top W A + \operatorname{diag}\rho)^{-1} A^\top W b

    Forward: Householder QR of :math:`[W^{1/2}A;\ \operatorname{diag}(\rho)^{1/2}]`,
    its rows sorted by size (a ridge or weights far above the rest then cost no accuracy
    in the common case; without column pivoting, which torch lacks, some designs still
    lose it under extreme weights: Powell and Reid's 4 × 3 example, weight 1e20), and
    one triangular solve, in float64 whatever the input dtype (the result is cast
    back), so float32 inputs with condition numbers up to ~1e6 get float64-grade
    solutions and gradients where b is near A's range; in general least squares is
    sensitive to rounding as eps·κ(1 + κ tan θ) (θ the angle of b to the range), which
    is estimated and warned about above 1e-6 (cond 1e6 with tan θ ~ 1 in float32: 1e-5
    off). The accuracy is normwise: components of x far
    below its largest (features of 1e-12 beside an intercept of 1) are exact relative to
    ``‖x‖``, not to themselves. When ``A``, ``weights`` and ``ridge`` have fewer batch
    elements than ``b`` (one design matrix, many right-hand sides) the factorisation is
    done once per distinct matrix.

    Backward: :math:`v = H^{-1} g` by two triangular solves with the forward's
    :math:`R` (:math:`H = R^\top R`), then :math:`\bar b = W A v`,
    :math:`\bar A = W(r v^\top - A v x^\top)`, :math:`\bar w = (A v) \circ r` and
    :math:`\bar\rho = -v \circ x` with :math:`r = b - A x` (summed over the columns of
    a matrix ``b``, and over broadcast batch dimensions).

    Args:
        A: design matrices ``(*, M, N)``, floating point.
        b: targets, ``(*, M)`` (one right-hand side: ``b.ndim == A.ndim - 1``) or
            ``(*, M, K)`` (K right-hand sides: ``b.ndim == A.ndim``); same dtype as ``A``.
        weights: nonnegative row weights ``(*, M)``, or ``None`` for all ones.
            Default: ``None``.
        ridge: :math:`\rho \ge 0`: a number, or a tensor broadcastable to ``(*, N)``
            (per coordinate; shape ``(*, 1)`` for one value per batch element). It may
            require grad. Default: ``0``.

    Shape:
        - ``A (*, M, N)``, ``b (*, M)`` or ``(*, M, K)``, ``weights (*, M)``; the batch
          dimensions ``*`` broadcast against each other.
        - Output: ``(*, N)`` or ``(*, N, K)``, in the dtype of ``A`` and ``b``.

    Raises:
        DTypeError: a tensor is not floating point, or ``A`` and ``b`` differ in dtype.
        ShapeError: ``A`` is not a batch of matrices, ``b``/``weights``/``ridge`` do
            not match its M, N or batch shape, or ``M < N`` with a number ``ridge = 0``
            (a tensor ridge with zeros is checked per element: SolverError).
        NonFiniteError: a tensor holds NaN or Inf.
        InputError: negative weights or entries of a tensor ``ridge``; tensors on
            different devices.
        OptionError: ``ridge`` is neither a number >= 0 nor a tensor (a negative number).
        SolverError: :math:`A^\top W A + \operatorname{diag}\rho` is singular to
            float64 precision for some batch elements (named in the message and in
            ``indices``), e.g. ``M < N`` where a tensor ridge has zeros; pass ``ridge > 0``.
            Where rows differ in size by over 1024×, singular row by row as well (row
            scales alone, rows 1e8, 1, 1e-8 of a well-conditioned 3×3, are solved).

    Warns:
        SolverWarning: x's estimated relative error exceeds 1e-6 (an ill-conditioned
            design, e.g. nearly dependent columns with a tiny ridge); the message names the
            batch elements. Where rows differ in size by over 1024× (sorted, stable row by
            row) the error is estimated row by row, from the design with unit columns and
            its rows' norms as weights, times how far the unpivoted factor is from a
            column-pivoted one (which row-wise stability needs): nearly dependent columns
            still warn, row scales alone (a weight of 1e20 on one row) do not.
        GradientWarning: in backward, a gradient that holds Inf or NaN although the
            inputs and the incoming gradient are finite (it exceeds the dtype's range,
            e.g. float32 ``A`` of magnitude 1e-20); the message names the batch elements.

    References:
        S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks", IEEE TPAMI 2021.

    Examples::

        >>> A, b = torch.randn(4, 20, 3), torch.randn(4, 20)
        >>> x = least_squares(A, b)
        >>> torch.allclose(x, torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1), atol=1e-5)
        True
    """
    A = check_tensor("A", A)
    b = check_tensor("b", b)
    refuse_vmap("least_squares", A, b, weights, ridge)
    if A.ndim < 2:
        raise ShapeError(f"A must be matrices of shape (*, M, N), got shape {tuple(A.shape)}")
    if b.dtype != A.dtype:
        raise DTypeError(f"b must have A's dtype {A.dtype}, got {b.dtype}")
    check_device("b", b, A, "A")
    m, n = A.shape[-2:]
    if b.ndim == A.ndim - 1:
        vector, bm = True, b.unsqueeze(-1)
    elif b.ndim == A.ndim:
        vector, bm = False, b
    else:
        raise ShapeError(
            f"b must have shape (*, M) or (*, M, K) with as many batch dims as A "
            f"{tuple(A.shape)}, got shape {tuple(b.shape)}"
        )
    if bm.shape[-2] != m:
        raise ShapeError(f"b must have M={m} rows like A {tuple(A.shape)}, got shape {tuple(b.shape)}")
    named = [("A", A), ("b", b)]
    if weights is not None:
        weights = check_tensor("weights", weights)
        check_device("weights", weights, A, "A")
        if weights.ndim < 1 or weights.shape[-1] != m:
            raise ShapeError(f"weights must have shape (*, M) with M={m}, got shape {tuple(weights.shape)}")
        named.append(("weights", weights))
    ridge, r = _as_ridge(ridge, n, A)
    if isinstance(ridge, torch.Tensor):
        named.append(("ridge", ridge))
    if r is None and m < n:
        raise ShapeError(
            f"least_squares needs M >= N rows when ridge = 0 (else the minimiser is not "
            f"unique), got A of shape {tuple(A.shape)}; pass ridge > 0"
        )
    shapes = [A.shape[:-2], bm.shape[:-2]] + ([] if weights is None else [weights.shape[:-1]]) + (
        [] if r is None else [r.shape[:-1]])
    try:  # (torch.broadcast_shapes costs ~30 µs: only where the batch shapes differ)
        batch = shapes[0] if all(t == shapes[0] for t in shapes) else torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ShapeError(
            f"the batch shapes of A {tuple(A.shape[:-2])}, b {tuple(bm.shape[:-2])}"
            + ("" if weights is None else f", weights {tuple(weights.shape[:-1])}")
            + ("" if r is None else f", ridge {tuple(r.shape[:-1])}")
            + " do not broadcast"
        ) from None
    gate = _Gate()
    # Forward mode too: torch's geqrf and ormqr have no forward derivative, the Function's jvp is exact.
    if (torch.is_grad_enabled() and any(t.requires_grad for _, t in named)) or may_carry_tangents(
            *(t for _, t in named), r):
        x, _, _, bad_rank, error, gain, *_ = _LeastSquaresFunction.apply(A, bm, weights, r, A.dtype, gate)
    else:
        gate.check = False  # no backward: no gain to estimate
        x, _, _, bad_rank, error, gain, *_ = _LeastSquaresFunction.forward(A, bm, weights, r, A.dtype, gate)
    # Each gradient is returned in its input's dtype: the narrowest range decides (float16
    # weights beside a float32 A overflowed silently).
    narrow = min((t.dtype for _, t in named), key=lambda t: torch.finfo(t).max)
    gate.check = may_overflow(check_solution(named, x, bad_rank, error, gain), narrow)
    x = x.expand(*batch, n, bm.shape[-1]) if x.shape[:-2] != batch else x
    return x.squeeze(-1) if vector else x
