"""A small CNN for 8×8 images whose head may project its features onto an Lp sphere or ball.

Gould et al. ("Deep Declarative Networks", §7, Table 6) put a batch normalisation
without learnable parameters and a Euclidean projection

.. math::

    y(z) = \\operatorname*{argmin}_{u} \\tfrac12 \\|u - z\\|_2^2
    \\quad\\text{s.t.}\\quad \\|u\\|_p = r \\ \\text{(sphere)} \\quad\\text{or}\\quad
    \\|u\\|_p \\le r \\ \\text{(ball)}

in front of ResNet-18's final linear layer. This is the same head on a small network
sized for scikit-learn's 8×8 digits; the projection is :class:`convexddn.LpProjection`
(closed-form or sort-based forward, implicit backward).
"""
from __future__ import annotations

import torch
from torch import nn

from ... import LpProjection
from ..._checks import check_choice, check_int, check_positive
from ...errors import OptionError, ShapeError
from .config import VARIANTS, variant_projection

__all__ = ["DigitsCNN"]


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class DigitsCNN(nn.Module):
    """Three 3×3 conv blocks, global average pooling, optional BN + projection, linear.

    Layers: conv(1→w) · conv(w→2w) · max-pool 2 · conv(2w→4w) (each conv followed by
    BatchNorm and ReLU) · global average pool → features ``(B, 4w)`` · head · linear
    ``4w → num_classes``. The head is empty for ``"baseline"``, a
    ``BatchNorm1d(4w, affine=False)`` for ``"bn"``, and that normalisation followed by
    ``LpProjection(p, mode, radius)`` for the projection variants. Every variant has
    the same parameters (the normalisation and the projection have none), so one seed
    gives every variant the same initialisation.

    Args:
        variant: one of :data:`~.config.VARIANTS`.
        radius: projection radius (> 0); required by, and only by, projection variants.
        width: channels of the first convolution. Default 32.
        num_classes: outputs. Default 10.

    Shape:
        ``(B, 1, H, W) -> (B, num_classes)`` logits (any ``H, W ≥ 2``).

    Raises:
        OptionError: for an unknown variant, a missing or non-positive radius, a radius
            given to a variant without projection, or a width or class count that is
            not a positive integer.
    """

    def __init__(self, variant: str = "baseline", radius: float | None = None, width: int = 32,
                 num_classes: int = 10) -> None:
        super().__init__()
        check_choice("variant", variant, VARIANTS)
        w = check_int("width", width, minimum=1)  # 2.5 was truncated, 0.5 gave no channels
        num_classes = check_int("num_classes", num_classes, minimum=1)
        projection = variant_projection(variant)
        if projection is None and radius is not None:
            raise OptionError(f"radius is only for projection variants, got radius={radius!r} "
                              f"for variant={variant!r}")
        if projection is not None:
            if radius is None:
                raise OptionError(f"variant={variant!r} needs a radius, got None")
            check_positive("radius", radius)
        self.variant = variant
        self.features = nn.Sequential(
            *_block(1, w), *_block(w, 2 * w), nn.MaxPool2d(2), *_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.norm = None if variant == "baseline" else nn.BatchNorm1d(4 * w, affine=False)
        self.project = None
        if projection is not None:
            p, mode = projection
            self.project = LpProjection(p=p, mode=mode, radius=float(radius), dim=-1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features entering the projection (after the normalisation, if any): ``(B, 4w)``."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ShapeError(f"images must have shape (B, 1, H, W), got {tuple(images.shape)}")
        z = self.features(images)
        return z if self.norm is None else self.norm(z)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Classify images: ``(B, 1, H, W) -> (B, num_classes)``."""
        z = self.embed(images)
        if self.project is not None:
            z = self.project(z)
        return self.classifier(z)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"
