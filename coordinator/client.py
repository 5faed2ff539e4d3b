"""Client helpers for the coordinator's services: channels, tokens, resumable downloads.

Used by ``coldswarm-admin``; usable by anything that talks to a coordinator::

    channel = open_channel("127.0.0.1:50051", ca_file=None)
    admin = AdminServiceStub(channel)
    admin.Status(StatusRequest(), metadata=bearer(token))
    download_version(admin, "latest", Path("v0"), metadata=bearer(token))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from coldswarm.proto import coldswarm_pb2 as pb

MANIFEST_NAME = "coldswarm-manifest.json"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Larger TCP reads for 1 MiB chunks (see coldswarm.coordinator.server.TCP_TUNING).
    ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
    ("grpc.experimental.tcp_read_chunk_size", 8 * 1024 * 1024),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 * 1024 * 1024),
]


def open_channel(address: str, ca_file: Path | str | None = None) -> grpc.Channel:
    """A channel to ``HOST:PORT``; TLS when ``ca_file`` names the PEM of the CA that signed the server."""
    if not ca_file:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    root = Path(ca_file).read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), CHANNEL_OPTIONS)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


class DownloadError(Exception):
    """A file did not arrive intact (after a retry from zero)."""


@dataclass
class DownloadReport:
    version: int
    files: int
    bytes_fetched: int
    bytes_reused: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def _safe(rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise DownloadError(f"refusing file path {rel!r} that would leave the output directory")
    return p


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        dest = out_dir / _safe(entry.path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() and dest.stat().st_size == entry.size and _sha256(dest) == entry.sha256:
            reused += entry.size
            continue
        part = dest.with_name(dest.name + ".part")
        for attempt in (0, 1):
            offset = part.stat().st_size if part.exists() else 0
            if offset > entry.size:
                part.unlink()
                offset = 0
            if offset < entry.size:
                with open(part, "ab") as fh:
                    req = pb.DownloadRequest(version=number, path=entry.path, offset=offset)
                    for chunk in stub.DownloadVersion(req, metadata=metadata, timeout=timeout):
                        if chunk.offset != offset:
                            raise DownloadError(f"{entry.path}: chunk at {chunk.offset}, expected {offset}")
                        fh.write(chunk.data)
                        offset += len(chunk.data)
                        fetched += len(chunk.data)
                        if progress:
                            progress(entry.path, offset, entry.size)
                    fh.flush()
                    os.fsync(fh.fileno())
            if part.stat().st_size == entry.size and _sha256(part) == entry.sha256:
                os.replace(part, dest)
                break
            # A corrupt partial (e.g. a disk error): fetch this file again from zero, once.
            part.unlink()
            if attempt:
                raise DownloadError(
                    f"{entry.path} does not match its sha256 {entry.sha256} after a fresh fetch"
                )
    _fsync_dir(out_dir)
    manifest = json.loads(info.manifest_json or "{}")
    return DownloadReport(manifest.get("version", info.number), len(entries), fetched, reused)
