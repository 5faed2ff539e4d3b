"""GetSwarmCredential over a real server: who gets a swarm credential, for what, for how long, and when not.
And the participants a collected pretrain round recorded, as ``rounds`` and ``workers`` show them."""

from __future__ import annotations

import json
import os
import stat
import time

import grpc
import pytest

from coldswarm.coordinator.states import VersionKind
from coldswarm.proto import coldswarm_pb2 as pb

pytest.importorskip("hivemind")

from coldswarm.swarm.credentials import (  # noqa: E402
    ROLE_WORKER,
    load_or_create_identity,
    parse_credential,
    peer_id_of,
    public_key_from_bytes,
    verify_credential,
)


def _key(tmp_path, name: str) -> bytes:
    return load_or_create_identity(tmp_path / f"{name}.key").get_public_key().to_bytes()


def _ask(worker, assignment_id: str, public_key: bytes) -> pb.SwarmCredential:
    request = pb.SwarmCredentialRequest(assignment_id=assignment_id, public_key=public_key)
    return worker.stub.GetSwarmCredential(request, metadata=worker.md)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_credential_for_a_registered_workers_pretrain_assignment(make_harness, tmp_path):
    h = make_harness(swarm_credential_ttl_s=120)
    join = h.join_token()
    w, other = h.register(join), h.register()
    rnd = h.admin.OpenRound(
        pb.OpenRoundRequest(kind="pretrain", options_json='{"epochs": 1}'), metadata=h.amd
    )
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    key = _key(tmp_path, "w")

    before = time.time()
    reply = _ask(w, a.id, key)
    authority = public_key_from_bytes(reply.authority_public_key)
    credential = verify_credential(parse_credential(reply.access_token), authority, run_id=rnd.run_id)
    assert (credential.role, credential.run_id, credential.worker_id) == (ROLE_WORKER, rnd.run_id, w.id)
    assert (
        credential.public_key == key and reply.peer_id == peer_id_of(public_key_from_bytes(key)).to_base58()
    )
    assert before + 120 - 5 <= reply.expires_at <= time.time() + 120 and reply.renew_after_s == 60
    # The authority key lives in the data dir, owner-only, and is the DHT peer's identity there.
    key_file = h.app.config.swarm_key_path
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert h.app.swarm.authority.public_key_bytes == bytes(reply.authority_public_key)

    assert _ask(w, a.id, key).access_token  # renewal: the same identity again
    # One identity per worker and round while a credential lives: a second key is refused.
    assert _code(lambda: _ask(w, a.id, _key(tmp_path, "second"))) == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(lambda: _ask(w, a.id, b"ssh-rsa notakey")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: _ask(other, a.id, _key(tmp_path, "o"))) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _ask(w, "a-nope", key)) == grpc.StatusCode.NOT_FOUND

    # Revoking the join token stops renewal: the credential then expires within its lifetime.
    token_id = next(
        t.id for t in h.admin.ListTokens(pb.ListTokensRequest(), metadata=h.amd).tokens if t.kind == "join"
    )
    h.admin.RevokeToken(pb.RevokeTokenRequest(id=token_id), metadata=h.amd)
    assert _code(lambda: _ask(w, a.id, key)) == grpc.StatusCode.UNAUTHENTICATED


def test_no_credential_once_the_round_is_over_or_for_a_fusion_round(make_harness, tmp_path):
    h = make_harness()
    w = h.register()
    h.admin.OpenRound(pb.OpenRoundRequest(kind="pretrain"), metadata=h.amd)
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    h.admin.CloseRound(pb.CloseRoundRequest(cancel=True), metadata=h.amd)
    assert _code(lambda: _ask(w, a.id, _key(tmp_path, "w"))) == grpc.StatusCode.FAILED_PRECONDITION
    h.open_fusion(quorum=1)
    f = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    assert f.WhichOneof("task") == "fusion"
    assert _code(lambda: _ask(w, f.id, _key(tmp_path, "w"))) == grpc.StatusCode.FAILED_PRECONDITION


def test_rounds_and_workers_show_a_collected_rounds_participants(make_harness, tiny_model):
    h = make_harness()
    w = h.register()
    rnd = h.admin.OpenRound(pb.OpenRoundRequest(kind="pretrain"), metadata=h.amd)
    # The coordinator admitted the worker under peer QmA (GetSwarmCredential's row); the manifest, which
    # every worker may read, names only the peer.
    with h.app.store.tx() as c:
        c.execute(
            "INSERT INTO swarm_credentials(round_id, worker_id, peer_id, public_key, issued_at, expires_at) "
            "VALUES (?, ?, 'QmA', x'00', 0, 0)",
            (rnd.id, w.id),
        )
    participants = [
        {
            "peer_id": "QmA",
            "epoch": 3,
            "steps": 30,
            "samples": 240,
            "loss": 1.5,
            "samples_per_s": 2.0,
        }
    ]
    version = h.app.merges.record_version(
        tiny_model, rnd.id, kind=VersionKind.PRETRAIN, metrics={}, extra={"swarm_participants": participants}
    )
    assert json.loads(version.manifest_json)["swarm_participants"] == participants
    listed = h.admin.ListRounds(pb.ListRoundsRequest(), metadata=h.amd).rounds
    (mine,) = [r for r in listed if r.id == rnd.id]
    assert [(p.worker_id, p.peer_id, p.samples, p.steps, p.epoch) for p in mine.swarm_participants] == [
        (w.id, "QmA", 240, 30, 3)
    ]
    (info,) = [
        x for x in h.admin.ListWorkers(pb.ListWorkersRequest(), metadata=h.amd).workers if x.id == w.id
    ]
    assert (info.swarm_samples, info.swarm_rounds) == (240, 1)

    from coldswarm.coordinator import admin_cli

    text = admin_cli.render(
        type("Args", (), {"coordinator": h.address})(), pb.ListRoundsResponse(rounds=[mine])
    )
    assert f"{w.id}:240" in text
