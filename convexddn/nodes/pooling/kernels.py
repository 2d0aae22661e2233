"""Row blocks, scratch buffers and the row sums of the solvers.

The solvers (:mod:`.iterations`) and the backward (:mod:`.backward`) walk ``x (R, N)`` in blocks of whole
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
from ..._warn import warn
from ...errors import ConvexDDNWarning
from .penalties import Penalty

# Bytes of x per row block on a CPU. Smaller blocks pay the per-op dispatch (~1-2 us)
# over too little work; measured on the 2-core CI machine (2 MiB L2 per core), 2 MiB
# blocks beat 512 KiB ones by 5-20 % forward and 10-25 % backward for pseudo-Huber,
# Huber and Welsch at (4, 256, 1024) and (4, 1024, 2048), although the block and its
# scratch buffers then exceed L2; 4-8 MiB were no better.
_CPU_BLOCK_BYTES = 1 << 21
# Elements per block elsewhere (CUDA, or compiled kernels): bounds the scratch memory.
_BIG_BLOCK_NUMEL = 1 << 24
# Column chunks of long rows (col_ranges) are multiples of this: the backward's float32
# weight sums add partial sums of PART terms (backward._row_sum), the same ones chunked.
PART = 256

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


def _from_compiler(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is torch.compile's own (dynamo's,
    or a backend's, which dynamo raises as ``BackendCompilerFailed``), not one the compiled
    code raised: that propagates unchanged through a compiled call."""
    while exc is not None:
        if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return True
        exc = exc.__cause__
    return False


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
                compiled = entry[1]
            except Exception as exc:  # noqa: BLE001 - torch.compile itself failed: run eagerly
                failure = exc
            else:
                try:
                    return compiled(*args)
                except Exception as exc:  # noqa: BLE001
                    # Only the compiler's own failures mean "run eagerly": an error the kernel's
                    # code raised (a user's penalty) is the caller's. It was reported as a compile
                    # failure, and compilation of that kernel was off for the rest of the process.
                    if not _from_compiler(exc):
                        raise
                    failure = exc
            warn(
                f"robust_pool: torch.compile failed for {name} "
                f"({type(failure).__name__}: {str(failure)[:200]}); running it eagerly from now on",
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


def col_ranges(n: int, x: Tensor, use_compile: bool, k: int = 1) -> list[slice]:
    """The column chunks of rows of length ``n`` (``k`` residuals per entry: a descent
    solve's starts): all of a row where ``k`` copies of it fit one block, else chunks of a
    block's budget (:func:`block_rows`) each, a multiple of :data:`PART` columns.

    A row longer than a block was one block of its own: every scratch buffer as long as
    the row (a float32 row of 1e7 took 3-8x the input). The solvers' row sums and the
    backward's weight sums are sums of elementwise terms, so they are taken chunk by
    chunk and added; whole rows are unchanged (one chunk: the same ops as before)."""
    budget = block_rows(1, x, use_compile)  # (entries per block)
    step = max(PART, budget // k // PART * PART)
    if n <= step:
        return [slice(0, n)]
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


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


# Rows with an entry beyond 1/_FAR of the float range are solved scaled (far_rows, row_scale).
_FAR = 16.0


def far_rows(lo: Tensor, hi: Tensor) -> Tensor:
    """Per row, from its min ``lo`` and max ``hi`` ``(R, 1)``: whether an entry lies beyond
    ``max / 16`` of the float range, a bool ``(R, 1)`` (no overflow: only magnitudes compared).

    Below it every residual ``u - x_i`` between the row's ends is at most ``max / 8`` and the
    solvers' terms in it stay finite; beyond it a residual, the spread ``hi - lo`` or a
    term of the gradient's noise (``h |u|``) may leave the range, and the noise, the stopping
    tests and the bisection read inf or NaN where the sums themselves are finite (pseudo-Huber
    at x = (-0.77, -0.34, 0.62) max stopped at once as "unresolved", and its bisection
    returned the row's minimum). Those rows are solved in the units of :func:`row_scale`."""
    return torch.maximum(lo.abs(), hi.abs()) > torch.finfo(lo.dtype).max / _FAR


def row_scale(lo: Tensor, hi: Tensor) -> Tensor:
    """Per row, the power of two that brings its entries below 1/16 of the float range
    (1 where they already are; :func:`far_rows` is false after it): scaling by it is exact."""
    finfo = torch.finfo(lo.dtype)
    big = torch.maximum(lo.abs(), hi.abs()).to(torch.float64)
    k = torch.ceil(torch.log2(big / (finfo.max / _FAR))).clamp(min=0)
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
