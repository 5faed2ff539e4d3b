"""Tokens: who may call what.

Three kinds of bearer token travel as ``authorization: Bearer <token>`` metadata:

- the **admin** token (``csa_...``), made at first start and written to
  ``<data-dir>/admin.token`` (mode 0600); AdminService takes only this one;
- **join** tokens (``csj_...``), minted and revoked by the admin; accepted only by
  ``WorkerService.Register``;
- **session** tokens (``csw_...``), one per registered worker, returned by
  ``Register``; every other WorkerService call takes one. Revoking a join token
  also cuts off the workers that joined with it.

Only sha256 hashes of tokens are stored; a token is shown once, when made.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from coldswarm.common.durable import write_private
from coldswarm.common.quoting import quote
from coldswarm.coordinator.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from coldswarm.coordinator.limits import NAME_CHARS
from coldswarm.coordinator.store import Store

PREFIX = {"admin": "csa_", "join": "csj_", "worker": "csw_"}
KIND_OF_PREFIX = {v: k for k, v in PREFIX.items()}


def new_token(kind: str) -> str:
    return PREFIX[kind] + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_from_metadata(metadata: Iterable[tuple[str, str]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


@dataclass(frozen=True)
class Principal:
    kind: str  # "admin", "join" or "worker"
    token_id: str  # the admin/join token's id; for a worker, the join token it came with
    worker_id: str = ""


@dataclass(frozen=True)
class TokenRow:
    id: str
    kind: str
    label: str
    created_at: float
    revoked: bool


def token_key(t: TokenRow) -> tuple[float, str]:
    """The order tokens are listed in (and the key a page token holds)."""
    return (t.created_at, t.id)


class Auth:
    """Mints, revokes and checks tokens over the state, with an in-memory cache.

    Every check is a dict lookup (heartbeats from hundreds of workers must not
    queue on SQLite); the cache is updated in the same call that changes the
    state, and this process is the only writer.
    """

    def __init__(self, store: Store, admin_token_path: Path):
        self.store = store
        self.admin_token_path = Path(admin_token_path)
        self._lock = threading.Lock()
        self._tokens: dict[str, TokenRow] = {}  # hash -> row
        self._revoked_ids: set[str] = set()
        self._sessions: dict[str, tuple[str, str]] = {}  # session hash -> (worker id, join token id)
        self.admin_token_created: str | None = None
        self._load()

    def _load(self) -> None:
        for r in self.store.all("SELECT * FROM tokens"):
            row = TokenRow(r["id"], r["kind"], r["label"], r["created_at"], bool(r["revoked"]))
            self._tokens[r["hash"]] = row
            if row.revoked:
                self._revoked_ids.add(row.id)
        for r in self.store.all("SELECT id, token_id, session_hash FROM workers WHERE left_at IS NULL"):
            self._sessions[r["session_hash"]] = (r["id"], r["token_id"])

    # -- admin token ----------------------------------------------------------------------

    def ensure_admin_token(self) -> str | None:
        """Make the admin token on first start; returns it then (None when one exists)."""
        if any(t.kind == "admin" and not t.revoked for t in self._tokens.values()):
            return None
        token = new_token("admin")
        write_private(self.admin_token_path, token + "\n")
        self._insert("admin", "admin", token)
        self.admin_token_created = token
        return token

    def ensure_join_token_file(self, path: Path) -> bool:
        """Keep a valid join token in ``path`` (0600); mint one when it is missing or no longer valid.

        Returns True when a new token was written.
        """
        path = Path(path)
        try:
            existing = path.read_text().strip()
        except OSError:
            existing = ""
        row = self._tokens.get(token_hash(existing)) if existing else None
        if row is not None and row.kind == "join" and not row.revoked:
            return False
        _row, token = self.create_join_token(f"file {path.name}"[:NAME_CHARS])
        write_private(path, token + "\n")
        return True

    # -- join tokens ----------------------------------------------------------------------

    def _insert(self, kind: str, label: str, token: str) -> TokenRow:
        row = TokenRow(f"tok-{secrets.token_hex(4)}", kind, label, time.time(), False)
        h = token_hash(token)
        with self.store.tx() as c:
            c.execute(
                "INSERT INTO tokens(id, kind, label, hash, created_at) VALUES (?, ?, ?, ?, ?)",
                (row.id, kind, label, h, row.created_at),
            )
        with self._lock:
            self._tokens[h] = row
        return row

    def create_join_token(self, label: str) -> tuple[TokenRow, str]:
        """A new join token labelled ``label`` (at most NAME_CHARS characters, like Register names)."""
        if len(label) > NAME_CHARS:
            raise InvalidArgument(f"a token label is at most {NAME_CHARS} characters, not {len(label)}")
        token = new_token("join")
        return self._insert("join", label or "", token), token

    def revoke(self, token_id: str) -> TokenRow:
        with self._lock:
            match = [(h, t) for h, t in self._tokens.items() if t.id == token_id]
        if not match:
            raise NotFound(f"no token with id {quote(token_id)}: `coldswarm-admin tokens list` shows the ids")
        h, row = match[0]
        if row.kind == "admin":
            raise PermissionDenied(
                "the admin token cannot be revoked over the API: delete it from the state "
                "and restart the coordinator to make a new one"
            )
        with self.store.tx() as c:
            c.execute("UPDATE tokens SET revoked=1 WHERE id=?", (token_id,))
        revoked = TokenRow(row.id, row.kind, row.label, row.created_at, True)
        with self._lock:
            self._tokens[h] = revoked
            self._revoked_ids.add(token_id)
        return revoked

    def list(self, after: list | None = None, limit: int = -1) -> list[TokenRow]:
        """Tokens by (creation time, id), after the token with key ``after`` (:func:`token_key`), at most
        ``limit`` (-1: all)."""
        with self._lock:
            rows = sorted(self._tokens.values(), key=token_key)
        if after is not None:
            rows = [t for t in rows if token_key(t) > tuple(after)]
        return rows if limit < 0 else rows[:limit]

    # -- worker sessions ------------------------------------------------------------------

    def new_session(self) -> tuple[str, str]:
        """A fresh session token and its hash (the caller stores the hash with the worker)."""
        token = new_token("worker")
        return token, token_hash(token)

    def add_session(self, session_hash: str, worker_id: str, join_token_id: str) -> None:
        with self._lock:
            self._sessions[session_hash] = (worker_id, join_token_id)

    def drop_worker(self, worker_id: str) -> None:
        with self._lock:
            for h in [h for h, (w, _) in self._sessions.items() if w == worker_id]:
                del self._sessions[h]

    # -- checks ---------------------------------------------------------------------------

    def caller_id(self, metadata) -> str | None:
        """Who calls, for counting their calls: ``kind:id`` of a valid token of any kind, else None."""
        token = bearer_from_metadata(metadata)
        if not token:
            return None
        h = token_hash(token)
        with self._lock:
            row = self._tokens.get(h)
            if row is not None:
                return None if row.revoked else f"{row.kind}:{row.id}"
            session = self._sessions.get(h)
            if session is not None and session[1] not in self._revoked_ids:
                return f"worker:{session[0]}"
        return None

    def authenticate(self, metadata, need: str) -> Principal:
        """The caller behind ``metadata``, which must hold a token of kind ``need``.

        Raises :class:`Unauthenticated` for a missing, unknown or revoked token and
        :class:`PermissionDenied` for a valid token of the wrong kind.
        """
        token = bearer_from_metadata(metadata)
        hint = {
            # Never the token file's path: these messages go to callers who are not yet anyone.
            "admin": "the admin token (the coordinator wrote it into its data directory at first start; "
            "pass --token or set COLDSWARM_ADMIN_TOKEN)",
            "join": "a join token from the coordinator's admin (`coldswarm-admin tokens create`)",
            "worker": "the session token Register returned (register again with a join token)",
        }[need]
        if token is None:
            raise Unauthenticated(f"no token: send `authorization: Bearer <token>` metadata with {hint}")
        if not token:
            raise Unauthenticated(f"malformed authorization metadata: expected `Bearer <token>` with {hint}")
        h = token_hash(token)
        with self._lock:
            row = self._tokens.get(h)
            session = self._sessions.get(h)
            revoked_ids = self._revoked_ids
            if row is not None:
                if row.revoked:
                    raise Unauthenticated(
                        f"token {row.id} ({row.kind}) was revoked: ask the admin for {hint}"
                    )
                kind = row.kind
                principal = Principal(kind, row.id)
            elif session is not None:
                worker_id, join_id = session
                if join_id in revoked_ids:
                    raise Unauthenticated(
                        f"worker {worker_id} joined with token {join_id}, which was revoked: "
                        "ask the admin for a new join token"
                    )
                kind = "worker"
                principal = Principal("worker", join_id, worker_id)
            else:
                kind = None
        if kind is None:
            what = KIND_OF_PREFIX.get(token[:4])
            extra = (
                f" (it looks like a {what} token this coordinator never issued or that left)" if what else ""
            )
            raise Unauthenticated(f"unknown token{extra}: this call needs {hint}")
        if kind != need:
            raise PermissionDenied(f"this is a {kind} token, but this call needs {hint}")
        return principal
