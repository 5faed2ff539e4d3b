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
died, or the server ended an idle or too-long stream) keeps its partial file, and
BeginUpload resumes it, until its round closes or its worker leaves: then it is
removed at once (:meth:`UploadManager.discard_round`, :meth:`UploadManager.discard_worker`).

A chunk larger than ``max_chunk_bytes`` is refused here (RESOURCE_EXHAUSTED, the
upload discarded). gRPC's own message limit sits well above it (``server.py``): a
message past *that* is refused by gRPC before the coordinator sees it, and the
sync server shows it only as a stream the client broke off, so such an upload is
kept as interrupted (and removed with its round or worker).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from coldswarm.common.hashing import hash_prefix
from coldswarm.common.quoting import quote
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
from coldswarm.coordinator.limits import check_int, parse_json_object
from coldswarm.coordinator.rounds import RoundStateMachine
from coldswarm.coordinator.states import RoundState
from coldswarm.coordinator.store import Store
from coldswarm.coordinator.validate import check_contribution
from coldswarm.coordinator.versions import VersionStore
from coldswarm.fusion.codecs import CODECS
from coldswarm.fusion.errors import DecodedTooLarge

log = logging.getLogger(__name__)
#: how many discarded uploads are remembered, to tell a late chunk why its upload is gone
_GONE_REMEMBERED = 1024


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
        max_metrics_bytes: int = 16 * 1024,
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
        self.max_metrics_bytes = max_metrics_bytes
        self._active: set[str] = set()
        self._gone: dict[str, str] = {}  # upload id -> why it was discarded (the latest few, oldest first)
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
        check_int(num_examples, "num_examples")
        if total_size > self.max_upload_bytes:
            raise ResourceExhausted(
                f"payload of {total_size} bytes exceeds this coordinator's limit of {self.max_upload_bytes} "
                "bytes: use a smaller form (LoRA/IA3) or a compressing codec"
            )
        codec = codec or "none"
        if codec not in CODECS:
            raise InvalidArgument(f"unknown codec {quote(codec)}; this coordinator decodes {sorted(CODECS)}")
        parse_json_object(metrics_json, "metrics_json", self.max_metrics_bytes, "--max-metrics-bytes")
        metrics_json = metrics_json or "{}"
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
        # The row first, then its file: a failure between them leaves a row whose partial file is simply
        # empty (resumed from 0), never a file no row names.
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
        self.part_path(upload_id).touch()
        return upload_id, 0, self.chunk_bytes

    def discard(self, upload_id: str) -> None:
        """Forget an upload: its row and partial file."""
        with self.store.tx() as c:
            c.execute("DELETE FROM uploads WHERE id=?", (upload_id,))
        self.part_path(upload_id).unlink(missing_ok=True)

    def discard_round(self, round_id: int, why: str) -> None:
        """A round closed: its unfinished uploads can never be accepted; drop them now. One still streaming
        is dropped when its stream ends (it is refused then: the round is closed)."""
        self._discard_where("round_id=?", (round_id,), why)

    def discard_worker(self, worker_id: str, why: str) -> None:
        """A worker left: it will never resume its uploads."""
        self._discard_where("worker_id=?", (worker_id,), why)

    def _discard_where(self, where: str, args: tuple, why: str) -> None:
        for r in self.store.all(f"SELECT id FROM uploads WHERE {where}", args):
            with self._lock:
                if r["id"] in self._active:
                    continue
                # A chunk that still arrives for it is told why (FAILED_PRECONDITION), not just NOT_FOUND.
                self._gone[r["id"]] = why
                while len(self._gone) > _GONE_REMEMBERED:
                    self._gone.pop(next(iter(self._gone)))
            self.discard(r["id"])

    # -- UploadContribution ---------------------------------------------------------------

    def receive(
        self, worker_id: str, chunks: Iterable[Chunk], is_active: Callable[[], bool] = lambda: True
    ) -> UploadResult:
        it = iter(chunks)
        try:
            first = next(it)
        except StopIteration:
            raise InvalidArgument("the upload stream was empty: send chunks after BeginUpload") from None
        except CoordinatorError:  # the chunk itself was refused at the door
            raise
        except Exception:  # the client went away before its first chunk arrived: nothing to keep
            raise FailedPrecondition("the upload stream broke off before its first chunk; retry") from None
        row = self.store.one("SELECT * FROM uploads WHERE id=?", (first.upload_id,))
        if row is None:
            with self._lock:
                why = self._gone.get(first.upload_id)
            if why is not None:
                raise FailedPrecondition(
                    f"upload {quote(first.upload_id)} was discarded: {why} and takes no more contributions"
                )
            raise NotFound(f"no upload {quote(first.upload_id)} in progress: call BeginUpload first")
        if row["worker_id"] != worker_id:
            raise PermissionDenied(f"upload {quote(first.upload_id)} belongs to another worker")
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
            # Our own failure (disk full, a bug): keep the bytes so the worker can resume, if they are
            # still there (a failure after the payload became a blob has nothing left to resume).
            keep_partial = self.part_path(upload_id).exists()
            raise
        finally:
            with self._lock:
                self._active.discard(upload_id)
            if keep_partial and not self._round_open(int(row["round_id"])):
                keep_partial = False  # the round closed meanwhile: nothing will resume it
            if not keep_partial and self.store.one("SELECT 1 FROM uploads WHERE id=?", (upload_id,)):
                self.discard(upload_id)

    def _round_open(self, round_id: int) -> bool:
        r = self.store.one("SELECT state FROM rounds WHERE id=?", (round_id,))
        return r is not None and r["state"] == RoundState.OPEN

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
                        f"chunk for upload {quote(chunk.upload_id)} in the stream of {upload_id}"
                    )
                if len(chunk.data) > self.chunk_bytes:
                    raise ResourceExhausted(
                        f"a chunk of {len(chunk.data)} bytes is over max_chunk_bytes ({self.chunk_bytes}, from "
                        "BeginUpload); the upload was discarded: call BeginUpload again"
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
                except CoordinatorError:  # the chunk itself was refused at the door
                    raise
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
                    f"the payload does not decode with codec {row['codec']!r}: {quote(exc, 200)}"
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
        num_examples = int(row["num_examples"]) or summary.num_examples
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
