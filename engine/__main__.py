"""``python -m engine``: the command line (see `engine.cli`)."""

import sys

from .cli._main import main

sys.exit(main())
