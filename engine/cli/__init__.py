"""The command line: ``textgrad optimize | evaluate | bench | cache``.

An application on the engine: it imports the engine's packages, and nothing in the
engine imports it (``tests/test_layering.py``).
"""

from ._main import main

__all__ = ["main"]
