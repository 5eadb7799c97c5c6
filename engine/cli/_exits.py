"""The command line's exit codes, and the one rule mapping a command's failure to them.

0 done, 1 failed, 2 bad input (the message names file, line, section and key),
130 interrupted.  Every command (optimize, evaluate, bench, cache copy) goes through
`exit_code_of`, so an error reads and exits the same way wherever it happens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .._errors import ConfigError, EngineError
from .._redact import redact_text

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "exit_code_of"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def exit_code_of(command: Callable[[], int], *, interrupted: str) -> int:
    """Run ``command``; its exit code, or the code (and a stderr line) of its failure.
    ``interrupted`` is what Ctrl-C prints."""
    try:
        return command()
    except KeyboardInterrupt:
        sys.stderr.write(f"{interrupted}\n")
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except EngineError as exc:
        sys.stderr.write(f"failed: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED
    except OSError as exc:  # a disk that fills up or goes away mid-run
        sys.stderr.write(f"failed: {redact_text(str(exc))}\n")
        return EXIT_FAILED
