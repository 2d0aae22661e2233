"""Robust pooling of rows longer than a block: their temporaries are bounded by column chunks.

A single long row was one block, every scratch buffer as long as the row: float32 rows of
1e7 took 3x the input (pseudo-Huber, Welsch) and 8x (Huber, whose float32 sums cannot
resolve such a row and which solved it again from a float64 copy). The row sums are now
taken chunk by chunk (:mod:`convexddn.nodes.pooling.chunks`) and a float64 solve converts
a chunk at a time (:class:`~convexddn.nodes.pooling.rows.Rows`)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from convexddn import _workspace
from convexddn.nodes.pooling import kernels, robust_pool
from convexddn.nodes.pooling import rows as rows_module
from convexddn.nodes.pooling.backward import pool_backward
from convexddn.nodes.pooling.penalties import Penalty
from convexddn.nodes.pooling.solvers import _rows, _solve

MiB = 1 << 20


def _peak_bytes(call) -> int:
    """Peak bytes torch held during ``call()`` above what it held before: its allocation
    events from the profiler, in time order (not the resident set: robust on a shared
    machine). The kept work buffers are emptied first, so that every scratch buffer the
    call needs is allocated within it and counts."""
    _workspace._FREE.clear()
    with profile(profile_memory=True) as prof:
        out = call()
    del out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("pen,shape,alpha_grad", [("pseudo_huber", (1, 1 << 22), False), ("huber", (1, 1 << 22), False),
                                                  ("welsch", (1, 1 << 22), False), ("huber", (2, 1 << 21), True),
                                                  ("welsch", (1, 1 << 22), True)])
def test_long_row_forward_backward_allocates_about_the_gradient(pen, shape, alpha_grad):
    # The gradient (1x the input) plus chunk-sized scratch: at most six buffers of a block
    # (2 MiB) each, 12 MiB. (Before: 4x for pseudo-Huber and Welsch, 8x for Huber.)
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float32).requires_grad_(True)
    a = torch.full(shape[:1], 1.0, requires_grad=alpha_grad)
    gy = torch.rand(shape[0]) + 0.5

    def call():
        y = robust_pool(x, pen, a if alpha_grad else 1.0)
        return torch.autograd.grad(y, [x, a] if alpha_grad else [x], gy)

    call()  # (warm-up: lazily built caches are not the call's)
    peak = _peak_bytes(call)
    nbytes = x.numel() * x.element_size()
    assert peak <= 1.1 * nbytes + 16 * MiB, peak / nbytes


def _closed_form(pen: str, x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Table 1 in float64 from the formulas: ``(sum_i phi'(y - x_i), dy/dx, sum_i phi'')``."""
    z = y.double().unsqueeze(-1) - x.double()
    p, a = Penalty.resolve(pen), torch.tensor(alpha, dtype=torch.float64)
    w = p.d2phi(z, a)
    return p.dphi(z, a).sum(-1), w / w.sum(-1, keepdim=True), w.sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pen", ["pseudo_huber", "huber", "welsch"])
