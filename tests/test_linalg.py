"""convexddn._linalg: the guarded batched LU and the batch-parallel eigh."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from convexddn._linalg import eigh, lu_factor_ex


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


@pytest.mark.parametrize("shape", [(3, 4, 9, 9), (37, 6, 6), (2, 5, 5), (7, 7)])
def test_eigh_matches_torch_in_any_batch_shape(shape):
    # Batches of 4+ matrices per thread are split across threads; smaller ones, and a
    # single matrix, take the plain call. Either way each matrix goes through the same
    # LAPACK routine, so values agree to rounding and eigenvectors up to sign.
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    S = A + A.mT
    lam, V = eigh(S)
    lam_ref, V_ref = torch.linalg.eigh(S)
    assert lam.shape == lam_ref.shape and V.shape == V_ref.shape
    torch.testing.assert_close(lam, lam_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(V @ torch.diag_embed(lam) @ V.mT, S, rtol=0, atol=1e-12)
    torch.testing.assert_close((V * V_ref).sum(-2).abs(), torch.ones_like(lam), rtol=0, atol=1e-10)


def test_eigh_one_thread_and_threads_agree():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(64, 12, 12, generator=g, dtype=torch.float64)
    S = A + A.mT
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lam1, _ = eigh(S)
        torch.set_num_threads(max(2, old))
        lam2, _ = eigh(S)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(lam1, lam2, rtol=0, atol=1e-12)


def test_eigh_in_a_forked_child_does_not_hang():
    # The pool's threads do not survive fork (DataLoader workers): the child must make
    # its own pool rather than queue work that never runs. In a subprocess with a timeout.
    code = (
        "import os, torch\n"
        "torch.set_num_threads(2)\n"
        "from convexddn._linalg import eigh\n"
        "S = torch.randn(16, 6, 6, dtype=torch.float64); S = S + S.mT\n"
        "eigh(S)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    lam, V = eigh(S)\n"
        "    os._exit(0 if torch.allclose(lam, torch.linalg.eigh(S)[0]) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0, status\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
