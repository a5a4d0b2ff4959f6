"""`python -m qcompile ...`: the same as the `qcompile` command (qcompile/tools/cli.py)."""

import sys

from qcompile.tools.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
