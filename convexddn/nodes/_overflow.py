"""The gradient-overflow check shared by the closed-form backward passes (least
squares, the L2 sphere projection), the gain beyond which a node runs it, and the
checked casts between a node's float64 work and the caller's dtype.

Their inputs are checked to be finite in the forward, so a NaN or Inf in a gradient
they return, with a finite incoming gradient, means that the true gradient (or a sum
or product formed on the way to it) exceeds the largest number of the dtype: float32
least squares with ``A ~ 1e-20`` (gradients ~1e40), an L2 sphere projection of radius
3e38. :func:`warn_gradient_overflow` says so, naming the batch elements; it costs one
sum per gradient and one host read when everything is finite.

Which backward passes check: those whose own gain (the size of a Jacobian entry) can
carry an ordinary incoming gradient out of the dtype's range. An ordinary gradient is
one up to :data:`GAIN_MARGIN` = 2**20 in size (√max = 256 for float16, whose range is
narrower than 2**40), so a node is flagged where ``gain > gain_limit(dtype)`` (float32:
3.2e32); the forward computes that flag inside a host read it already does, and a node
that is not flagged costs its backward nothing (no host read, no sync on CUDA). The L1
ball and sphere, the simplex, the L∞ ball and sphere and the L2 ball have Jacobian
entries bounded by 1 (radius gradients by the row length): never flagged. Gradients
that overflow only because the incoming gradient is within that margin of the dtype's
range (an incoming 3e38 in float32; fp16 gradients scaled by ``GradScaler``, which
overflow by design and are skipped by it) are torch's ordinary overflow, Inf as in its
own reductions, and are not checked.

The casts. Nodes that solve and differentiate in float64 (sinkhorn, pnp) hand their
results and derivatives back in the caller's dtype, where a finite float64 value beyond
that dtype's range becomes ±Inf and a line that holds mass can round to all zeros: a
float16 sinkhorn's cost gradient of 1.7e5 came back as Inf, a float32 plan of a marginal
of mass 1e40 as Inf, one of mass 1e-50 as zeros, all silently. :func:`widened` (the
inputs' float64 copies, whose gradients go back through a checked cast) and
:func:`narrowed` (the result, checked, and its forward-mode tangent) are those casts:
one sum per gradient and one host read per backward, as above, the cause being the cast
itself (an entry finite in float64 and ±Inf in the caller's dtype) so that no gain
decides; the node's own float64 arithmetic stays checked by
:func:`warn_gradient_overflow` where its gain says so.

The options. A tensor option (robust pooling's alpha, a projection's radius or z, total
variation's lam, a ridge) narrower than the node's work dtype goes through the same
checked cast (:func:`option_cast`), and before it is broadcast against the batch: its
gradient is then summed over the batch in the work dtype and rounded once. Broadcast
first, each row's term was rounded to the option's dtype before the sum: a float16
alpha over float32 rows got +Inf and -Inf terms beyond 65504 that summed to NaN (two
mirror rows whose exact gradient is 0), silently; and a sum that did not fit came back
±Inf with no warning (a float16 radius's gradient of -2.5e5). Where the work dtype is
narrower than float32 (a projection of float16 x) or than the option itself (a float64
alpha over float32 rows), :func:`option_rows` broadcasts the option in the wider
:func:`sum_dtype` and only then casts it to the work dtype: the rows' gradients, each
formed in the work dtype, are summed in that wider dtype (a float32 radius of a
float16 projection over 60,000 rows had the gradient 9.0e4, summed in float16: +Inf).
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import torch

from .._autograd import bind_fast, may_carry_tangents
from .._warn import warn
from ..errors import GradientWarning, SolverWarning
from .degeneracy import shown_indices

__all__ = ["GAIN_MARGIN", "all_finite", "gain_limit", "may_overflow", "narrowed", "option_cast", "option_rows",
           "sum_dtype", "warn_cast_overflow", "warn_gradient_overflow", "widened"]

GAIN_MARGIN = 2.0**20


def gain_limit(dtype: torch.dtype) -> float:
    """The largest gain (Jacobian entry size) of a node whose backward is not checked:
    ``max / margin``, margin ``GAIN_MARGIN`` (√max where that is smaller: float16)."""
    top = torch.finfo(dtype).max
    return top / min(GAIN_MARGIN, math.sqrt(top))


def may_overflow(gain: float, dtype: torch.dtype) -> bool:
    """Whether a backward of this gain (a host number, read by the forward) must check
    its gradients with :func:`warn_gradient_overflow`: ``gain > gain_limit(dtype)``, or
    a NaN gain."""
    return not gain <= gain_limit(dtype)


def _rows(bad: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``bad`` reduced (any, keepdim) over those of ``dims`` (negative) that it has."""
    for d in dims:
        if -d <= bad.ndim:
            bad = bad.any(d, keepdim=True)
    return bad


