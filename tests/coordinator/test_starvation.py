"""No caller can starve the coordinator (issue 13, class 1).

The attack clients are raw gRPC, as the issue's attacker's were: generic ``stream_stream`` /
``unary_stream`` / ``stream_unary`` calls by method path with serialized bytes, no coldswarm client code.
The server runs with 8 threads; each attack opens more streams than that, which hold their calls open
and never send (or never read); health and an admin call must still answer within a second.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import save_file

from coldswarm.proto import coldswarm_pb2 as pb

THREADS = 8
N = 3 * THREADS  # streams per attack: well above the thread count

REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
UPLOAD = "/coldswarm.v1.WorkerService/UploadContribution"
DOWNLOAD = "/coldswarm.v1.WorkerService/DownloadVersion"
ADMIN_STATUS = "/coldswarm.v1.AdminService/Status"


class Attack:
    """``n`` calls of ``method`` that hold the stream open and never send (requests block on an event)."""

    def __init__(self, address: str, method: str, n: int, metadata=(), request: bytes | None = None):
        # One channel per call, as separate attackers would: nothing shares a connection with the checks.
        self.release = threading.Event()
        self.channels = [grpc.insecure_channel(address) for _ in range(n)]
        self.calls = []
        for ch in self.channels:
            if request is not None:  # server streaming: one request, then never read the replies
                call = ch.unary_stream(method)(request, metadata=metadata)
            else:
                call = ch.stream_stream(method)(self._silent(), metadata=metadata)
            self.calls.append(call)

    def _silent(self):
        self.release.wait()
        return
        yield  # a generator that never yields while the attack lasts

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        for ch in self.channels:
            ch.close()

    def wait_settled(self, timeout: float = 30.0) -> dict[str, int]:
        """Wait until every call was either refused (ended) or is being served; returns codes of ended ones."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [c for c in self.calls if c.done()]
            if len(done) >= len(self.calls) - THREADS:
                break
            time.sleep(0.05)
        codes: dict[str, int] = {}
        for c in self.calls:
            if c.done():
                codes[c.code().name] = codes.get(c.code().name, 0) + 1
        return codes


def answers_within_a_second(h) -> None:
    """Health (raw bytes) and an admin call (raw bytes), each on a fresh channel, within 1 s."""
    from grpc_health.v1 import health_pb2

    with grpc.insecure_channel(h.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)  # connecting is not what is measured
        t0 = time.monotonic()
        raw = ch.unary_unary(HEALTH_CHECK)(health_pb2.HealthCheckRequest().SerializeToString(), timeout=1)
        assert health_pb2.HealthCheckResponse.FromString(raw).status == health_pb2.HealthCheckResponse.SERVING
        raw = ch.unary_unary(ADMIN_STATUS)(pb.StatusRequest().SerializeToString(), metadata=h.amd, timeout=1)
        assert pb.StatusResponse.FromString(raw).current_version >= 0
        assert time.monotonic() - t0 < 2.0


@pytest.fixture
def small(make_harness):
    return make_harness(threads=THREADS)


def test_idle_reflection_and_health_streams_without_a_token(small):
    attacks = [Attack(small.address, REFLECTION, N), Attack(small.address, HEALTH_WATCH, N, request=b"")]
    try:
        codes = attacks[0].wait_settled()
        answers_within_a_second(small)
        assert codes.get("RESOURCE_EXHAUSTED", 0) >= N - THREADS, codes
        # The admin's reflection (with its token: its own share of streams) still works beside them.
        reflection_answers(small, metadata=small.amd)
    finally:
        for a in attacks:
            a.close()
    reflection_answers(small)  # and anyone's, once the attack is over


def reflection_answers(h, metadata=()):
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(h.address) as ch:
        request = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        reply = next(iter(ch.stream_stream(REFLECTION)(iter([request]), metadata=metadata, timeout=5)))
        names = {
            s.name
            for s in reflection_pb2.ServerReflectionResponse.FromString(reply).list_services_response.service
        }
        assert "coldswarm.v1.AdminService" in names


