"""robust_vector_pool on one set too large for the start search's block budget: the nonconvex
penalties' (S, N) temporaries (S = 130 candidate points) are taken in chunks of the points, so
their memory stays within the pooling kernels' block budget whatever N (one float32 set of 1e6
3-vectors took 2.7 GB, 250 times its input, before), with the result of the one-pass search."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from convexddn.nodes import _vector_pool_starts as starts
from convexddn.nodes.pooling import kernels
from convexddn.nodes.vector_pool import robust_vector_pool

D = torch.float64


def _one_set(n: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, 3, n): a third of the points in a tight cluster at 2, the rest standard normal."""
    x = torch.randn(1, 3, n, dtype=D, generator=torch.Generator().manual_seed(0))
    x[..., : n // 3] = 0.3 * x[..., : n // 3] + 2.0
    return x.to(dtype)


@pytest.mark.parametrize("name", ["welsch", "trunc_quad"])
def test_start_search_temporaries_stay_within_the_block_budget_for_one_large_set(name, monkeypatch):
    """One float32 set of 20000 points: S·N is 10 MB per temporary in one pass, over the 2 MiB
    CPU block; every (r, S, n) distance the search forms is within the block."""
    seen = []
    real = starts.kappa

    def recording(pen, z, a):
        if z.dim() == 3:  # the start search's (r, S, n) distances
            seen.append(z.numel() * z.element_size())
        return real(pen, z, a)

    monkeypatch.setattr(starts, "kappa", recording)
    robust_vector_pool(_one_set(20000, torch.float32), name, 1.0)
    assert seen and max(seen) <= kernels._CPU_BLOCK_BYTES, (max(seen), kernels._CPU_BLOCK_BYTES)


@pytest.mark.parametrize("name", ["welsch", "trunc_quad"])
def test_chunked_start_search_gives_the_one_pass_result(name, monkeypatch):
    """Chunks of 32 points against every set in one pass (an unbounded block): the same
    minimiser, to float64 rounding, and (Welsch) a stationary point of the objective written
    out; (trunc_quad) the mean of its own inliers."""
    x = _one_set(3000, D)
    out = []
    for budget in (1 << 40, 130 * 32 * 8):
        monkeypatch.setattr(kernels, "_CPU_BLOCK_BYTES", budget)
        seen = []
        real = starts.kappa
        monkeypatch.setattr(starts, "kappa", lambda pen, z, a: (seen.append(z.shape[-1]), real(pen, z, a))[1])
        out.append(robust_vector_pool(x, name, 1.0))
        monkeypatch.setattr(starts, "kappa", real)
        assert max(seen) == (3000 if budget > 1 << 30 else 32)  # one pass / chunks of 32 points
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-12)
    y = out[1]
    d = y.unsqueeze(-1) - x
    if name == "welsch":
        grad = (d * torch.exp(-0.5 * (d * d).sum(-2, keepdim=True))).sum(-1)
        assert grad.abs().max() < 1e-9
    else:
        inl = (d.norm(dim=-2) <= 1.0).to(D)
        torch.testing.assert_close(y, (x * inl.unsqueeze(-2)).sum(-1) / inl.sum(-1, keepdim=True), rtol=0,
                                   atol=1e-12)


_PROBE = textwrap.dedent("""
    import gc, sys, torch
    torch.set_num_threads(1)
    from convexddn.nodes.vector_pool import robust_vector_pool
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    def run(n):
        x = torch.randn(1, 3, n, generator=torch.Generator().manual_seed(0))
        x[..., : n // 3] = 0.3 * x[..., : n // 3] + 2.0
        x.requires_grad_()
        y = robust_vector_pool(x, sys.argv[1], 1.0)
        y.backward(torch.ones_like(y))
        return x
    run(2000)  # (libraries and the autograd engine's first allocations)
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    x = run(int(sys.argv[2]))
    print((status("VmHWM") - base) / (x.numel() * x.element_size()))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
@pytest.mark.parametrize("name", ["welsch", "trunc_quad"])
def test_one_large_set_forward_backward_peak_memory_is_a_small_multiple_of_the_input(name):
    """Peak resident memory added by forward + backward of one float32 set of 1e5 3-vectors
    (1.2 MB), in a fresh process: 230 to 300 times the input with the start search in one
    pass; a small multiple now (the polish's and backward's per-point terms, and the tiles)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks leave the resident set
    out = subprocess.run([sys.executable, "-c", _PROBE, name, "100000"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.split()[-1])
    assert ratio < 24, ratio
