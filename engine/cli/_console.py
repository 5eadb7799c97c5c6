"""A status line on a stream: rewritten in place on a terminal, one line each otherwise."""

from __future__ import annotations

from typing import TextIO

__all__ = ["StatusLine"]


class StatusLine:
    """Writes progress lines; on a terminal the last one is replaced by the next
    unless it was ``final``."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def write(self, line: str, *, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
