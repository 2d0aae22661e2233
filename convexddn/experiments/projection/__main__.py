"""``python -m convexddn.experiments.projection``: the same as ``convexddn experiment projection``."""
import argparse
import sys

from .command import PROG, add_arguments, main

parser = argparse.ArgumentParser(prog=PROG)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
