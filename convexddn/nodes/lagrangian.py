"""The user's objective and constraints at a declarative node's solution: their calls
(shape and dtype checked), their Jacobians and the Lagrangian the implicit backward
(:mod:`.implicit`) differentiates, and the tests of its derivatives.

References:
    S. Gould, R. Hartley and D. Campbell, "Deep Declarative Networks",
    IEEE TPAMI 44(8), 2021.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import DTypeError, ProblemError, ShapeError
from ._strong_zero import detached_outside as cut
from .krylov import pseudo_random_directions
from .multipliers import scaled_norm
from .optimality import _format_indices

__all__ = ["ConstraintFn", "gradient_at"]

Tensor = torch.Tensor
#: ``fn(*xs, y)``: a constraint function, returning ``(B, ...)`` or ``None``.
ConstraintFn = Callable[..., "Tensor | None"]


def _batched_vjp(output: Tensor, inputs: Tensor, cotangents: Tensor, create_graph: bool = False) -> Tensor:
    """``k`` vjps of ``output`` at once: ``cotangents`` is ``(k, *output.shape)``."""
    if not output.requires_grad:
        return cotangents.new_zeros((cotangents.shape[0],) + tuple(inputs.shape))
    if cotangents.shape[0] == 1:
        (g,) = torch.autograd.grad(
            output, inputs, cotangents[0], retain_graph=True, allow_unused=True, create_graph=create_graph
        )
        return torch.zeros_like(inputs).unsqueeze(0) if g is None else g.unsqueeze(0)
    try:
        if torch.is_anomaly_enabled():
            # (Its NaN check reads each gradient on the host, which vmap refuses; the
            # failed attempt would be reported as an error in the backward, with traces.)
            raise RuntimeError("anomaly mode")
        (g,) = torch.autograd.grad(
            output, inputs, cotangents, retain_graph=True, allow_unused=True,
            is_grads_batched=True, create_graph=create_graph,
        )
    except RuntimeError:
        # Some user ops have no vmap rule: one vjp per direction is the slow, safe path.
        rows = []
        for c in cotangents:
            (gi,) = torch.autograd.grad(output, inputs, c, retain_graph=True, allow_unused=True,
                                        create_graph=create_graph)
            rows.append(torch.zeros_like(inputs) if gi is None else gi)
        return torch.stack(rows)
    if g is None:
        return cotangents.new_zeros((cotangents.shape[0],) + tuple(inputs.shape))
    return g


# torch's messages for operands whose shapes do not fit together.
_SHAPE_FAULTS = ("must match the size", "cannot be multiplied", "size mismatch", "shape mismatch")
_DTYPE_FAULTS = ("same dtype", "expected scalar type", "dtype mismatch")


def _call(name: str, fn: Callable[..., Tensor], xs, y: Tensor):
    """``fn(*xs, y)``; a shape fault inside it names the shapes it was called with
    (typically ``solve`` returned another per-element shape than ``fn`` expects), a dtype
    fault the dtypes (typically a tensor kept as a plain attribute, which does not follow
    the dtype the node evaluates ``fn`` in)."""
    try:
        return fn(*xs, y)
    except RuntimeError as err:
        if any(k in str(err) for k in _DTYPE_FAULTS):
            dtypes = ", ".join(str(x.dtype).removeprefix("torch.") for x in xs)
            raise DTypeError(
                f"{name} failed on inputs of dtypes {dtypes} and a solution y of dtype "
                f"{str(y.dtype).removeprefix('torch.')} ({err}): the node evaluates {name} in the dtype "
                "it differentiates in (float64 for its checks); a tensor it uses that is not an input "
                "must follow it — register it with register_buffer or as an nn.Parameter, or cast it "
                "to y's dtype inside the function") from err
        if not any(k in str(err) for k in _SHAPE_FAULTS):
            raise
        shapes = ", ".join(str(tuple(x.shape)) for x in xs)
        raise ShapeError(f"{name} failed on inputs of shapes {shapes} and a solution y of shape "
                         f"{tuple(y.shape)} ({err}): does solve return the shape {name} expects, and do "
                         f"the shapes inside {name} fit together?") from err


def _real(name: str, t: Tensor) -> None:
    """A complex (or integer, bool) value has no order to minimise or bound: a complex one
    escaped as torch's raw error in the backward (grad of a non-real output)."""
    if not t.is_floating_point():
        raise DTypeError(f"{name} must return a real floating-point tensor, got {t.dtype} (take .real, .abs() "
                         "or a squared modulus of a complex value)")


