"""Guarded batched LU factorisation and solve (one place for a workaround of a CPU LAPACK hang).

On the CPU builds of torch we ship against (2.13, MKL), ``torch.linalg.lu_factor_ex``
of a batch of matrices larger than 128 × 128 prints "Parameter 6 was incorrect on
entry to DLASWP" and hangs once the program has called ``torch.set_num_threads(k)``
with ``k > 1`` (a common call in training scripts); a single matrix, Cholesky, QR and
``lu_solve`` are not affected (``torch.linalg.solve_ex`` is: it factorises by LU). There,
the batch is factorised one matrix at a time: on a CPU torch's batched LU is a loop over
the batch too (measured: 128 matrices of 200 × 200, 30 ms batched, 32 ms one at a time),
so nothing is lost. CUDA tensors and
small matrices take the batched call unchanged.
"""
from __future__ import annotations

import torch

__all__ = ["lu_factor_ex", "solve_ex"]

# The largest size seen to factorise safely in a batch (129 passed, 160 hung).
_SAFE_BATCHED_CPU = 128


def lu_factor_ex(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.lu_factor_ex(A)`` for ``A (B, k, k)``: ``(LU, pivots, info)``."""
    if A.device.type != "cpu" or A.dim() != 3 or A.shape[0] < 2 or A.shape[-1] <= _SAFE_BATCHED_CPU:
        return torch.linalg.lu_factor_ex(A)
    # Each factor written into its place in the batch's (a list of them, concatenated,
    # held the batch's factors twice: the Newton polish's peak), laid out as LAPACK's
    # (column-major LU: row-major, every lu_solve copied the batch's factors first, 5 ms
    # for 8 of 479 × 479 against 0.5 ms, the same solution).
    first = torch.linalg.lu_factor_ex(A[:1])
    out = tuple(v.new_empty_strided((A.shape[0],) + tuple(v.shape[1:]), (v[0].numel(),) + v.stride()[1:])
                for v in first)
    for i in range(A.shape[0]):
        for o, v in zip(out, first if i == 0 else torch.linalg.lu_factor_ex(A[i:i + 1])):
            o[i:i + 1] = v
    return out  # type: ignore[return-value]


def solve_ex(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.solve_ex(A, B)`` for ``A (B, k, k)``: ``(X, info)``, through
    :func:`lu_factor_ex` where the batched call could hang. ``B`` is ``(B, k, r)``, or a
    batch of vectors ``(B, k)`` as torch reads it (its shape is ``A``'s without the last dim)."""
    if A.device.type != "cpu" or A.dim() != 3 or A.shape[0] < 2 or A.shape[-1] <= _SAFE_BATCHED_CPU:
        return torch.linalg.solve_ex(A, B)
    LU, pivots, info = lu_factor_ex(A)
    vector = B.shape == A.shape[:-1]
    X = torch.linalg.lu_solve(LU, pivots, B.unsqueeze(-1) if vector else B)
    return (X.squeeze(-1) if vector else X), info
