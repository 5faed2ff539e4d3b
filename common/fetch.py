"""Resumable, sha256-checked download of a version's files (both roles and the admin CLI use it).

``stub`` is an AdminService or WorkerService stub (both have GetVersion/DownloadVersion)::

    channel = open_channel("127.0.0.1:50051")                   # coldswarm.common.channel
    download_version(AdminServiceStub(channel), "latest", Path("v0"), metadata=bearer(token))

The worker keeps its own content-addressed cache (``worker/downloads.py``) and uses :func:`fetch_file`
and :func:`safe_relpath` from here, so both ways of downloading resume and verify alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coldswarm.common.durable import fsync_dir
from coldswarm.common.hashing import hash_prefix, sha256_file
from coldswarm.common.manifest import MANIFEST_NAME
from coldswarm.proto import coldswarm_pb2 as pb


class DownloadError(Exception):
    """A file did not arrive intact (after a retry from zero)."""


@dataclass
class DownloadReport:
    version: int
    files: int
    bytes_fetched: int
    bytes_reused: int


def safe_relpath(rel: str) -> Path:
    """A version's file path, refused if it could leave the directory it is written into."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise DownloadError(f"refusing file path {rel!r} that would leave the output directory")
    return p


def fetch_file(
    stub,
    version: str,
    entry: pb.FileEntry,
    part: Path,
    metadata=(),
    timeout: float | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> bool:
    """Continue ``entry``'s bytes into ``part`` from its current size; True if ``part`` is then intact.

    The resume point is the size of ``part``: an interrupted call (outage, kill) loses nothing
    already on disk. A ``part`` that is complete but fails its sha256 is deleted (returns False),
    so the caller's next attempt starts from zero.
    """
    safe_relpath(entry.path)
    offset = part.stat().st_size if part.exists() else 0
    if offset > entry.size:
        part.unlink()
        offset = 0
    # Hashed as it arrives (after the bytes already on disk), not read back afterwards: a model shard larger
    # than the page cache would otherwise come off the disk a second time. (A writer thread to overlap hashing
    # with receiving gained nothing on 2 cores, where the coordinator's send, gRPC's receive and sha256 already
    # compete for both: benchmarks/transfer.py.)
    digest = hash_prefix(part, offset) if offset else hashlib.sha256()
    if offset < entry.size:
        with open(part, "ab") as fh:
            try:
                req = pb.DownloadRequest(version=str(version), path=entry.path, offset=offset)
                for chunk in stub.DownloadVersion(req, metadata=metadata, timeout=timeout):
                    if chunk.offset != offset:
                        raise DownloadError(f"{entry.path}: chunk at {chunk.offset}, expected {offset}")
                    if offset + len(chunk.data) > entry.size:
                        raise DownloadError(
                            f"{entry.path}: the coordinator sent more than its {entry.size} bytes"
                        )
                    fh.write(chunk.data)
                    digest.update(chunk.data)
                    offset += len(chunk.data)
                    if on_bytes:
                        on_bytes(len(chunk.data))
            finally:
                fh.flush()
                os.fsync(fh.fileno())
    if offset == entry.size and part.stat().st_size == entry.size and digest.hexdigest() == entry.sha256:
        return True
    part.unlink()
    return False


def download_version(
    stub,
    version: str,
    out_dir: Path,
    metadata=(),
    timeout: float | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> DownloadReport:
    """Fetch ``version`` ("latest" or a number) into ``out_dir`` as an HF directory.

    Resumable: a file being fetched lives as ``<name>.part`` and the next call
    continues from its size; files already present with the right sha256 are
    kept. Every file is hashed before it is renamed into place, and the manifest
    is written last, so a directory with a manifest is complete. ``stub`` is an
    AdminService or WorkerService stub (both have GetVersion/DownloadVersion).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info: pb.Version = stub.GetVersion(
        pb.GetVersionRequest(version=str(version)), metadata=metadata, timeout=timeout
    )
    number = str(info.number)  # pin the number: "latest" may move while we download
    fetched = reused = 0
    entries = sorted(info.files, key=lambda f: (f.path == MANIFEST_NAME, f.path))
    for entry in entries:
        dest = out_dir / safe_relpath(entry.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and dest.stat().st_size == entry.size and sha256_file(dest) == entry.sha256:
            reused += entry.size
            continue
        part = dest.with_name(dest.name + ".part")
        received = [0]

        def count(n: int, entry=entry, part=part, received=received) -> None:
            received[0] += n
            if progress:
                progress(entry.path, part.stat().st_size, entry.size)

        # A corrupt partial (e.g. a disk error) is fetched again from zero, once.
        if not fetch_file(stub, number, entry, part, metadata, timeout, count):
            if not fetch_file(stub, number, entry, part, metadata, timeout, count):
                raise DownloadError(
                    f"{entry.path} does not match its sha256 {entry.sha256} after a fresh fetch"
                )
        fetched += received[0]
        os.replace(part, dest)
    fsync_dir(out_dir)
    manifest = json.loads(info.manifest_json or "{}")
    return DownloadReport(manifest.get("version", info.number), len(entries), fetched, reused)
