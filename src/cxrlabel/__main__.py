"""``python -m cxrlabel``: the command line; torchrun starts it as ``torchrun -m cxrlabel``."""

import sys

from cxrlabel.cli import main

if __name__ == "__main__":
    sys.exit(main())
