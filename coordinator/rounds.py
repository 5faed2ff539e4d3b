"""The round state machine: a round's row, its transitions, and the one live round.

A round has a kind (:class:`~coldswarm.coordinator.states.RoundKind`), a base
version, a quorum and a deadline. States
(:class:`~coldswarm.coordinator.states.RoundState`)::

    open ──quorum / deadline / CloseRound──▶ closing ──▶ merging ──▶ published (merged: --no-auto-publish)
      │                                         │            └──────▶ failed
      └──CloseRound(cancel)──▶ cancelled        └ (pretrain: the checkpointer records a version)

Every transition is a committed row before the work it starts, so after a kill
a round found ``closing`` or ``merging`` is merged again at start
(:mod:`coldswarm.coordinator.merge_pipeline`); the merge reads the same base and
the same accepted contributions in the same order, so it re-runs to the same
weights. A version row appears only in the transaction that marks the round
published.

Every write to a round's state is a method here. Other parts of the coordinator
act on rounds through them:

- :mod:`~coldswarm.coordinator.assignments` and
  :mod:`~coldswarm.coordinator.contributions` read rounds and hold :attr:`RoundStateMachine.lock`
  to act on a round that must stay open meanwhile;
- the merge pipeline is given each fusion round that closes (``merge`` at
  construction) and marks it merging, merged/published or failed;
- ``on_round_opened`` / ``on_round_closed`` callbacks: the pretrain collector
  (:mod:`coldswarm.coordinator.pretrain_collector`) watches pretrain rounds there.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from coldswarm.common import round_options
from coldswarm.coordinator import merge as merge_bridge
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.errors import (
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from coldswarm.coordinator.states import (
    LIVE_STATES,
    MERGE_PENDING_STATES,
    REMERGEABLE_STATES,
    ROUND_KINDS,
    AssignmentState,
    RoundKind,
    RoundState,
)
from coldswarm.coordinator.store import Store, placeholders
from coldswarm.coordinator.versions import RUN_ID, VersionStore

log = logging.getLogger(__name__)


@dataclass
class RoundRow:
    id: int
    kind: str  # a RoundKind
    base_version: int
    state: str  # a RoundState
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


# A round with its number of contributions, in one read.
_SELECT_ROUND = (
    "SELECT r.*, (SELECT COUNT(*) FROM contributions c WHERE c.round_id=r.id) AS n_contributions "
    "FROM rounds r WHERE r.id=?"
)


def _round(r: sqlite3.Row) -> RoundRow:
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
        contributions=int(r["n_contributions"]),
        result_version=r["result_version"],
        error=r["error"],
        opened_at=r["opened_at"],
        closed_at=r["closed_at"],
        run_id=r["hivemind_run_id"],
    )


def _abort_active_assignments(c: sqlite3.Connection, round_id: int, message: str) -> None:
    """A round that ends ends its assignments, in the same transaction."""
    c.execute(
        "UPDATE assignments SET state=?, message=? WHERE round_id=? AND state=?",
        (AssignmentState.ABORTED, message, round_id, AssignmentState.ACTIVE),
    )


class RoundStateMachine:
    """Rounds over the state: read them, open, close, fail, and close those past their deadline."""

    def __init__(
        self,
        store: Store,
        versions: VersionStore,
        config: CoordinatorConfig,
        *,
        dht_peers: Callable[[], list[str]],
        merge: Callable[[int], None],
    ):
        """``dht_peers``: the swarm's bootstrap multiaddrs (a pretrain round opens only where there are
        some). ``merge(round_id)``: queue the merge of a fusion round that closed (it must not block)."""
        self.store = store
        self.versions = versions
        self.config = config
        self.dht_peers = dht_peers
        self._merge = merge
        # Serialises state transitions, and what must see a round stay open meanwhile (new assignments).
        self.lock = threading.RLock()
        self.on_round_opened: list[Callable[[RoundRow], None]] = []
        self.on_round_closed: list[Callable[[RoundRow], None]] = []

    # -- reading --------------------------------------------------------------------------

    def get(self, round_id: int) -> RoundRow:
        r = self.store.one(_SELECT_ROUND, (round_id,))
        if r is None:
            raise NotFound(f"no round {round_id}: `coldswarm-admin rounds` lists them")
        return _round(r)

    def list(self) -> list[RoundRow]:
        return [self.get(r["id"]) for r in self.store.all("SELECT id FROM rounds ORDER BY id")]

    def live(self) -> RoundRow | None:
        """The round that is open, closing or merging, if any (at most one is)."""
        r = self.store.one(
            f"SELECT id FROM rounds WHERE state IN ({placeholders(LIVE_STATES)}) ORDER BY id DESC LIMIT 1",
            LIVE_STATES,
        )
        return None if r is None else self.get(r["id"])

    def open(self) -> RoundRow | None:
        """The open round, if any."""
        r = self.store.one("SELECT id FROM rounds WHERE state=? ORDER BY id DESC LIMIT 1", (RoundState.OPEN,))
        return None if r is None else self.get(int(r["id"]))

    # -- opening --------------------------------------------------------------------------

    def open_round(
        self,
        kind: str,
        base_version: int | None = None,
        quorum: int = 0,
        deadline_s: float = 0.0,
        method: str = "",
        options_json: str = "",
    ) -> RoundRow:
        method, options = self._check_open_request(kind, quorum, deadline_s, method, options_json)
        base = self.versions.resolve("latest" if base_version is None else base_version)
        now = time.time()
        with self.lock, self.store.tx() as c:
            live = c.execute(
                f"SELECT id, state FROM rounds WHERE state IN ({placeholders(LIVE_STATES)})", LIVE_STATES
            ).fetchone()
            if live is not None:
                raise FailedPrecondition(
                    f"round {live['id']} is still {live['state']}: close it (`coldswarm-admin round close`) "
                    "or wait for its merge before opening another"
                )
            cur = c.execute(
                "INSERT INTO rounds(run_id, kind, base_version, state, quorum, deadline, method, options_json, "
                "opened_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    RUN_ID,
                    kind,
                    base,
                    RoundState.OPEN,
                    quorum or self.config.default_quorum,
                    now + (deadline_s or self.config.default_deadline_s),
                    method,
                    json.dumps(options, sort_keys=True),
                    now,
                ),
            )
            round_id = int(cur.lastrowid)
            if kind == RoundKind.PRETRAIN:
                run_id = str(options.get("run_id") or f"coldswarm-r{round_id}")
                c.execute("UPDATE rounds SET hivemind_run_id=? WHERE id=?", (run_id, round_id))
        rnd = self.get(round_id)
        self._notify(self.on_round_opened, rnd, "round-opened")
        return rnd

    def _check_open_request(
        self, kind: str, quorum: int, deadline_s: float, method: str, options_json: str
    ) -> tuple[str, dict]:
        """Refuse an OpenRound that could not run; returns the round's method and options."""
        if kind not in ROUND_KINDS:
            raise InvalidArgument(f"round kind {kind!r} is not one of {list(ROUND_KINDS)}")
        try:
            options = json.loads(options_json) if options_json.strip() else {}
        except ValueError as exc:
            raise InvalidArgument(f"options are not valid JSON: {exc}") from None
        if not isinstance(options, dict):
            raise InvalidArgument('options must be a JSON object, e.g. \'{"peft_method": "lora"}\'')
        if quorum < 0 or deadline_s < 0:
            raise InvalidArgument("quorum and deadline must not be negative")
        method = method or self.config.default_method
        if kind == RoundKind.FUSION and method not in merge_bridge.available_methods():
            raise InvalidArgument(
                f"merge method {method!r} is not available; choose one of {merge_bridge.available_methods()}"
            )
        if kind == RoundKind.FUSION:
            check_fusion_options(options, method)
        if kind == RoundKind.PRETRAIN:
            method = RoundKind.PRETRAIN  # the swarm averages; no merge method applies
            check_pretrain_options(options)
            if not self.dht_peers():
                raise FailedPrecondition(
                    "a pretrain round needs a hivemind DHT for its workers to meet in, and this coordinator "
                    "runs none: restart it with --dht-listen /ip4/0.0.0.0/tcp/31337 (it then also collects "
                    "the round's result), or name a running swarm's peers with --dht-peers"
                )
        return method, options

    # -- closing --------------------------------------------------------------------------

    def close_round(
        self, round_id: int | None = None, cancel: bool = False, reason: str = "closed"
    ) -> RoundRow:
        """Stop accepting work; a fusion round then merges (unless ``cancel``)."""
        with self.lock:
            if round_id is None:
                live = self.open()
                if live is None:
                    raise FailedPrecondition("no round is open: `coldswarm-admin rounds` lists them")
                round_id = live.id
            rnd = self.get(round_id)
            # A pretrain round waiting for its checkpoint may still be cancelled.
            waiting_checkpoint = rnd.kind == RoundKind.PRETRAIN and rnd.state == RoundState.CLOSING
            if rnd.state != RoundState.OPEN and not (cancel and waiting_checkpoint):
                raise FailedPrecondition(f"round {round_id} is {rnd.state}, not open")
            state, error = self._closed_state(rnd, cancel, reason)
            with self.store.tx() as c:
                _abort_active_assignments(c, round_id, f"round {reason}")
                c.execute(
                    "UPDATE rounds SET state=?, closed_at=?, error=COALESCE(?, error) WHERE id=?",
                    (state, time.time(), error, round_id),
                )
            rnd = self.get(round_id)
        log.info("round %d %s: now %s", round_id, reason, rnd.state)
        if rnd.kind == RoundKind.FUSION and rnd.state == RoundState.CLOSING:
            self._merge(round_id)
        self._notify(self.on_round_closed, rnd, "round-closed")
        return rnd

    def _closed_state(self, rnd: RoundRow, cancel: bool, reason: str) -> tuple[str, str | None]:
        """The state an open round closes into, and the error to record (None: keep the round's)."""
        if cancel:
            return RoundState.CANCELLED, "cancelled by the admin"
        if rnd.kind == RoundKind.FUSION and rnd.contributions == 0:
            return RoundState.FAILED, f"{reason} with no contributions"
        if rnd.kind == RoundKind.PRETRAIN and rnd.result_version is not None:
            return RoundState.PUBLISHED, None
        if rnd.kind == RoundKind.PRETRAIN and not self.on_round_closed:
            return RoundState.FAILED, f"{reason}; no pretrain checkpointer is running to record a version"
        return RoundState.CLOSING, None

    def close_overdue(self, now: float | None = None) -> None:
        """Close the open rounds whose deadline passed (the ticker calls this)."""
        now = time.time() if now is None else now
        for r in self.store.all(
            "SELECT id FROM rounds WHERE state=? AND deadline>0 AND deadline<?", (RoundState.OPEN, now)
        ):
            try:
                self.close_round(int(r["id"]), reason="reached its deadline")
            except CoordinatorError:
                pass  # closed meanwhile

    def close_on_quorum(self, round_id: int) -> None:
        """Close the round once it has its quorum (after each accepted contribution)."""
        rnd = self.get(round_id)
        if rnd.state == RoundState.OPEN and rnd.contributions >= rnd.quorum:
            try:
                self.close_round(round_id, reason="reached its quorum")
            except FailedPrecondition:
                pass

    def fail_round(self, round_id: int, error: str) -> None:
        """Mark a live round failed with ``error`` (e.g. the checkpointer could not collect)."""
        with self.store.tx() as c:
            c.execute(
                "UPDATE rounds SET state=?, error=?, closed_at=COALESCE(NULLIF(closed_at, 0), ?) "
                f"WHERE id=? AND state IN ({placeholders(LIVE_STATES)})",
                (RoundState.FAILED, error[:2000], time.time(), round_id, *LIVE_STATES),
            )
            _abort_active_assignments(c, round_id, "round failed")

    # -- the merge pipeline's transitions -------------------------------------------------

    def pending_merges(self) -> list[int]:
        """Fusion rounds closed but not yet merged (a kill interrupted them), oldest first."""
        return [
            int(r["id"])
            for r in self.store.all(
                f"SELECT id FROM rounds WHERE kind=? AND state IN ({placeholders(MERGE_PENDING_STATES)}) "
                "ORDER BY id",
                (RoundKind.FUSION, *MERGE_PENDING_STATES),
            )
        ]

    def any_merge_pending(self) -> bool:
        return (
            self.store.one(
                f"SELECT 1 FROM rounds WHERE state IN ({placeholders(MERGE_PENDING_STATES)})",
                MERGE_PENDING_STATES,
            )
            is not None
        )

    def start_merge(self, round_id: int) -> RoundRow | None:
        """Mark a round that awaits its merge ``merging``; None if it does not await one (any more)."""
        rnd = self.get(round_id)
        if rnd.state not in MERGE_PENDING_STATES:
            return None
        with self.store.tx() as c:
            c.execute("UPDATE rounds SET state=? WHERE id=?", (RoundState.MERGING, round_id))
        return rnd

    def finish_merge(self, c: sqlite3.Connection, round_id: int, version: int, published: bool) -> None:
        """In the transaction that records ``version``: the round's merge is its result."""
        c.execute(
            "UPDATE rounds SET state=?, result_version=?, error='' WHERE id=?",
            (RoundState.PUBLISHED if published else RoundState.MERGED, version, round_id),
        )

    def fail_merge(self, round_id: int, error: str) -> None:
        """The merge of a round that awaited it failed: the round fails with ``error``."""
        with self.store.tx() as c:
            c.execute(
                f"UPDATE rounds SET state=?, error=? WHERE id=? AND state IN ({placeholders(MERGE_PENDING_STATES)})",
                (RoundState.FAILED, error[:2000], round_id, *MERGE_PENDING_STATES),
            )

    def latest_remergeable(self) -> int | None:
        """The latest fusion round that finished (published, merged or failed), if any."""
        r = self.store.one(
            f"SELECT id FROM rounds WHERE kind=? AND state IN ({placeholders(REMERGEABLE_STATES)}) "
            "ORDER BY id DESC LIMIT 1",
            (RoundKind.FUSION, *REMERGEABLE_STATES),
        )
        return None if r is None else int(r["id"])

    def record_result(self, c: sqlite3.Connection, rnd: RoundRow, version: int) -> None:
        """In the transaction that records ``version`` for ``rnd`` from outside a merge (the pretrain
        checkpointer): it is the round's latest result, and a round that was closing is published."""
        published = rnd.state in (RoundState.CLOSING, RoundState.PUBLISHED)
        state = RoundState.PUBLISHED if published else rnd.state
        c.execute("UPDATE rounds SET result_version=?, state=? WHERE id=?", (version, state, rnd.id))

    # -- callbacks ------------------------------------------------------------------------

    def _notify(self, callbacks: list[Callable[[RoundRow], None]], rnd: RoundRow, what: str) -> None:
        for callback in callbacks:
            try:
                callback(rnd)
            except Exception:  # a callback's bug must not fail the request nor wedge the round
                log.exception("%s callback failed for round %d", what, rnd.id)


