"""Contribution uploads: begun once, streamed in order, resumable, checked before recorded.

Protocol (WorkerService.BeginUpload + UploadContribution):

1. ``BeginUpload`` checks the worker may contribute (round open, its base version,
   no earlier contribution) and the declared size (over ``max_upload_bytes``:
   RESOURCE_EXHAUSTED), and returns an upload id and the offset to continue from:
   0 for a new upload, the bytes already received when the same worker resumes
   its upload for the same round (same assignment, size and codec).
2. ``UploadContribution`` takes chunks whose ``offset`` must be exactly the next
   byte (else INVALID_ARGUMENT); the last chunk carries the sha256 of the whole
   payload (a stream that ends without it: INVALID_ARGUMENT; a mismatch:
   DATA_LOSS). Bytes go straight to ``uploads/<id>.part`` on disk, never buffered
   whole; going past the declared size or the limit is refused at that chunk.
3. The payload is decoded (codec), checked (:mod:`coldswarm.coordinator.validate`),
   stored as a blob, and only then recorded as a contribution, in one
   transaction that also drops the upload row.

A refused upload is discarded entirely (row and partial file): the worker starts
again with BeginUpload. An *interrupted* one (the connection or the coordinator
died) keeps its partial file, and BeginUpload resumes it.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from coldswarm.common.hashing import hash_prefix
from coldswarm.coordinator.blobs import BlobStore
from coldswarm.coordinator.contributions import Contributions
from coldswarm.coordinator.errors import (
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from coldswarm.coordinator.rounds import RoundStateMachine
from coldswarm.coordinator.states import RoundState
from coldswarm.coordinator.store import Store
from coldswarm.coordinator.validate import check_contribution
from coldswarm.coordinator.versions import VersionStore
from coldswarm.fusion.codecs import CODECS
from coldswarm.fusion.errors import DecodedTooLarge

log = logging.getLogger(__name__)


def _decode(codec: str, data: bytes, max_output: int) -> bytes:
    return CODECS[codec].decode(data, max_output=max_output)


@dataclass
class Chunk:
    upload_id: str
    offset: int
    data: bytes
    sha256: str


@dataclass
class UploadResult:
    contribution_id: int
    sha256: str  # of the payload as received
    size: int  # bytes received


class UploadManager:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        versions: VersionStore,
        rounds: RoundStateMachine,
        contributions: Contributions,
        root: Path,
        max_upload_bytes: int,
        chunk_bytes: int,
    ):
        self.store = store
        self.blobs = blobs
        self.versions = versions
        self.rounds = rounds
        self.contributions = contributions
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes
        self.chunk_bytes = chunk_bytes
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def part_path(self, upload_id: str) -> Path:
        return self.root / f"{upload_id}.part"

    def recover(self) -> None:
        """At start: drop uploads for rounds that no longer take them and partial files with no row."""
        with self.store.tx() as c:
            c.execute(
                "DELETE FROM uploads WHERE round_id NOT IN (SELECT id FROM rounds WHERE state=?)",
                (RoundState.OPEN,),
            )
        ids = {r["id"] for r in self.store.all("SELECT id FROM uploads")}
        for p in self.root.glob("*.part"):
            if p.stem not in ids:
                p.unlink(missing_ok=True)

    # -- BeginUpload ----------------------------------------------------------------------

    def begin(
        self,
        worker_id: str,
        *,
        assignment_id: str,
        round_id: int,
        base_version: int,
        total_size: int,
        codec: str,
        num_examples: int,
        metrics_json: str,
    ) -> tuple[str, int, int]:
        """Returns (upload id, offset to continue from, max chunk bytes)."""
        if total_size <= 0:
            raise InvalidArgument("total_size must be the payload's size in bytes (> 0)")
        if total_size > self.max_upload_bytes:
            raise ResourceExhausted(
                f"payload of {total_size} bytes exceeds this coordinator's limit of {self.max_upload_bytes} "
                "bytes: use a smaller form (LoRA/IA3) or a compressing codec"
            )
        codec = codec or "none"
        if codec not in CODECS:
            raise InvalidArgument(f"unknown codec {codec!r}; this coordinator decodes {sorted(CODECS)}")
        metrics_json = metrics_json or "{}"
        try:
            if not isinstance(json.loads(metrics_json), dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise InvalidArgument(f"metrics_json must be a JSON object: {exc}") from None
        self.contributions.check_can_contribute(worker_id, round_id, base_version, assignment_id)
        existing = self.store.one(
            "SELECT * FROM uploads WHERE worker_id=? AND round_id=?", (worker_id, round_id)
        )
        if existing is not None:
            part = self.part_path(existing["id"])
            same = (
                existing["assignment_id"] == assignment_id
                and existing["total_size"] == total_size
                and existing["codec"] == codec
                and existing["base_version"] == base_version
            )
            if same and existing["id"] not in self._active:
                offset = part.stat().st_size if part.exists() else 0
                if offset > total_size:  # cannot happen through this code; start over rather than trust it
                    part.unlink(missing_ok=True)
                    offset = 0
                part.touch()
                return existing["id"], offset, self.chunk_bytes
            if existing["id"] in self._active:
                raise Unavailable(
                    f"upload {existing['id']} is still streaming (an earlier connection is ending); retry shortly"
                )
            self.discard(existing["id"])
        upload_id = f"u-{secrets.token_hex(8)}"
        self.part_path(upload_id).touch()
        with self.store.tx() as c:
            c.execute(
                "INSERT INTO uploads(id, worker_id, round_id, assignment_id, base_version, total_size, codec, "
                "num_examples, metrics_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    upload_id,
                    worker_id,
                    round_id,
                    assignment_id,
                    base_version,
                    total_size,
                    codec,
                    num_examples,
                    metrics_json,
                    time.time(),
                ),
            )
        return upload_id, 0, self.chunk_bytes

    def discard(self, upload_id: str) -> None:
        """Forget an upload: its row and partial file."""
        with self.store.tx() as c:
            c.execute("DELETE FROM uploads WHERE id=?", (upload_id,))
        self.part_path(upload_id).unlink(missing_ok=True)

    # -- UploadContribution ---------------------------------------------------------------

    def receive(
        self, worker_id: str, chunks: Iterable[Chunk], is_active: Callable[[], bool] = lambda: True
    ) -> UploadResult:
        it = iter(chunks)
        try:
            first = next(it)
        except StopIteration:
            raise InvalidArgument("the upload stream was empty: send chunks after BeginUpload") from None
        except Exception:  # the client went away before its first chunk arrived: nothing to keep
            raise FailedPrecondition("the upload stream broke off before its first chunk; retry") from None
        row = self.store.one("SELECT * FROM uploads WHERE id=?", (first.upload_id,))
        if row is None:
            raise NotFound(f"no upload {first.upload_id!r} in progress: call BeginUpload first")
        if row["worker_id"] != worker_id:
            raise PermissionDenied(f"upload {first.upload_id} belongs to another worker")
        upload_id = row["id"]
        with self._lock:
            if upload_id in self._active:
                raise Unavailable(
                    f"upload {upload_id} is still streaming (an earlier connection is ending); retry shortly"
                )
            self._active.add(upload_id)
        keep_partial = False
        try:
            return self._receive(row, first, it, is_active)
        except _Interrupted:
            keep_partial = True
            raise FailedPrecondition(
                f"upload {upload_id} ended before its last byte (the stream broke or was cut short); "
                "the bytes received are kept: call BeginUpload again to resume"
            ) from None
        except CoordinatorError:
            raise
        except Exception:
            # Our own failure (disk full, a bug): keep the bytes so the worker can resume.
            keep_partial = True
            raise
        finally:
            with self._lock:
                self._active.discard(upload_id)
            if not keep_partial and self.store.one("SELECT 1 FROM uploads WHERE id=?", (upload_id,)):
                self.discard(upload_id)

    def _receive(self, row, first: Chunk, it, is_active) -> UploadResult:
        upload_id, total = row["id"], int(row["total_size"])
        part = self.part_path(upload_id)
        if not part.exists():
            part.touch()
        expected = part.stat().st_size
        digest = hash_prefix(part, expected)
        final_sha = ""
        # Unbuffered: each chunk reaches the OS as it arrives, so after a kill -9 the partial
        # file holds every byte the stream delivered and BeginUpload can resume from its size.
        with open(part, "r+b", buffering=0) as fh:
            fh.seek(expected)
            chunk: Chunk | None = first
            while chunk is not None:
                if chunk.upload_id and chunk.upload_id != upload_id:
                    raise InvalidArgument(
                        f"chunk for upload {chunk.upload_id!r} in the stream of {upload_id}"
                    )
                if chunk.offset != expected:
                    raise InvalidArgument(
                        f"chunk at offset {chunk.offset}, expected {expected}: send chunks in order from the "
                        "offset BeginUpload returned (the upload was discarded; call BeginUpload again)"
                    )
                end = expected + len(chunk.data)
                if end > self.max_upload_bytes:
                    raise ResourceExhausted(
                        f"upload passed this coordinator's limit of {self.max_upload_bytes} bytes "
                        f"(at the chunk ending at byte {end})"
                    )
                if end > total:
                    raise InvalidArgument(
                        f"upload sent more than the {total} bytes declared at BeginUpload "
                        f"(at the chunk ending at byte {end})"
                    )
                if chunk.data:
                    view = memoryview(chunk.data)
                    while view:
                        view = view[fh.write(view) :]
                    digest.update(chunk.data)
                    expected = end
                if chunk.sha256:
                    final_sha = chunk.sha256.strip().lower()
                    if expected != total:
                        raise InvalidArgument(
                            f"final chunk (with the sha256) arrived at byte {expected} of {total}; "
                            "send every byte before the hash"
                        )
                    break
                try:
                    chunk = next(it)
                except StopIteration:
                    chunk = None
                except Exception as exc:  # the client went away mid-stream
                    raise _Interrupted() from exc
        if not final_sha:
            # A stream cut short is resumable whoever cut it. gRPC cannot say for sure: a cancelled call
            # can end the request iterator before context.is_active() turns False, so a short stream keeps
            # its bytes even when the call still looks alive.
            if expected < total or not is_active():
                raise _Interrupted()
            raise InvalidArgument(
                f"the stream sent all {total} bytes but no sha256: "
                "the last chunk must carry the sha256 of the whole payload"
            )
        got = digest.hexdigest()
        if got != final_sha:
            from coldswarm.coordinator.errors import DataLoss

            raise DataLoss(
                f"payload hashes to {got}, but the final chunk said {final_sha}: the bytes were corrupted "
                "or the hash is of another file; upload again from BeginUpload"
            )
        return self._accept(row, part, got)

    def _accept(self, row, part: Path, payload_sha: str) -> UploadResult:
        round_id, worker_id = int(row["round_id"]), row["worker_id"]
        rnd = self.contributions.check_can_contribute(
            worker_id, round_id, int(row["base_version"]), row["assignment_id"]
        )
        decoded = part
        if row["codec"] != "none":
            decoded = self.blobs.temp_path(prefix="decoded-")
            try:
                # Bounded like the wire bytes: a small compressed upload must not expand without limit.
                decoded.write_bytes(_decode(row["codec"], part.read_bytes(), self.max_upload_bytes))
            except DecodedTooLarge as exc:
                decoded.unlink(missing_ok=True)
                raise ResourceExhausted(
                    f"the payload decoded with codec {row['codec']!r} is larger than this coordinator's "
                    f"limit of {self.max_upload_bytes} bytes: {exc}"
                ) from None
            except Exception as exc:
                decoded.unlink(missing_ok=True)
                raise InvalidArgument(
                    f"the payload does not decode with codec {row['codec']!r}: {exc}"
                ) from None
        try:
            summary = check_contribution(
                decoded,
                self.versions.weight_index(rnd.base_version),
                rnd.base_version,
                self.versions.directory(rnd.base_version),
                rnd.method,
            )
        except BaseException:
            if decoded != part:
                decoded.unlink(missing_ok=True)
            raise
        num_examples = int(row["num_examples"]) or int(summary.meta.get("num_examples", 0) or 0)
        # The blob is complete and verified before any row names it; if the transaction below
        # refuses (round closed meanwhile), the blob is removed again unless something else uses it.
        size = part.stat().st_size
        sha, stored_size = self.blobs.commit(
            decoded, hashed_by_caller=payload_sha if decoded == part else None
        )
        try:
            with self.store.tx() as c:
                cid = self.contributions.add(
                    c,
                    worker_id=worker_id,
                    round_id=round_id,
                    fields={
                        "assignment_id": row["assignment_id"],
                        "form": summary.form,
                        "size": stored_size,
                        "sha256": sha,
                        "payload_sha256": payload_sha,
                        "codec": row["codec"],
                        "num_examples": num_examples,
                        "metrics_json": row["metrics_json"],
                    },
                )
                c.execute("DELETE FROM uploads WHERE id=?", (row["id"],))
        except BaseException:
            if not self._referenced(sha):
                self.blobs.delete(sha)
            raise
        part.unlink(missing_ok=True)
        log.info("contribution %d from %s for round %d accepted (%d bytes)", cid, worker_id, round_id, size)
        self.rounds.close_on_quorum(round_id)
        return UploadResult(cid, payload_sha, size)

    def _referenced(self, sha: str) -> bool:
        return bool(
            self.store.one("SELECT 1 FROM contributions WHERE sha256=?", (sha,))
            or self.store.one("SELECT 1 FROM version_files WHERE sha256=?", (sha,))
        )


class _Interrupted(Exception):
    """The client's stream broke off: keep what arrived, so BeginUpload can resume it."""