def test_chunked_rows_match_whole_rows_and_the_closed_form(monkeypatch, pen, dtype):
    # Rows of 100003 entries (a tail that is no multiple of the chunks' 256) in chunks of
    # 16 KiB against the same rows whole (one block of 1 GiB): y to a few ulps (the sums
    # are added in another order), and both the closed form's stationary point and gradient.
    torch.manual_seed(1)
    x = (torch.randn(3, 100_003, dtype=torch.float64) * 2).to(dtype)
    x[:, ::9] += 7.0
    alpha, gy = 0.7, torch.tensor([1.0, -0.5, 2.0], dtype=dtype)
    got = {}
    for block in (1 << 30, 1 << 14):
        monkeypatch.setattr(kernels, "_CPU_BLOCK_BYTES", block)
        assert (len(kernels.col_ranges(x.shape[1], x, False)) > 1) == (block < x.shape[1])
        xr = x.clone().requires_grad_(True)
        a = torch.tensor(alpha, dtype=dtype, requires_grad=True)
        y = robust_pool(xr, pen, a)
        got[block] = (y.detach(), *torch.autograd.grad(y, (xr, a), gy))
    (y0, gx0, ga0), (y1, gx1, ga1) = got[1 << 30], got[1 << 14]
    eps = torch.finfo(dtype).eps
    assert ((y1 - y0).abs() <= 8 * eps * (y0.abs() + alpha)).all()
    assert (gx1 - gx0).abs().max() <= 64 * eps * gx0.abs().max()
    # y is stationary (to the stop's tolerance, 1e-6 (alpha + |y|), times the curvature)
    g, dydx, h = _closed_form(pen, x, y1, alpha)
    assert (g.abs() <= 2e-5 * h * (alpha + y1.double().abs())).all(), (g, h)
    assert (gx1.double() - dydx * gy.double().unsqueeze(-1)).abs().max() <= 1e-4 * dydx.abs().max()
    # alpha's gradient: a sum of cancelling terms, to its rounding
    assert abs(ga1.item() - ga0.item()) <= 1e-5 * abs(ga0.item()) + 1e3 * eps


def test_chunked_backward_is_bit_identical_in_float32(monkeypatch):
    # The float32 weight sums are partial sums of 256 terms added in float64 over the whole
    # row, whichever the chunks: given the same y, the gradient is the same to the bit --
    # but for Welsch's exp, which torch's CPU loops take vectorised, and scalar in a range's
    # last few entries, so that an entry's ulp depends on where the chunks (and the threads'
    # ranges) end: within 1 ulp there (3 entries of 1e5 with one thread, none with two).
    torch.manual_seed(2)
    x = torch.randn(2, 50_001) * 3
    y = x.median(-1).values
    a = torch.tensor(1.3)
    gy = torch.tensor([1.0, -2.0])
    out = {}
    for block in (1 << 30, 1 << 13):
        monkeypatch.setattr(kernels, "_CPU_BLOCK_BYTES", block)
        for pen in ("pseudo_huber", "huber", "welsch", "trunc_quad"):
            out[block, pen] = pool_backward(Penalty.resolve(pen), x, y, a, gy, True, False, False)[0]
    for pen in ("pseudo_huber", "huber", "trunc_quad"):
        assert torch.equal(out[1 << 30, pen], out[1 << 13, pen]), pen
    whole, chunked = out[1 << 30, "welsch"], out[1 << 13, "welsch"]
    assert ((chunked - whole).abs() <= torch.finfo(torch.float32).eps * whole.abs()).all()


@pytest.mark.parametrize("pen", ["huber", "welsch"])
def test_lazily_converted_rows_solve_as_a_float64_copy(monkeypatch, pen):
    # Float32 rows solved again in float64 are converted a block (or chunk) at a time; the
    # solve is the same, to the bit, as that of their float64 copy.
    monkeypatch.setattr(rows_module, "_LAZY_BYTES", 0)
    monkeypatch.setattr(kernels, "_CPU_BLOCK_BYTES", 1 << 14)
    torch.manual_seed(3)
    x = torch.randn(5, 20_000) * 2
    a = torch.tensor([0.5, 1.0, 2.0, 0.5, 1.0]).reshape(-1, 1)
    idx = torch.tensor([1, 3, 4])
    lazy = _rows(x, a).select(idx, torch.float64)
    assert lazy.index is not None and lazy.x.dtype == torch.float32  # (no copy made)
    copy = _rows(x[idx].double(), a[idx].double())
    got, want = (_solve(Penalty.resolve(pen), r, 1e-6, 100, False, None, x) for r in (lazy, copy))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_trunc_quad_long_row_forward_backward_peak():
    # The exact solver's forward on one long row: its sorted copy, int32 run starts and the
    # sort's own buffers (torch's int64 indices and its radix sort's second keys and
    # indices: 5x at the sort), the prefix sums in column chunks. (Before: 28x, a flat int64
    # sort of row-tagged keys and a dozen row-sized float64/int64 temporaries.)
    torch.manual_seed(4)
    x = torch.randn(1, 1 << 22).requires_grad_(True)
    gy = torch.tensor([0.7])

    def call():
        return torch.autograd.grad(robust_pool(x, "trunc_quad", 1.0), [x], gy)

    call()
    nbytes = x.numel() * x.element_size()
    assert _peak_bytes(call) <= 5.2 * nbytes + 16 * MiB


