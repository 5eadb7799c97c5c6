"""``python -m engine``: the command line (see `engine.cli`)."""

import sys

from .cli import main

sys.exit(main())
