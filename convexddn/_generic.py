"""A fixed, generic probe vector: golden-angle sines, dense and deterministic.

Probes that must not be orthogonal to a particular direction by accident (a null
direction of a limit system, the smallest singular vector of a factor, a direction of
the parameters) use it; deterministic, so the same input gives the same verdict.
"""
from __future__ import annotations

import torch

__all__ = ["GOLDEN_ANGLE", "generic_vector"]

# The golden angle in radians: sin(k·φ + 1) never repeats and has no structure that a
# problem's own directions share.
GOLDEN_ANGLE = 2.399963229728653


def generic_vector(n: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``(n,)``: ``sin(k·φ + 1)``, k = 0 … n − 1, φ the golden angle."""
    return torch.sin(GOLDEN_ANGLE * torch.arange(n, dtype=dtype, device=device) + 1.0)