def _brute_force(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The truncated quadratic's global minimiser of each row by brute force in float64: over
    every contiguous run W of the sorted row, the least SSE_W - alpha^2 |W| (the objective at
    W's mean, less a constant), its mean."""
    s = x.double().sort(-1).values
    p1 = torch.nn.functional.pad(s.cumsum(-1), (1, 0))
    p2 = torch.nn.functional.pad((s * s).cumsum(-1), (1, 0))
    n = s.shape[-1]
    i, j = torch.triu_indices(n + 1, n + 1, offset=1)  # runs [i, j)
    size = (j - i).double()
    s1 = p1[:, j] - p1[:, i]
    g = (p2[:, j] - p2[:, i]) - s1 * s1 / size - alpha**2 * size
    k = g.argmin(-1)
    return s1.gather(-1, k[:, None])[:, 0] / size[k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trunc_quad_column_chunks_match_whole_rows_to_the_bit(monkeypatch, dtype):
    # trunc_quad_long ranks the candidates from prefix sums taken in column chunks with
    # carried totals; chunks of 97 entries (many windows, lagging and leading windows
    # spanning several chunks) give trunc_quad_runs' outputs to the bit, and the brute
    # force's minimiser.
    from convexddn.nodes.pooling import trunc_quad_long as long_module
    from convexddn.nodes.pooling.trunc_quad import trunc_quad_runs
    monkeypatch.setattr(long_module, "_cols", lambda n: 97)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(1200, generator=g, dtype=torch.float64) * 3,  # dense: every l_k far behind k
            torch.cat([torch.randn(700, generator=g, dtype=torch.float64), 40 + torch.rand(300, generator=g) * 80]),
            (torch.randn(1001, generator=g, dtype=torch.float64) * 4).round()]  # duplicates
    for alpha in (0.3, 1.0, 5.0):
        for row in rows:
            s = row.to(dtype).sort().values.unsqueeze(0)
            a = torch.tensor(alpha, dtype=dtype)
            lft = long_module.long_starts(s, a)
            assert torch.equal(lft, torch.searchsorted(s, s - 2 * a, out_int32=True).clamp(max=torch.arange(s.shape[1],
                               dtype=torch.int32)))
            got = long_module.trunc_quad_long(s, lft, a)
            want = trunc_quad_runs(s, torch.searchsorted(s, s - 2 * a, out_int32=True), a)
            for u, v in zip(got, want):
                assert torch.equal(u, v), (alpha, u, v)
            y = got[0].double() + got[3].double()
            ref = _brute_force(s, alpha)
            assert (y - ref).abs().max() <= 1e-10 * (alpha + ref.abs().max()), (alpha, y, ref)


def test_long_rows_take_the_chunked_solver_and_agree_with_the_brute_force(monkeypatch):
    # Through robust_pool: rows from TQ_LONG entries on take trunc_quad_long (lowered here to
    # 1000, chunks of 128), one row at a time; y is the brute force's minimiser.
    from convexddn.nodes.pooling import trunc_quad_long as long_module
    monkeypatch.setattr(long_module, "TQ_LONG", 1000)
    monkeypatch.setattr(long_module, "_cols", lambda n: 128)
    calls = []
    real = long_module.trunc_quad_long
    monkeypatch.setattr(long_module, "trunc_quad_long", lambda *args: calls.append(1) or real(*args))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 1500, generator=g) * 2
    x[:, ::5] += 9.0
    y = robust_pool(x, "trunc_quad", 0.8)
    assert len(calls) == 3
    assert (y.double() - _brute_force(x, 0.8)).abs().max() <= 4 * torch.finfo(torch.float32).eps * 10


def _welsch_objective(x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Welsch's objective ``sum_i 1 - exp(-(y - x_i)^2 / (2 alpha^2))`` per row, in float64."""
    r = (y.double().unsqueeze(-1) - x.double()) / alpha.double()
    return (1 - torch.exp(-0.5 * r * r)).sum(-1)


@pytest.mark.parametrize("pen", ["welsch", "trunc_quad"])
def test_a_lazily_converted_long_row_takes_its_starts_within_a_chunk(monkeypatch, pen):
    # The descent's two starts (mean, median) of a float32 row solved again in float64 are read
    # chunk by chunk: the Rows buffer stays one chunk (before: the whole row converted, a float64
    # copy of 2x the input kept for the solve). The solve matches the whole rows' (one block each)
    # to the mean's rounding, and Welsch's objective there is not higher.
    monkeypatch.setattr(rows_module, "_LAZY_BYTES", 0)
    torch.manual_seed(7)
    x = torch.randn(4, 30_000) * 2
    x[:, ::7] += 25.0  # (outliers: a second local minimum)
    a = torch.tensor([0.5, 1.0, 2.0, 0.7]).reshape(-1, 1)
    idx = torch.tensor([0, 1, 3])
    monkeypatch.setattr(kernels, "_CPU_BLOCK_BYTES", 1 << 30)
    whole = _solve(Penalty.resolve(pen), _rows(x[idx].double(), a[idx].double()), 1e-6, 100, False, None, x)[0]
    monkeypatch.setattr(kernels, "_CPU_BLOCK_BYTES", 1 << 14)
    lazy = _rows(x, a).select(idx, torch.float64)
    assert lazy.index is not None and len(kernels.col_ranges(x.shape[1], lazy.like, False, 2)) > 1
    y = _solve(Penalty.resolve(pen), lazy, 1e-6, 100, False, None, x)[0]
    assert lazy.buf.numel() * lazy.buf.element_size() <= kernels._CPU_BLOCK_BYTES
    eps = torch.finfo(torch.float64).eps
    assert ((y - whole).abs() <= 1e6 * eps * (whole.abs() + a[idx, 0])).all(), (y, whole)
    if pen == "welsch":
        f, f_whole = (_welsch_objective(x[idx], v, a[idx]) for v in (y, whole))
        assert (f <= f_whole * (1 + 1e3 * eps)).all(), (f, f_whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_chunked_two_starts_are_the_mean_and_the_median_start(dtype):
    # Read chunk by chunk, the mean is the exact mean (math.fsum) to its rounding, and the
    # median part is the whole row's, to the bit, in any layout of the row.
    import math

    from convexddn.nodes.pooling.solvers import _median_start, _two_starts
    torch.manual_seed(8)
    x = (torch.randn(1, 10_007, dtype=torch.float64) * 3 + 1e3).to(dtype)
    x[:, ::11] -= 400.0
    cols = [slice(i, min(i + 512, x.shape[1])) for i in range(0, x.shape[1], 512)]
    reads = []

    def read(c):
        reads.append(c)
        return xt[:, c]

    exact = math.fsum(x.double().flatten().tolist()) / x.shape[1]
    for xt in (x, x.t().contiguous().t()):  # (a strided view of the same values)
        s = _two_starts.on_chunks(read, x.shape[1], cols)
        assert s.shape == (1, _two_starts.count) and s.dtype == dtype
        # (float64 sums of the chunks, added: a few float64 ulps; then rounded once to dtype)
        tol = torch.finfo(dtype).eps / 2 + 8 * torch.finfo(torch.float64).eps
        assert abs(s[0, 0].item() - exact) <= tol * abs(exact)
        assert torch.equal(s[:, 1:], _median_start(x))
        assert all(c.stop - c.start <= 512 or c.step for c in reads)  # (no whole row read)
