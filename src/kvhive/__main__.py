"""``python -m kvhive`` runs the ``kvhive`` console script."""

import sys

from kvhive.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
