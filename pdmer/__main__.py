"""``python -m pdmer ...``: the same commands as ``python run.py ...`` (for an installed package)."""

import sys

from pdmer.cli import main

if __name__ == "__main__":
    sys.exit(main())
