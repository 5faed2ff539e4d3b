"""Swarm admission: which workers' hivemind peers may take part in a pretrain round, and who did.

The coordinator is the swarm's authority. Its key is its own DHT peer's identity (``<data-dir>/dht.key``,
owner-only, made at first need, kept across restarts like the admin token); with it, it signs each admitted
worker a short-lived credential (:mod:`coldswarm.swarm.credentials`) naming the worker's hivemind identity key
and the round's run. Peers refuse every DHT and averaging request from a peer without one.

A credential is issued (``WorkerService.GetSwarmCredential``) only

* to a registered worker whose session and join token are live (the servicer checks the session token: a
  revoked join token or a worker that left gets UNAUTHENTICATED, so its renewal stops);
* for its own pretrain assignment, active or done (a done worker serves its state to the checkpointer), in a
  round that is open or closing (being collected);
* for one identity per worker and round at a time: asking for another key while a credential is live is
  refused, so one worker cannot field several peers.

It lives ``lifetime_s`` (``--swarm-credential-ttl-s``, default 600 s) and workers renew it at half that. So a
worker whose token is revoked, or whose round ends, drops out of the swarm within ``lifetime_s`` (plus the
peers' clock difference, which hivemind bounds) of its last renewal: that is the revocation bound.

Who took part is read back from the swarm itself at collection (the checkpointer's ``swarm_participants``:
credentials and signed metrics records on the DHT) and kept in the version's manifest
(``swarm_participants``: peer ids and counts, no worker ids, since every worker may read a manifest);
:meth:`SwarmAdmission.participants` and :meth:`SwarmAdmission.worker_totals` name each peer's worker from the
credentials issued (``swarm_credentials``) for ``coldswarm-admin rounds`` / ``workers``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coldswarm.coordinator.assignments import Assignments
from coldswarm.coordinator.errors import FailedPrecondition, InvalidArgument
from coldswarm.coordinator.rounds import RoundStateMachine
from coldswarm.coordinator.states import AssignmentState, RoundKind, RoundState, VersionKind
from coldswarm.coordinator.store import Store

#: rounds whose swarm still runs: credentials are issued for them
_SWARM_STATES = (RoundState.OPEN, RoundState.CLOSING)
_ASSIGNMENT_STATES = (AssignmentState.ACTIVE, AssignmentState.DONE)


@dataclass(frozen=True)
class IssuedCredential:
    token: bytes  # a serialised hivemind AccessToken
    authority_public_key: bytes
    expires_at: float
    renew_after_s: float
    peer_id: str
    run_id: str


class SwarmAdmission:
    """Issues swarm credentials (one identity per worker and round) and reads back who took part."""

    def __init__(
        self,
        store: Store,
        assignments: Assignments,
        rounds: RoundStateMachine,
        key_path: Path,
        lifetime_s: float,
    ):
        from coldswarm.swarm.credentials import MAX_LIFETIME_S

        if not 0 < lifetime_s <= MAX_LIFETIME_S:
            raise ValueError(f"the swarm credential lifetime must be in (0, {MAX_LIFETIME_S:.0f}] seconds")
        self.store = store
        self.assignments = assignments
        self.rounds = rounds
        self.key_path = Path(key_path)
        self.lifetime_s = float(lifetime_s)
        self._authority = None
        self._lock = threading.Lock()

    @property
    def authority(self):
        """The swarm authority (loaded from, or made into, ``key_path``; the DHT peer's identity too)."""
        with self._lock:
            if self._authority is None:
                from coldswarm.swarm.credentials import SwarmAuthority  # hivemind: only for swarms

                self._authority = SwarmAuthority.load_or_create(self.key_path)
            return self._authority

    def issue(self, worker_id: str, assignment_id: str, public_key: bytes) -> IssuedCredential:
        """A credential admitting ``worker_id``'s peer with ``public_key`` to its assignment's round."""
        from coldswarm.swarm.credentials import (
            ROLE_WORKER,
            CredentialError,
            peer_id_of,
            public_key_from_bytes,
        )

        try:
            peer_id = peer_id_of(public_key_from_bytes(bytes(public_key))).to_base58()
        except CredentialError as exc:
            raise InvalidArgument(
                f"public_key: {exc} (send the hivemind identity's OpenSSH public key)"
            ) from None
        row = self.assignments.owned(worker_id, assignment_id)
        if row["state"] not in _ASSIGNMENT_STATES:
            raise FailedPrecondition(f"assignment {assignment_id} is {row['state']}: it has no swarm to join")
        rnd = self.rounds.get(int(row["round_id"]))
        if rnd.kind != RoundKind.PRETRAIN:
            raise FailedPrecondition(
                f"round {rnd.id} is a {rnd.kind} round: only pretrain rounds have a swarm"
            )
        if rnd.state not in _SWARM_STATES:
            raise FailedPrecondition(f"round {rnd.id} is {rnd.state}: its swarm is over")
        from hivemind.utils.timed_storage import get_dht_time

        now = get_dht_time()
        with self.store.tx() as c:
            held = c.execute(
                "SELECT peer_id, expires_at FROM swarm_credentials WHERE round_id=? AND worker_id=?",
                (rnd.id, worker_id),
            ).fetchone()
            if held is not None and held["peer_id"] != peer_id and held["expires_at"] > now:
                raise FailedPrecondition(
                    f"worker {worker_id} holds a swarm credential of round {rnd.id} for peer {held['peer_id']} "
                    f"for {held['expires_at'] - now:.0f}s more: a worker joins a swarm with one identity "
                    "(join-swarm keeps it in its work dir)"
                )
            credential = self.authority.issue(
                bytes(public_key),
                role=ROLE_WORKER,
                run_id=rnd.run_id,
                worker_id=worker_id,
                expires_at=now + self.lifetime_s,
            )
            c.execute(
                "INSERT INTO swarm_credentials(round_id, worker_id, peer_id, public_key, issued_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(round_id, worker_id) DO UPDATE SET "
                "peer_id=excluded.peer_id, public_key=excluded.public_key, issued_at=excluded.issued_at, "
                "expires_at=excluded.expires_at",
                (rnd.id, worker_id, peer_id, bytes(public_key), time.time(), credential.expires_at),
            )
        return IssuedCredential(
            token=credential.to_bytes(),
            authority_public_key=self.authority.public_key_bytes,
            expires_at=credential.expires_at,
            renew_after_s=self.lifetime_s / 2,
            peer_id=peer_id,
            run_id=rnd.run_id,
        )

    # -- who took part ------------------------------------------------------------------------------------

    def participants(self, result_version: int | None) -> list[dict]:
        """The participants recorded in a pretrain round's version manifest (``swarm_participants``: peer ids
        and their counts), each named by the worker this coordinator admitted under that peer id. The
        manifest, which every worker may read, names no worker (issue 13); the database does."""
        if result_version is None:
            return []
        row = self.store.one("SELECT round_id, manifest_json FROM versions WHERE number=?", (result_version,))
        if row is None:
            return []
        participants = json.loads(row["manifest_json"]).get("swarm_participants") or []
        workers = {
            r["peer_id"]: r["worker_id"]
            for r in self.store.all(
                "SELECT peer_id, worker_id FROM swarm_credentials WHERE round_id=?", (row["round_id"],)
            )
        }
        return [
            {**p, "worker": workers.get(p.get("peer_id"), "")} for p in participants if isinstance(p, dict)
        ]

    def worker_totals(self) -> dict[str, tuple[int, int]]:
        """worker id -> (samples contributed, pretrain versions taken part in), over every recorded manifest
        (its participants' peer ids matched with the credentials this coordinator issued in that round)."""
        rows = self.store.all(
            "SELECT c.worker_id AS worker, SUM(json_extract(p.value, '$.samples')) AS samples, "
            "COUNT(DISTINCT v.number) AS rounds "
            "FROM versions v, json_each(v.manifest_json, '$.swarm_participants') p "
            "JOIN swarm_credentials c ON c.round_id = v.round_id AND c.peer_id = json_extract(p.value, '$.peer_id') "
            "WHERE v.kind=? GROUP BY c.worker_id",
            (VersionKind.PRETRAIN,),
        )
        return {r["worker"]: (int(r["samples"] or 0), int(r["rounds"])) for r in rows if r["worker"]}
