"""``python -m chunkflow`` is the ``chunkflow`` command (what ``torchrun -m chunkflow`` runs)."""

import sys

from chunkflow.cli import main

sys.exit(main())
