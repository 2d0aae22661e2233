"""``python -m convexddn.experiments.pointcloud``: the same as ``convexddn experiment pointcloud``.

Run through the ``convexddn`` command itself: a parser of its own printed argparse's usage
block before an error, where the command's is one line, and could drift from it.
"""
import sys

from ...cli import main

sys.exit(main(["experiment", "pointcloud", *sys.argv[1:]]))
