"""Only peers the coordinator admitted take part: real DHT peers and averagers on loopback.

The coordinator's side is its checkpointer's DHT peer (the authority); admitted peers hold a credential it signed
for their identity and the run. The outsider is plain hivemind (``hivemind.DHT``, ``hivemind.P2P``, a stock
``DecentralizedAverager`` and its RPC stubs), with no credential.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import serialize_torch_tensor
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema
from hivemind.p2p import P2P, P2PHandlerError
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter
from hivemind.utils.auth import TokenAuthorizerBase

from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig
from coldswarm.swarm.authorizer import CredentialFile, SwarmAuthorizer
from coldswarm.swarm.credentials import ROLE_WORKER, SwarmAuthority, load_or_create_identity
from coldswarm.swarm.dht import start_dht
from coldswarm.swarm.guarded_averagers import AveragerGuard, GuardedAveragerMixin
from coldswarm.swarm.records import admitted_key, collected_key, metrics_key, metrics_record, peer_metrics
from coldswarm.swarm.security import PeerSecurity

pytestmark = pytest.mark.slow

_SHM_MANAGER_STARTER = torch.empty(1).share_memory_()  # see tests/worker/test_swarm_multiprocess.py

RUN = "admission-test"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class Guarded(GuardedAveragerMixin, DecentralizedAverager):
    _wire_name = "DecentralizedAverager"  # what a stock peer's stubs call


@pytest.fixture
def coordinator(processes):  # after `processes`: its DHT is shut down before the leak check
    ckpt = Checkpointer(CheckpointerConfig(host_maddrs=LOOPBACK)).start()
    try:
        yield ckpt
    finally:
        ckpt.shutdown()


@pytest.fixture
def started():
    """Everything a test starts (DHTs, averagers, P2P), shut down at the end in reverse order."""
    things = []
    yield things
    for thing in reversed(things):
        try:
            thing.shutdown()
        except Exception:  # one that failed to start has nothing to stop
            pass


def admitted(
    tmp: Path, name: str, authority: SwarmAuthority, peers, *, run_id: str = RUN, lifetime_s: float = 600.0
) -> PeerSecurity:
    key = load_or_create_identity(tmp / f"{name}.key")
    credential = authority.issue(
        key.get_public_key().to_bytes(),
        role=ROLE_WORKER,
        run_id=run_id,
        worker_id=f"w-{name}",
        expires_at=get_dht_time() + lifetime_s,
    )
    source = CredentialFile(tmp / f"{name}.credential")
    source.write(credential)
    return PeerSecurity(tmp / f"{name}.key", authority.public_key_bytes, source)


def join(security: PeerSecurity, peers, started, run_id: str = RUN):
    dht = start_dht(peers, LOOPBACK, **security.dht_kwargs())
    started.append(dht)
    dht.add_validators(security.run_validators(run_id))
    assert security.publish_credential(dht, run_id)
    return dht


def poll(fn, until, timeout: float = 30.0):
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = fn()
        if until(value):
            return value
        time.sleep(0.2)
    return value


def test_outsider_expired_or_forged_credential_cannot_join_the_dht(coordinator, started, tmp_path):
    peers = coordinator.initial_peers
    authority = coordinator.authority
    member = join(admitted(tmp_path, "a", authority, peers), peers, started)
    record = metrics_record(epoch=1, steps=1, samples=8, loss=1.0, samples_per_s=1.0, time=get_dht_time())

    # A plain hivemind peer: the swarm does not answer its bootstrap ping.
    with pytest.raises(RuntimeError, match="bootstrap failed"):
        started.append(hivemind.DHT(initial_peers=peers, host_maddrs=LOOPBACK, start=True))
    # Told to start anyway, it can neither read what admitted peers store nor store anything they see.
    outsider = hivemind.DHT(
        initial_peers=peers, host_maddrs=LOOPBACK, start=True, ensure_bootstrap_success=False
    )
    started.append(outsider)
    outsider.store(metrics_key(RUN), subkey=b"outsider", value=record, expiration_time=get_dht_time() + 60)
    assert outsider.get(admitted_key(RUN), latest=True) is None
    assert coordinator.dht.get(metrics_key(RUN), latest=True) is None

    # An expired credential, or one signed by another authority: the swarm refuses the requests that carry it.
    # (coldswarm's own authorizer would not even send an expired one; this client's does.)
    class Careless(SwarmAuthorizer):
        def is_token_valid(self, token) -> bool:
            return True

        refresh_token_if_needed = TokenAuthorizerBase.refresh_token_if_needed

    expired = admitted(tmp_path, "expired", authority, peers, lifetime_s=-1.0)
    forger = SwarmAuthority.load_or_create(tmp_path / "forger.key")
    forged = admitted(tmp_path, "forged", forger, peers)
    for security in (expired, forged):
        authorizer = Careless(security.private_key, security.authority_public_key, security.credentials)
        with pytest.raises(RuntimeError, match="bootstrap failed"):
            started.append(
                hivemind.DHT(
                    initial_peers=peers,
                    host_maddrs=LOOPBACK,
                    start=True,
                    identity_path=str(security.identity_path),
                    authorizer=authorizer,
                )
            )
    assert member.get(admitted_key(RUN), latest=True) is not None  # the member itself is fine


def test_averagers_serve_and_download_from_admitted_peers_only(coordinator, started, tmp_path):
    peers = coordinator.initial_peers
    authority = coordinator.authority
    prefix = f"{RUN}_state"

    def averager(dht, security, value: float, run_id: str = RUN):
        guard = AveragerGuard(admitted=security.admitted(run_id))
        avg = Guarded(
            [torch.full((64,), value)], dht, prefix=prefix, start=True, allow_state_sharing=True, guard=guard
        )
        started.append(avg)
        return avg

    server_security = admitted(tmp_path, "server", authority, peers)
    server_dht = join(server_security, peers, started)
    server = averager(server_dht, server_security, 1.0)
    downloader_security = admitted(tmp_path, "downloader", authority, peers)
    downloader = averager(join(downloader_security, peers, started), downloader_security, 0.0)
    # Admitted, but for another run, with hivemind's own averager: it may use the DHT, not this run's averagers.
    stranger_security = admitted(tmp_path, "stranger", authority, peers, run_id="another-run")
    stranger_dht = join(stranger_security, peers, started, "another-run")
    stranger = DecentralizedAverager([torch.zeros(64)], stranger_dht, prefix=prefix, start=True)
    started.append(stranger)
    donors = f"{prefix}.all_averagers"
    poll(lambda: stranger_dht.get(donors, latest=True), lambda f: f is not None and len(f.value) >= 2)
    assert stranger.load_state_from_peers(timeout=30) is None  # neither guarded averager serves it

    # An outsider serving a state of its own, libp2p-connected to the server (it cannot use the swarm's DHT).
    server_maddrs = [str(a) for a in server_dht.get_visible_maddrs()]
    outsider_dht = hivemind.DHT(
        initial_peers=server_maddrs, host_maddrs=LOOPBACK, start=True, ensure_bootstrap_success=False
    )
    started.append(outsider_dht)
    outsider = DecentralizedAverager(
        [torch.full((64,), 7.0)], outsider_dht, prefix=prefix, start=True, allow_state_sharing=True
    )
    started.append(outsider)
    # An admitted (malicious) peer may still write hivemind's unsigned donor list: it names the outsider first.
    server_dht.store(
        donors, subkey=outsider_dht.peer_id.to_bytes(), value=1e6, expiration_time=get_dht_time() + 120
    )
    poll(lambda: server_dht.get(donors, latest=True), lambda f: f is not None and len(f.value) >= 3)

    state = downloader.load_state_from_peers(timeout=30)
    assert state is not None, downloader.refusals()
    assert torch.equal(state[1][0], torch.full((64,), 1.0))  # the admitted server's, not the outsider's
    assert any("may not serve its state" in r for r in downloader.refusals())

    # The outsider calls the server's averaging RPCs directly, with hivemind's own stubs. The server answers
    # PROTOCOL_VIOLATION and closes the stream without reading the caller's parts; the daemons may then reset
    # the stream before that answer arrives, so the caller sees an error or a stream that ends with no message
    # (both seen on a loaded machine). What it must never see is an averaged part: the server's own record,
    # checked below, says each call was refused.
    async def codes(call) -> list:
        try:
            return [m.code async for m in await call]
        except (ConnectionError, P2PHandlerError):
            return ["closed"]

    async def knock() -> list:
        p2p = await P2P.create(initial_peers=server_maddrs, host_maddrs=LOOPBACK)
        try:
            stub = DecentralizedAverager.get_stub(p2p, server_dht.peer_id, namespace=prefix)
            joined = await codes(
                stub.rpc_join_group(
                    averaging_pb2.JoinRequest(
                        schema_hash=b"x", expiration=get_dht_time() + 10, group_key=prefix
                    )
                )
            )
            part = averaging_pb2.AveragingData(
                code=averaging_pb2.PART_FOR_AVERAGING,
                group_id=b"group",
                tensor_part=serialize_torch_tensor(torch.full((64,), float("nan"))),
                weight=1.0,
            )
            aggregated = await codes(stub.rpc_aggregate_part(as_aiter(part)))
            downloaded = [m async for m in await stub.rpc_download_state(averaging_pb2.DownloadRequest())]
            return [p2p.peer_id, joined, aggregated, downloaded]
        finally:
            await p2p.shutdown()

    knocker, joined, aggregated, downloaded = asyncio.new_event_loop().run_until_complete(knock())
    assert joined in ([averaging_pb2.PROTOCOL_VIOLATION], ["closed"], [])
    assert aggregated in ([averaging_pb2.PROTOCOL_VIOLATION], ["closed"], [])
    assert downloaded == []
    refused = server.refusals()
    for what in ("join a group", "send an all-reduce part", "download state"):
        assert any(f"{knocker} may not {what}" in r for r in refused), (what, refused)
    assert server.guard_stats()["callers"] >= 4  # the stranger's download and the outsider's three calls
    with server.get_tensors() as tensors:
        assert torch.equal(tensors[0], torch.full((64,), 1.0))


def test_forged_progress_and_metrics_records_are_rejected(coordinator, started, tmp_path):
    peers = coordinator.initial_peers
    authority = coordinator.authority
    progress = SchemaValidator(TrainingProgressSchema, prefix=RUN)  # what hivemind's tracker adds
    coordinator.dht.add_validators([progress])
    coordinator.swarm_metrics(RUN)  # what the collector does when the round opens: it now validates the run
    a_security, b_security = (admitted(tmp_path, n, authority, peers) for n in ("a", "b"))
    a, b = join(a_security, peers, started), join(b_security, peers, started)
    for dht in (a, b):
        dht.add_validators([progress])
    expires = get_dht_time() + 120
    record = metrics_record(epoch=3, steps=30, samples=240, loss=1.25, samples_per_s=4.0, time=get_dht_time())

    assert a.store(metrics_key(RUN), subkey=a_security.owner_marker, value=record, expiration_time=expires)
    # a writes as b: its signature is not b's.
    assert not a.store(
        metrics_key(RUN), subkey=b_security.owner_marker, value=record, expiration_time=expires
    )
    forged_progress = dict(
        peer_id=b.peer_id.to_bytes(),
        epoch=10**6,
        samples_accumulated=0,
        samples_per_second=1.0,
        time=1.0,
        client_mode=False,
    )
    assert not a.store(
        f"{RUN}_progress", subkey=b_security.owner_marker, value=forged_progress, expiration_time=expires
    )
    # Its own record, but malformed: refused by the schema.
    for bad in ({**record, "samples": -1}, {**record, "loss": float("nan")}, {**record, "extra": 1}):
        assert not a.store(
            metrics_key(RUN), subkey=a_security.owner_marker, value=bad, expiration_time=expires
        )
    # The coordinator's record, under the coordinator's key or its own: only the authority writes it.
    for subkey in (a_security.authority_marker, a_security.owner_marker):
        assert not a.store(collected_key(RUN), subkey=subkey, value=1, expiration_time=expires)
    # b's credential re-published by a under a's own key names another key: refused.
    b_token = b_security.credentials.current().SerializeToString()
    assert not a.store(
        admitted_key(RUN), subkey=a_security.owner_marker, value=b_token, expiration_time=expires
    )

    assert b.get(collected_key(RUN), latest=True) is None
    found = poll(
        lambda: peer_metrics(coordinator.dht.get(metrics_key(RUN), latest=True)), lambda r: len(r) >= 1
    )
    assert [(owner, m.samples) for owner, m in found] == [(a_security.public_key, 240)]
    assert b.get(f"{RUN}_progress", latest=True) is None
    participants = coordinator.swarm_participants(RUN)
    assert [(p["worker"], p["peer_id"], p["samples"]) for p in participants] == [
        ("w-a", a.peer_id.to_base58(), 240)
    ]