def fusion_task(options: dict, method: str, index: int, n: int) -> dict:
    """The ``FusionTask`` fields of shard ``index`` of ``n`` in a fusion round with these options."""
    return round_options.fusion_task(options, merge_bridge.statistics_for(method), index, n)


def check_pretrain_options(options: dict) -> None:
    """Refuse at OpenRound a pretrain round's options that every worker would refuse: ``epochs`` and
    ``target_batch_size`` that are not positive integers, ``hyperparameters`` that are not an object, or MoD
    data options out of range. Swarm option names are the worker's ``SwarmConfig`` fields, which the
    coordinator does not import: a name the workers do not know fails their assignments."""
    try:
        round_options.check_round_options("pretrain", options, codecs=())
    except round_options.RoundOptionsError as exc:
        raise InvalidArgument(str(exc)) from None


def check_fusion_options(options: dict, method: str) -> None:
    """Refuse at OpenRound what every worker would refuse (a typo, an impossible combination), rather than
    let each of them fail its assignment until the deadline. Workers read the options the same way."""
    try:
        round_options.check_round_options(
            "fusion",
            options,
            codecs=merge_bridge.codec_names(),
            statistics=merge_bridge.statistics_for(method),
        )
    except round_options.RoundOptionsError as exc:
        raise InvalidArgument(str(exc)) from None
