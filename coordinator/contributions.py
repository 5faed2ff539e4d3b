"""Contributions: which uploads a fusion round may take, and the rows of those it took.

The upload path (:mod:`coldswarm.coordinator.uploads`) asks :meth:`Contributions.check_can_contribute`
at BeginUpload and again before it commits, and inserts the accepted contribution with
:meth:`Contributions.add` in the transaction that commits it. A contribution names the base version it was
trained from; one trained from another version than its round's base is refused (FAILED_PRECONDITION),
never merged. One contribution per worker per round.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from coldswarm.coordinator.assignments import Assignments
from coldswarm.coordinator.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from coldswarm.coordinator.rounds import RoundRow, RoundStateMachine
from coldswarm.coordinator.states import ContributionState, RoundKind, RoundState
from coldswarm.coordinator.store import Store


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
    state: str  # a ContributionState
    created_at: float


def _contribution(r: sqlite3.Row) -> ContributionRow:
    return ContributionRow(
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


class Contributions:
    """The ``contributions`` table: admission of uploads to a round, and reading what was admitted."""

    def __init__(self, store: Store, rounds: RoundStateMachine, assignments: Assignments):
        self.store = store
        self.rounds = rounds
        self.assignments = assignments

    def list(
        self, round_id: int | None = None, after: int | None = None, limit: int = -1
    ) -> list[ContributionRow]:
        """A round's contributions (all of them without ``round_id``), in the order they were accepted,
        after contribution ``after``, at most ``limit`` (-1: all)."""
        start = -1 if after is None else int(after)
        if round_id is not None:
            self.rounds.get(round_id)
            rows = self.store.all(
                "SELECT * FROM contributions WHERE round_id=? AND id > ? ORDER BY id LIMIT ?",
                (round_id, start, limit),
            )
        else:
            rows = self.store.all(
                "SELECT * FROM contributions WHERE id > ? ORDER BY id LIMIT ?", (start, limit)
            )
        return [_contribution(r) for r in rows]

    def check_can_contribute(
        self, worker_id: str, round_id: int, base_version: int, assignment_id: str
    ) -> RoundRow:
        """Refuse early (at BeginUpload) what the commit would refuse anyway."""
        rnd = self.rounds.get(round_id)
        if rnd.kind != RoundKind.FUSION:
            raise FailedPrecondition(f"round {round_id} is a {rnd.kind} round; it takes no uploads")
        if rnd.state != RoundState.OPEN:
            raise FailedPrecondition(f"round {round_id} is {rnd.state} and takes no more contributions")
        if base_version != rnd.base_version:
            raise FailedPrecondition(
                f"round {round_id} merges onto version {rnd.base_version}, but this contribution was "
                f"trained from version {base_version}: download version {rnd.base_version} and train again"
            )
        if assignment_id:
            row = self.assignments.owned(worker_id, assignment_id)
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

    def add(self, c: sqlite3.Connection, *, worker_id: str, round_id: int, fields: dict) -> int:
        """Insert an accepted contribution inside the caller's transaction; returns its id."""
        rnd = self.store.one("SELECT state, base_version FROM rounds WHERE id=?", (round_id,))
        if rnd is None or rnd["state"] != RoundState.OPEN:
            state = "gone" if rnd is None else rnd["state"]
            raise FailedPrecondition(f"round {round_id} is {state} and takes no more contributions")
        if c.execute(
            "SELECT 1 FROM contributions WHERE round_id=? AND worker_id=?", (round_id, worker_id)
        ).fetchone():
            raise AlreadyExists(f"worker {worker_id} already contributed to round {round_id}")
        cur = c.execute(
            "INSERT INTO contributions(round_id, worker_id, assignment_id, base_version, form, size, sha256, "
            "payload_sha256, codec, num_examples, metrics_json, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ContributionState.ACCEPTED,
                time.time(),
            ),
        )
        if fields["assignment_id"]:
            self.assignments.mark_done(c, fields["assignment_id"])
        return int(cur.lastrowid)

    def mark_merged(self, c: sqlite3.Connection, merged: list[int], screened_out: set[int]) -> None:
        """In the transaction that records their merge: what became of each contribution merged."""
        c.executemany(
            "UPDATE contributions SET state=? WHERE id=?",
            [
                (ContributionState.SCREENED_OUT if i in screened_out else ContributionState.MERGED, i)
                for i in merged
            ],
        )
