"""Writes that survive a crash: fsync of files and directories, and atomic file writes.

An atomic write goes to a temporary file in the target's directory (same file system, so the rename
is atomic), is fsynced, renamed over the target, and the directory is fsynced so the rename itself is
durable: a reader sees the old content or the new, never a part. The temporary file is created by
``mkstemp``, so it is owner-only (0600) from its first byte; :func:`write_private` keeps it so, which
is how tokens and session files are written: no other user can ever read them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file inside directory ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's content to disk (a read-only descriptor is enough on Linux, so read-only files too)."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync of the directory).

    ``mode`` is the file's permission bits; the default, owner-only, is what ``mkstemp`` creates."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode != 0o600:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` to ``path`` (creating its directory), readable only by this user (0600)
    from the first byte on: the file is never, even briefly, readable by anyone else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode(), mode=0o600)
