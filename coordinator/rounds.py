"""Rounds: opening, assignments, closing, and the merge → evaluate → publish pipeline.

A round has a kind (``fusion`` or ``pretrain``), a base version, a quorum and a
deadline. States::

    open ──quorum / deadline / CloseRound──▶ closing ──▶ merging ──▶ published
      │                                         │            └──────▶ failed
      └──CloseRound(cancel)──▶ cancelled        └ (pretrain: the checkpointer records a version)

Every transition is a committed row before the work it starts, so after a kill
a round found ``closing`` or ``merging`` is merged again at start; the merge
reads the same base and the same accepted contributions in the same order, so it
re-runs to the same weights. A version row appears only in the transaction that
marks the round published.

Merges run on one background thread; RPCs never wait for them (the admin
``Merge`` RPC, a deliberate re-merge, is the one exception and says so).

Hooks for other parts of coldswarm:

- :meth:`RoundManager.record_version` — the pretrain checkpointer (``coordinator/
  checkpointer.py``) calls it with a directory of averaged weights;
- ``dht_peers`` (at construction) — a callable returning the DHT bootstrap multiaddrs
  handed out in pretrain assignments (the pretrain collector's, or the configured ``dht_peers``).
"""

from __future__ import annotations

import importlib
import json
import logging
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coldswarm.coordinator import merge as merge_bridge
from coldswarm.coordinator.blobs import BlobStore
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.errors import (
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from coldswarm.coordinator.store import Store
from coldswarm.coordinator.versions import RUN_ID, VersionRow, VersionStore
from coldswarm.coordinator.workers import WorkerRegistry

log = logging.getLogger(__name__)

KINDS = ("fusion", "pretrain")
LIVE_STATES = ("open", "closing", "merging")
# The statistics a merge method needs from every worker (fusion/ collects them).
STATISTICS_FOR = {"fisher": ["fisher"], "regmean": ["regmean"]}


@dataclass
class RoundRow:
    id: int
    kind: str
    base_version: int
    state: str
    quorum: int
    deadline: float
    method: str
    options: dict
    options_json: str
    contributions: int
    result_version: int | None
    error: str
    opened_at: float
    closed_at: float
    run_id: str


@dataclass
class AssignmentInfo:
    id: str
    round_id: int
    base_version: int
    kind: str
    deadline: float
    task: dict = field(default_factory=dict)


@dataclass
class ContributionRow:
    id: int
    round_id: int
    worker_id: str
    base_version: int
    form: str
    size: int
    sha256: str
    num_examples: int
    metrics_json: str
    state: str
    created_at: float


def _round(r, count: int) -> RoundRow:
    return RoundRow(
        id=r["id"],
        kind=r["kind"],
        base_version=r["base_version"],
        state=r["state"],
        quorum=r["quorum"],
        deadline=r["deadline"],
        method=r["method"],
        options=json.loads(r["options_json"] or "{}"),
        options_json=r["options_json"],
        contributions=count,
        result_version=r["result_version"],
        error=r["error"],
        opened_at=r["opened_at"],
        closed_at=r["closed_at"],
        run_id=r["hivemind_run_id"],
    )


def _load_evaluator(spec: str) -> Callable[[Path], dict] | None:
    if not spec:
        return None
    module, _, func = spec.partition(":")
    if not func:
        raise ValueError(f"evaluator {spec!r} must be 'module:function'")
    return getattr(importlib.import_module(module), func)


class RoundManager:
    """Rounds, assignments and contributions over the state; runs merges on a background thread."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        versions: VersionStore,
        workers: WorkerRegistry,
        config: CoordinatorConfig,
        dht_peers: Callable[[], list[str]],
    ):
        self.store = store
        self.blobs = blobs
        self.versions = versions
        self.workers = workers
        self.config = config
        self.dht_peers = dht_peers
        self.evaluator = _load_evaluator(config.evaluator)
        self._lock = threading.RLock()  # serialises state transitions of rounds
        self._merge_lock = threading.Lock()  # one merge at a time (memory)
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_round_opened: list[Callable[[RoundRow], None]] = []
        self.on_round_closed: list[Callable[[RoundRow], None]] = []

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the merge thread and re-queue merges a kill interrupted."""
        self._thread = threading.Thread(target=self._merge_loop, name="coldswarm-merge", daemon=True)
        self._thread.start()
        for r in self.store.all(
            "SELECT id FROM rounds WHERE kind='fusion' AND state IN ('closing', 'merging') ORDER BY id"
        ):
            log.info("round %d was interrupted while merging: merging it again", r["id"])
            self._queue.put(r["id"])

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- reading --------------------------------------------------------------------------

    def get(self, round_id: int) -> RoundRow:
        r = self.store.one("SELECT * FROM rounds WHERE id=?", (round_id,))
        if r is None:
            raise NotFound(f"no round {round_id}: `coldswarm-admin rounds` lists them")
        return _round(r, self._count(round_id))

    def _count(self, round_id: int) -> int:
        return int(self.store.one("SELECT COUNT(*) FROM contributions WHERE round_id=?", (round_id,))[0])

    def list(self) -> list[RoundRow]:
        return [self.get(r["id"]) for r in self.store.all("SELECT id FROM rounds ORDER BY id")]

    def live(self) -> RoundRow | None:
        """The round that is open, closing or merging, if any (at most one is)."""
        r = self.store.one(
            "SELECT id FROM rounds WHERE state IN ('open', 'closing', 'merging') ORDER BY id DESC LIMIT 1"
        )
        return None if r is None else self.get(r["id"])

    def contributions(self, round_id: int | None = None) -> list[ContributionRow]:
        if round_id is not None:
            self.get(round_id)
            rows = self.store.all("SELECT * FROM contributions WHERE round_id=? ORDER BY id", (round_id,))
        else:
            rows = self.store.all("SELECT * FROM contributions ORDER BY id")
        return [
            ContributionRow(
                id=r["id"],
                round_id=r["round_id"],
                worker_id=r["worker_id"],
                base_version=r["base_version"],
                form=r["form"],
                size=r["size"],
                sha256=r["sha256"],
                num_examples=r["num_examples"],
                metrics_json=r["metrics_json"],
                state=r["state"],
                created_at=r["created_at"],
            )
            for r in rows
        ]

    # -- opening and closing --------------------------------------------------------------

    def open_round(
        self,
        kind: str,
        base_version: int | None = None,
        quorum: int = 0,
        deadline_s: float = 0.0,
        method: str = "",
        options_json: str = "",
    ) -> RoundRow:
        if kind not in KINDS:
            raise InvalidArgument(f"round kind {kind!r} is not one of {list(KINDS)}")
        try:
            options = json.loads(options_json) if options_json.strip() else {}
        except ValueError as exc:
            raise InvalidArgument(f"options are not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise InvalidArgument('options must be a JSON object, e.g. \'{"peft_method": "lora"}\'')
        if quorum < 0 or deadline_s < 0:
            raise InvalidArgument("quorum and deadline must not be negative")
        method = method or self.config.default_method
        if kind == "fusion" and method not in merge_bridge.available_methods():
            raise InvalidArgument(
                f"merge method {method!r} is not available; choose one of {merge_bridge.available_methods()}"
            )
        if kind == "fusion":
            check_fusion_options(options, method)
        if kind == "pretrain":
            method = "pretrain"
            if not self.dht_peers():
                raise FailedPrecondition(
                    "a pretrain round needs a hivemind DHT for its workers to meet in, and this coordinator "
                    "runs none: restart it with --dht-listen /ip4/0.0.0.0/tcp/31337 (it then also collects "
                    "the round's result), or name a running swarm's peers with --dht-peers"
                )
        base = self.versions.resolve("latest" if base_version is None else base_version)
        now = time.time()
        with self._lock, self.store.tx() as c:
            live = c.execute(
                "SELECT id, state FROM rounds WHERE state IN ('open', 'closing', 'merging')"
            ).fetchone()
            if live is not None:
                raise FailedPrecondition(
                    f"round {live['id']} is still {live['state']}: close it (`coldswarm-admin round close`) "
                    "or wait for its merge before opening another"
                )
            cur = c.execute(
                "INSERT INTO rounds(run_id, kind, base_version, state, quorum, deadline, method, options_json, "
                "opened_at) VALUES (?, ?, ?, 'open', ?, ?, ?, ?, ?)",
                (
                    RUN_ID,
                    kind,
                    base,
                    quorum or self.config.default_quorum,
                    now + (deadline_s or self.config.default_deadline_s),
                    method,
                    json.dumps(options, sort_keys=True),
                    now,
                ),
            )
            round_id = int(cur.lastrowid)
            if kind == "pretrain":
                run_id = str(options.get("run_id") or f"coldswarm-r{round_id}")
                c.execute("UPDATE rounds SET hivemind_run_id=? WHERE id=?", (run_id, round_id))
        rnd = self.get(round_id)
        for hook in self.on_round_opened:
            try:
                hook(rnd)
            except Exception:  # a hook's bug must not fail the admin's request
                log.exception("round-opened hook failed for round %d", round_id)
        return rnd

    def close_round(
        self, round_id: int | None = None, cancel: bool = False, reason: str = "closed"
    ) -> RoundRow:
        """Stop accepting work; a fusion round then merges (unless ``cancel``)."""
        with self._lock:
            if round_id is None:
                live = self.store.one("SELECT id FROM rounds WHERE state='open' ORDER BY id DESC LIMIT 1")
                if live is None:
                    raise FailedPrecondition("no round is open: `coldswarm-admin rounds` lists them")
                round_id = int(live["id"])
            rnd = self.get(round_id)
            # A pretrain round waiting for its checkpoint may still be cancelled.
            if rnd.state != "open" and not (cancel and rnd.kind == "pretrain" and rnd.state == "closing"):
                raise FailedPrecondition(f"round {round_id} is {rnd.state}, not open")
            now = time.time()
            with self.store.tx() as c:
                c.execute(
                    "UPDATE assignments SET state='aborted', message=? WHERE round_id=? AND state='active'",
                    (f"round {reason}", round_id),
                )
                if cancel:
                    c.execute(
                        "UPDATE rounds SET state='cancelled', closed_at=?, error=? WHERE id=?",
                        (now, "cancelled by the admin", round_id),
                    )
                elif rnd.kind == "fusion" and rnd.contributions == 0:
                    c.execute(
                        "UPDATE rounds SET state='failed', closed_at=?, error=? WHERE id=?",
                        (now, f"{reason} with no contributions", round_id),
                    )
                elif rnd.kind == "pretrain" and rnd.result_version is not None:
                    c.execute("UPDATE rounds SET state='published', closed_at=? WHERE id=?", (now, round_id))
                elif rnd.kind == "pretrain" and not self.on_round_closed:
                    c.execute(
                        "UPDATE rounds SET state='failed', closed_at=?, error=? WHERE id=?",
                        (now, f"{reason}; no pretrain checkpointer is running to record a version", round_id),
                    )
                else:
                    c.execute("UPDATE rounds SET state='closing', closed_at=? WHERE id=?", (now, round_id))
            rnd = self.get(round_id)
        log.info("round %d %s: now %s", round_id, reason, rnd.state)
        if rnd.kind == "fusion" and rnd.state == "closing":
            self._queue.put(round_id)
        for hook in self.on_round_closed:
            try:
                hook(rnd)
            except Exception:  # a hook's bug must not wedge the round
                log.exception("round-closed hook failed for round %d", round_id)
        return rnd

    def tick(self) -> None:
        """Close rounds whose deadline passed; free the assignments of workers gone silent."""
        now = time.time()
        stale = [
            r["id"]
            for r in self.store.all(
                "SELECT a.id, a.worker_id FROM assignments a JOIN rounds r ON r.id=a.round_id "
                "WHERE a.state='active' AND r.state='open'"
            )
            if not self.workers.is_active(r["worker_id"], now)
        ]
        if stale:
            with self.store.tx() as c:
                c.executemany(
                    "UPDATE assignments SET state='expired', message='worker went silent' WHERE id=?",
                    [(i,) for i in stale],
                )
        for r in self.store.all(
            "SELECT id FROM rounds WHERE state='open' AND deadline>0 AND deadline<?", (now,)
        ):
            try:
                self.close_round(int(r["id"]), reason="reached its deadline")
            except CoordinatorError:
                pass  # closed meanwhile

    # -- assignments ----------------------------------------------------------------------

    def get_assignment(self, worker_id: str) -> AssignmentInfo | None:
        """The worker's current assignment in the open round, or a new one; None when there is no work."""
        with self._lock:
            rnd_row = self.store.one("SELECT id FROM rounds WHERE state='open' ORDER BY id DESC LIMIT 1")
            if rnd_row is None:
                return None
            rnd = self.get(int(rnd_row["id"]))
            existing = self.store.one(
                "SELECT * FROM assignments WHERE round_id=? AND worker_id=? AND state='active'",
                (rnd.id, worker_id),
            )
            if existing is not None:
                return self._assignment(rnd, existing["id"], existing["shard_index"])
            if self.store.one(
                "SELECT 1 FROM assignments WHERE round_id=? AND worker_id=? AND state='done'",
                (rnd.id, worker_id),
            ) or (
                rnd.kind == "fusion"
                and self.store.one(
                    "SELECT 1 FROM contributions WHERE round_id=? AND worker_id=?", (rnd.id, worker_id)
                )
            ):
                # This worker's part of the round is done (a pretrain worker that finished its epochs must
                # not start the run again while the checkpointer collects it).
                return None
            with self.store.tx() as c:
                index = int(
                    c.execute("SELECT COUNT(*) FROM assignments WHERE round_id=?", (rnd.id,)).fetchone()[0]
                )
                index %= max(rnd.quorum, 1)
                assignment_id = f"a-{rnd.id}-{secrets.token_hex(4)}"
                c.execute(
                    "INSERT INTO assignments(id, round_id, worker_id, shard_index, state, created_at, deadline) "
                    "VALUES (?, ?, ?, ?, 'active', ?, ?)",
                    (assignment_id, rnd.id, worker_id, index, time.time(), rnd.deadline),
                )
            return self._assignment(rnd, assignment_id, index)

    def _assignment(self, rnd: RoundRow, assignment_id: str, index: int) -> AssignmentInfo:
        opts = rnd.options
        n = max(rnd.quorum, 1)
        if rnd.kind == "fusion":
            task = fusion_task(opts, rnd.method, index, n)
        else:
            task = {
                "run_id": rnd.run_id,
                "initial_peers": list(self.dht_peers()),
                "target_batch_size": int(opts.get("target_batch_size", 64)),
                "corpus_shard": f"{opts.get('corpus_prefix', 'corpus')}:{index}-of-{n}",
                "hyperparameters_json": json.dumps(opts.get("hyperparameters", {}), sort_keys=True),
                "epochs": int(opts.get("epochs", 1)),
            }
        return AssignmentInfo(assignment_id, rnd.id, rnd.base_version, rnd.kind, rnd.deadline, task)

    def report_assignment(self, worker_id: str, assignment_id: str, outcome: str, message: str) -> None:
        if outcome not in ("done", "failed", "aborted"):
            raise InvalidArgument(f"outcome {outcome!r} is not one of done, failed, aborted")
        row = self._own_assignment(worker_id, assignment_id)
        with self.store.tx() as c:
            c.execute(
                "UPDATE assignments SET state=?, message=? WHERE id=?", (outcome, message[:2000], row["id"])
            )

    def _own_assignment(self, worker_id: str, assignment_id: str):
        row = self.store.one("SELECT * FROM assignments WHERE id=?", (assignment_id,))
        if row is None:
            raise NotFound(f"no assignment {assignment_id!r}: ask GetAssignment for work")
        if row["worker_id"] != worker_id:
            raise PermissionDenied(f"assignment {assignment_id} belongs to another worker")
        return row

    def should_cancel(self, worker_id: str, assignment_id: str) -> bool:
        """Heartbeat's answer: stop working on ``assignment_id`` (its round is no longer open)."""
        if not assignment_id:
            return False
        r = self.store.one(
            "SELECT a.worker_id, a.state AS a_state, r.state AS r_state FROM assignments a "
            "JOIN rounds r ON r.id=a.round_id WHERE a.id=?",
            (assignment_id,),
        )
        if r is None or r["worker_id"] != worker_id:
            return True
        return r["r_state"] != "open" or r["a_state"] not in ("active", "done")

    # -- contributions --------------------------------------------------------------------

    def check_can_contribute(
        self, worker_id: str, round_id: int, base_version: int, assignment_id: str
    ) -> RoundRow:
        """Refuse early (at BeginUpload) what the commit would refuse anyway."""
        rnd = self.get(round_id)
        if rnd.kind != "fusion":
            raise FailedPrecondition(f"round {round_id} is a {rnd.kind} round; it takes no uploads")
        if rnd.state != "open":
            raise FailedPrecondition(f"round {round_id} is {rnd.state} and takes no more contributions")
        if base_version != rnd.base_version:
            raise FailedPrecondition(
                f"round {round_id} merges onto version {rnd.base_version}, but this contribution was "
                f"trained from version {base_version}: download version {rnd.base_version} and train again"
            )
        if assignment_id:
            row = self._own_assignment(worker_id, assignment_id)
            if row["round_id"] != round_id:
                raise InvalidArgument(
                    f"assignment {assignment_id} is for round {row['round_id']}, not {round_id}"
                )
        if self.store.one(
            "SELECT 1 FROM contributions WHERE round_id=? AND worker_id=?", (round_id, worker_id)
        ):
            raise AlreadyExists(
                f"worker {worker_id} already contributed to round {round_id}; one contribution per worker "
                "per round (wait for the next round)"
            )
        return rnd

    def add_contribution(self, c, *, worker_id: str, round_id: int, fields: dict) -> int:
        """Insert an accepted contribution inside the caller's transaction; returns its id."""
        rnd = self.store.one("SELECT state, base_version FROM rounds WHERE id=?", (round_id,))
        if rnd is None or rnd["state"] != "open":
            state = "gone" if rnd is None else rnd["state"]
            raise FailedPrecondition(f"round {round_id} is {state} and takes no more contributions")
        if c.execute(
            "SELECT 1 FROM contributions WHERE round_id=? AND worker_id=?", (round_id, worker_id)
        ).fetchone():
            raise AlreadyExists(f"worker {worker_id} already contributed to round {round_id}")
        cur = c.execute(
            "INSERT INTO contributions(round_id, worker_id, assignment_id, base_version, form, size, sha256, "
            "payload_sha256, codec, num_examples, metrics_json, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'accepted', ?)",
            (
                round_id,
                worker_id,
                fields["assignment_id"],
                rnd["base_version"],
                fields["form"],
                fields["size"],
                fields["sha256"],
                fields["payload_sha256"],
                fields["codec"],
                fields["num_examples"],
                fields["metrics_json"],
                time.time(),
            ),
        )
        if fields["assignment_id"]:
            c.execute("UPDATE assignments SET state='done' WHERE id=?", (fields["assignment_id"],))
        return int(cur.lastrowid)

    def after_contribution(self, round_id: int) -> None:
        """Close the round once it has its quorum."""
        rnd = self.get(round_id)
        if rnd.state == "open" and rnd.contributions >= rnd.quorum:
            try:
                self.close_round(round_id, reason="reached its quorum")
            except FailedPrecondition:
                pass

    # -- merging --------------------------------------------------------------------------

    def _merge_loop(self) -> None:
        while not self._stop.is_set():
            round_id = self._queue.get()
            if round_id is None:
                return
            try:
                self._merge_round(round_id)
            except Exception as exc:  # recorded on the round; the thread keeps serving other rounds
                log.exception("merge of round %d failed", round_id)
                with self.store.tx() as c:
                    c.execute(
                        "UPDATE rounds SET state='failed', error=? WHERE id=? AND state IN ('closing', 'merging')",
                        (f"merge failed: {exc}"[:2000], round_id),
                    )

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until queued merges are done (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and not self._merge_lock.locked():
                live = self.store.one("SELECT 1 FROM rounds WHERE state IN ('closing', 'merging')")
                if live is None:
                    return
            time.sleep(0.05)
        raise TimeoutError("merges still running")

    def _merge_round(self, round_id: int) -> None:
        rnd = self.get(round_id)
        if rnd.state not in ("closing", "merging"):
            return
        with self.store.tx() as c:
            c.execute("UPDATE rounds SET state='merging' WHERE id=?", (round_id,))
        self._merge(
            rnd, rnd.method, rnd.options.get("merge", {}), publish=self.config.auto_publish, final=True
        )

    def merge_now(self, round_id: int, method: str = "", options_json: str = "") -> VersionRow:
        """Admin re-merge of a finished round into a candidate version (runs in the caller's thread).

        ``round_id`` 0 means the latest fusion round that has finished.
        """
        if not round_id:
            r = self.store.one(
                "SELECT id FROM rounds WHERE kind='fusion' AND state IN ('published', 'failed', 'merged') "
                "ORDER BY id DESC LIMIT 1"
            )
            if r is None:
                raise FailedPrecondition("no fusion round has finished yet: there is nothing to re-merge")
            round_id = int(r["id"])
        rnd = self.get(round_id)
        if rnd.kind != "fusion":
            raise FailedPrecondition(f"round {round_id} is a {rnd.kind} round; only fusion rounds merge")
        if rnd.state not in ("published", "failed", "merged"):
            raise FailedPrecondition(
                f"round {round_id} is {rnd.state}: re-merge a round after it has published or failed"
            )
        if rnd.contributions == 0:
            raise FailedPrecondition(f"round {round_id} has no contributions to merge")
        method = method or rnd.method
        if method not in merge_bridge.available_methods():
            raise InvalidArgument(
                f"merge method {method!r} is not available; one of {merge_bridge.available_methods()}"
            )
        try:
            options = json.loads(options_json) if options_json.strip() else rnd.options.get("merge", {})
        except ValueError as exc:
            raise InvalidArgument(f"options are not valid JSON: {exc}") from None
        return self._merge(rnd, method, options, publish=False, final=False)

    def _merge(self, rnd: RoundRow, method: str, options: dict, publish: bool, final: bool) -> VersionRow:
        contributions = [c for c in self.contributions(rnd.id)]
        paths = [self.blobs.path(c.sha256) for c in contributions]
        with self._merge_lock:
            base_dir = self.versions.directory(rnd.base_version)
            work = self.blobs.temp_dir(prefix=f"merge-r{rnd.id}-")
            try:
                out = work / "model"
                t0 = time.monotonic()
                report = merge_bridge.merge(
                    base_dir,
                    paths,
                    method,
                    options,
                    out,
                    keys=[str(c.id) for c in contributions],
                    base_version=rnd.base_version,
                )
                dropped = {str(k) for k in (report or {}).get("dropped", [])}
                if self.config.merge_delay_s:
                    # Test hook (COLDSWARM_TEST_MERGE_DELAY_S): widen the window in which a kill
                    # lands mid-merge, after the weights are written but before anything is recorded.
                    time.sleep(self.config.merge_delay_s)
                metrics = {}
                if self.evaluator is not None:
                    metrics = dict(self.evaluator(out) or {})
                ids = [c.id for c in contributions]

                def mark(c, number: int) -> None:
                    if final:
                        c.execute(
                            "UPDATE rounds SET state=?, result_version=?, error='' WHERE id=?",
                            ("published" if publish else "merged", number, rnd.id),
                        )
                    c.executemany(
                        "UPDATE contributions SET state=? WHERE id=?",
                        [("screened_out" if str(i) in dropped else "merged", i) for i in ids],
                    )

                version = self.versions.create(
                    out,
                    parent=rnd.base_version,
                    round_id=rnd.id,
                    kind="fusion",
                    method=method,
                    contributions=[
                        {
                            "id": c.id,
                            "worker": c.worker_id,
                            "sha256": c.sha256,
                            "num_examples": c.num_examples,
                        }
                        for c in contributions
                    ],
                    metrics=metrics,
                    publish=publish,
                    extra={
                        "merge_report": _jsonable(report),
                        "merge_seconds": round(time.monotonic() - t0, 3),
                    },
                    on_commit=mark,
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
        log.info("round %d merged (%s) into version %d", rnd.id, method, version.number)
        return version

    def fail_round(self, round_id: int, error: str) -> None:
        """Mark a live round failed with ``error`` (e.g. the checkpointer could not collect)."""
        with self.store.tx() as c:
            c.execute(
                "UPDATE rounds SET state='failed', error=?, closed_at=COALESCE(NULLIF(closed_at, 0), ?) "
                "WHERE id=? AND state IN ('open', 'closing', 'merging')",
                (error[:2000], time.time(), round_id),
            )
            c.execute(
                "UPDATE assignments SET state='aborted', message=? WHERE round_id=? AND state='active'",
                ("round failed", round_id),
            )

    # -- the checkpointer's door ----------------------------------------------------------

    def record_version(
        self,
        model_dir: Path,
        round_id: int | None = None,
        kind: str = "pretrain",
        metrics: dict | None = None,
        publish: bool = True,
        method: str | None = None,
    ) -> VersionRow:
        """Record ``model_dir`` (an HF directory with safetensors weights) as the next version.

        For the pretrain checkpointer: call it with the averaged state written to a
        directory (it is copied into the blob store; the directory may be deleted after).
        With ``round_id`` the version's parent is that round's latest result (or its
        base), and a round that was ``closing`` becomes ``published``. Returns the version.
        """
        parent = self.versions.current()
        rnd = None
        if round_id is not None:
            rnd = self.get(round_id)
            parent = rnd.result_version if rnd.result_version is not None else rnd.base_version

        def mark(c, number: int) -> None:
            if rnd is None:
                return
            state = "published" if rnd.state == "closing" or rnd.state == "published" else rnd.state
            c.execute("UPDATE rounds SET result_version=?, state=? WHERE id=?", (number, state, rnd.id))

        return self.versions.create(
            Path(model_dir),
            parent=parent,
            round_id=round_id,
            kind=kind,
            method=method or kind,
            metrics=metrics or {},
            publish=publish,
            on_commit=mark,
        )


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=str))


def fusion_task(options: dict, method: str, index: int, n: int) -> dict:
    """The ``FusionTask`` fields of shard ``index`` of ``n`` in a fusion round with these options."""
    return {
        "shard": f"{options.get('shard_prefix', 'default')}:{index}-of-{n}",
        "peft_method": options.get("peft_method", "lora"),
        "hyperparameters_json": json.dumps(options.get("hyperparameters", {}), sort_keys=True),
        "statistics": list(options.get("statistics", STATISTICS_FOR.get(method, []))),
        "codec": options.get("codec", ""),  # empty: the worker's default (FusionHyperparameters.codec)
    }


def check_fusion_options(options: dict, method: str) -> None:
    """Refuse at OpenRound what every worker would refuse (a typo, an impossible combination), rather than
    let each of them fail its assignment until the deadline. Workers read the options the same way."""
    from coldswarm.proto import coldswarm_pb2 as pb
    from coldswarm.worker.fusion_job import hyperparameters_for

    try:
        hyperparameters_for(pb.FusionTask(**fusion_task(options, method, 0, 1)))
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"fusion round options: {exc}") from None
