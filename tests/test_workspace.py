"""The work buffers kept between calls (convexddn._workspace) and the solvers using them."""
import subprocess
import sys

import pytest
import torch

from convexddn import _workspace as workspace
from convexddn.functional import robust_pool

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.setattr(workspace, "_FREE", [])


def test_a_buffer_handed_back_is_handed_out_again_in_any_dtype():
    a = workspace.take(1000, torch.float32, CPU)
    assert a.shape == (1000,) and a.dtype == torch.float32
    workspace.give(a)
    b = workspace.take(500, torch.float64, CPU)  # 4000 bytes hold 500 float64
    assert b.data_ptr() == a.data_ptr() and b.shape == (500,) and b.dtype == torch.float64
    c = workspace.take(500, torch.float64, CPU)  # the first is in use: a new one
    assert c.data_ptr() != b.data_ptr()


def test_the_smallest_buffer_that_fits_is_taken():
    small, large = workspace.take(100, torch.uint8, CPU), workspace.take(10_000, torch.uint8, CPU)
    workspace.give(large, small)
    assert workspace.take(50, torch.uint8, CPU).data_ptr() == small.data_ptr()
    assert workspace.take(200, torch.uint8, CPU).data_ptr() == large.data_ptr()


def test_kept_bytes_are_capped_and_a_buffer_is_kept_once(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_BYTES", 10_000)
    bufs = [workspace.take(3000, torch.uint8, CPU) for _ in range(4)]
    workspace.give(*bufs)
    assert sum(b.numel() for b in workspace._FREE) == 9000  # the fourth would pass the cap
    workspace.give(bufs[0])
    assert len(workspace._FREE) == 3
    workspace.give(workspace.take(6000, torch.uint8, CPU))  # over half the cap: not kept
    assert len(workspace._FREE) == 3


def test_views_into_a_buffer_and_tensors_of_transforms_are_not_kept():
    buf = workspace.take(100, torch.float32, CPU)
    workspace.give(buf[10:])
    assert workspace._FREE == []

    def f(x):
        workspace.give(torch.empty(10))  # a wrapped tensor under jvp
        t = workspace.take(10, torch.float32, CPU)
        assert torch._C._functorch.is_functorch_wrapped_tensor(t)  # the transform's own
        return x

    torch.func.jvp(f, (torch.ones(3),), (torch.ones(3),))
    assert workspace._FREE == []


def test_buffers_made_in_inference_mode_serve_a_training_step():
    with torch.inference_mode():
        workspace.give(workspace.take(100, torch.float32, CPU))
    buf = workspace.take(100, torch.float32, CPU)
    assert not buf.is_inference()
    x = torch.randn(4, 8, 64, dtype=torch.float64)
    with torch.inference_mode():
        y0 = robust_pool(x, "pseudo_huber", 1.0)
    xg = x.clone().requires_grad_(True)
    y = robust_pool(xg, "pseudo_huber", 1.0)
    (g,) = torch.autograd.grad(y.sum(), xg)
    torch.testing.assert_close(y.detach(), y0, rtol=0, atol=0)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("penalty", ["pseudo_huber", "huber", "welsch", "trunc_quad"])
def test_pooling_is_unchanged_by_stale_buffers_and_its_results_own_their_memory(penalty):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 700, generator=gen, dtype=torch.float64)
    x[..., :70] += 5.0
    g = torch.randn(2, 300, generator=gen, dtype=torch.float64)

    def fwd_bwd(x):
        xg = x.clone().requires_grad_(True)
        y = robust_pool(xg, penalty, 1.0)
        return y.detach(), torch.autograd.grad(y, xg, g)[0]

    y0, g0 = fwd_bwd(x)  # fresh buffers
    # Only NaN-filled buffers, of the sizes the solvers take (20 MiB in all, under the cap)
    workspace._FREE.clear()
    stale = [workspace.take(n, torch.float64, CPU).fill_(torch.nan) for n in [1 << 19] * 4 + [1 << 16] * 10]
    workspace.give(*stale)
    assert len(workspace._FREE) == 14
    y1, g1 = fwd_bwd(x)  # stale NaN-filled buffers
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    fwd_bwd(torch.randn_like(x))  # another call reuses the buffers: the results stay
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)


_FAULTS = """
import resource, torch
import convexddn._workspace as workspace
from convexddn.functional import robust_pool
gen = torch.Generator().manual_seed(0)
x = torch.randn(4, 256, 1024, generator=gen)
x[..., :102] += 5.0
kept = workspace.MAX_BYTES
for max_bytes in (0, kept):  # nothing kept (buffers made anew on each call), then kept
    workspace.MAX_BYTES = max_bytes
    out = []
    for penalty in ("pseudo_huber", "welsch"):
        with torch.no_grad():
            for _ in range(3):
                robust_pool(x, penalty, 1.0)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                robust_pool(x, penalty, 1.0)
        out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    print(*out)
"""


def test_a_repeated_pooling_call_faults_in_no_new_memory():
    # 1024 rows of 1024 float32 (10 % outliers): 2 MiB blocks, three scratch buffers of
    # 2 MiB (Welsch: 4 MiB, two starts) per solve. Made anew on each call, glibc handed
    # them back to the kernel and every forward call faulted in 250-1,500 pages; kept, none.
    # In a fresh process, and there in only some: one whose glibc has raised its
    # thresholds (this test session's other tests free blocks that do it; in fresh
    # processes it happened in 2 of 5 too) faults either way. Both ways are timed in the
    # same process, until one shows the faults.
    for _ in range(6):
        run = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True)
        without, kept = ([float(v) for v in line.split()] for line in run.stdout.splitlines())
        if min(without) >= 100:
            assert max(kept) < 32, (kept, without)
            return
    pytest.skip(f"the C library kept freed memory mapped by itself in 6 processes ({without} page faults a call)")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_starts_with_an_empty_pool_and_a_free_lock():
    import os

    workspace.give(workspace.take(1000, torch.float32, CPU))
    assert len(workspace._FREE) == 1
    with workspace._LOCK:  # held (by this thread) across the fork
        pid = os.fork()
        if pid == 0:  # the child: its lock must be free and its pool empty
            ok = workspace._LOCK.acquire(timeout=5) and not workspace._FREE
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(workspace._FREE) == 1  # the parent's pool is untouched


def test_host_buffers_stay_on_the_cpu_under_another_default_device(default_device):
    """Under torch.set_default_device (meta here, as a CUDA default) a new CPU buffer was
    made on the default device: robust pooling of CPU rows then failed ("Attempting to
    copy from device cpu to device meta"). Closed form: Huber pooling with alpha above
    every residual is the mean."""
    x = torch.tensor([[0.0, 1.0, 5.0, -2.0], [3.0, 3.5, 2.0, 0.5]], dtype=torch.float64)
    with default_device("meta"):
        buf = workspace.take(100, torch.float64, CPU)
        y = robust_pool(x, "huber", alpha=100.0)
    assert buf.device == CPU
    assert torch.allclose(y, x.mean(-1), rtol=1e-12, atol=1e-12)
