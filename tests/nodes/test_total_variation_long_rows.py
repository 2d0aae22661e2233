"""tv_denoise on long rows: the active-set loop works in buffers made once per call, not in
row-sized temporaries made anew by every op of every step (which, mapped and faulted in a
page at a time, made the time superlinear in n and the peak memory 50x the input); and its
result on a long row against an independent solver (Condat's direct algorithm, below)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import profile

from convexddn.nodes.total_variation import tv_denoise

F64 = torch.float64


def _condat(x: np.ndarray, lam: float) -> np.ndarray:
    """The exact 1-D TV denoiser by Condat's direct algorithm (IEEE SPL 2013), written plainly:
    a sequential scan that extends the current segment while a value within [vmin, vmax]
    keeps the running dual residuals in the box, and closes a segment (backtracking to its
    last admissible end) when one leaves it. Independent of the library's active-set method."""
    y, n = x.tolist(), len(x)
    out = np.empty(n)
    k = k0 = km = kp = 0
    vmin, vmax, umin, umax = y[0] - lam, y[0] + lam, lam, -lam
    while True:
        if k == n - 1:
            if umin < 0.0:  # the segment at vmin ends at km: a downward jump after it
                out[k0:km + 1] = vmin
                k = k0 = km = kp = km + 1
                vmin, vmax, umin, umax = y[k], y[k] + 2 * lam, lam, -lam
                continue
            if umax > 0.0:  # the segment at vmax ends at kp: an upward jump after it
                out[k0:kp + 1] = vmax
                k = k0 = km = kp = kp + 1
                vmin, vmax, umin, umax = y[k] - 2 * lam, y[k], lam, -lam
                continue
            out[k0:] = vmin + umin / (k - k0 + 1)
            return out
        umin += y[k + 1] - vmin
        umax += y[k + 1] - vmax
        if umin < -lam:
            out[k0:km + 1] = vmin
            k = k0 = km = kp = km + 1
            vmin, vmax, umin, umax = y[k], y[k] + 2 * lam, lam, -lam
        elif umax > lam:
            out[k0:kp + 1] = vmax
            k = k0 = km = kp = kp + 1
            vmin, vmax, umin, umax = y[k] - 2 * lam, y[k], lam, -lam
        else:
            k += 1
            if umin >= lam:
                km = k
                vmin += (umin - lam) / (k - k0 + 1)
                umin = lam
            if umax <= -lam:
                kp = k
                vmax += (umax + lam) / (k - k0 + 1)
                umax = -lam


def _piecewise(b: int, n: int, seed: int) -> torch.Tensor:
    """Piecewise-constant rows (a jump every 200 entries on average) plus noise of scale 1."""
    g = torch.Generator().manual_seed(seed)
    jumps = (torch.rand(b, n, generator=g, dtype=F64) < 1 / 200).to(F64)
    return (3 * jumps * torch.randn(b, n, generator=g, dtype=F64)).cumsum(1) + torch.randn(b, n, generator=g, dtype=F64)


def test_condat_reference_on_closed_forms():
    # (the reference itself: two points move λ towards each other or meet at their mean;
    # a large λ gives the mean; λ = 0 gives x)
    assert np.allclose(_condat(np.array([0.0, 3.0]), 0.75), [0.75, 2.25])
    assert np.allclose(_condat(np.array([0.0, 1.0]), 0.75), [0.5, 0.5])
    x = np.array([1.0, -2.0, 4.0, 0.5, 3.0])
    assert np.allclose(_condat(x, 100.0), np.full(5, x.mean()))
    assert np.allclose(_condat(x, 0.0), x)


def _allocations(x: torch.Tensor, lam: float, steps: list) -> tuple[int, int, float]:
    """(steps, allocations of at least one float64 row per row of x, peak bytes held by torch
    during the call over the bytes of x), from torch's profiler: each op's own allocations
    and the frees between ops, in time order; ``steps``: the ``tv_steps`` fixture's list."""
    with profile(profile_memory=True) as prof:
        tv_denoise(x, lam)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    row = 8 * (x.shape[-1] - 1) * x.shape[0]  # (an edge row, n − 1 entries, counts too)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    big = sum(e.self_cpu_memory_usage >= row for e in events)
    return len(steps), big, peak / (8 * x.numel())


@pytest.mark.parametrize("case", ["ramp", "piecewise", "piecewise rows"])
def test_tv_steps_allocate_no_row_sized_temporaries(case, tv_steps):
    """Every op of every active-set step made its output anew: about 38 row-sized tensors a
    step (10954 for the ramp's 288 steps), held up to 23 rows at once, and above glibc's mmap
    threshold each was faulted in a page at a time and unmapped again: one row of 4·10⁶
    took 13.6 s for 9 steps (1.9 s with glibc told to keep its memory), 8·10⁶ 23-26 s, and
    the process grew by 47 times the input. Now the steps run in buffers made once per
    working set: the row-sized allocations do not grow with the steps, and at most about
    ten rows are held (x centred, σ, the segment ids and the step's buffers)."""
    if case == "ramp":  # a smooth signal: its active set moves slowly, dozens of steps
        x, lam = (10 * torch.linspace(0, 1, 1000, dtype=F64) ** 2)[None], 10.0
    else:
        x, lam = _piecewise(1 if case == "piecewise" else 4, 4000, seed=3), 0.5
    steps, big, peak = _allocations(x, lam, tv_steps)
    assert steps >= (50 if case == "ramp" else 5)
    assert big <= 24  # (old: 38 a step)
    # (rows that finish at different steps add their stores and a smaller working set's buffers)
    assert peak <= (11.0 if x.shape[0] == 1 else 14.0)  # (old: 23)


def test_tv_long_row_matches_condat_and_its_closed_form_derivatives():
    # A row of 2·10⁵ with many segments (λ half the noise's scale), against the direct algorithm; the
    # derivatives against the closed form on the reference's own segments:
    # ∂⟨w, y⟩/∂x = segment means of w, ∂⟨w, y⟩/∂λ = Σ_segments (σ_e − σ_{s−1}) mean(w).
    n, lam = 200_000, 0.5
    x = _piecewise(1, n, seed=5)[0]
    ref = _condat(x.numpy(), lam)
    xr = x.clone().requires_grad_()
    lr = torch.tensor(lam, dtype=F64, requires_grad=True)
    y = tv_denoise(xr, lr)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=0, atol=1e-9)
    w = torch.cos(0.01 * torch.arange(n, dtype=F64)) + 0.1 * _piecewise(1, n, seed=6)[0]
    gx, gl = torch.autograd.grad((w * y).sum(), (xr, lr))
    d = np.diff(ref)
    jump = np.abs(d) > 1e-7
    ends = np.flatnonzero(jump)
    assert len(ends) > 1000
    assert np.abs(d[~jump]).max() < 1e-12  # (no jump near the threshold: the segments are unambiguous)
    starts, stops = np.concatenate([[0], ends + 1]), np.concatenate([ends + 1, [n]])
    signs = np.concatenate([[0.0], np.sign(d[ends]), [0.0]])  # σ at each segment's left and right end
    wn = w.numpy()
    means = np.add.reduceat(wn, starts) / (stops - starts)
    np.testing.assert_allclose(gx.numpy(), np.repeat(means, stops - starts), rtol=0, atol=1e-12)
    np.testing.assert_allclose(float(gl), float(((signs[1:] - signs[:-1]) * means).sum()), rtol=1e-9, atol=1e-9)
