"""Run the command line: ``python -m xdsi``."""

from xdsi.cli import main

# The guard keeps worker processes, which import this module, from running
# the command again.
if __name__ == "__main__":
    main()
