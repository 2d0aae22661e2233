"""convexddn._linalg: the guarded batched LU."""
from __future__ import annotations

import subprocess
import sys

import torch

from convexddn._linalg import lu_factor_ex


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
        "from convexddn._linalg import lu_factor_ex\n"
        "A = torch.randn(4, 200, 200, dtype=torch.float64)\n"
        "LU, piv, info = lu_factor_ex(A)\n"
        "x = torch.linalg.lu_solve(LU, piv, A[..., :1])\n"
        "e = torch.zeros(200, 1, dtype=torch.float64); e[0] = 1\n"
        "assert (x - e).abs().max() < 1e-8, (x - e).abs().max()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
