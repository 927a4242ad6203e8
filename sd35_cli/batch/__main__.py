"""``python -m sd35_cli.batch`` is the same as ``sd35 batch``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