def _caused(upstream: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Whether a non-finite incoming gradient reaches each element of a gradient of
    ``shape`` (summed over the dims that it broadcast along, if any)."""
    try:
        fits = torch.broadcast_shapes(shape, upstream.shape) == upstream.shape
    except RuntimeError:
        fits = False
    if not fits:
        return upstream.any().expand(shape)
    return upstream.sum_to_size(shape) > 0


def warn_gradient_overflow(
    what: str,
    incoming: torch.Tensor,
    grads: Sequence[tuple[str, torch.Tensor | None]],
    dims: Sequence[int],
    tangent: bool = False,
) -> None:
    """Warn (:class:`~convexddn.errors.GradientWarning`) when a returned gradient holds
    NaN or Inf that the incoming gradient does not explain.

    Common path: one sum per gradient (in float32 at least) and one host read (a sum
    that overflows where no entry does only sends the call down the exact path, which
    then finds nothing). Skipped inside a compiled graph (no host read there). Call it
    only where the node's gain is flagged (module docstring, :func:`gain_limit`).

    Args:
        what: the node's name, which starts the message.
        incoming: the gradient with respect to the node's output.
        grads: ``(input name, gradient or None)`` pairs, in the order named. Each is laid
            out like ``incoming`` (batch dims first, aligned from the right) so that
            reducing ``dims`` leaves one flag per batch element that broadcasts
            against ``incoming``'s.
        dims: the non-batch dims, negative (counted from the end); a gradient with
            fewer dims is reduced over those it has.
        tangent: the derivatives are forward-mode tangents of the outputs named in
            ``grads``, ``incoming`` the inputs' tangents (the message says so).
    """
    present = [(name, g) for name, g in grads if g is not None and g.numel()]
    if not present or torch.compiler.is_compiling() or _finite_sum([g for _, g in present]):
        return
    upstream = _rows(~torch.isfinite(incoming.detach()), dims)
    parts, dtypes = [], []
    for name, g in present:
        bad = _rows(~torch.isfinite(g.detach()), dims)
        new = bad & ~_caused(upstream, bad.shape)
        if bool(new.any()):
            parts.append(f"{name} at {shown_indices(new, _batch_of(new, dims))}")
            dtypes.append(g.dtype)
    if not parts:  # a NaN or Inf came in: torch's propagation, not ours to report
        return
    _warn_overflow(what, tangent, parts, dtypes)


def _batch_of(flags: torch.Tensor, dims: Sequence[int]) -> tuple[int, ...]:
    """The batch shape of ``flags`` (:func:`_rows`' output): without the size-1 dims it reduced,
    which leaves the row-major order of its entries, and so :func:`shown_indices`', as it is."""
    reduced = {d + flags.ndim for d in dims if -d <= flags.ndim}
    return tuple(s for i, s in enumerate(flags.shape) if i not in reduced)


def _warn_overflow(what: str, tangent: bool, parts: list[str], dtypes: list[torch.dtype]) -> None:
    dtype = min(dtypes, key=lambda t: torch.finfo(t).max)
    advice = ("rescale the problem" if torch.finfo(dtype).max >= torch.finfo(torch.float64).max
              else "use float64 inputs")
    noun, given = ("tangent of", "their tangents") if tangent else ("gradient with respect to", "the incoming gradient")
    warn(
        f"{what}: the {noun} {'; '.join(parts)} holds Inf or NaN "
        f"although the inputs and {given} are finite there: the true "
        f"{noun.split()[0]} (or a sum or product in its computation) exceeds the range of {dtype} "
        f"(largest {torch.finfo(dtype).max:.1e}); {advice}",
        GradientWarning,
    )


def _finite_sum(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry is finite, by one sum per tensor and one host read; a finite
    tensor whose sum overflows reads as not finite (the callers' exact path then finds
    nothing). 16-bit tensors are summed in float32: a finite float16 gradient whose sum
    overflowed 65504 took that path (more host reads) for nothing."""
    total = functools.reduce(operator.add, [
        t.detach().sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors])
    return bool(torch.isfinite(total))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """:func:`_finite_sum` for the nodes that form a derivative plainly and, where this is False
    (an overflow on the way, or a finite tensor whose sum overflows), again in a scaled form."""
    return _finite_sum(tensors)


def warn_cast_overflow(
    what: str,
    casts: Sequence[tuple[str, torch.Tensor, torch.Tensor, int]],
    tangent: bool = False,
) -> None:
    """Warn (:class:`~convexddn.errors.GradientWarning`) where a derivative, finite in
    float64, became ±Inf when cast to the caller's dtype.

    Common path: one sum per cast derivative and one host read (skipped inside a
    compiled graph). A derivative that is not finite in float64 already (a NaN or Inf
    incoming gradient, or the node's own overflow, which :func:`warn_gradient_overflow`
    reports) is not the cast's doing and is not reported here.

    Args:
        what: the node's name, which starts the message.
        casts: ``(name, float64 derivative, the same cast, k)``: k trailing dims of each
            are reduced so that the message names batch elements.
        tangent: the derivatives are forward-mode tangents of the outputs named in
            ``casts`` (the message says so).
    """
    present = [c for c in casts if c[2].numel()]
    if not present or torch.compiler.is_compiling() or _finite_sum([c[2] for c in present]):
        return
    parts, dtypes = [], []
    for name, wide, out, k in present:
        lost = _rows(torch.isinf(out.detach()) & torch.isfinite(wide.detach()), range(-k, 0))
        if bool(lost.any()):
            parts.append(f"{name} at {shown_indices(lost, _batch_of(lost, range(-k, 0)))}")
            dtypes.append(out.dtype)
    if parts:
        _warn_overflow(what, tangent, parts, dtypes)


@bind_fast
class _Widen(torch.autograd.Function):
    """The caller's tensors in a wider ``dtype`` (float64: :func:`widened`); backward: their
    gradients cast back to each one's dtype and checked together by :func:`warn_cast_overflow`."""

    @staticmethod
    def forward(what, names, ks, dtype, *xs):  # type: ignore[override]
        return tuple(x.to(dtype) for x in xs)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.what, ctx.names, ctx.ks, ctx.wide = inputs[:4]
        # (Grads and tangents materialised, never None: with None, forward mode failed an
        # internal assert of torch's on a copy without a tangent beside one with.)
        ctx.dtypes = [x.dtype for x in inputs[4:]]

    @staticmethod
    def backward(ctx, *gs):  # type: ignore[override]
        out = [g.to(t) for g, t in zip(gs, ctx.dtypes)]
        warn_cast_overflow(ctx.what, list(zip(ctx.names, gs, out, ctx.ks)))
        return (None, None, None, None, *out)

    @staticmethod
    def jvp(ctx, _what, _names, _ks, _dtype, *ts):  # type: ignore[override]
        return tuple(t.to(ctx.wide) for t in ts)


def widened(what: str, named: Sequence[tuple[str, torch.Tensor | None, int]]) -> list[torch.Tensor | None]:
    """The float64 copies of a node's inputs ``(name, tensor or None, k)`` (k: the
    tensor's trailing non-batch dims), in order; those narrower than float64 that autograd
    or forward mode may differentiate through one Function, whose backward casts their
    gradients back with one check (:func:`warn_cast_overflow`). The rest: plain casts.

    Shape: each tensor keeps its shape.
    """
    grad, compiling = torch.is_grad_enabled(), torch.compiler.is_compiling()
    tracked = [i for i, (_, t, _) in enumerate(named) if t is not None and t.dtype != torch.float64
               and not compiling and ((grad and t.requires_grad) or may_carry_tangents(t))]
    out = [None if i in tracked or t is None else t.to(torch.float64) for i, (_, t, _) in enumerate(named)]
    if tracked:
        names, ks = tuple(named[i][0] for i in tracked), tuple(named[i][2] for i in tracked)
        for i, w in zip(tracked, _Widen.apply(what, names, ks, torch.float64, *(named[i][1] for i in tracked))):
            out[i] = w
    return out


def option_cast(what: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A node's tensor option ``name`` (alpha, radius, z, lam, ridge) in the node's work
    ``dtype``; call it before broadcasting the option against the batch (module docstring).

    Where the option is narrower than ``dtype`` and autograd or forward mode may
    differentiate through it, the cast is :class:`_Widen`'s: its gradient, summed in
    ``dtype``, is cast back to the option's dtype, and where a finite gradient becomes
    ±Inf there a :class:`~convexddn.errors.GradientWarning` names ``name`` and its
    entries (the value stays torch's cast, Inf, as for :func:`widened`'s tensors). Else
    (a wider or equal option, none tracked, a compiled graph, a torch.func transform:
    the Function has no vmap rule) a plain cast.

    Shape: any -> the same.
    """
    if t.dtype == dtype:
        return t
    narrower = torch.finfo(t.dtype).max < torch.finfo(dtype).max
    if (not narrower or not _tracked(t) or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return t.to(dtype)
    return _Widen.apply(what, (name,), (0,), dtype, t)[0]


def _tracked(t: torch.Tensor) -> bool:
    """Whether autograd or forward mode may differentiate through ``t``."""
    return (torch.is_grad_enabled() and t.requires_grad) or may_carry_tangents(t)


def sum_dtype(option: torch.dtype, work: torch.dtype) -> torch.dtype:
    """The dtype an option's gradient is summed over the rows in: the work dtype, float32
    at least (a float16 sum overflows past 65504 and rounds to 11 bits), or the option's
    own dtype where that is wider (its gradient may exceed the work dtype's range)."""
    return torch.promote_types(torch.promote_types(work, torch.float32), option)


def option_rows(what: str, name: str, t: torch.Tensor, dtype: torch.dtype,
                shape: Sequence[int]) -> torch.Tensor:
    r"""A node's tensor option ``name`` broadcast to ``shape`` (one entry per row of the
    batch) in the node's work ``dtype``, its gradient summed over the rows in
    :func:`sum_dtype` and cast back to the option's dtype by :func:`option_cast`'s
    checked cast (a :class:`~convexddn.errors.GradientWarning` naming ``name`` where a
    gradient that is finite in the sum's dtype does not fit the option's).

    For :math:`g_r` the rows' gradients (each formed in ``dtype``), the option's gradient
    is :math:`\sum_r g_r` over the broadcast rows, computed in ``sum_dtype(t.dtype, dtype)``:
    the option is cast to that dtype, broadcast, then cast to ``dtype``, so that autograd
    widens each row's gradient before the broadcast's sum. That last cast forms a tensor
    of ``shape`` (one entry per row); only where the option is tracked and the sum's dtype
    differs from ``dtype``. Otherwise: :func:`option_cast` and a broadcast view.

    Shape: ``t`` broadcastable to ``shape`` -> ``shape``.

    Raises:
        RuntimeError: torch's, where ``t`` does not broadcast to ``shape`` (the callers
            name the shapes).
    """
    wide = sum_dtype(t.dtype, dtype)
    if wide == dtype or not _tracked(t):
        return torch.broadcast_to(option_cast(what, name, t, dtype), shape)
    return torch.broadcast_to(option_cast(what, name, t, wide), shape).to(dtype)


@bind_fast
class _Narrow(torch.autograd.Function):
    """``y.to(dtype)`` of a float64 result; its forward-mode tangent cast likewise and
    checked (:func:`warn_cast_overflow`); the backward widens, exactly."""

    @staticmethod
    def forward(y, dtype, what, name, k):  # type: ignore[override]
        return y.to(dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        ctx.dtype, ctx.what, ctx.name, ctx.k = inputs[1:]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g.to(torch.float64), None, None, None, None

    @staticmethod
    def jvp(ctx, y_t, *_):  # type: ignore[override]
        out = y_t.to(ctx.dtype)
        warn_cast_overflow(f"{ctx.what} (forward mode)", [(ctx.name, y_t, out, ctx.k)], tangent=True)
        return out


def narrowed(y: torch.Tensor, dtype: torch.dtype, what: str, name: str, k: int,
             lines: Sequence[tuple[int, str]] = (), advice: str = "pass inputs in a wider dtype",
             check: bool = True) -> torch.Tensor:
    """A node's float64 result ``y`` (``name``: "the plan") in the caller's ``dtype``, with a
    :class:`~convexddn.errors.SolverWarning` where it does not fit: entries finite in
    ``y`` and ±Inf in ``dtype``, or, for each ``(dim, noun)`` of ``lines``, lines along
    ``dim`` that hold nonzero entries in ``y`` and are all zero in ``dtype`` (a plan's row
    that must sum to its marginal). One pass per line direction (the largest entry of
    each line) and one host read; none inside a compiled graph. The forward-mode tangent
    goes through :class:`_Narrow` and its check; ``k``: the trailing non-batch dims.
    ``check=False``: the caller knows (from host numbers) that ``y`` fits; no pass, no read.

    Shape: any -> the same.
    """
    if dtype == y.dtype:
        return y
    out = _Narrow.apply(y, dtype, what, name, k) if may_carry_tangents(y) else y.to(dtype)
    if not check or torch.compiler.is_compiling() or not out.numel():
        return out
    top = [out.detach().abs().amax(d) for d, _ in lines] or [out.detach().abs().amax()]
    flags = [top[0].eq(math.inf).any()] + [t.eq(0).any() for t in top[:len(lines)]]
    if not bool(torch.stack(flags).any()):
        return out
    y = y.detach()
    found = []
    big = torch.isinf(out.detach()) & torch.isfinite(y)
    if bool(big.any()):
        found.append(f"{int(big.sum())} of {big.numel()} entries beyond {dtype}'s range (largest "
                     f"{torch.finfo(dtype).max:.3g}; up to {float(y.abs().amax()):.3g} in float64) are Inf")
    for (d, noun), t in zip(lines, top):
        zero = t.eq(0) & y.abs().amax(d).gt(0)
        if bool(zero.any()):
            found.append(f"{int(zero.sum())} of {zero.numel()} {noun}s rounded to all zeros (their entries "
                         f"up to {float(y.abs().amax(d)[zero].max()):.3g} in float64)")
    if found:
        warn(f"{what}: {name} does not fit {dtype}: {'; '.join(found)}; {advice}", SolverWarning)
    return out
