"""Registered workers: registration, heartbeats (batched in memory), leaving.

Heartbeats are soft state: they update an in-memory table that a background
tick flushes to SQLite every ``tick_s`` seconds in one transaction, so hundreds
of workers heartbeating never queue on the database. Losing the last few
seconds of heartbeats in a crash only makes workers look a little older.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from coldswarm.coordinator.auth import Auth, Principal
from coldswarm.coordinator.errors import NotFound
from coldswarm.coordinator.limits import NAME_CHARS
from coldswarm.coordinator.states import AssignmentState, RoundState, WorkerState
from coldswarm.coordinator.store import Store

log = logging.getLogger(__name__)


@dataclass
class WorkerRow:
    id: str
    name: str
    capabilities: bytes
    registered_at: float
    last_seen: float
    state: str  # a WorkerState
    assignment_id: str
    progress_json: str
    token_id: str = ""  # the join token it came with
    address: str = ""  # where it registered from (gRPC's peer string, e.g. ipv4:10.0.0.7:51234)


class WorkerRegistry:
    def __init__(self, store: Store, auth: Auth, gone_after_s: float):
        self.store = store
        self.auth = auth
        self.gone_after_s = gone_after_s
        #: called with the worker id after a worker left (e.g. to drop its unfinished uploads)
        self.on_leave: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, str]] = {}  # worker id -> (last seen, progress json), unflushed
        self._touched: dict[str, float] = {}  # worker id -> last seen, unflushed
        self._known: dict[str, float] = {
            r["id"]: r["last_seen"]
            for r in store.all("SELECT id, last_seen FROM workers WHERE left_at IS NULL")
        }
        # Called with (worker id, progress, time) after every heartbeat, e.g. by the swarm's series.
        self.on_heartbeat: list[Callable[[str, dict, float], None]] = []

    def register(
        self, principal: Principal, name: str, capabilities: bytes, address: str = ""
    ) -> tuple[str, str]:
        """A new worker joined with ``principal``'s join token from ``address``; returns (worker id,
        session token)."""
        worker_id = f"w-{secrets.token_hex(6)}"
        token, h = self.auth.new_session()
        now = time.time()
        with self.store.tx() as c:
            c.execute(
                "INSERT INTO workers(id, name, capabilities, token_id, session_hash, registered_at, last_seen, "
                "address) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (worker_id, name[:NAME_CHARS], capabilities, principal.token_id, h, now, now, address[:200]),
            )
        self.auth.add_session(h, worker_id, principal.token_id)
        with self._lock:
            self._known[worker_id] = now
        return worker_id, token

    def heartbeat(self, worker_id: str, progress: dict) -> None:
        now = time.time()
        with self._lock:
            if worker_id not in self._known:
                raise NotFound(f"unknown worker {worker_id}: register again with a join token")
            self._known[worker_id] = now
            self._seen[worker_id] = (now, json.dumps(progress, sort_keys=True))
        for callback in self.on_heartbeat:
            try:
                callback(worker_id, progress, now)
            except Exception:  # a listener's bug must not fail the worker's heartbeat
                log.exception("heartbeat listener failed")

    def touch(self, worker_id: str) -> None:
        """Any call from a worker counts as a sign of life."""
        with self._lock:
            if worker_id in self._known:
                self._known[worker_id] = self._touched[worker_id] = time.time()

    def flush(self) -> None:
        with self._lock:
            pending, self._seen = self._seen, {}
            touched, self._touched = self._touched, {}
        if not pending and not touched:
            return
        with self.store.tx() as c:
            c.executemany(
                "UPDATE workers SET last_seen=MAX(last_seen, ?), progress_json=? WHERE id=?",
                [(seen, progress, wid) for wid, (seen, progress) in pending.items()],
            )
            c.executemany(
                "UPDATE workers SET last_seen=MAX(last_seen, ?) WHERE id=?",
                [(seen, wid) for wid, seen in touched.items() if wid not in pending],
            )

    def leave(self, worker_id: str) -> None:
        with self.store.tx() as c:
            c.execute("UPDATE workers SET left_at=? WHERE id=?", (time.time(), worker_id))
            c.execute(
                "UPDATE assignments SET state=?, message='worker left' WHERE worker_id=? AND state=?",
                (AssignmentState.ABORTED, worker_id, AssignmentState.ACTIVE),
            )
        self.auth.drop_worker(worker_id)
        with self._lock:
            self._known.pop(worker_id, None)
            self._seen.pop(worker_id, None)
        for callback in self.on_leave:
            callback(worker_id)

    def last_seen(self, worker_id: str) -> float | None:
        with self._lock:
            return self._known.get(worker_id)

    def is_active(self, worker_id: str, now: float | None = None) -> bool:
        seen = self.last_seen(worker_id)
        return seen is not None and (now or time.time()) - seen < self.gone_after_s

    def list(
        self, include_gone: bool = False, after: int | None = None, limit: int = -1
    ) -> list[tuple[int, WorkerRow]]:
        """(key, row) of registered workers in registration order (gone ones only with ``include_gone``),
        from after key ``after``, at most ``limit`` (-1: all). The key is the row's SQLite rowid."""
        self.flush()
        now = time.time()
        active = {
            r["worker_id"]: r["id"]
            for r in self.store.all(
                "SELECT a.worker_id, a.id FROM assignments a JOIN rounds r ON r.id=a.round_id "
                "WHERE a.state=? AND r.state=?",
                (AssignmentState.ACTIVE, RoundState.OPEN),
            )
        }
        where, args = "rowid > ?", [-1 if after is None else int(after)]
        if not include_gone:
            where += " AND left_at IS NULL AND last_seen > ?"
            args.append(now - self.gone_after_s)
        out = []
        for r in self.store.all(
            f"SELECT rowid AS k, * FROM workers WHERE {where} ORDER BY rowid LIMIT ?", (*args, limit)
        ):
            gone = r["left_at"] is not None or now - r["last_seen"] >= self.gone_after_s
            state = (
                WorkerState.GONE if gone else (WorkerState.WORKING if r["id"] in active else WorkerState.IDLE)
            )
            row = WorkerRow(
                id=r["id"],
                name=r["name"],
                capabilities=bytes(r["capabilities"]),
                registered_at=r["registered_at"],
                last_seen=r["last_seen"],
                state=state,
                assignment_id=active.get(r["id"], ""),
                progress_json=r["progress_json"],
                token_id=r["token_id"],
                address=r["address"],
            )
            out.append((int(r["k"]), row))
        return out

    def counts(self) -> tuple[int, int]:
        """(registered and not left, active now)."""
        now = time.time()
        with self._lock:
            total = len(self._known)
            act = sum(1 for seen in self._known.values() if now - seen < self.gone_after_s)
        return total, act
