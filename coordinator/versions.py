"""Versions: immutable, HF-loadable model directories with a manifest, and the pointer.

A version is a set of files (``config.json``, safetensors weights, tokenizer
files, ...) plus ``coldswarm-manifest.json`` (sha256 per file, parent, round,
method, contributions, metrics; format in docs/INTERFACES.md). Each file is a
blob; ``version_files`` maps paths to blobs, so a download streams any file from
any offset. ``versions/<N>/`` is the same version as a directory (hard links to
the blobs), made on demand for merges and validation.

The run's ``current_version`` is the published pointer ("latest"). Publishing
and rolling back move it; nothing is ever deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from coldswarm.common.durable import fsync_dir
from coldswarm.common.manifest import MANIFEST_NAME
from coldswarm.common.quoting import quote
from coldswarm.coordinator.blobs import BlobStore
from coldswarm.coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from coldswarm.coordinator.limits import UINT32_MAX
from coldswarm.coordinator.states import VersionState
from coldswarm.coordinator.store import Store

RUN_ID = "default"
_VERSION_NUMBER = re.compile(r"[0-9]{1,10}", re.ASCII)
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"}


@dataclass
class VersionRow:
    number: int
    parent: int | None
    round_id: int | None
    kind: str
    method: str
    state: str
    manifest: dict
    manifest_json: str
    created_at: float
    files: list[tuple[str, int, str]] = field(default_factory=list)  # (path, size, sha256)
    is_current: bool = False


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    dtype: str


def check_model_dir(path: Path) -> list[Path]:
    """The files of an HF model directory with safetensors weights, or InvalidArgument saying why not."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidArgument(f"{path} is not a directory: point at an HF model directory")
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"{path} has no config.json: it is not an HF model directory")
    if not list(path.glob("*.safetensors")):
        raise InvalidArgument(
            f"{path} has no *.safetensors weights (only safetensors are accepted, never pickle): "
            "re-save it with save_pretrained(..., safe_serialization=True)"
        )
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."):
            files.append(p)
    return files


def weight_index(model_dir: Path) -> dict[str, ParamInfo]:
    """Name -> shape/dtype of every tensor in a model directory's safetensors files (headers only)."""
    index: dict[str, ParamInfo] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                index[name] = ParamInfo(tuple(sl.get_shape()), str(sl.get_dtype()))
    return index