def test_idle_upload_streams_of_one_worker(small):
    w = small.register()
    attack = Attack(small.address, UPLOAD, N, metadata=w.md)
    try:
        codes = attack.wait_settled()
        answers_within_a_second(small)
        assert codes.get("RESOURCE_EXHAUSTED", 0) >= N - THREADS, codes
    finally:
        attack.close()


def _big_version(h, tmp_path) -> str:
    """Publish a version with a 16 MiB file: more than any flow-control window, so an unread download blocks."""
    import shutil

    from support import save_tiny_t5

    d = save_tiny_t5(tmp_path / "big")
    save_file({"blob": torch.zeros(4 * 2**20)}, str(d / "extra.safetensors"))
    v = h.app.merges.record_version(d, None, kind="init", publish=True)
    shutil.rmtree(d)
    return str(v.number)


def test_unread_download_streams_of_one_worker(small, tmp_path):
    version = _big_version(small, tmp_path)
    w = small.register()
    request = pb.DownloadRequest(version=version, path="extra.safetensors").SerializeToString()
    attack = Attack(small.address, DOWNLOAD, N, metadata=w.md, request=request)
    try:
        codes = attack.wait_settled()
        answers_within_a_second(small)
        assert codes.get("RESOURCE_EXHAUSTED", 0) >= N - THREADS, codes
    finally:
        attack.close()


def test_many_workers_cannot_take_every_thread(small):
    """Each worker within its own cap, together past the thread count: the global cap keeps threads free."""
    workers = [small.register(name=f"w{i}") for i in range(N)]
    attacks = [Attack(small.address, UPLOAD, 1, metadata=w.md) for w in workers]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(a.calls[0].done() for a in attacks) < N - THREADS:
            time.sleep(0.05)
        answers_within_a_second(small)
        ended = [a.calls[0].code() for a in attacks if a.calls[0].done()]
        assert len(ended) >= N - THREADS and set(ended) == {grpc.StatusCode.UNAVAILABLE}, ended
    finally:
        for a in attacks:
            a.close()


def test_idle_and_slow_streams_are_ended(make_harness):
    h = make_harness(threads=THREADS, stream_idle_s=1.0, stream_max_s=4.0)
    w = h.register()
    rnd = h.open_fusion(quorum=2)
    # Idle: a stream that sends nothing is ended by the server (DEADLINE_EXCEEDED, which clients retry).
    t0 = time.monotonic()
    idle = Attack(h.address, UPLOAD, 1, metadata=w.md)
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(idle.calls[0])
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        assert "idle" in info.value.details()
        assert time.monotonic() - t0 < 15
    finally:
        idle.close()
    # Slow: one byte at a time, never idle for a second, is ended at stream_max_s; its bytes are kept.
    up = w.stub.BeginUpload(
        pb.BeginUploadRequest(round_id=rnd.id, base_version=0, total_size=10_000, codec="none"), metadata=w.md
    )

    def trickle():
        for i in range(10_000):
            yield pb.UploadChunk(upload_id=up.upload_id, offset=i, data=b"x").SerializeToString()
            time.sleep(0.1)

    t0 = time.monotonic()
    with grpc.insecure_channel(h.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.stream_unary(UPLOAD)(trickle(), metadata=w.md, timeout=60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert 3.5 < time.monotonic() - t0 < 20
    deadline = time.monotonic() + 10
    resumed = None
    while resumed is None and time.monotonic() < deadline:
        try:
            resumed = w.stub.BeginUpload(
                pb.BeginUploadRequest(round_id=rnd.id, base_version=0, total_size=10_000, codec="none"),
                metadata=w.md,
            )
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            time.sleep(0.05)
    assert resumed is not None and resumed.upload_id == up.upload_id and resumed.offset > 0
    answers_within_a_second(h)
