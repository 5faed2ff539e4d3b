"""The coordinator as a real process: first start, kill -9 mid-upload and mid-merge, restart.

After each kill the state is consistent: no partial contribution or version is
visible, the killed upload resumes, and the killed merge re-runs to the same
weights (same sha256) as an independent re-merge of the same contributions.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time

import grpc
import pytest
from support import wait_for

from coldswarm.common.channel import bearer, open_channel
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

from .conftest import chunks, delta_contribution, sha

pytestmark = pytest.mark.slow
MERGE_DELAY_S = 8.0  # the window the test kills the merge in; generous for a loaded machine


def wait_ready(address: str, proc, timeout: float = 180.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"coordinator exited with {proc.returncode}"
        try:
            with open_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"coordinator at {address} did not become ready")


def start(processes, data_dir, port, base_model, log):
    proc = processes.start(
        [
            sys.executable,
            "-m",
            "coldswarm.coordinator.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--base-model",
            str(base_model),
            "--tick-s",
            "0.2",
        ],
        env={"COLDSWARM_TEST_MERGE_DELAY_S": str(MERGE_DELAY_S)},
        stdout=log,
        stderr=log,
    )
    wait_ready(f"127.0.0.1:{port}", proc)
    return proc


def kill9(processes, proc) -> None:
    processes.kill(proc)
    proc.wait(timeout=10)


def test_kill_during_upload_and_merge(processes, port, tmp_path, tiny_model):
    data_dir = tmp_path / "data"
    log = open(tmp_path / "coordinator.log", "ab")
    address = f"127.0.0.1:{port}"
    proc = start(processes, data_dir, port, tiny_model, log)

    token_file = data_dir / "admin.token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    amd = bearer(token_file.read_text().strip())
    channel = open_channel(address)
    admin, workers = pb_grpc.AdminServiceStub(channel), pb_grpc.WorkerServiceStub(channel)

    rnd = admin.OpenRound(pb.OpenRoundRequest(kind="fusion", quorum=2), metadata=amd)
    join = admin.CreateToken(pb.CreateTokenRequest(label="t"), metadata=amd).token
    ws = []
    for name in ("a", "b"):
        r = workers.Register(pb.RegisterRequest(name=name), metadata=bearer(join))
        md = bearer(r.session_token)
        a = workers.GetAssignment(pb.GetAssignmentRequest(), metadata=md)
        ws.append((md, a))
    payloads = [delta_contribution(tiny_model, seed=s) for s in (1, 2)]

    # -- kill -9 during an upload ------------------------------------------------------------
    md, a = ws[0]
    data = payloads[0]
    begin = pb.BeginUploadRequest(assignment_id=a.id, round_id=rnd.id, base_version=0, total_size=len(data))
    up = workers.BeginUpload(begin, metadata=md)
    half = len(data) // 2
    sent_half = threading.Event()

    def stalled():
        yield pb.UploadChunk(upload_id=up.upload_id, offset=0, data=data[:half])
        sent_half.set()
        time.sleep(30)  # never finishes: the coordinator dies first

    errors = []
    t = threading.Thread(
        target=lambda: errors.append(
            pytest.raises(grpc.RpcError, workers.UploadContribution, stalled(), metadata=md)
        ),
        daemon=True,
    )
    t.start()
    assert sent_half.wait(10)
    part = data_dir / "uploads" / f"{up.upload_id}.part"
    wait_for(lambda: part.exists() and part.stat().st_size == half, 20, "the first half on disk")
    kill9(processes, proc)
    t.join(timeout=10)

    proc = start(processes, data_dir, port, tiny_model, log)
    assert list(admin.ListContributions(pb.ListContributionsRequest(), metadata=amd).contributions) == []
    assert len(admin.ListVersions(pb.ListVersionsRequest(), metadata=amd).versions) == 1
    again = workers.BeginUpload(begin, metadata=md)
    assert again.upload_id == up.upload_id and again.offset == half
    resp = workers.UploadContribution(chunks(up.upload_id, data, offset=again.offset), metadata=md)
    assert resp.sha256 == sha(data)

    # -- kill -9 during the merge ------------------------------------------------------------
    md, a = ws[1]
    begin = pb.BeginUploadRequest(
        assignment_id=a.id, round_id=rnd.id, base_version=0, total_size=len(payloads[1])
    )
    up = workers.BeginUpload(begin, metadata=md)
    workers.UploadContribution(chunks(up.upload_id, payloads[1]), metadata=md)  # quorum: the merge starts

    def merging():
        r = admin.ListRounds(pb.ListRoundsRequest(), metadata=amd).rounds[0]
        return r.state == "merging"

    wait_for(merging, 20, "the round to start merging")
    # The merge writes its output first, then sleeps MERGE_DELAY_S before recording: kill in there.
    wait_for(lambda: any(p.name.startswith("merge-") for p in (data_dir / "tmp").iterdir()), 10, "merge dir")
    time.sleep(1.0)
    kill9(processes, proc)
    assert (data_dir / "tmp").exists()

    proc = start(processes, data_dir, port, tiny_model, log)
    # The re-run merge starts with the server, so on a slow start it may already have published; what must
    # never be visible is a version without its round published.
    versions = admin.ListVersions(pb.ListVersionsRequest(), metadata=amd).versions
    state = admin.ListRounds(pb.ListRoundsRequest(), metadata=amd).rounds[0].state
    numbers = [v.number for v in versions]  # read before the state: a publish in between only adds a version
    assert numbers == [0] or (numbers == [0, 1] and state == "published"), (
        "a partial version",
        numbers,
        state,
    )

    def published():
        r = admin.ListRounds(pb.ListRoundsRequest(), metadata=amd).rounds[0]
        assert r.state in ("closing", "merging", "published"), r.error
        return r if r.state == "published" else None

    r = wait_for(published, 60, "the re-run merge to publish")
    assert r.result_version == 1
    v1 = admin.GetVersion(pb.GetVersionRequest(version="latest"), metadata=amd)
    assert v1.number == 1 and v1.parent == 0 and v1.is_current
    contributions = admin.ListContributions(pb.ListContributionsRequest(), metadata=amd).contributions
    assert [c.state for c in contributions] == ["merged", "merged"]
    manifest = json.loads(v1.manifest_json)
    assert [c["id"] for c in manifest["contributions"]] == [c.id for c in contributions]

    # The same merge again, independently (admin re-merge): byte-identical weights.
    v2 = admin.Merge(pb.MergeRequest(round_id=r.id), metadata=amd, timeout=120)
    weights = {v.number: {f.path: f.sha256 for f in v.files}["model.safetensors"] for v in (v1, v2)}
    assert weights[1] == weights[2]
    # Nothing half-written is left behind.
    assert not list((data_dir / "uploads").glob("*.part"))
    assert not [p for p in (data_dir / "tmp").iterdir() if p.name.startswith("merge-")]
    channel.close()
    processes.kill(proc, sig=15)
    assert proc.wait(timeout=60) == 0
