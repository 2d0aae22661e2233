"""The paper's experiments, run by ``convexddn experiment NAME``.

Each experiment is a module with ``add_arguments(parser)`` and ``main(args) -> int``;
:data:`EXPERIMENTS` maps the command-line name to the module name and a one-line help.
Modules are imported only when their experiment is chosen.
"""
from __future__ import annotations

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "pointcloud": ("pointcloud", "robust pooling in point-cloud classification with outliers "
                                 "(Gould et al. §7, Tables 3-5)"),
    "projection": ("projection", "Lp-sphere/ball projections in image classification "
                                 "(Gould et al. §7, Table 6)"),
}
