"""Output files that never destroy inputs: checked before the first call, written whole.

`check_output_file` and `check_output_dir` run before anything is paid for and raise
`ConfigError` (exit 2) for a path that could not be written or must not be: a folder
where a file is wanted and the reverse, a symbolic link (never followed), a parent that
cannot be created, anything but a regular file, or any file the run reads (run file,
datasets, prompt file, cache).  Writes go to a temporary file in the same folder, created
0600 (outputs hold prompts and data), then ``os.replace`` puts it in place: a reader sees
the old file or the new one, never half of one, and an existing file's looser mode does
not survive.  `replacing` streams into the temporary file and renames only when its block
succeeds; on any failure the old file is left untouched.

Usage::

    check_output_file(out, inputs={run.path: "the run file"}, option="--out")
    with replacing(out) as handle:
        handle.write(...)
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

from .._errors import ConfigError

__all__ = [
    "check_output_dir",
    "check_output_file",
    "make_output_dir",
    "replacing",
    "replacing_path",
    "write_private",
]


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def _check_parent(path: Path, folder: Path, option: str) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder we may write in."""
    probe = folder
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {path}: cannot be created, {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: the folder {probe} is not writable")


def check_output_file(path: Path, *, inputs: Mapping[Path, str], option: str) -> Path:
    """Validate ``path`` as a file to (over)write; returns it absolute.  Writes nothing."""
    path = Path(os.path.abspath(path))
    if os.path.islink(path):
        raise ConfigError(
            f"{option} {path}: is a symbolic link; outputs never follow links, give the real path"
        )
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder, a file is wanted")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise ConfigError(f"{option} {path}: is not a regular file")
    for source, what in inputs.items():
        if _same(path, source):
            raise ConfigError(
                f"{option} {path}: is {what}, an input of this run; refusing to overwrite it"
            )
    _check_parent(path, path.parent, option)
    return path


def check_output_dir(path: Path, *, inputs: Mapping[Path, str], option: str) -> Path:
    """Validate ``path`` as a folder of outputs; returns it absolute.  Creates nothing."""
    path = Path(os.path.abspath(path))
    if os.path.islink(path):
        raise ConfigError(
            f"{option} {path}: is a symbolic link; outputs never follow links, give the real path"
        )
    if os.path.exists(path) and not path.is_dir():
        raise ConfigError(
            f"{option} {path}: exists and is not a folder (a folder of outputs is wanted)"
        )
    for source, what in inputs.items():
        if _same(path, source):
            raise ConfigError(f"{option} {path}: is {what}, an input of this run")
    _check_parent(path, path, option)
    return path


def make_output_dir(path: Path, option: str) -> None:
    """Create ``path`` (0700) and prove a file can be made in it, before any call."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(dir=path, prefix=".probe.")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write there: {exc.strerror or exc}") from None


def _fsync_dir(folder: Path) -> None:
    # the rename is durable only once the folder's entry is on disk
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, mode 0600) for a writer that
    takes a file name; it replaces ``path`` when the block succeeds, else vanishes."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, 0o600)  # a writer that recreated the file may have used 0644
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[TextIO]:
    """A text handle on a temporary file that replaces ``path`` when the block succeeds;
    on an exception (or interrupt) the old ``path`` is untouched."""
    with replacing_path(path) as temp, temp.open("w", encoding="utf-8") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_private(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole (temporary file + rename), mode 0600."""
    with replacing_path(path) as temp:
        if isinstance(data, str):
            temp.write_text(data, encoding="utf-8")
        else:
            temp.write_bytes(data)
