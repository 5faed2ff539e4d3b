"""The run's DHT records are typed and signed: a peer with the run's validators refuses malformed ones, and a
reader parses every value with the schema and takes only entries under an owner's key, whatever another peer
stored (real DHT peers on loopback)."""

from __future__ import annotations

import math
import time

import pytest
from hivemind.utils import ValueWithExpiration, get_dht_time

from coldswarm.swarm.authorizer import CredentialFile
from coldswarm.swarm.credentials import ROLE_WORKER, SwarmAuthority, load_or_create_identity, owner_marker
from coldswarm.swarm.dht import start_dht
from coldswarm.swarm.records import (
    ENDED_UNCOLLECTED,
    collected_epoch,
    collected_key,
    metrics_key,
    metrics_record,
    peer_metrics,
    run_validators,
)
from coldswarm.swarm.security import PeerSecurity

RUN = "records-test"
GOOD = metrics_record(epoch=2, steps=10, samples=80, loss=1.5, samples_per_s=12.0, time=1.0)
KEY = b"ssh-rsa AAAAkey"


def test_metrics_record_is_what_the_schema_reads_back():
    assert GOOD == {"epoch": 2, "steps": 10, "samples": 80, "loss": 1.5, "samples_per_s": 12.0, "time": 1.0}
    diverged = metrics_record(epoch=0, steps=0, samples=0, loss=math.nan, samples_per_s=math.inf, time=0.0)
    assert diverged["loss"] is None and diverged["samples_per_s"] == 0.0  # NaN never goes on the wire

    def found(*values, subkey=lambda i: owner_marker(KEY + str(i).encode())):
        return ValueWithExpiration(
            {subkey(i): ValueWithExpiration(v, 1.0) for i, v in enumerate(values)}, 1.0
        )

    bad = [
        None,
        "text",
        {**GOOD, "epoch": -1},
        {**GOOD, "steps": 3.0},  # a float where a count belongs: no silent conversion
        {**GOOD, "samples": True},
        {**GOOD, "loss": float("nan")},
        {**GOOD, "samples_per_s": -1.0},
        {**GOOD, "extra": 1},
        {k: v for k, v in GOOD.items() if k != "time"},
    ]
    records = peer_metrics(found(GOOD, *bad))
    assert [(owner, r.samples, r.loss) for owner, r in records] == [(KEY + b"0", 80, 1.5)]
    assert peer_metrics(found(GOOD, subkey=lambda i: f"p{i}")) == []  # not under an owner's key
    assert peer_metrics(None) == [] and peer_metrics(ValueWithExpiration([1, 2], 1.0)) == []

    def collected(value, owner=KEY):
        return ValueWithExpiration({owner_marker(owner): ValueWithExpiration(value, 1.0)}, 1.0)

    assert collected_epoch(collected(3), KEY) == 3
    assert collected_epoch(collected(ENDED_UNCOLLECTED), KEY) == ENDED_UNCOLLECTED
    assert collected_epoch(collected(3, owner=b"ssh-rsa AAAAother"), KEY) is None  # only the authority's
    for value in (True, -2, 2.0, "3", None):
        assert collected_epoch(collected(value), KEY) is None, value
    assert collected_epoch(None, KEY) is None and collected_epoch(ValueWithExpiration(3, 1.0), KEY) is None


def _get(dht, key, until, timeout: float = 30.0):
    deadline, found = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        found = dht.get(key, latest=True)
        if until(found):
            return found
        time.sleep(0.2)
    return found


@pytest.mark.timeout(300)
def test_validating_peers_refuse_malformed_records_from_a_peer_that_does_not_validate(tmp_path):
    coordinator = PeerSecurity.for_authority(tmp_path / "authority.key")
    authority = SwarmAuthority.load_or_create(tmp_path / "authority.key")

    def admitted(name: str) -> PeerSecurity:
        key = load_or_create_identity(tmp_path / f"{name}.key")
        source = CredentialFile(tmp_path / f"{name}.credential")
        source.write(
            authority.issue(
                key.get_public_key().to_bytes(), role=ROLE_WORKER, run_id=RUN, expires_at=get_dht_time() + 600
            )
        )
        return PeerSecurity(tmp_path / f"{name}.key", authority.public_key_bytes, source)

    checkpointer = start_dht(**coordinator.dht_kwargs())
    peers = []
    try:
        checkpointer.add_validators(run_validators(RUN, authority.public_key_bytes))
        initial = [str(a) for a in checkpointer.get_visible_maddrs()]
        worker_security, rogue_security = admitted("worker"), admitted("rogue")
        worker = start_dht(initial_peers=initial, **worker_security.dht_kwargs())
        rogue = start_dht(
            initial_peers=initial, **rogue_security.dht_kwargs()
        )  # admitted, adds no run validator
        peers += [worker, rogue]
        worker.add_validators(run_validators(RUN, authority.public_key_bytes))
        expires = get_dht_time() + 600
        mine = rogue_security.owner_marker

        rogue.store(
            metrics_key(RUN), subkey=mine, value={**GOOD, "samples": -(10**9)}, expiration_time=expires
        )
        rogue.store(metrics_key(RUN), subkey=b"plain", value=GOOD, expiration_time=expires)  # no owner's key
        worker.store(
            metrics_key(RUN), subkey=worker_security.owner_marker, value=GOOD, expiration_time=expires
        )
        found = _get(checkpointer, metrics_key(RUN), lambda f: f is not None and len(f.value) >= 1)
        assert found is not None and set(found.value) == {worker_security.owner_marker}, found
        assert [r.samples for _, r in peer_metrics(found)] == [80]

        # A malformed "collected" from the rogue stays on the rogue: the worker never takes it for an answer.
        rogue.store(collected_key(RUN), subkey=mine, value="done", expiration_time=expires)
        assert _get(rogue, collected_key(RUN), lambda f: f is not None).value[mine].value == "done"
        assert worker.get(collected_key(RUN), latest=True) is None
        assert checkpointer.store(
            collected_key(RUN), subkey=coordinator.owner_marker, value=4, expiration_time=expires
        )
        answer = _get(
            worker, collected_key(RUN), lambda f: collected_epoch(f, authority.public_key_bytes) == 4
        )
        assert collected_epoch(answer, authority.public_key_bytes) == 4
    finally:
        for dht in [*peers, checkpointer]:
            dht.shutdown()
