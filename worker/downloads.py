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

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc

from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.client import CoordinatorClient

log = logging.getLogger(__name__)

MANIFEST_NAME = "coldswarm-manifest.json"
HASH_BLOCK = 4 * 1024 * 1024


class DownloadError(Exception):
    """A version could not be fetched intact."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_relpath(path: str) -> Path:
    """A version's file path, refused if it could escape the version directory."""
    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DownloadError(f"the coordinator listed an unsafe file path {path!r}; refusing it")
    return rel


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
            actual = sha256_file(part)
            if actual == entry.sha256 and part.stat().st_size == entry.size:
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
            part.unlink(missing_ok=True)
        raise DownloadError(
            f"{entry.path} of version {number} failed its sha256 check {self.max_attempts_per_file} times; "
            "the coordinator's copy may be damaged: tell its operator"
        )

    def _fetch(self, client: CoordinatorClient, number: int, entry: pb.FileEntry, progress) -> Path:
        safe_relpath(entry.path)
        part = self.partial / f"{entry.sha256}.part"

        def attempt() -> None:
            offset = part.stat().st_size if part.exists() else 0
            if offset > entry.size:
                part.unlink()
                offset = 0
            if progress and offset:
                progress(offset)
            if offset == entry.size:
                return
            request = pb.DownloadRequest(version=str(number), path=entry.path, offset=offset)
            with open(part, "ab") as fh:
                try:
                    for chunk in client.stream("DownloadVersion", request):
                        if chunk.offset != fh.tell():
                            raise DownloadError(
                                f"{entry.path}: chunk at offset {chunk.offset}, expected {fh.tell()}"
                            )
                        fh.write(chunk.data)
                        if progress:
                            progress(len(chunk.data))
                finally:
                    fh.flush()
                    os.fsync(fh.fileno())

        # An outage mid-stream resumes from the bytes already on disk.
        client.retrying(attempt, what=f"download of {entry.path}")
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


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.NOT_FOUND