def _objective(name: str, fn: Callable[..., Tensor], xs, y: Tensor) -> Tensor:
    f = _call(name, fn, xs, y)
    if not isinstance(f, torch.Tensor):
        raise DTypeError(f"{name} must return a torch.Tensor, got {type(f).__name__}")
    _real(name, f)
    if tuple(f.shape) != (y.shape[0],):
        raise ShapeError(
            f"{name} must return shape (B,) = ({y.shape[0]},), one value per batch "
            f"element, got {tuple(f.shape)}"
        )
    return f


def _constraint(name: str, fn: ConstraintFn | None, xs, y: Tensor) -> Tensor | None:
    """``fn(*xs, y)`` flattened to ``(B, p)``; ``None`` when absent or empty."""
    if fn is None:
        return None
    c = _call(name, fn, xs, y)
    if c is None:
        return None
    if not isinstance(c, torch.Tensor):
        raise DTypeError(f"{name} must return a torch.Tensor or None, got {type(c).__name__}")
    _real(name, c)
    if c.ndim == 0 or c.shape[0] != y.shape[0]:
        raise ShapeError(
            f"{name} must return shape (B, ...) with B = {y.shape[0]} (one row of "
            f"constraints per batch element), got {tuple(c.shape)}"
        )
    c = c.reshape(y.shape[0], math.prod(c.shape[1:]))
    return c if c.shape[1] else None


def _constraints(prefix: str, fns, xs, y: Tensor) -> Tensor | None:
    """``(B, p + q)`` the equality then the inequality constraints ``fns``; ``None`` without either."""
    parts = [c for name, fn in zip(("equality_constraints", "inequality_constraints"), fns)
             if (c := _constraint(f"{prefix}{name}", fn, xs, y)) is not None]
    return None if not parts else (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])


