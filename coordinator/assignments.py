"""Assignments: which worker does which part of the open round, and what it is told to do.

A worker that asks (GetAssignment) gets its active assignment in the open round,
or a new one: shard ``i`` of the round's quorum, ``i`` in assignment order. The
task it carries is a ``FusionTask`` (:func:`~coldswarm.coordinator.rounds.fusion_task`)
or a ``PretrainTask`` (:func:`pretrain_task`), built from the round's options.
A worker whose part is done gets no second one in the same round; one that goes
silent loses its assignment (:meth:`Assignments.expire_silent`, on the ticker)
and gets a fresh one when it is back.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coldswarm.common import round_options
from coldswarm.common.quoting import quote
from coldswarm.coordinator.errors import InvalidArgument, NotFound, PermissionDenied
from coldswarm.coordinator.rounds import RoundRow, RoundStateMachine, fusion_task
from coldswarm.coordinator.states import REPORTED_OUTCOMES, AssignmentState, RoundKind, RoundState
from coldswarm.coordinator.store import Store
from coldswarm.coordinator.workers import WorkerRegistry


@dataclass
class AssignmentInfo:
    id: str
    round_id: int
    base_version: int
    kind: str  # a RoundKind: which task ``task`` holds the fields of
    deadline: float
    task: dict = field(default_factory=dict)


def pretrain_task(rnd: RoundRow, initial_peers: list[str], index: int, n: int) -> dict:
    """The ``PretrainTask`` fields of shard ``index`` of ``n`` in pretrain round ``rnd``."""
    opts = rnd.options
    return {
        "run_id": rnd.run_id,
        "initial_peers": list(initial_peers),
        "target_batch_size": int(opts.get("target_batch_size", 64)),
        "corpus_shard": f"{opts.get('corpus_prefix', 'corpus')}:{index}-of-{n}",
        "hyperparameters_json": json.dumps(round_options.pretrain_task_hyperparameters(opts), sort_keys=True),
        "epochs": int(opts.get("epochs", 1)),
    }


class Assignments:
    """The ``assignments`` table: hand out, report, cancel, expire."""

    def __init__(
        self,
        store: Store,
        rounds: RoundStateMachine,
        workers: WorkerRegistry,
        dht_peers: Callable[[], list[str]],
    ):
        self.store = store
        self.rounds = rounds
        self.workers = workers
        self.dht_peers = dht_peers

    def assign(self, worker_id: str) -> AssignmentInfo | None:
        """The worker's current assignment in the open round, or a new one; None when there is no work."""
        with self.rounds.lock:  # the round stays open while its assignment is made
            rnd = self.rounds.open()
            if rnd is None:
                return None
            existing = self.store.one(
                "SELECT * FROM assignments WHERE round_id=? AND worker_id=? AND state=?",
                (rnd.id, worker_id, AssignmentState.ACTIVE),
            )
            if existing is not None:
                return self._info(rnd, existing["id"], existing["shard_index"])
            if self._part_done(rnd, worker_id):
                # A pretrain worker that finished its epochs must not start the run again while the
                # checkpointer collects it.
                return None
            with self.store.tx() as c:
                index = int(
                    c.execute("SELECT COUNT(*) FROM assignments WHERE round_id=?", (rnd.id,)).fetchone()[0]
                )
                index %= max(rnd.quorum, 1)
                assignment_id = f"a-{rnd.id}-{secrets.token_hex(4)}"
                c.execute(
                    "INSERT INTO assignments(id, round_id, worker_id, shard_index, state, created_at, deadline) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        assignment_id,
                        rnd.id,
                        worker_id,
                        index,
                        AssignmentState.ACTIVE,
                        time.time(),
                        rnd.deadline,
                    ),
                )
            return self._info(rnd, assignment_id, index)

    def _part_done(self, rnd: RoundRow, worker_id: str) -> bool:
        """This worker finished its part of ``rnd`` (a fusion worker: its contribution was accepted)."""
        if self.store.one(
            "SELECT 1 FROM assignments WHERE round_id=? AND worker_id=? AND state=?",
            (rnd.id, worker_id, AssignmentState.DONE),
        ):
            return True
        return rnd.kind == RoundKind.FUSION and bool(
            self.store.one(
                "SELECT 1 FROM contributions WHERE round_id=? AND worker_id=?", (rnd.id, worker_id)
            )
        )

    def _info(self, rnd: RoundRow, assignment_id: str, index: int) -> AssignmentInfo:
        n = max(rnd.quorum, 1)
        if rnd.kind == RoundKind.FUSION:
            task = fusion_task(rnd.options, rnd.method, index, n)
        else:
            task = pretrain_task(rnd, self.dht_peers(), index, n)
        return AssignmentInfo(assignment_id, rnd.id, rnd.base_version, rnd.kind, rnd.deadline, task)

    def report(self, worker_id: str, assignment_id: str, outcome: str, message: str) -> None:
        if outcome not in REPORTED_OUTCOMES:
            raise InvalidArgument(f"outcome {quote(outcome)} is not one of {', '.join(REPORTED_OUTCOMES)}")
        row = self.owned(worker_id, assignment_id)
        with self.store.tx() as c:
            c.execute(
                "UPDATE assignments SET state=?, message=? WHERE id=?", (outcome, message[:2000], row["id"])
            )

    def owned(self, worker_id: str, assignment_id: str) -> sqlite3.Row:
        """The assignment's row, if it is ``worker_id``'s."""
        row = self.store.one("SELECT * FROM assignments WHERE id=?", (assignment_id,))
        if row is None:
            raise NotFound(f"no assignment {quote(assignment_id)}: ask GetAssignment for work")
        if row["worker_id"] != worker_id:
            raise PermissionDenied(f"assignment {assignment_id} belongs to another worker")
        return row

    def mark_done(self, c: sqlite3.Connection, assignment_id: str) -> None:
        """In the caller's transaction (the one that accepts its contribution): the assignment is done."""
        c.execute("UPDATE assignments SET state=? WHERE id=?", (AssignmentState.DONE, assignment_id))

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
        # A done assignment is not cancelled: a pretrain worker serves its state until it is collected.
        return r["r_state"] != RoundState.OPEN or r["a_state"] not in (
            AssignmentState.ACTIVE,
            AssignmentState.DONE,
        )

    def expire_silent(self, now: float | None = None) -> None:
        """Free the assignments (in open rounds) of workers gone silent (the ticker calls this)."""
        now = time.time() if now is None else now
        stale = [
            r["id"]
            for r in self.store.all(
                "SELECT a.id, a.worker_id FROM assignments a JOIN rounds r ON r.id=a.round_id "
                "WHERE a.state=? AND r.state=?",
                (AssignmentState.ACTIVE, RoundState.OPEN),
            )
            if not self.workers.is_active(r["worker_id"], now)
        ]
        if stale:
            with self.store.tx() as c:
                c.executemany(
                    "UPDATE assignments SET state=?, message='worker went silent' WHERE id=?",
                    [(AssignmentState.EXPIRED, i) for i in stale],
                )
