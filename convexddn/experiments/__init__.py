"""The paper's experiments, run by ``convexddn experiment NAME``.

Each experiment is a module with ``add_arguments(parser)`` and ``main(args) -> int``;
:data:`EXPERIMENTS` maps the command-line name to the module name and a one-line help.
Modules are imported only when their experiment is chosen.
"""
from __future__ import annotations

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "pointcloud": ("pointcloud", "point-cloud classification with outliers (Gould et al. §7)"),
}
