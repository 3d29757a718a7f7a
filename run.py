#!/usr/bin/env python
"""pdmer's one entry point: ``python run.py --help``."""

import sys

from pdmer.cli import main

if __name__ == "__main__":
    sys.exit(main())
