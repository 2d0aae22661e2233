"""Tests of convexddn._pow2: powers of two near a magnitude, exact and never Inf."""
from __future__ import annotations

import pytest
import torch

from convexddn._pow2 import pow2_floor, pow2_round


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_at_the_range_ends(dtype):
    """log2 of the largest number rounds up to the next integer (128 in float32, 1024 in
    float64), so exp2(floor(log2 v)) was Inf there; these stay within the range."""
    finfo = torch.finfo(dtype)
    v = torch.tensor([finfo.max, finfo.tiny], dtype=dtype)
    top = 2.0 ** (torch.finfo(dtype).maxexp - 1) if hasattr(finfo, "maxexp") else None
    for f in (pow2_floor, pow2_round):
        p = f(v)
        assert torch.isfinite(p).all()
        assert float(p[1]) == finfo.tiny
    assert float(pow2_floor(v)[0]) <= finfo.max < 2 * float(pow2_floor(v)[0])
    assert top is None or float(pow2_floor(v)[0]) == top


def test_agree_with_the_log_forms_inside_the_range():
    """Against 2 ** floor / round(log2 v) in float64 over magnitudes 2^-40 to 2^40, where
    those forms do not overflow (Python floats, not the module)."""
    import math

    v = torch.exp2(torch.empty(20000, dtype=torch.float64).uniform_(-40, 40, generator=torch.Generator().manual_seed(0)))
    floor = [2.0 ** math.floor(math.log2(t)) for t in v.tolist()]
    near = [2.0 ** round(math.log2(t)) for t in v.tolist()]
    assert pow2_floor(v).tolist() == floor
    assert pow2_round(v).tolist() == near
    assert pow2_floor(torch.tensor([1.0, 2.0, 3.0, 0.75])).tolist() == [1.0, 2.0, 2.0, 0.5]
    assert pow2_round(torch.tensor([1.4, 1.5, 3.0, 0.75])).tolist() == [1.0, 2.0, 4.0, 1.0]
