"""The run's DHT records are typed: a peer with the run's validator refuses malformed ones, and a reader
parses every value with the schema, whatever another peer stored (real DHT peers on loopback)."""

from __future__ import annotations

import math
import time

import pytest
from hivemind.utils import ValueWithExpiration, get_dht_time

from coldswarm.swarm.dht import start_dht
from coldswarm.swarm.records import (
    ENDED_UNCOLLECTED,
    collected_epoch,
    collected_key,
    metrics_key,
    metrics_record,
    peer_metrics,
    run_validator,
)

RUN = "records-test"
GOOD = metrics_record(epoch=2, steps=10, samples=80, loss=1.5, samples_per_s=12.0, time=1.0)


def test_metrics_record_is_what_the_schema_reads_back():
    assert GOOD == {"epoch": 2, "steps": 10, "samples": 80, "loss": 1.5, "samples_per_s": 12.0, "time": 1.0}
    diverged = metrics_record(epoch=0, steps=0, samples=0, loss=math.nan, samples_per_s=math.inf, time=0.0)
    assert diverged["loss"] is None and diverged["samples_per_s"] == 0.0  # NaN never goes on the wire

    def found(*values):
        return ValueWithExpiration({f"p{i}": ValueWithExpiration(v, 1.0) for i, v in enumerate(values)}, 1.0)

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
    assert len(records) == 1 and records[0].samples == 80 and records[0].loss == 1.5
    assert peer_metrics(None) == [] and peer_metrics(ValueWithExpiration([1, 2], 1.0)) == []
    assert collected_epoch(ValueWithExpiration(3, 1.0)) == 3
    assert collected_epoch(ValueWithExpiration(ENDED_UNCOLLECTED, 1.0)) == ENDED_UNCOLLECTED
    for value in (True, -2, 2.0, "3", None):
        assert collected_epoch(ValueWithExpiration(value, 1.0)) is None, value
    assert collected_epoch(None) is None


def _get(dht, key, until, timeout: float = 30.0):
    deadline, found = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        found = dht.get(key, latest=True)
        if until(found):
            return found
        time.sleep(0.2)
    return found


@pytest.mark.timeout(300)
def test_validating_peers_refuse_malformed_records_from_a_peer_that_does_not_validate():
    checkpointer = start_dht()
    peers = []
    try:
        checkpointer.add_validators([run_validator(RUN)])
        initial = [str(a) for a in checkpointer.get_visible_maddrs()]
        worker, rogue = start_dht(initial_peers=initial), start_dht(initial_peers=initial)
        peers += [worker, rogue]
        worker.add_validators([run_validator(RUN)])
        expires = get_dht_time() + 600

        rogue.store(metrics_key(RUN), subkey="honest", value=GOOD, expiration_time=expires)
        rogue.store(
            metrics_key(RUN), subkey="liar", value={**GOOD, "samples": -(10**9)}, expiration_time=expires
        )
        found = _get(checkpointer, metrics_key(RUN), lambda f: f is not None and "honest" in f.value)
        assert found is not None and set(found.value) == {"honest"}, found
        assert [r.samples for r in peer_metrics(found)] == [80]

        # A malformed "collected" from the rogue stays on the rogue: the worker never takes it for an answer.
        rogue.store(collected_key(RUN), "done", expiration_time=expires)
        assert _get(rogue, collected_key(RUN), lambda f: f is not None).value == "done"
        assert worker.get(collected_key(RUN), latest=True) is None
        assert checkpointer.store(collected_key(RUN), 4, expiration_time=expires + 1)
        assert collected_epoch(_get(worker, collected_key(RUN), lambda f: collected_epoch(f) == 4)) == 4
    finally:
        for dht in [*peers, checkpointer]:
            dht.shutdown()
