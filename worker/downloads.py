"""Versions downloaded once, into a cache keyed by sha256, resumed after any interruption.

Layout under the cache root::

    blobs/<sha256>          one verified file per distinct content
    partial/<sha256>.part   bytes received so far (the resume point is its size)
    versions/<N>/           the version as an HF directory, hard links into blobs/

Nothing is used before its hash is checked: a blob is renamed into ``blobs/``
only after its sha256 matches the version's file list, and every blob of a
version is hashed again before the version is handed to training, so a file
corrupted on disk after the download is detected and fetched again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from coldswarm.common.durable import fsync_dir
from coldswarm.common.fetch import DownloadError, fetch_file, safe_relpath
from coldswarm.common.hashing import sha256_file
from coldswarm.common.manifest import MANIFEST_NAME
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.client import CoordinatorClient

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]


class VersionCache:
    """Fetches versions through a :class:`CoordinatorClient` and keeps them on disk."""

    def __init__(self, root: Path, max_attempts_per_file: int = 3):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        self.versions = self.root / "versions"
        for d in (self.blobs, self.partial, self.versions):
            d.mkdir(parents=True, exist_ok=True)
        self.max_attempts_per_file = max_attempts_per_file

    def ensure(self, client: CoordinatorClient, ref: str | int, progress: ProgressFn | None = None) -> Path:
        """The directory of version ``ref`` (a number or ``latest``), downloading what is missing."""
        info: pb.Version = client.call("GetVersion", pb.GetVersionRequest(version=str(ref)))
        target = self.versions / str(info.number)
        for entry in info.files:
            self._ensure_blob(client, info.number, entry, progress)
        if not self._version_dir_intact(target, info):
            self._assemble(target, info)
        return target

    def _ensure_blob(self, client: CoordinatorClient, number: int, entry: pb.FileEntry, progress) -> Path:
        blob = self.blobs / entry.sha256
        if blob.exists():
            if blob.stat().st_size == entry.size and sha256_file(blob) == entry.sha256:
                if progress:
                    progress(entry.size)
                return blob
            log.warning("cached %s (%s) is corrupt; fetching it again", entry.path, entry.sha256[:12])
            blob.unlink()
        for attempt in range(1, self.max_attempts_per_file + 1):
            part = self._fetch(client, number, entry, progress)
            if part.exists():  # fetch_file deletes a partial that fails its hash
                os.replace(part, blob)
                fsync_dir(self.blobs)
                return blob
            log.warning(
                "%s of version %d failed its hash check (attempt %d/%d); fetching it again",
                entry.path,
                number,
                attempt,
                self.max_attempts_per_file,
            )
        raise DownloadError(
            f"{entry.path} of version {number} failed its sha256 check {self.max_attempts_per_file} times; "
            "the coordinator's copy may be damaged: tell its operator"
        )

    def _fetch(self, client: CoordinatorClient, number: int, entry: pb.FileEntry, progress) -> Path:
        part = self.partial / f"{entry.sha256}.part"
        if progress and part.exists():
            progress(part.stat().st_size)
        # An outage mid-stream resumes from the bytes already on disk.
        client.retrying(
            lambda: fetch_file(client.stub, str(number), entry, part, client.metadata, None, progress),
            what=f"download of {entry.path}",
        )
        return part

    def _version_dir_intact(self, target: Path, info: pb.Version) -> bool:
        if not target.is_dir():
            return False
        for entry in info.files:
            path = target / safe_relpath(entry.path)
            blob = self.blobs / entry.sha256
            if not path.exists() or not blob.exists() or not os.path.samefile(path, blob):
                return False
        return True

    def _assemble(self, target: Path, info: pb.Version) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{info.number}-", dir=self.versions))
        try:
            for entry in info.files:
                dst = tmp / safe_relpath(entry.path)
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blobs / entry.sha256, dst)
                except OSError:  # file systems without hard links
                    shutil.copyfile(self.blobs / entry.sha256, dst)
            listed = {e.path for e in info.files}
            if MANIFEST_NAME not in listed and info.manifest_json:
                (tmp / MANIFEST_NAME).write_text(info.manifest_json)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            fsync_dir(self.versions)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def manifest(self, version_dir: Path) -> dict:
        path = Path(version_dir) / MANIFEST_NAME
        return json.loads(path.read_text()) if path.exists() else {}
