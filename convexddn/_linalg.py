"""Batched CPU LAPACK calls made safe and fast: one place for their workarounds.

**LU.** On the CPU builds of torch we ship against (2.13, MKL), ``torch.linalg.lu_factor_ex``
of a batch of matrices larger than 128 × 128 prints "Parameter 6 was incorrect on
entry to DLASWP" and hangs once the program has called ``torch.set_num_threads(k)``
with ``k > 1`` (a common call in training scripts); a single matrix, Cholesky, QR and
``lu_solve`` are not affected. There, the batch is factorised one matrix at a time:
on a CPU torch's batched LU is a loop over the batch too (measured: 128 matrices of
200 × 200, 30 ms batched, 32 ms one at a time), so nothing is lost. CUDA tensors and
small matrices take the batched call unchanged.

**Symmetric eigendecomposition.** torch's CPU ``eigh`` of a batch is a loop of LAPACK
calls, one matrix after another, and MKL's threading inside each call costs more than
it gains on small matrices (64 matrices of 32 × 32 on 2 cores: 4–9 ms depending on the
thread settings, 2.5–5 ms in two chunks). :func:`eigh` runs the batch in chunks on
``torch.get_num_threads()`` threads (the call releases the GIL); CUDA tensors, single
matrices and one-thread settings take the plain call.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading

import torch

__all__ = ["eigh", "lu_factor_ex"]

# Fewest matrices per chunk worth a thread (a thread hand-off costs ~0.05 ms).
_MIN_CHUNK = 4
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def _executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        # A forked child (e.g. a DataLoader worker) inherits the pool without its
        # threads: work submitted there would never run, so the child makes its own.
        if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < workers:  # noqa: SLF001
            _pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="convexddn-linalg")
            _pool_pid = os.getpid()
        return _pool


def eigh(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh(S)`` for symmetric ``S (*, n, n)``, CPU batches in parallel chunks.

    Returns ``(eigenvalues (*, n) ascending, eigenvectors (*, n, n))``, the same values
    as the plain call (each matrix goes through the same LAPACK routine).
    """
    n = S.shape[-1]
    batch = S.shape[:-2].numel() if S.dim() > 2 else 1
    parts = min(torch.get_num_threads(), batch // _MIN_CHUNK)
    if S.device.type != "cpu" or parts < 2 or n < 2:
        return torch.linalg.eigh(S)
    chunks = S.reshape(batch, n, n).tensor_split(parts)
    futures = [_executor(parts - 1).submit(torch.linalg.eigh, c) for c in chunks[1:]]
    results = [torch.linalg.eigh(chunks[0])] + [f.result() for f in futures]
    lam = torch.cat([r[0] for r in results]).reshape(S.shape[:-1])
    V = torch.cat([r[1] for r in results]).reshape(S.shape)
    return lam, V

# The largest size seen to factorise safely in a batch (129 passed, 160 hung).
_SAFE_BATCHED_CPU = 128


def lu_factor_ex(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.lu_factor_ex(A)`` for ``A (B, k, k)``: ``(LU, pivots, info)``."""
    if A.device.type != "cpu" or A.dim() != 3 or A.shape[0] < 2 or A.shape[-1] <= _SAFE_BATCHED_CPU:
        return torch.linalg.lu_factor_ex(A)
    parts = [torch.linalg.lu_factor_ex(A[i:i + 1]) for i in range(A.shape[0])]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]
