"""``python -m sd35_cli`` is the same as the ``sd35`` console script."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
