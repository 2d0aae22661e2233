"""A small PointNet classifier whose global pooling is swappable.

The network follows PointNet (Qi et al., CVPR 2017) without the T-nets: a shared
per-point MLP written as 1×1 convolutions, one pooling layer that reduces over the
points, and an MLP classifier. Only the pooling differs between the variants of the
point-cloud experiment, and the robust poolings add no parameters, so every variant
has exactly the same parameters (and, from the same seed, the same initialisation).

Robust pooling (Gould et al., "Deep Declarative Networks", §7) replaces max pooling by

.. math::

    y_c = \\operatorname{argmin}_u \\sum_{i=1}^N \\phi(u - x_{ci}; \\alpha)

for each channel ``c``, with ``φ`` one of the penalties of :func:`convexddn.functional.robust_pool`.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from .._checks import check_choice, check_int, check_positive
from ..errors import OptionError, ShapeError
from ..functional import robust_pool

__all__ = ["POOLINGS", "ROBUST_POOLINGS", "PointPool", "PointNet"]

#: Poolings that are robust-pooling penalties, solved by :func:`convexddn.functional.robust_pool`.
ROBUST_POOLINGS: tuple[str, ...] = ("quadratic", "pseudo_huber", "huber", "welsch", "trunc_quad")

#: Every pooling the model accepts.
POOLINGS: tuple[str, ...] = ("max", "mean") + ROBUST_POOLINGS


class PointPool(nn.Module):
    """Pool features over points: ``(B, C, N) -> (B, C)``.

    Args:
        pooling: ``"max"``, ``"mean"`` or a robust penalty from :data:`ROBUST_POOLINGS`.
        alpha: robust-penalty scale (ignored by max and mean). Default 1.

    Raises:
        OptionError: for an unknown pooling or a non-positive ``alpha``.
    """

    def __init__(self, pooling: str = "max", alpha: float = 1.0) -> None:
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        check_positive("alpha", alpha)
        self.pooling = pooling
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ShapeError(f"x must have shape (B, C, N), got {tuple(x.shape)}")
        if self.pooling == "max":
            return x.amax(dim=-1)
        if self.pooling == "mean":
            return x.mean(dim=-1)
        return robust_pool(x, penalty=self.pooling, alpha=self.alpha, dim=-1)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, alpha={self.alpha}"


class PointNet(nn.Module):
    """PointNet classifier (no T-nets) with a configurable pooling over points.

    Layers: 1×1 convolutions 3→64→128→256 with BatchNorm (ReLU after the first two,
    none after the last so the pooled features are signed and roughly standardised,
    which is what ``alpha = 1`` is scaled against), pooling, then
    Linear 256→128, BatchNorm, ReLU, dropout, Linear 128→classes.

    Args:
        num_classes: number of output classes.
        pooling: see :class:`PointPool`. Default ``"max"``.
        alpha: robust-penalty scale. Default 1.
        dropout: dropout probability before the last layer. Default 0.3.

    Shape:
        - Input: ``(B, 3, N)`` point coordinates, channels first.
        - Output: ``(B, num_classes)`` logits.
    """

    def __init__(
        self, num_classes: int, pooling: str = "max", alpha: float = 1.0, dropout: float = 0.3
    ) -> None:
        super().__init__()
        num_classes = check_int("num_classes", num_classes, minimum=1)  # 2.5 was truncated to 2
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
            raise OptionError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        self.features = nn.Sequential(
            nn.Conv1d(3, 64, 1),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Conv1d(64, 128, 1),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Conv1d(128, 256, 1),
            nn.BatchNorm1d(256),
        )
        self.pool = PointPool(pooling, alpha)
        self.classifier = nn.Sequential(
            nn.Linear(256, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Classify point clouds: ``(B, 3, N) -> (B, num_classes)``."""
        if points.dim() != 3 or points.shape[1] != 3:
            raise ShapeError(f"points must have shape (B, 3, N), got {tuple(points.shape)}")
        return self.classifier(self.pool(self.features(points)))
