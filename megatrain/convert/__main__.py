"""`python -m megatrain.convert VERB ...` = `megatrain convert VERB ...`."""
import sys

from megatrain.cli import main

raise SystemExit(main(["convert", *sys.argv[1:]]))
