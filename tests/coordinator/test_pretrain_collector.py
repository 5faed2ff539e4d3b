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
    from hivemind.utils import get_dht_time

    from coldswarm.swarm.authorizer import CredentialFile
    from coldswarm.swarm.credentials import ROLE_WORKER, load_or_create_identity
    from coldswarm.swarm.dht import start_dht
    from coldswarm.swarm.records import ENDED_UNCOLLECTED, collected_epoch, collected_key
    from coldswarm.swarm.security import PeerSecurity

    # Only an admitted peer may read the swarm's DHT: sign a reader a credential with the coordinator's key.
    authority = h.running.collector.ckpt.authority
    key_path = h.app.config.data_dir.parent / "reader.key"
    credential = authority.issue(
        load_or_create_identity(key_path).get_public_key().to_bytes(),
        role=ROLE_WORKER,
        run_id=rnd.run_id,
        worker_id="reader",
        expires_at=get_dht_time() + 600,
    )
    source = CredentialFile(key_path.with_suffix(".credential"))
    source.write(credential)
    reader = PeerSecurity(key_path, authority.public_key_bytes, source)
    peer = start_dht(initial_peers=peers, client_mode=True, **reader.dht_kwargs())
    try:
        for run_id in (rnd.run_id, cancelled.run_id):
            # The round's state changes before the announcement is stored: poll rather than read once.
            deadline, epoch = time.monotonic() + 30, None
            while epoch != ENDED_UNCOLLECTED and time.monotonic() < deadline:
                epoch = collected_epoch(
                    peer.get(collected_key(run_id), latest=True), authority.public_key_bytes
                )
                time.sleep(0.2)
            assert epoch == ENDED_UNCOLLECTED, run_id
    finally:
        peer.shutdown()


def _join(h):
    from coldswarm.common.channel import bearer

    return bearer(h.join_token())
