"""Content-addressed blob store: files named by their sha256, written atomically.

Layout under the data dir::

    blobs/<aa>/<sha256>    complete, verified, read-only content
    tmp/                   files being written (temp names; removed or renamed)

A blob appears under its name only by ``rename`` of a fully written and fsynced
temp file whose hash was checked, so a reader never sees a partial blob and a
kill at any moment leaves at most a stray temp file (swept at start).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from coldswarm.common.durable import fsync_dir, fsync_file
from coldswarm.common.hashing import sha256_file
from coldswarm.coordinator.errors import DataLoss


class BlobStore:
    """Immutable files addressed by sha256 under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.blob_dir / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def temp_path(self, prefix: str = "blob-") -> Path:
        """A fresh path under ``tmp/`` (same filesystem as the blobs, so rename is atomic)."""
        fd, name = tempfile.mkstemp(prefix=prefix, dir=self.tmp_dir)
        os.close(fd)
        return Path(name)

    def temp_dir(self, prefix: str = "dir-") -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))

    def commit(
        self, temp: Path, expected_sha256: str | None = None, hashed_by_caller: str | None = None
    ) -> tuple[str, int]:
        """Move a finished temp file into the store; returns (sha256, size).

        The file is hashed here unless the caller hashed the very bytes it wrote
        (``hashed_by_caller``); when ``expected_sha256`` is given it must match or
        :class:`DataLoss` is raised and the temp file removed.
        """
        temp = Path(temp)
        fsync_file(temp)
        digest = hashed_by_caller or sha256_file(temp)
        size = temp.stat().st_size
        if expected_sha256 is not None and digest != expected_sha256:
            temp.unlink(missing_ok=True)
            raise DataLoss(f"content hashes to {digest}, expected {expected_sha256}")
        dest = self.path(digest)
        if dest.exists():
            # Same content already stored: content addressing makes this a no-op.
            temp.unlink(missing_ok=True)
            return digest, size
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(temp, 0o444)
        os.replace(temp, dest)
        fsync_dir(dest.parent)
        return digest, size

    def put_file(self, src: Path) -> tuple[str, int]:
        """Copy ``src`` into the store; returns (sha256, size)."""
        temp = self.temp_path()
        shutil.copyfile(src, temp)
        return self.commit(temp)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        temp = self.temp_path()
        with open(temp, "wb") as fh:
            fh.write(data)
        return self.commit(temp)

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def all(self) -> set[str]:
        return {p.name for p in self.blob_dir.glob("*/*") if p.is_file()}

    def sweep_temp(self, keep: set[str] = frozenset()) -> int:
        """Remove temp files and dirs left by a killed process, except names in ``keep``."""
        removed = 0
        for p in self.tmp_dir.iterdir():
            if p.name in keep:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        return removed
