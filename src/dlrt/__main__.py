"""``python -m dlrt``: the ``dlrt`` command line (what ``torchrun ... -m dlrt train`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
