"""Durable state: one SQLite database in WAL mode, with numbered migrations.

Every table the coordinator keeps lives here: runs, versions (and their files),
rounds, assignments, workers, contributions, tokens, uploads in progress and the
swarm's curves per pretrain round (:mod:`coldswarm.coordinator.series`) and the swarm
credentials issued (:mod:`coldswarm.coordinator.swarm_admission`).
Blobs (weights, contributions) are files in :mod:`coldswarm.coordinator.blobs`;
a row names a blob by sha256 only after the blob is complete and verified.

One connection is shared by all threads behind a lock: the coordinator's writes
are small and few (heartbeats are batched in memory), and one writer is what
SQLite wants anyway.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Append only: a migration, once released, never changes (databases in the field ran it).
MIGRATIONS: list[tuple[str, str]] = [
    (
        "initial schema",
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            current_version INTEGER
        );
        CREATE TABLE versions (
            number INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            parent INTEGER,
            round_id INTEGER,
            kind TEXT NOT NULL,
            method TEXT NOT NULL,
            state TEXT NOT NULL,
            manifest_json TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE version_files (
            version INTEGER NOT NULL REFERENCES versions(number),
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            PRIMARY KEY (version, path)
        );
        CREATE TABLE rounds (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(id),
            kind TEXT NOT NULL,
            base_version INTEGER NOT NULL,
            state TEXT NOT NULL,
            quorum INTEGER NOT NULL,
            deadline REAL NOT NULL,
            method TEXT NOT NULL,
            options_json TEXT NOT NULL,
            result_version INTEGER,
            error TEXT NOT NULL DEFAULT '',
            opened_at REAL NOT NULL,
            closed_at REAL NOT NULL DEFAULT 0,
            hivemind_run_id TEXT NOT NULL DEFAULT ''
        );
        CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            label TEXT NOT NULL,
            hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            capabilities BLOB NOT NULL,
            token_id TEXT NOT NULL,
            session_hash TEXT NOT NULL UNIQUE,
            registered_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            left_at REAL,
            progress_json TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE assignments (
            id TEXT PRIMARY KEY,
            round_id INTEGER NOT NULL REFERENCES rounds(id),
            worker_id TEXT NOT NULL REFERENCES workers(id),
            shard_index INTEGER NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            deadline REAL NOT NULL,
            message TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX assignments_by_worker ON assignments(worker_id, state);
        CREATE TABLE contributions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            round_id INTEGER NOT NULL REFERENCES rounds(id),
            worker_id TEXT NOT NULL REFERENCES workers(id),
            assignment_id TEXT NOT NULL,
            base_version INTEGER NOT NULL,
            form TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            payload_sha256 TEXT NOT NULL,
            codec TEXT NOT NULL,
            num_examples INTEGER NOT NULL,
            metrics_json TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            UNIQUE (round_id, worker_id)
        );
        CREATE TABLE uploads (
            id TEXT PRIMARY KEY,
            worker_id TEXT NOT NULL REFERENCES workers(id),
            round_id INTEGER NOT NULL,
            assignment_id TEXT NOT NULL,
            base_version INTEGER NOT NULL,
            total_size INTEGER NOT NULL,
            codec TEXT NOT NULL,
            num_examples INTEGER NOT NULL,
            metrics_json TEXT NOT NULL,
            created_at REAL NOT NULL,
            UNIQUE (worker_id, round_id)
        );
        """,
    ),
    (
        "swarm series per round; worker addresses",
        """
        CREATE TABLE round_series (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            round_id INTEGER NOT NULL REFERENCES rounds(id),
            source TEXT NOT NULL,
            t REAL NOT NULL,
            loss REAL,
            samples_per_s REAL,
            peers REAL,
            epoch REAL
        );
        CREATE INDEX round_series_by_round ON round_series(round_id, source, t);
        ALTER TABLE workers ADD COLUMN address TEXT NOT NULL DEFAULT ''
        """,
    ),
    (
        "swarm credentials",
        """
        CREATE TABLE swarm_credentials (
            round_id INTEGER NOT NULL REFERENCES rounds(id),
            worker_id TEXT NOT NULL REFERENCES workers(id),
            peer_id TEXT NOT NULL,
            public_key BLOB NOT NULL,
            issued_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (round_id, worker_id)
        )
        """,
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


def placeholders(values) -> str:
    """``?, ?, ?`` for binding ``values`` in ``IN (...)``: states and kinds go into SQL as parameters."""
    return ", ".join("?" * len(values))


class Store:
    """The coordinator's SQLite database. Use :meth:`tx` for anything that writes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly
        # the `with store.tx()` block and nothing commits half of it behind our back.
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._depth = 0
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss, not only a killed process.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=10000")
        self.migrate()

    def migrate(self) -> int:
        """Apply the migrations this database has not run yet; returns the schema version."""
        with self._lock:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            done = {r[0] for r in self._conn.execute("SELECT version FROM migrations")}
            if done and max(done) > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {max(done)}, newer than this coordinator's "
                    f"{SCHEMA_VERSION}: upgrade coldswarm"
                )
            for number, (name, sql) in enumerate(MIGRATIONS, start=1):
                if number in done:
                    continue
                with self.tx() as c:
                    for statement in sql.split(";"):
                        if statement.strip():
                            c.execute(statement)
                    c.execute(
                        "INSERT INTO migrations(version, name, applied_at) VALUES (?, ?, ?)",
                        (number, name, time.time()),
                    )
                    c.execute(f"PRAGMA user_version={number}")
            return self.schema_version()

    def schema_version(self) -> int:
        row = self.one("SELECT MAX(version) FROM migrations")
        return int(row[0] or 0)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (nested calls join the outer one); rolls back on any exception."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    def all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, args).fetchone()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
