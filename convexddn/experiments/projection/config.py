"""Settings of the projection experiment: variants, the :class:`Config` dataclass, presets."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..._checks import check_choices
from ...errors import OptionError
from ..running import check_threads, resolve_device

__all__ = ["Config", "VARIANTS", "DEFAULT_VARIANTS", "DISPLAY_NAMES", "variant_projection"]

#: Every head the model accepts, in report order. ``baseline``: features straight into
#: the final linear layer (the paper's baseline); ``bn``: parameter-free batch
#: normalisation only (a control: is a change due to the projection or to the
#: normalisation in front of it?); ``l<p>_<mode>``: batch normalisation, then the
#: Euclidean projection onto the Lp sphere or ball.
VARIANTS: tuple[str, ...] = (
    "baseline", "bn",
    "l1_sphere", "l1_ball", "l2_sphere", "l2_ball", "linf_sphere", "linf_ball",
)
DEFAULT_VARIANTS: tuple[str, ...] = VARIANTS

DISPLAY_NAMES: dict[str, str] = {
    "baseline": "baseline",
    "bn": "BN only",
    "l1_sphere": "L1 sphere",
    "l1_ball": "L1 ball",
    "l2_sphere": "L2 sphere",
    "l2_ball": "L2 ball",
    "linf_sphere": "L∞ sphere",
    "linf_ball": "L∞ ball",
}

_P = {"l1": 1, "l2": 2, "linf": math.inf}


def variant_projection(variant: str) -> tuple[float, str] | None:
    """``(p, mode)`` of a projection variant, ``None`` for ``baseline`` and ``bn``."""
    if variant in ("baseline", "bn"):
        return None
    norm, mode = variant.split("_")
    return _P[norm], mode


@dataclass
class Config:
    """Settings of one run. ``Config()`` is the default preset; ``Config.quick()`` the smoke test.

    Attributes:
        variants: heads to compare (see :data:`VARIANTS`).
        train_fraction: fraction of each class used for training (stratified, drawn per
            seed); the rest is the test set. Small on purpose: with the whole set the
            digits are nearly solved and every metric sits at its ceiling.
        epochs, batch_size, lr, momentum, weight_decay: SGD with a one-cycle schedule.
        width: channels of the first convolution (doubled twice); the feature vector
            before the head has ``4 * width`` entries.
        radius_scale: the radius of every projection is ``radius_scale`` times the
            median Lp norm of the batch-normalised training features (see
            :func:`~.protocol.median_feature_norms`).
        ece_bins: bins of the expected calibration error.
        seed: the first seed; the run uses ``seed, ..., seed + seeds - 1``, each seeding
            the split, the initialisation (shared by every variant) and the batch order.
        seeds: number of independent repetitions (mean ± std over them is reported).
        device, out, threads: as for the point-cloud experiment.
        progress: show a tqdm bar per model on stderr; ``None`` (default): only when
            stderr is a terminal.
        timing_batches: timed training steps per variant and seed (after one untimed
            warm-up step); ``0`` skips the timing.
        timing_batch_size: images per timed step (larger than a training batch: an
            8×8 image costs microseconds, and a bigger batch steadies the clock).
        preset: name of the preset the config came from (recorded in the JSON).
    """

    variants: tuple[str, ...] = DEFAULT_VARIANTS
    train_fraction: float = 0.1
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 32
    radius_scale: float = 1.0
    ece_bins: int = 15
    seed: int = 0
    seeds: int = 3
    device: str = "cpu"
    out: str | None = "results"
    progress: bool | None = None
    threads: int | None = None
    timing_batches: int = 8
    timing_batch_size: int = 128
    preset: str = "default"

    @classmethod
    def default(cls, **overrides: Any) -> "Config":
        """The full experiment: 10 % of the digits for training, 20 epochs, 3 seeds."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        """A smoke test of a few seconds: 3 epochs, a narrow network, 2 seeds."""
        settings: dict[str, Any] = dict(epochs=3, width=8, seeds=2, timing_batches=1, timing_batch_size=32,
                                      preset="quick")
        settings.update(overrides)
        return cls(**settings)

    @property
    def seed_list(self) -> list[int]:
        """The seeds of the run, in order."""
        return [self.seed + i for i in range(self.seeds)]

    def validate(self) -> None:
        """Raise ``OptionError`` naming the first invalid field (a missing CUDA device too)."""
        check_choices("variants", self.variants, VARIANTS)
        f = self.train_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
            raise OptionError(f"train_fraction must lie in (0, 1), got {f!r}")
        for name in ("epochs", "width", "ece_bins", "seeds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionError(f"{name} must be a positive int, got {v!r}")
        minima = (("timing_batches", 0), ("seed", 0), ("batch_size", 2), ("timing_batch_size", 2))
        for name, minimum in minima:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                # Batch sizes >= 2: BatchNorm cannot train on a batch of one.
                raise OptionError(f"{name} must be an int >= {minimum}, got {v!r}")
        for name in ("lr", "radius_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise OptionError(f"{name} must be finite and > 0, got {v!r}")
        for name in ("momentum", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise OptionError(f"{name} must be finite and >= 0, got {v!r}")
        check_threads(self.threads)
        resolve_device(self.device)
