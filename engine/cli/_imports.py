"""Where a run file's ``"module:attr"`` names are found: `import_root`.

A run file names the user's code as ``"examples.program.pipeline:pipeline"``.  Python
finds that module only when the directory holding ``examples/`` is on ``sys.path``,
which the current directory is only when the command runs from there: the same file
worked from the repository root and failed from anywhere else.  A name that the
interpreter cannot import is looked up from the run file's folder and its parents, as
a file path (``examples/program/pipeline.py``); the first folder holding it is put on
``sys.path`` and on ``PYTHONPATH`` (so a local cluster's worker processes, started from
this one, import the same module).  A name that imports already is never shadowed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["import_root"]


def _findable(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):  # a parent package is missing, or half-imported
        return False


def _holds(folder: Path, module_name: str) -> bool:
    relative = Path(*module_name.split("."))
    return (folder / relative.with_suffix(".py")).is_file() or (
        folder / relative / "__init__.py"
    ).is_file()


def import_root(module_name: str, start: Path) -> Path | None:
    """Make ``module_name`` importable from ``start`` or one of its parents.

    Returns the folder added to ``sys.path``, or ``None`` when nothing was needed (the
    module imports as things are) or nothing was found (the import then fails with
    Python's own message).
    """
    if _findable(module_name):
        return None
    for folder in (start.resolve(), *start.resolve().parents):
        if _holds(folder, module_name):
            root = str(folder)
            if root not in sys.path:
                sys.path.insert(0, root)
                importlib.invalidate_caches()
            paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if root not in paths:
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, *paths) if p)
            return folder
    return None
