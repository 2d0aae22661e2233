"""convexddn._linalg: the guarded batched LU and solve."""
from __future__ import annotations

import subprocess
import sys

import torch

from convexddn._linalg import lu_factor_ex, solve_ex


def _passes_in_a_subprocess(code: str) -> None:
    """``code`` runs in a fresh interpreter and prints 'ok' (a regression hangs there, not here)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_lu_factor_ex_matches_torch_and_solves():
    gen = torch.Generator().manual_seed(0)
    for k in (8, 200):
        A = torch.randn(3, k, k, dtype=torch.float64, generator=gen)
        LU, piv, info = lu_factor_ex(A)
        assert LU.shape == A.shape and piv.shape == (3, k) and info.shape == (3,)
        assert (info == 0).all()
        b = torch.randn(3, k, 2, dtype=torch.float64, generator=gen)
        x = torch.linalg.lu_solve(LU, piv, b)
        torch.testing.assert_close(A @ x, b, atol=1e-9, rtol=0)


def test_lu_factor_ex_after_set_num_threads_does_not_hang():
    """torch.linalg.lu_factor_ex hangs here on a batch of 200 x 200 matrices after
    torch.set_num_threads(2) (MKL: 'Parameter 6 was incorrect on entry to DLASWP');
    ours must return. In a subprocess, so that a regression fails instead of hanging."""
    code = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from convexddn._linalg import lu_factor_ex, solve_ex\n"
        "A = torch.randn(4, 200, 200, dtype=torch.float64)\n"
        "LU, piv, info = lu_factor_ex(A)\n"
        "x = torch.linalg.lu_solve(LU, piv, A[..., :1])\n"
        "e = torch.zeros(200, 1, dtype=torch.float64); e[0] = 1\n"
        "assert (x - e).abs().max() < 1e-8, (x - e).abs().max()\n"
        "print('ok')\n"
    )
    _passes_in_a_subprocess(code)


def test_solve_ex_matches_torch_for_matrices_and_vectors():
    gen = torch.Generator().manual_seed(1)
    for k in (8, 200):
        A = torch.randn(3, k, k, dtype=torch.float64, generator=gen)
        A[1] = 0.0  # singular: info > 0, as torch's
        for rhs in ((3, k), (3, k, 2)):
            b = torch.randn(rhs, dtype=torch.float64, generator=gen)
            x, info = solve_ex(A, b)
            assert x.shape == b.shape and info.tolist()[0] == 0 and info.tolist()[1] > 0
            good = torch.tensor([0, 2])
            back = A[good] @ (x[good] if len(rhs) == 3 else x[good].unsqueeze(-1))
            torch.testing.assert_close(back if len(rhs) == 3 else back.squeeze(-1), b[good], atol=1e-8, rtol=0)


def test_robust_vector_pool_beyond_128_dims_after_set_num_threads_does_not_hang():
    """RobustVectorPool's Newton steps solve its C x C Hessians with a batched
    torch.linalg.solve_ex, an LU: at C = 150 after torch.set_num_threads(2) MKL printed
    'Parameter 6 was incorrect on entry to DLASWP' and hung; at C = 160 it raised torch's
    'Pivots given to lu_solve must all be greater or equal to 1'. The pool of the same
    points with one thread is the reference. In a subprocess (a regression would hang)."""
    code = (
        "import torch, convexddn as cddn\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(3, 160, 200, dtype=torch.float64, generator=g)\n"
        "x[..., :20] += 5.0\n"
        "torch.set_num_threads(1)\n"
        "ref = cddn.RobustVectorPool('pseudo_huber', alpha=1.0)(x)\n"
        "torch.set_num_threads(2)\n"
        "y = cddn.RobustVectorPool('pseudo_huber', alpha=1.0)(x)\n"
        "assert (y - ref).abs().max() < 1e-12, (y - ref).abs().max()\n"
        "print('ok')\n"
    )
    _passes_in_a_subprocess(code)


def test_lu_factor_ex_lays_the_factors_out_as_lapack():
    """The factors one matrix at a time (k > 128 on a CPU) are laid out as torch's own batched
    call lays them, column-major per matrix: in row-major order, every ``lu_solve`` of them first
    copied the whole batch's factors (8 of 479 × 479: 5 ms against 0.5 ms a solve). The same
    factors either way (each matrix's own LAPACK call: compared with it alone)."""
    A = torch.randn(3, 200, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    LU, piv, info = lu_factor_ex(A)
    assert LU.stride() == torch.linalg.lu_factor_ex(A)[0].stride() == (200 * 200, 1, 200)
    for i in range(3):
        alone = torch.linalg.lu_factor_ex(A[i])
        assert torch.equal(LU[i], alone[0]) and torch.equal(piv[i], alone[1])
