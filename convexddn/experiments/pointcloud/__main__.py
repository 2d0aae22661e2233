"""``python -m convexddn.experiments.pointcloud``: the same as ``convexddn experiment pointcloud``."""
import argparse
import sys

from .command import PROG, add_arguments, main

parser = argparse.ArgumentParser(prog=PROG)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
