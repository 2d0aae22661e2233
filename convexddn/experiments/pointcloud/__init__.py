"""The point-cloud robustness experiment (Gould et al., "Deep Declarative Networks", §7).

A small PointNet is trained on generated shapes (:mod:`..shapes`) once per pooling
(:mod:`..pointnet`) and seed, and tested on clouds in which a fraction of the points
has been replaced by outliers drawn uniformly from the unit ball. Two protocols:

- default (the paper's Table 4): train without outliers, test at every rate;
- ``train_outliers=True`` (Table 3): train and test at the same rate (one model per
  pooling, rate and seed; by default only the rates of :data:`TABLE3_RATES`).

Reported per pooling and rate: top-1 accuracy and mean average precision (softmax
scores), as mean ± std over seeds, with paired comparisons between poolings; and the
runtime per training cloud split into data, forward and backward (Table 5). Outputs:
markdown tables on stdout, ``<out>/pointcloud.json`` and ``<out>/pointcloud.png``.

Modules: :mod:`.config` (settings and presets), :mod:`.protocol` (one seed: outliers,
training, evaluation, timing), :mod:`.runner` (seeds and their summary), :mod:`.report`
(tables, plot, files), :mod:`.command` (the ``convexddn experiment pointcloud`` options).
"""
from __future__ import annotations

from ..metrics import average_precision, mean_average_precision
from .command import add_arguments, config_from_args, main
from .config import DEFAULT_POOLINGS, DEFAULT_RATES, DISPLAY_NAMES, TABLE3_RATES, Config
from .protocol import add_outliers
from .report import format_comparisons, format_runtime_table, format_table
from .runner import run

__all__ = [
    "Config",
    "DEFAULT_POOLINGS",
    "DEFAULT_RATES",
    "DISPLAY_NAMES",
    "TABLE3_RATES",
    "add_outliers",
    "average_precision",
    "mean_average_precision",
    "run",
    "format_table",
    "format_runtime_table",
    "format_comparisons",
    "add_arguments",
    "config_from_args",
    "main",
]
