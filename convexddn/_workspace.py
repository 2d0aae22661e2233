"""Work buffers kept between calls on the CPU.

torch's CPU allocator gives freed memory back to the C library, and glibc's malloc
returns chunks of a few MiB to the kernel (``munmap``, or trimming the top of its heap
once more than twice its mmap threshold lies free there). A work buffer of a few MiB
made anew on every call is then faulted in again, a page at a time, on every call:
robust pooling at (4, 256, 1024) in float32 took 250-1,500 page faults a forward call
in 3 of 5 fresh processes, and pseudo-Huber, Huber and Welsch ran 1.4-3× faster with
glibc told to keep its memory (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``)
-- a setting of the whole process, not the library's to change. So the solvers take
their scratch buffers from here and hand them back when done: at most
:data:`MAX_BYTES` stay resident, as raw bytes that any dtype views.

CUDA's caching allocator already reuses memory (and a captured CUDA graph holds the
addresses of its buffers, which must not be handed to anyone else): elsewhere than on
the CPU, and under a functorch transform (whose buffers are its own wrapped tensors),
:func:`take` allocates and :func:`give` drops.
"""
from __future__ import annotations

import os
import threading
import weakref

import torch

__all__ = ["MAX_BYTES", "give", "is_scratch", "take"]

#: Bytes kept between calls, over all buffers (a buffer larger than half of it is not kept).
MAX_BYTES = 32 << 20

_LOCK = threading.Lock()
_FREE: list[torch.Tensor] = []  # flat uint8 CPU tensors, not in use
# Address -> the flat tensor last handed out there (weakly: an entry whose tensor is gone
# says nothing, its address may serve another tensor by then), for is_scratch.
_HANDED: dict[int, weakref.ref] = {}


def _after_fork_in_child() -> None:
    # A fork while another thread held the lock would leave the child's copy locked
    # forever; the kept buffers are the parent's copy-on-write pages: start afresh.
    global _LOCK
    _LOCK = threading.Lock()
    _FREE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def take(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised flat tensor of ``numel`` entries; on the CPU one kept from an
    earlier call where one is large enough (the smallest such), else a new one.

    Shape:
        ``() -> (numel,)``
    """
    if device.type != "cpu" or torch._C._are_functorch_transforms_active():
        # (under vmap, grad or jvp, buffers must be the transform's own wrapped tensors)
        return torch.empty(numel, dtype=dtype, device=device)
    nbytes = numel * dtype.itemsize
    # (bookkeeping out of sight of torch-function modes: a DeclarativeNode's read guard, whose
    # objective calls a native node, took the kept buffers for the problem's own state)
    with torch._C.DisableTorchFunction():
        with _LOCK:
            fits = [i for i, b in enumerate(_FREE) if b.numel() >= nbytes]
            raw = _FREE.pop(min(fits, key=lambda i: _FREE[i].numel())) if fits else None
        if raw is None:
            with torch.inference_mode(False):  # a kept buffer serves later calls in any mode
                raw = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cpu")
        # A fresh allocation and a kept buffer both start 64-byte aligned: any dtype views them.
        out = raw[:nbytes].view(dtype)
        with _LOCK:
            if len(_HANDED) > 256:  # (the dead entries go now and then)
                for key in [k for k, ref in _HANDED.items() if ref() is None]:
                    del _HANDED[key]
            # (the tensor handed out, which its user holds while it works in it; raw's Python
            # object dies here, its memory held by the view)
            _HANDED[raw.data_ptr()] = weakref.ref(out)
        return out


def is_scratch(t: torch.Tensor) -> bool:
    """Whether ``t`` lies in a buffer :func:`take` handed out: the library's scratch memory,
    rewritten by later calls, which a DeclarativeNode's read guard must not take for state
    of the problem (an objective calling ``robust_pool`` raised a false in-place error when
    another call reused its buffer before the backward)."""
    if type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided:
        return False  # (the buffers are plain tensors; a subclass's or a sparse tensor's storage may not answer)
    with torch._C.DisableTorchFunction():
        ptr = t.untyped_storage().data_ptr()
        ref = _HANDED.get(ptr)
        raw = None if ref is None else ref()
        return raw is not None and raw.untyped_storage().data_ptr() == ptr


def give(*buffers: torch.Tensor) -> None:
    """Hand back buffers from :func:`take` that the caller no longer uses (nothing else
    may: their memory goes to the next :func:`take`); kept while the kept bytes stay
    within :data:`MAX_BYTES`, the largest first."""
    with torch._C.DisableTorchFunction():  # (out of sight of torch-function modes, as in take)
        _give(buffers)


def _give(buffers) -> None:
    for buf in buffers:
        if buf.device.type != "cpu" or torch._C._functorch.is_functorch_wrapped_tensor(buf):
            continue
        storage = buf.untyped_storage()
        if buf.storage_offset() or storage.nbytes() > MAX_BYTES // 2:
            continue
        with torch.inference_mode(False):
            raw = torch.empty(0, dtype=torch.uint8, device="cpu").set_(storage)  # all of its bytes, as bytes
        with _LOCK:
            if any(b.data_ptr() == raw.data_ptr() for b in _FREE):
                continue  # handed back twice: keep it once
            _FREE.append(raw)
            _FREE.sort(key=lambda b: b.numel(), reverse=True)
            total = 0
            for i, b in enumerate(_FREE):
                total += b.numel()
                if total > MAX_BYTES:
                    del _FREE[i:]
                    break