def _lagrangian_parts(objective, fns, prefix: str, xg, yv: Tensor, f: Tensor, c: Tensor | None,
                      inactive: Tensor | None, broken: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(f, c)`` for the Lagrangian, where some elements enter through detached inputs.

    An element's multipliers being 0 does not keep autograd's chain rule from
    multiplying them by the constraint's derivative: an inactive constraint not
    differentiable at the solution (``‖y‖ - 1 <= 0`` at ``y = 0``, behind a
    zero-initialised layer) made the Lagrangian's derivatives NaN (a zero gradient and a
    false "singular" warning instead of the unconstrained derivative). So elements
    without an active constraint enter the constraint part detached, and ``broken`` ones
    (non-finite derivatives, :func:`_non_finite_derivatives`) enter both parts detached.
    """
    if broken is not None:
        f = _objective(f"{prefix}objective", objective, tuple(cut(x, ~broken) for x in xg), cut(yv, ~broken))
    if c is None:
        return f, None
    keep = ~inactive.all(-1)  # equality rows are never inactive
    if broken is not None:
        keep = keep & ~broken
    return f, c if bool(keep.all()) else _constraints(prefix, fns, tuple(cut(x, keep) for x in xg), cut(yv, keep))


# A solution shorter than this fraction of how far the objective lets it move has no
# length of its own for the activity test (see _solution_length).
_LENGTH_FLOOR = 1e-3


def _solution_length(g: Tensor, yg: Tensor) -> Tensor:
    """``(B,)`` the length by which the activity test measures ``y``: ``‖y‖``, but at least
    :data:`_LENGTH_FLOOR` times its reach :math:`\\|\\nabla_y f\\| / \\|H\\|` (how far the
    objective's curvature puts the unconstrained minimiser, the Newton step; ``‖H‖`` from
    one Hessian-vector product of ``f``; no floor without curvature, a linear objective).
    Measured by ``‖y‖`` alone, a projection onto ``y >= 0`` solved to 1e-12 at ``y* = 0``
    had every bound inactive: rejected, or with ``check_solution=False`` the identity for a
    zero Jacobian. The reach holds the data only as far as the problem sees it (``B x``
    enters ``∇_y f``): with ``‖B‖‖x‖`` in it, a common offset of inputs that cancels in the
    problem (``y ≥ 0`` near ``x − x₀`` at ``x ~ x₀ ~ 1e6``) made a bound 1e-3 from ``y``
    active. ``g``: ``∇_y f`` built with ``create_graph=True``."""
    length = scaled_norm(yg.detach())  # (‖y‖ overflowed from |y| ~ 1e154 in float64)
    if not g.requires_grad:
        return length
    u = pseudo_random_directions(yg.shape[1], yg.shape[0], yg.dtype, yg.device)
    # retain_graph: this second pass runs through the objective's own forward nodes, whose
    # saved tensors (exp, log, division) the Lagrangian's gradient needs after it.
    (Hu,) = torch.autograd.grad((g * u).sum(), yg, retain_graph=True, allow_unused=True)
    curvature = torch.zeros_like(length) if Hu is None else Hu.norm(dim=-1)
    reach = g.detach().norm(dim=-1) / torch.where(curvature > 0, curvature, 1.0)
    floor = torch.where((curvature > 0) & torch.isfinite(reach), _LENGTH_FLOOR * reach, 0.0)
    return torch.maximum(length, floor)


def lagrangian_probes(gL: Tensor, yg: Tensor, xg, seed: Tensor | None, u: Tensor) -> tuple:
    """One double-backward pass of ``∇_y L`` along the generic direction :func:`~.krylov.pseudo_random_directions`:
    ``(H u, Bᵀu for each input)`` (``None`` where unused), shared by :func:`_non_finite_derivatives` and
    :func:`~.optimality.kkt_residuals`; with ``seed`` (the ``ω`` of :func:`~.graph.lagrangian_gradient`), also
    ``∂⟨∇_y L, u⟩/∂ω`` (B,) last (for :func:`~.graph.check_second_order`); ``u`` (B, m): that direction."""
    extra = () if seed is None else (seed,)
    if not gL.requires_grad:
        return (None,) * (1 + len(xg) + len(extra))
    return torch.autograd.grad((gL * u).sum(), (yg, *xg, *extra), retain_graph=True, allow_unused=True)


# Incoming gradients c near 1, not powers of two: ∇_y L(c ω)/c rounds each product and sum of the terms anew
# (seed_rounding). Twelve: a sum of a few terms can round alike at a seed (3 seeds measured none for up to 17 of
# 2000 elements, 6 for 3 of 60,000). Near 1: a term affine in ω (a backward ignoring its incoming gradient) leaks
# only |1/c − 1| ≤ 1.4e-4 of itself into the measure, its gap 7e3 times that (at c = 3 it leaked 2/3: 1.5).
_ROUNDING_SEEDS = tuple(1.0 + s * (0.7 + 0.13 * k) * 1e-4 for k in range(6) for s in (1.0, -1.0))
#: A gap between two evaluations of ∇_y L up to this many times their measured rounding (:func:`seed_rounding`)
#: is rounding: at most 2.5 times it for plain torch pooling whose terms saturate (±1, cancelling; float32 and
#: float64, 24,000 elements); a term without a graph scored ≥ 1.8e6 (float32), one ignoring its seed ≥ 7e3.
ROUNDING_MARGIN = 64.0


def seed_rounding(grad: Callable[[float], Tensor], reference: Tensor) -> Tensor:
    r"""``(B, m)`` the rounding of a gradient ``reference`` = ``grad(1)`` (B, m), measured: :math:`\max_c
    |g(c)/c - g(1)|` over ``_ROUNDING_SEEDS``, ``grad(c)`` the gradient taken with the incoming gradient ``c``.
    A gradient is linear in it, so the difference is only the rounding of the terms the gradient sums, whatever
    their size: where they saturate and cancel (pseudo-Huber terms ±1 of points ±100 from y) ``∇_y L`` rounds at
    eps·Σ|t_i| ~ 1e-15, far above eps of the scale the checks build from its derivatives (``‖H‖‖y‖ + ‖B‖‖x‖`` ~
    1e-4: curvatures of 1e-6); 0 where they cancel exactly at every seed (terms ±a, tanh at 1 exactly: see
    :func:`~.graph.ill_determined`). For a check about to report only (one backward pass per seed).
    """
    noise = torch.zeros_like(reference)
    for c in _ROUNDING_SEEDS:
        noise = torch.maximum(noise, (grad(c) / c - reference).abs())
    return torch.nan_to_num(noise, nan=0.0, posinf=0.0)  # (no measure: no floor)


def end_rounding(grad_at: Callable[..., Tensor], y: Tensor, step: Tensor, u: Tensor, ends) -> Tensor:
    """``(B, m)``: :func:`seed_rounding` of ``ends`` = ``grad_at(y ± step u)`` (``step`` (B, 1)), summed."""
    with torch.enable_grad():
        return sum(seed_rounding(lambda c, p=y + k * step * u: grad_at(p, c), end) for k, end in zip((1.0, -1.0), ends))


# The kink probe's step, in eps of ‖y‖∞ (norm-wise, as the solution's accuracy): a hundred
# ulps of y, so that only a kink at the solution to rounding is crossed (one 1e-4 from y in
# float32 is not: a step of 1e4 eps, 1.2e-3 ‖y‖, crossed it, where autograd was right).
_KINK_STEP = 1e2
# A difference of ∇_y L across y ± δu that departs from 2δ Hu by more than this fraction
# of 2δ‖Hu‖, plus the rounding floor, is a jump, not curvature: O(δ²) relative for
# smooth terms, O(1) / δ for a kink.
_KINK_RATIO = 0.05
# Each entry's rounding floor, in units of its residual ∇_y L at y (the rounding of its terms: least squares with
# a large residual and a solution of 6e-7 was flagged against eps of ‖∇_y f‖), plus eps of ∇_y f's. Per entry:
# a row's largest hid a float32 solution's kink (soft-thresholding at x = (0, 10000.3): 1e3 times 5e-4 > 0.2).
_KINK_FLOOR = 1e3
# Plus this many eps of the row's size of ∇_y L's terms (_term_scale), their rounding at
# y ± δu whatever ∇_y L's value at y: at y = mean(x) ~ 0.02, x ~ 2, Σ(y − x_i) was exactly
# 0, and one rounding step of y ± δu − x_i (7e-16; δ is below their ulp) a "kink".
_KINK_TERMS = 64.0
# Steps δ and 2δ whose jumps differ by more than this fraction are curvature, not a kink
# (softmax's y log y at y_i = 1e-14 ‖y‖ was flagged with one step, its gradient zeroed).
_KINK_AGREE = 0.25


def _kink_length(y: Tensor, curvature: Tensor, scale: Tensor) -> Tensor:
    r"""``(B, 1)`` the length ``ℓ`` of the kink probe's step ``100 eps ℓ``: ``‖y‖∞``; where ``y = 0``
    (a step of 0: soft-thresholding at ``x = 0`` went unprobed, gradient 1 for a true 0), the reach
    :math:`s / \|Hu\|_\infty` of the terms' size ``s`` (``scale`` (B,)) over the ``curvature`` (B,)
    along the unit ``u`` (eps of it: the Newton step of their rounding); else the dtype's unit 1 (any
    step crosses a kink exactly at ``y``; 100 eps of 1, others only where constants put them as close)."""
    reach = scale / curvature  # (Inf or NaN without curvature: 1 below)
    reach = torch.where(torch.isfinite(reach) & (reach > 0), reach, 1.0)
    top = y.abs().amax(-1)
    return torch.where(top > 0, top, reach).unsqueeze(-1)


def gradient_at(objective, fns, prefix: str, xg, shape, lam: Tensor | None,
                inactive: Tensor | None) -> Callable[..., Tensor]:
    """``grad(point, c=1.0)``: ``∇_y L`` (B, m) at ``point`` (B, m), the inputs ``xg`` and the
    multipliers ``lam`` fixed (inactive rows 0, their constraints detached: one not differentiable
    there, a norm at 0, would make a probe NaN), taken with the incoming gradient ``c``."""
    xs = tuple(x.detach() for x in xg)
    weights = None if lam is None else torch.where(inactive, 0.0, lam).detach()

    def grad(point: Tensor, seed: float = 1.0) -> Tensor:
        point = point.requires_grad_(True)
        yv = point.view(shape)
        total = _objective(f"{prefix}objective", objective, xs, yv).sum()
        if weights is not None:
            c = _constraints(prefix, fns, xs, yv)
            total = total + (weights * torch.where(inactive, c.detach(), c)).sum()
        (g,) = _grads(total, point, create_graph=False, seed=None if seed == 1.0 else total.new_tensor(seed))
        return g
    return grad


def kinked(grad_at: Callable[..., Tensor], yg: Tensor, u: Tensor, hu: Tensor | None, gf: Tensor, gL: Tensor,
           scale: Tensor, diff: list | None = None) -> Tensor | None:
    r"""``(B,)`` elements whose ``∇_y L`` jumps at the solution; ``None`` if none (one host sync).

    Autograd differentiates ``|y_i|``, ``max`` or ``clamp`` at a kink by a one-sided choice (``|·|' = |·|'' = 0``
    at 0): a solution at one (an L1 term's exact zero, an L1 ball's vertex) looks like a smooth KKT point, its
    implicit derivative that of another problem (soft-thresholding at ``x_i = 0``: 1 for a true 0). The probe:
    with the multipliers fixed (``grad_at``), :math:`\nabla_y L(y + \delta u) - \nabla_y L(y - \delta u)` along
    the dense ``u`` (B, m) of ``hu`` (:math:`H u`) is :math:`2\delta H u + O(\delta^3)` where L is twice
    differentiable, off by the gradient's jump where a kink lies within :math:`\delta = 100\, \epsilon\, \ell` of
    ``y`` (:func:`_kink_length`: at the solution to rounding). Flagged: an element where, in some entry ``j``,
    that excess exceeds ``_KINK_RATIO`` of :math:`2\delta\|Hu\|_\infty` plus the entry's rounding floor
    :math:`10^3 (|\nabla_y L|_j + \epsilon |\nabla_y f|_j) + 64\,\epsilon\, s` (``s`` = ``scale`` (B,), the size
    of the terms of :math:`\nabla_y L`: :math:`\|H\|\|y\| + \|B\|\|x\| + \|\nabla_y f\| + \sum_j |\lambda_j|
    \|a_j\|`) and agrees with the excess at the step :math:`2\delta` (a jump does not depend on the step; a
    smooth term's excess grows with it); reported where it also exceeds ``ROUNDING_MARGIN`` times the gradient's
    rounding measured at the step's ends, entry by entry (:func:`seed_rounding`). ``grad_at``:
    :func:`gradient_at`; ``u``, ``hu``: those of :func:`lagrangian_probes`. ``diff``: a list that gets
    ``(∇_y L(y + δu) − ∇_y L(y − δu), δ)`` ((B, m), (B, 1)), for :func:`~.graph.ill_determined`.
    """
    if hu is None:
        return None
    y = yg.detach()
    eps = torch.finfo(y.dtype).eps
    curvature = hu.detach().abs().amax(-1)
    delta = _KINK_STEP * eps * _kink_length(y, curvature, scale)
    with torch.enable_grad():
        ends = [grad_at(y + k * delta * u) for k in (1.0, -1.0, 2.0, -2.0)]
    if diff is not None:
        diff.append((ends[0] - ends[1], delta))
    jump, wide = ends[0] - ends[1] - 2.0 * delta * hu, ends[2] - ends[3] - 4.0 * delta * hu
    size = _KINK_RATIO * 2.0 * delta[:, 0] * curvature
    floor = _KINK_FLOOR * (gL.detach().abs() + eps * gf.detach().abs()) + _KINK_TERMS * eps * scale.unsqueeze(-1)
    # A jump is the same across both steps; a smooth term whose curvature changes within the
    # step (y log y at y_i ~ δ) departs by amounts that grow with it, or turns NaN: no kink.
    agree = (wide - jump).abs() <= _KINK_AGREE * jump.abs() + floor
    excess = torch.where(agree, jump.abs(), 0.0) - floor
    kink = excess.amax(-1) > size
    if not bool(kink.any()):
        return None
    # Before reporting: the jump's rounding measured at its ends, which the floor above misses
    # where terms saturate and cancel (pseudo-Huber pooling of points ±100: 90 of 2000 "kinks").
    kink = kink & ((excess - ROUNDING_MARGIN * end_rounding(grad_at, y, delta, u, ends)).amax(-1) > size)
    return kink if bool(kink.any()) else None


def _non_finite_derivatives(gL: Tensor, probes) -> Tensor | None:
    """``(B,)`` elements whose ``∇_y L`` or its Hessian-vector product in ``probes``
    (:func:`lagrangian_probes`) is not finite; ``None`` if there are none (one host sync)."""
    bad = ~torch.isfinite(gL).all(-1)
    if probes[0] is not None:
        bad = bad | ~torch.isfinite(probes[0]).all(-1)
    return bad if bool(bad.any()) else None


def _check_values(prefix: str, c: Tensor, n_eq: int, batch_shape) -> None:
    """Raise where a constraint's value at the solution is NaN, an equality's is ±Inf or
    an inequality's is +Inf (an inequality at -Inf is a bound at infinity: inactive).

    Such a value is not defined there (``y - sqrt(s)`` at ``s < 0``) or overflows the work
    dtype (``‖y‖² - r²`` at ``r = 1e160``): neither the activity test nor the KKT
    conditions can be judged (NaN compares as active: the element's gradient came back as
    zeros under warnings about kinks and zero multipliers, or as the unconstrained one).
    """
    v = c.detach()
    is_eq = torch.arange(v.shape[1], device=v.device) < n_eq
    bad = torch.isnan(v) | (torch.isinf(v) & (is_eq | (v > 0)))
    if not bool(bad.any()):
        return
    raise ProblemError(_bad_constraints(
        prefix, "return NaN or Inf", "constraint(s)", bad, n_eq, batch_shape,
        f"the constraint is not defined there (e.g. sqrt of a negative number) or overflows {v.dtype} "
        "(rescale the problem), so neither its activity nor the KKT conditions can be judged (an "
        "inequality may be -Inf: a bound at infinity, never active)"))


def _bad_constraints(prefix: str, what: str, kind: str, bad: Tensor, n_eq: int, batch_shape, why: str) -> str:
    """The message naming the methods, the constraints (flat indices within each method's
    output) and the batch elements of a ``(B, m)`` mask ``bad``, then ``why``."""
    rows = torch.nonzero(bad.any(0)).flatten().tolist()
    which = " and ".join(sorted({"equality_constraints" if j < n_eq else "inequality_constraints" for j in rows}))
    flat = [j if j < n_eq else j - n_eq for j in rows]
    indices = _format_indices(bad.any(-1), batch_shape)
    return (f"{prefix}{which} {what} at the returned solution, for {kind} {flat[:8]} (flat index within "
            f"each method's output) at batch indices {indices[:8]} ({len(indices)} of {bad.shape[0]} "
            f"element(s)): {why}")


def _check_jacobian(prefix: str, A: Tensor, n_eq: int, batch_shape) -> None:
    """Raise where an active constraint's Jacobian in ``y`` is NaN or Inf.

    The constraint is not differentiable there (e.g. ``|y|^0.5`` at a zero entry), so
    the KKT conditions and the implicit derivative do not exist; zeroing the entries,
    as the gradient's final safeguard does, would differentiate another problem.
    """
    bad = ~torch.isfinite(A).all(dim=-1)  # inactive rows are zero already
    if not bool(bad.any()):
        return
    raise ProblemError(_bad_constraints(
        prefix, "have a non-finite (NaN or Inf) Jacobian with respect to y", "active constraint(s)", bad, n_eq,
        batch_shape, "a constraint that is not differentiable at the solution (e.g. |y|^p with p < 1 at a zero "
        "entry) has no KKT conditions there, so the implicit derivative does not exist"))


def _grads(out: Tensor, inputs, create_graph: bool, seed: Tensor | None = None) -> tuple[Tensor, ...]:
    """``torch.autograd.grad`` (incoming gradient ``seed``, shaped as ``out``; ``None``: ones)
    that gives zeros for inputs ``out`` does not depend on."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not out.requires_grad or not inputs:
        return tuple(torch.zeros_like(t) for t in inputs)
    if seed is None and out.dim():
        seed = torch.ones_like(out)
    gs = torch.autograd.grad(
        out, inputs, seed, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, gs))
