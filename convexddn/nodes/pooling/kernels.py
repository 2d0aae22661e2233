"""Row blocks, scratch buffers, the row sums of the solvers and the closed-form backward.

The solvers (:mod:`.iterations`) and the backward walk ``x (R, N)`` in blocks of whole
rows. On a CPU a block is sized to stay in cache (512 KiB of ``x``): each pass over it
is one in-place torch op into preallocated scratch buffers (no row-sized temporaries,
so the peak memory stays near the input's), and its rows' sums are taken while it is
in cache. Elsewhere (CUDA) blocks are large and only bound the scratch memory. With
``compile=True`` the row sums are the penalty's derived formulas fused by
:func:`torch.compile` into one pass per block instead of the hand-fused passes; the
backward always runs the hand-fused passes (it reads ``x`` once and writes the
gradient once).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ... import _workspace as workspace
from ..._checks import check_finite
from ..._warn import warn
from ...errors import ConvexDDNWarning
from .penalties import SPREAD_DIVISOR, Penalty

# Bytes of x per row block on a CPU. Smaller blocks pay the per-op dispatch (~1-2 us)
# over too little work; measured on the 2-core CI machine (2 MiB L2 per core), 2 MiB
# blocks beat 512 KiB ones by 5-20 % forward and 10-25 % backward for pseudo-Huber,
# Huber and Welsch at (4, 256, 1024) and (4, 1024, 2048), although the block and its
# scratch buffers then exceed L2; 4-8 MiB were no better.
_CPU_BLOCK_BYTES = 1 << 21
# Elements per block elsewhere (CUDA, or compiled kernels): bounds the scratch memory.
_BIG_BLOCK_NUMEL = 1 << 24

# Compiled kernels: key -> [the function, its torch.compile wrapper or None], least
# recently used first. Bounded: a fused kernel's key names a penalty instance, which its
# closure holds (so its id is not reused while the entry lives), and a user's penalty
# made per call kept every one of them alive, each with its compiled kernel.
_COMPILED_MAX = 256
_COMPILED: dict[Any, list] = {}
_COMPILE_FAILED: set[str] = set()  # names of the kernels that run eagerly from now on
_COMPILED_LOCK = threading.Lock()


def compile_available() -> bool:
    return hasattr(torch, "compile") and not torch.jit.is_scripting()


def kernel(key: Any, make: Callable[[], Callable]) -> list:
    """The entry ``[fn, compiled or None]`` of ``key``; ``fn = make()`` on a miss."""
    with _COMPILED_LOCK:
        entry = _COMPILED.pop(key, None) or [make(), None]
        _COMPILED[key] = entry
        while len(_COMPILED) > _COMPILED_MAX:
            del _COMPILED[next(iter(_COMPILED))]
    return entry


def run(fn: Callable | None, use_compile: bool, *args: Any, key: Any = None,
        make: Callable[[], Callable] | None = None) -> Any:
    """Call ``fn(*args)`` through torch.compile when asked, falling back to eager (with a
    one-time warning per kernel) when compilation fails. A keyed kernel is ``make()``,
    built on a miss (``fn`` None)."""
    if use_compile:
        entry = kernel(fn if key is None else key, make or (lambda: fn))
        fn = entry[0]
        name = getattr(fn, "__name__", repr(fn))
        if name not in _COMPILE_FAILED:
            try:
                if entry[1] is None:  # (two threads may both wrap it: either will do)
                    entry[1] = torch.compile(fn)
                return entry[1](*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
                warn(
                    f"robust_pool: torch.compile failed for {name} "
                    f"({type(exc).__name__}: {str(exc)[:200]}); running it eagerly from now on",
                    ConvexDDNWarning,
                )
                # Marked once the warning returned: where warnings are errors it raised, the call
                # failed, and a failed call changes nothing (marked first, the next ran eagerly, unsaid).
                _COMPILE_FAILED.add(name)
    return fn(*args)


def _fused(penalty: Penalty, method: str, clamp: bool, measure: bool, variant: tuple) -> Callable:
    """``(u, x, alpha) ->`` the row sums of the base class's (derived) ``method`` at the
    residuals ``u - x``, and the norm of its terms ``d1`` when ``measure``: what
    torch.compile fuses into one pass over ``x`` without a row-sized output.

    ``variant`` (dtype, device, the ranks of ``u`` and ``alpha``) only names a kernel of
    its own for each kind of input (see below)."""
    base = getattr(Penalty, method)

    def fn(u, x, alpha):
        z = u - x
        if clamp:
            bound = penalty.saturation * alpha
            z = torch.maximum(torch.minimum(z, bound), -bound)
        *row_sums, d1 = base(penalty, z, alpha, None)
        norm = (d1 * d1).sum(-1, keepdim=True).sqrt() if measure else None
        return (*row_sums, norm)

    fn.__name__ = "_".join(["", method, penalty.name, *(str(v).replace("torch.", "") for v in variant)])
    # A code object of its own: torch.compile keeps its compiled variants (and counts
    # them against its recompile limit, 8) per code object, which every closure made
    # here would otherwise share -- after a few penalties, methods, dtypes and input
    # ranks the later ones silently ran eagerly.
    fn.__code__ = fn.__code__.replace(co_name=fn.__name__, co_qualname=fn.__name__)
    return fn


def row_sums(penalty: Penalty, method: str, u: Tensor, x: Tensor, alpha, scratch: Scratch,
             clamp: bool, use_compile: bool) -> tuple:
    """``penalty.<method>`` at the residuals ``u - x`` of one block (``u`` ``(r, 1)``
    with ``x`` ``(r, N)``, or ``(r, k, 1)`` with ``(r, 1, N)``): its row sums, and the
    norm of its terms where the penalty gives no bound for it (else None).

    Eagerly: the hand-fused in-place passes over scratch buffers. With ``use_compile``:
    the penalty's derived formulas fused by torch.compile into one pass."""
    measure = type(penalty).dphi_norm is Penalty.dphi_norm
    if use_compile:
        al = alpha if isinstance(alpha, Tensor) else torch.tensor(alpha, dtype=x.dtype, device=x.device)
        key = (id(penalty), method, clamp and penalty.saturation is not None, measure,
               (x.dtype, x.device.type, u.dim(), al.dim()))
        return run(None, True, u, x, al, key=key, make=lambda: _fused(penalty, *key[1:]))
    # u and x have the same number of dims, one of them 1 where they differ
    # (torch.broadcast_shapes costs ~30 us per call here).
    z, *work = scratch.get(*(max(a, b) for a, b in zip(u.shape, x.shape)))
    sub_into(z, u, x)
    if clamp:
        clamp_saturated(penalty, z, alpha)
    *out, d1 = getattr(penalty, method)(z, alpha, work)
    norm = d1.mul_(d1).sum(-1, keepdim=True).sqrt_() if measure else None
    return (*out, norm)


