"""``python -m saekit`` (and ``torchrun -m saekit``) run the CLI."""

import sys

from saekit.cli import main

sys.exit(main())
