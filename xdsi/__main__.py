"""Run the command line: ``python -m xdsi``."""

from xdsi.cli import main

main()
