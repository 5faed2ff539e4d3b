"""Uploading a contribution: chunked, resumable, and hashed end to end.

``BeginUpload`` tells the worker where to continue (0 for a new upload, the
coordinator's received byte count after an interruption); the bytes then stream
in order from there and the last chunk carries the sha256 of the whole payload,
which the coordinator checks before it records anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from coldswarm.common.hashing import sha256_file
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.client import CoordinatorClient

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1024 * 1024


def _chunks(path: Path, upload_id: str, offset: int, size: int, chunk_bytes: int, sha256: str, progress):
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            data = fh.read(chunk_bytes)
            last = offset + len(data) >= size
            yield pb.UploadChunk(upload_id=upload_id, offset=offset, data=data, sha256=sha256 if last else "")
            if progress and data:
                progress(len(data))
            offset += len(data)
            if last:
                return


def upload_contribution(
    client: CoordinatorClient,
    payload: Path,
    *,
    assignment: pb.Assignment,
    codec: str,
    num_examples: int,
    metrics_json: str = "{}",
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> pb.UploadResponse:
    """Send ``payload`` (an encoded contribution file) for ``assignment``; resumes after outages."""
    payload = Path(payload)
    size = payload.stat().st_size
    digest = sha256_file(payload)
    begin = pb.BeginUploadRequest(
        assignment_id=assignment.id,
        round_id=assignment.round_id,
        base_version=assignment.base_version,
        total_size=size,
        codec=codec,
        num_examples=num_examples,
        metrics_json=metrics_json,
    )

    def attempt() -> pb.UploadResponse:
        started: pb.BeginUploadResponse = client.stub.BeginUpload(
            begin, metadata=client.metadata, timeout=client.call_timeout_s
        )
        step = min(chunk_bytes, started.max_chunk_bytes or chunk_bytes)
        if started.offset:
            log.info("resuming upload %s at byte %d of %d", started.upload_id, started.offset, size)
            if progress:
                progress(started.offset)
        chunks: Iterator = _chunks(payload, started.upload_id, started.offset, size, step, digest, progress)
        return client.stub.UploadContribution(chunks, metadata=client.metadata)

    return client.retrying(attempt, what="contribution upload")