class VersionStore:
    """Creates, lists and serves versions; owns the published pointer."""

    def __init__(self, store: Store, blobs: BlobStore, root: Path):
        self.store = store
        self.blobs = blobs
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._dir_lock = threading.Lock()
        self._index_cache: dict[int, dict[str, ParamInfo]] = {}
        with store.tx() as c:
            c.execute("INSERT OR IGNORE INTO runs(id, created_at) VALUES (?, ?)", (RUN_ID, time.time()))

    # -- reading --------------------------------------------------------------------------

    def current(self) -> int | None:
        row = self.store.one("SELECT current_version FROM runs WHERE id=?", (RUN_ID,))
        return None if row is None or row[0] is None else int(row[0])

    def count(self) -> int:
        return int(self.store.one("SELECT COUNT(*) FROM versions")[0])

    def resolve(self, spec: str | int) -> int:
        """A version number from ``spec``: ASCII digits (a number that fits the wire's uint32), or
        "latest"/"" for the published pointer. Python's int() would take "٠" or " 1_0 " too: not here."""
        text = str(spec)
        if text.lower() in ("", "latest"):
            current = self.current()
            if current is None:
                raise NotFound("no version is published yet: create version 0 (serve --base-model DIR)")
            return current
        if not _VERSION_NUMBER.fullmatch(text) or int(text) > UINT32_MAX:
            raise InvalidArgument(
                f"version {quote(text)} is neither 'latest' nor a version number (ASCII digits, at most "
                f"{UINT32_MAX})"
            )
        number = int(text)
        if self.store.one("SELECT 1 FROM versions WHERE number=?", (number,)) is None:
            raise NotFound(f"no version {number}: `coldswarm-admin versions` lists them")
        return number

    def state(self, number: int) -> str:
        """A version's state (:class:`~coldswarm.coordinator.states.VersionState`)."""
        return self.store.one("SELECT state FROM versions WHERE number=?", (number,))["state"]

    def get(self, spec: str | int) -> VersionRow:
        number = self.resolve(spec)
        r = self.store.one("SELECT * FROM versions WHERE number=?", (number,))
        files = [
            (f["path"], int(f["size"]), f["sha256"])
            for f in self.store.all(
                "SELECT path, size, sha256 FROM version_files WHERE version=? ORDER BY path", (number,)
            )
        ]
        return self._row(r, files)

    def list(self, after: int | None = None, limit: int = -1) -> list[VersionRow]:
        """Versions in number order, after number ``after``, at most ``limit`` (-1: all)."""
        rows = self.store.all(
            "SELECT number FROM versions WHERE number > ? ORDER BY number LIMIT ?",
            (-1 if after is None else int(after), limit),
        )
        return [self.get(r[0]) for r in rows]

    def _row(self, r, files) -> VersionRow:
        current = self.current()
        return VersionRow(
            number=r["number"],
            parent=r["parent"],
            round_id=r["round_id"],
            kind=r["kind"],
            method=r["method"],
            state=r["state"],
            manifest=json.loads(r["manifest_json"]),
            manifest_json=r["manifest_json"],
            created_at=r["created_at"],
            files=files,
            is_current=current == r["number"],
        )

    def file(self, spec: str | int, path: str) -> tuple[Path, int, str]:
        """(blob path, size, sha256) of one file of a version."""
        number = self.resolve(spec)
        r = self.store.one(
            "SELECT sha256, size FROM version_files WHERE version=? AND path=?", (number, path)
        )
        if r is None:
            raise NotFound(f"version {number} has no file {quote(path)}: GetVersion lists its files")
        return self.blobs.path(r["sha256"]), int(r["size"]), r["sha256"]

    # -- writing --------------------------------------------------------------------------

    def create(
        self,
        src_dir: Path,
        *,
        parent: int | None,
        round_id: int | None,
        kind: str,
        method: str,
        contributions: list[dict] | None = None,
        metrics: dict | None = None,
        publish: bool = False,
        rejected: bool = False,
        extra: dict | None = None,
        on_commit=None,
    ) -> VersionRow:
        """Record the model directory ``src_dir`` as the next version.

        The files become blobs first; then one transaction numbers the version,
        writes its manifest and rows and (when ``publish``) moves the pointer, so a
        kill at any moment leaves either no version or a complete one. It is
        ``published``, a ``candidate``, or (``rejected``: the publication gate held it
        back) ``rejected``. ``on_commit(conn, number)`` runs inside that transaction (e.g. to mark the
        round that produced the version).
        """
        if publish and rejected:
            raise ValueError("a version is published or rejected, not both")
        files = check_model_dir(src_dir)
        stored: dict[str, tuple[int, str]] = {}
        for p in files:
            rel = p.relative_to(src_dir).as_posix()
            sha, size = self.blobs.put_file(p)
            stored[rel] = (size, sha)
        with self.store.tx() as c:
            number = int(c.execute("SELECT COALESCE(MAX(number) + 1, 0) FROM versions").fetchone()[0])
            manifest = {
                "version": number,
                "parent": parent,
                "round": round_id,
                "kind": kind,
                "method": method,
                "created_at": time.time(),
                "files": {rel: {"size": size, "sha256": sha} for rel, (size, sha) in sorted(stored.items())},
                "contributions": contributions or [],
                "metrics": metrics or {},
            }
            if extra:
                manifest.update(extra)
            manifest_json = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
            m_sha, m_size = self.blobs.put_bytes(manifest_json.encode())
            state = (
                VersionState.PUBLISHED
                if publish
                else VersionState.REJECTED
                if rejected
                else VersionState.CANDIDATE
            )
            c.execute(
                "INSERT INTO versions(number, run_id, parent, round_id, kind, method, state, manifest_json, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    number,
                    RUN_ID,
                    parent,
                    round_id,
                    kind,
                    method,
                    state,
                    manifest_json,
                    manifest["created_at"],
                ),
            )
            rows = [(number, rel, sha, size) for rel, (size, sha) in stored.items()]
            rows.append((number, MANIFEST_NAME, m_sha, m_size))
            c.executemany("INSERT INTO version_files(version, path, sha256, size) VALUES (?, ?, ?, ?)", rows)
            if publish:
                c.execute("UPDATE runs SET current_version=? WHERE id=?", (number, RUN_ID))
            if on_commit is not None:
                on_commit(c, number)
        return self.get(number)

    def publish(self, number: int) -> VersionRow:
        """Move the pointer to ``number``: a candidate, an earlier published version, or one the publication
        gate rejected (the admin overrides the gate; its record stays in the manifest)."""
        number = self.resolve(number)
        with self.store.tx() as c:
            c.execute("UPDATE versions SET state=? WHERE number=?", (VersionState.PUBLISHED, number))
            c.execute("UPDATE runs SET current_version=? WHERE id=?", (number, RUN_ID))
        return self.get(number)

    def rollback(self, number: int) -> VersionRow:
        """Move the pointer back to an earlier published version. Deletes nothing."""
        number = self.resolve(number)
        current = self.current()
        row = self.get(number)
        if current is not None and number >= current:
            raise FailedPrecondition(
                f"rollback goes back: version {number} is not older than the current version {current} "
                "(use `publish` to move forward)"
            )
        if row.state != VersionState.PUBLISHED:
            raise FailedPrecondition(
                f"version {number} was never published ({row.state}); use `publish {number}` to publish it"
            )
        with self.store.tx() as c:
            c.execute("UPDATE runs SET current_version=? WHERE id=?", (number, RUN_ID))
        return self.get(number)

    # -- as a directory -------------------------------------------------------------------

    def directory(self, spec: str | int) -> Path:
        """``versions/<N>/``: the version as an HF directory (hard links to its blobs)."""
        row = self.get(spec)
        final = self.root / str(row.number)
        with self._dir_lock:
            if final.is_dir():
                return final
            tmp = self.blobs.temp_dir(prefix=f"version-{row.number}-")
            for rel, _size, sha in row.files:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blobs.path(sha), dest)
                except OSError:  # e.g. a filesystem without hard links: copy instead
                    shutil.copyfile(self.blobs.path(sha), dest)
            os.replace(tmp, final)
            fsync_dir(self.root)
        return final

    def weight_index(self, spec: str | int) -> dict[str, ParamInfo]:
        number = self.resolve(spec)
        if number not in self._index_cache:
            self._index_cache[number] = weight_index(self.directory(number))
        return self._index_cache[number]
