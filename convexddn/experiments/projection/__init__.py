"""Lp-sphere and Lp-ball projections in image classification (Gould et al. §7, Table 6).

A small CNN (:mod:`.model`) is trained on scikit-learn's bundled 8×8 digits
(:mod:`.data`) with different heads before its final linear layer: nothing (the
paper's baseline), a batch normalisation without parameters, or that normalisation
followed by a Euclidean projection onto the L1, L2 or L∞ sphere or ball
(:class:`convexddn.LpProjection`), its radius set from the median feature norm.
Reported per variant, as mean ± std over seeds with paired comparisons: top-1 and
top-5 accuracy, mean average precision (ranking by logits as in the paper's code, and
by softmax), expected calibration error, and the time per image of the forward and
backward pass. Outputs: markdown tables on stdout, ``<out>/projection.json`` and
``<out>/projection.png``.

Modules: :mod:`.config`, :mod:`.data`, :mod:`.model`, :mod:`.protocol` (one seed),
:mod:`.runner` (seeds and their summary), :mod:`.report`, :mod:`.command`.
"""
from __future__ import annotations

from .command import add_arguments, config_from_args, main
from .config import DEFAULT_VARIANTS, DISPLAY_NAMES, VARIANTS, Config
from .model import DigitsCNN
from .report import format_comparisons, format_runtime_table, format_table
from .runner import run

__all__ = [
    "Config",
    "DEFAULT_VARIANTS",
    "DISPLAY_NAMES",
    "VARIANTS",
    "DigitsCNN",
    "run",
    "format_table",
    "format_comparisons",
    "format_runtime_table",
    "add_arguments",
    "config_from_args",
    "main",
]
