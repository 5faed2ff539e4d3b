"""serve --dht-listen: the pretrain collector runs the swarm's DHT bootstrap peer, which the coordinator hands out."""

from __future__ import annotations

import time

import pytest

from coldswarm.proto import coldswarm_pb2 as pb

pytest.importorskip("hivemind")
pytestmark = pytest.mark.slow


def test_dht_peer_handed_out_and_failed_collection_is_reported(make_harness):
    h = make_harness(dht_listen=["/ip4/127.0.0.1/tcp/0"])
    w = h.register()
    peers = list(h.workers.Register(pb.RegisterRequest(name="x"), metadata=_join(h)).dht_initial_peers)
    assert peers and all("/p2p/" in p for p in peers)
    assert list(h.admin.Status(pb.StatusRequest(), metadata=h.amd).dht_maddrs) == peers
    rnd = h.admin.OpenRound(
        pb.OpenRoundRequest(kind="pretrain", options_json='{"epochs": 1, "collect_timeout_s": 1}'),
        metadata=h.amd,
    )
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    assert list(a.pretrain.initial_peers) == peers
    # Nobody trained: closing starts a collection that finds no state and fails the round, visibly.
    assert h.admin.CloseRound(pb.CloseRoundRequest(), metadata=h.amd).state == "closing"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = h.admin.ListRounds(pb.ListRoundsRequest(), metadata=h.amd).rounds[0]
        if r.state != "closing":
            break
        time.sleep(0.2)
    assert r.id == rnd.id and r.state == "failed" and "first optimizer step" in r.error
    # A cancelled round too: its peers serving state are told on the DHT that nothing will be collected.
    cancelled = h.admin.OpenRound(pb.OpenRoundRequest(kind="pretrain"), metadata=h.amd)
    assert h.admin.CloseRound(pb.CloseRoundRequest(cancel=True), metadata=h.amd).state == "cancelled"
    from coldswarm.swarm.dht import start_dht
    from coldswarm.swarm.records import ENDED_UNCOLLECTED, collected_key

    peer = start_dht(initial_peers=peers, client_mode=True)
    try:
        for run_id in (rnd.run_id, cancelled.run_id):
            # The round's state changes before the announcement is stored: poll rather than read once.
            deadline, found = time.monotonic() + 30, None
            while (found is None or found.value != ENDED_UNCOLLECTED) and time.monotonic() < deadline:
                found = peer.get(collected_key(run_id), latest=True)
                time.sleep(0.2)
            assert found is not None and found.value == ENDED_UNCOLLECTED, run_id
    finally:
        peer.shutdown()


def _join(h):
    from coldswarm.common.channel import bearer

    return bearer(h.join_token())
