"""``python -m fct`` runs the command line (also what torchrun launches)."""

import sys

from fct.cli import main

sys.exit(main())
