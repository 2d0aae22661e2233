"""``python -m convexddn``: the ``convexddn`` command (the console script of
pyproject.toml's ``[project.scripts]``, ``convexddn.cli:main``), with its exit status.
Without this module ``python -m convexddn`` failed ("is a package and cannot be directly
executed"), where no console script is installed (a source checkout on PYTHONPATH)."""
import sys

from .cli import main

# The guard: ConvexLayer's worker processes (spawned) import the main module again.
if __name__ == "__main__":
    sys.exit(main())