def sub_into(z: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``z = a - b`` in place, broadcast: the residuals ``u - x`` of a block (``a`` ``(r, 1)``
    or ``(r, k, 1)``, ``b`` ``(r, N)`` or ``(r, 1, N)``, ``z`` a scratch view of their
    broadcast shape). ``b`` holds rows of the caller's ``x`` in whatever layout they came:
    a transposed view where pooling runs over a leading dim, or over a transposed input.

    Eagerly one ``out=`` pass, and ``z`` keeps its layout. Traced by torch.compile, an
    ``out=`` op's result takes its operands' layout instead of ``out``'s: ``z`` then held a
    transposed tensor, which could not be written back into the flat buffer that ``z``
    views (BackendCompilerFailed: "Cannot view a tensor with shape [6, 8] and strides
    (1, 6) as a tensor with shape (48,)"). There the difference is copied in, which keeps
    ``z``'s layout (the compiler fuses the two)."""
    if torch.compiler.is_compiling():
        return z.copy_(torch.sub(a, b))
    return torch.sub(a, b, out=z)


def block_rows(n: int, x: Tensor, use_compile: bool) -> int:
    """Rows per block for rows of length ``n``."""
    if x.device.type == "cpu" and not use_compile:
        return max(1, _CPU_BLOCK_BYTES // (n * x.element_size()))
    return max(1, _BIG_BLOCK_NUMEL // n)


def block_ranges(rows: int, n: int, x: Tensor, use_compile: bool) -> list[slice]:
    """The row blocks of ``rows`` rows of length ``n`` (at least one, possibly empty)."""
    step = block_rows(n, x, use_compile)
    return [slice(i, min(i + step, rows)) for i in range(0, max(rows, 1), step)]


@dataclass
class Scratch:
    """``count`` flat buffers, handed out as views of any shape that fits. On the CPU
    they come from, and :meth:`release` hands them back to, :mod:`convexddn._workspace`
    (buffers kept between calls: no page faults on every call)."""

    flat: list[Tensor]

    @classmethod
    def make(cls, count: int, numel: int, like: Tensor) -> Scratch:
        return cls([workspace.take(numel, like.dtype, like.device) for _ in range(count)])

    def get(self, *shape: int) -> list[Tensor]:
        numel = math.prod(shape)
        if numel > self.flat[0].numel():
            old, self.flat = self.flat, [workspace.take(numel, t.dtype, t.device) for t in self.flat]
            workspace.give(*old)
        return [t[:numel].view(shape) for t in self.flat]

    def release(self) -> None:
        """Hand the buffers back (no view of them may be used after this)."""
        workspace.give(*self.flat)
        self.flat = []


def check_ends(lo: Tensor, hi: Tensor, full: Tensor) -> None:
    """Raise NonFiniteError naming ``full`` when a row's min or max is not finite (they
    propagate NaN and Inf). One host sync; the full count runs only on failure."""
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        check_finite("x", full)


def row_scale(lo: Tensor, hi: Tensor) -> Tensor:
    """Per row, the power of two that brings its entries below 1/16 of the float range
    (1 where they already are): scaling by it is exact."""
    finfo = torch.finfo(lo.dtype)
    big = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
    k = torch.ceil(torch.log2(big / (finfo.max / 16))).clamp(min=0)
    return torch.exp2(-k).to(lo.dtype)


def clamp_saturated(penalty: Penalty, z: Tensor, alpha: float | Tensor) -> None:
    """Clamp residuals to ``±saturation * alpha`` (``phi'`` is constant there to working
    precision, see :attr:`Penalty.saturation`), so that their squares cannot overflow;
    ``alpha`` a float or shaped to broadcast against ``z``."""
    if penalty.saturation is None:
        return
    if isinstance(alpha, float):
        # (at most the float range: a float32 alpha of 1e38 times the saturation was a
        # Python float torch refused to convert, a raw RuntimeError)
        bound = min(penalty.saturation * alpha, torch.finfo(z.dtype).max)
        z.clamp_(-bound, bound)
    else:
        bound = penalty.saturation * alpha
        torch.minimum(z, bound, out=z)
        torch.maximum(z, -bound, out=z)


def pool_backward(penalty: Penalty, x: Tensor, y: Tensor, a: Tensor, gy: Tensor, need_x: bool,
                  need_alpha: bool, use_compile: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """The vjp of Table 1 by row blocks: ``grad_x_i = gy * w_i / sum_j w_j`` and
    ``grad_alpha = -gy * sum_j wa_j / sum_j w_j``, ``w = phi''(y - x)``, ``wa =
    d2phi/dz dalpha``. Each block is read once and its gradient written once into the
    output. Returns ``(grad_x (R, N), grad_alpha (R,), ok (R,), ok.all() as a bool)``;
    rows whose Hessian sum is zero, singular or negative get a zero gradient and
    ``ok = False``. A NaN or Inf in ``gy`` (a fault upstream) is no verdict on the
    Hessian: it propagates to that row's gradients (and a shared alpha's), as torch does.

    ``x`` and ``a`` (0-d or ``(R, 1)``), ``y`` and ``gy`` ``(R,)``."""
    rows, n = x.shape
    gx = torch.empty_like(x) if need_x else None
    finfo = torch.finfo(x.dtype)
    alpha_f = float(a) if a.dim() == 0 else None
    # (a tensor alpha's least and largest in one host read)
    a_lo, a_hi = (alpha_f, alpha_f) if alpha_f is not None else torch.stack(torch.aminmax(a)).tolist()
    # Squares of residuals over alpha beyond this overflow (only alpha's gradient of a
    # saturating penalty cares: its weights there are 0 either way).
    wide = math.sqrt(finfo.max) / SPREAD_DIVISOR * (alpha_f if alpha_f else a_lo)
    ranges = block_ranges(rows, n, x, use_compile)
    scratch = Scratch.make(3, (ranges[0].stop - ranges[0].start) * n, x)
    # Per row: the weights' sum and absolute sum, the scale gy / sum, alpha's weights' sum.
    sw, size, scale = x.new_empty(rows, 1), x.new_empty(rows, 1), x.new_empty(rows, 1)
    # Rows with a residual y - x_i beyond the float range (data spread over more than it):
    # their weights there came out 0 from an infinite residual, for points a few alphas
    # away (Welsch at alpha = max/2: a gradient of 0 for the true -0.196, silently). Only
    # an alpha within 1e12 of the range's end gives such a point a weight that counts
    # (a penalty whose weight falls like (alpha/z)^2 or faster: 1e-24 of a point near y),
    # so only then is each row's residual sum formed to find them (+3-7 % of the backward).
    zsum = x.new_empty(rows, 1) if a_hi * 1e12 >= finfo.max else None
    swa = x.new_zeros(rows, 1) if need_alpha else None
    gcol = gy.reshape(rows, 1)
    for sl in ranges:
        r = sl.stop - sl.start
        if r == 0:
            continue
        z, *work = scratch.get(r, n)
        sub_into(z, y[sl].unsqueeze(-1), x[sl])
        if zsum is not None:
            # (a row sum, not isinf(z).any(): no block-sized temporary, whose fresh pages
            # cost 6x the backward; a finite row whose sum overflows goes the careful way too)
            torch.sum(z, -1, keepdim=True, out=zsum[sl])
        al = alpha_f if alpha_f is not None else a[sl]
        if need_alpha and penalty.saturation is not None and max(float(z.amax()), -float(z.amin())) > wide:
            clamp_saturated(penalty, z, al)
        w, wa, wsize = penalty.hessian_weights(z, al, work, need_alpha)
        torch.sum(w, -1, keepdim=True, out=sw[sl])
        signed = wsize is not None
        if signed:
            size[sl] = wsize
        if need_alpha:
            swa[sl] = wa
        torch.div(gcol[sl], sw[sl], out=scale[sl])
        if need_x:
            torch.mul(w, scale[sl], out=gx[sl])
    scratch.release()
    if not signed:
        size = sw
    # Rows whose weights all underflowed (every point far from y) or overflowed (entries
    # near the float range's end), or whose gy / sum_j w_j overflowed although gy is finite
    # (weights near underflow: float32 pseudo-Huber points 1e10 alpha from y weigh 1e-30),
    # get the careful, rescaled weights in float64. A Hessian sum at or below its own
    # rounding noise is singular (or negative: not a minimum), where the exact gradient does
    # not exist and the row gets zero: a test of the Hessian alone, never of gy (a NaN or
    # Inf there is a fault upstream, which propagates as torch propagates it). All are
    # rare, as is a non-finite alpha weight sum: one host sync tells that none occurs.
    low = (size < finfo.tiny / finfo.eps) | ~torch.isfinite(size) | (~torch.isfinite(scale) & torch.isfinite(gcol))
    low = (low if zsum is None else low | ~torch.isfinite(zsum)).squeeze(-1)
    ok = _nonsingular(sw, size, n)
    flags = [(low | ~ok).any()] + ([~torch.isfinite(swa).all()] if need_alpha else [])
    rare, *alpha_rare = torch.stack(flags).tolist()
    all_ok = not rare
    if not all_ok:
        if bool(low.any()):
            idx = low.nonzero().squeeze(-1)
            w_r, sw_r, wa_r, size_r = _careful_weights64(penalty, x, y, a, idx, need_alpha)
            # (float64 throughout: the gradient is the ratio w_i / sum_j w_j times gy, and
            # the test is taken before a cast that could flush a tiny sum to zero)
            g_r = gcol[idx].to(sw_r.dtype) / sw_r
            sw[idx], size[idx], scale[idx] = sw_r.to(x.dtype), size_r.to(x.dtype), g_r.to(x.dtype)
            if need_alpha:
                swa[idx] = wa_r.to(x.dtype)
            if need_x:
                gx[idx] = (w_r * g_r).to(x.dtype)
            ok = ok.index_copy(0, idx, _nonsingular(sw_r, size_r, n))
        all_ok = bool(ok.all())
        if not all_ok:
            bad = (~ok).nonzero().squeeze(-1)
            if need_x:
                gx.index_fill_(0, bad, 0.0)
            scale = torch.where(ok.unsqueeze(-1), scale, torch.zeros_like(scale))
    ga, alpha_lost = None, 0
    if need_alpha:
        # Rows set to zero above stay zero (their swa may be NaN, and NaN * 0 is NaN).
        ga = torch.where(ok, (-(swa * scale)).squeeze(-1), 0.0)
        if alpha_rare[0] or rare:  # (the careful weights above may have overflowed too)
            ga, alpha_lost = _finite_alpha_grad(penalty, x, y, a, gcol, ga)
    return gx, ga, ok, all_ok, alpha_lost


def _careful_weights64(penalty: Penalty, x: Tensor, y: Tensor, a: Tensor, idx: Tensor, need_alpha: bool):
    """:func:`_careful_weights` of the rows ``idx`` in float64 (rare rows): a user's penalty
    without a saturation overflows on a far outlier in float32 ((z / alpha)^2 at 1e20)
    whatever the row's scale."""
    f64 = torch.float64
    return _careful_weights(penalty, x[idx].to(f64), y[idx].to(f64), (a if a.dim() == 0 else a[idx]).to(f64),
                            need_alpha)


def _finite_alpha_grad(penalty, x: Tensor, y: Tensor, a: Tensor, gcol: Tensor, ga: Tensor) -> tuple[Tensor, int]:
    """``ga`` with its non-finite entries formed again in float64 by the careful,
    rescaled weights (a penalty's ``d2phi_dalpha`` overflowing in a low precision: a
    user's formula at ``z / alpha ~ 1e15`` in float32); entries still not finite are
    set to zero. Entries whose incoming gradient is not finite are left as they are (a
    fault upstream, propagated). Returns the gradient and how many were set to zero (rare:
    its host syncs run only where the caller's one read saw something amiss)."""
    bad = ~torch.isfinite(ga) & torch.isfinite(gcol).squeeze(-1)
    if not bool(bad.any()):
        return ga, 0
    idx = bad.nonzero().squeeze(-1)
    _, sw, wa, _ = _careful_weights64(penalty, x, y, a, idx, True)
    again = (-(gcol[idx].to(sw.dtype) * wa / sw)).squeeze(-1).to(ga.dtype)
    lost = ~torch.isfinite(again)
    return ga.index_copy(0, idx, torch.where(lost, 0.0, again)), int(lost.sum())


def _nonsingular(sw: Tensor, size: Tensor, n: int) -> Tensor:
    """(R,) rows whose Hessian sum ``sw`` is above the rounding noise of its terms
    (``size`` bounds their absolute sum): a property of the Hessian alone, whatever the
    incoming gradient."""
    eps = torch.finfo(sw.dtype).eps
    return (sw > (n * eps) * size).squeeze(-1)


def _careful_weights(penalty: Penalty, x: Tensor, y: Tensor, a: Tensor, need_alpha: bool):
    """The backward's weights of rows with huge entries or spread: scaled by a power of
    two per row (exact), residuals clamped at the penalty's saturation, rescaled weights.
    Both ratios of Table 1 are scale-free."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = row_scale(torch.minimum(lo, y.unsqueeze(-1)), torch.maximum(hi, y.unsqueeze(-1)))
    a_s = a * s
    # Scaled before the subtraction: y - x overflows where both lie near the range's ends.
    z = y.unsqueeze(-1) * s - x * s
    clamp_saturated(penalty, z, a_s)
    w, sw, swa = penalty.weight_sums(z, a_s, need_alpha)
    return w, sw, swa, w.abs().sum(-1, keepdim=True)
