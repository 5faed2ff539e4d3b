"""join-swarm against a real coordinator: the download cache, and a fusion round that outlives a coordinator kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import wait_for

from coldswarm.common.channel import bearer, open_channel
from coldswarm.common.hashing import sha256_file
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.server import start_server
from coldswarm.lm.default import build_default_version
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc
from coldswarm.worker.client import CoordinatorClient
from coldswarm.worker.downloads import VersionCache

TINY_FUSION = {
    "peft_method": "lora",
    "codec": "zstd",
    "hyperparameters": {
        "steps": 8,
        "batch_size": 4,
        "eval_examples": 4,
        "fisher_examples": 4,
        "regmean_batches": 1,
        "max_input_length": 64,
    },
}


@pytest.fixture(scope="module")
def version0(tmp_path_factory) -> Path:
    return build_default_version(tmp_path_factory.mktemp("v0") / "model")


@pytest.fixture
def in_process(tmp_path, version0):
    config = CoordinatorConfig(
        data_dir=tmp_path / "coord", listen="127.0.0.1:0", base_model=version0, tick_s=0.1
    )
    running = start_server(config)
    admin_token = config.admin_token_path.read_text().strip()
    channel = open_channel(running.address)
    join = pb_grpc.AdminServiceStub(channel).CreateToken(
        pb.CreateTokenRequest(), metadata=bearer(admin_token)
    )
    session = pb_grpc.WorkerServiceStub(channel).Register(
        pb.RegisterRequest(name="t"), metadata=bearer(join.token)
    )
    client = CoordinatorClient(running.address, session.session_token)
    yield client
    client.close()
    channel.close()
    running.stop(grace=0)


def test_version_cache_verifies_and_refetches_corrupt_files(in_process, tmp_path, version0):
    cache = VersionCache(tmp_path / "cache")
    got = cache.ensure(in_process, 0)
    assert sha256_file(got / "model.safetensors") == sha256_file(version0 / "model.safetensors")
    info = in_process.call("GetVersion", pb.GetVersionRequest(version="0"))
    weights = next(e for e in info.files if e.path == "model.safetensors")

    # Corrupted on disk after the download: found by the check before use, fetched again.
    blob = cache.blobs / weights.sha256
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    again = cache.ensure(in_process, 0)
    assert sha256_file(again / "model.safetensors") == weights.sha256

    # A partial download that arrived corrupt (complete size, wrong bytes): refused, fetched from zero.
    blob.unlink()
    (cache.partial / f"{weights.sha256}.part").write_bytes(b"\0" * weights.size)
    third = cache.ensure(in_process, 0)
    assert sha256_file(third / "model.safetensors") == weights.sha256
    assert not list(cache.partial.iterdir())


def test_interrupted_download_resumes_from_the_bytes_on_disk(in_process, tmp_path):
    cache = VersionCache(tmp_path / "cache")
    info = in_process.call("GetVersion", pb.GetVersionRequest(version="0"))
    weights = next(e for e in info.files if e.path == "model.safetensors")
    # Fetch the first half of the file only, as a killed worker would have left it.
    part = cache.partial / f"{weights.sha256}.part"
    with open(part, "wb") as fh:
        for chunk in in_process.stream("DownloadVersion", pb.DownloadRequest(version="0", path=weights.path)):
            fh.write(chunk.data)
            if fh.tell() >= weights.size // 2:
                break
    kept = part.stat().st_size
    received = []
    cache.ensure(in_process, 0, progress=received.append)
    assert 0 < kept < weights.size
    assert sha256_file(cache.blobs / weights.sha256) == weights.sha256
    # Progress counts the kept bytes once (at resume) plus what was streamed: each byte of every file exactly
    # once when the download resumed, the kept half twice had it started over.
    assert kept in received
    assert sum(received) == sum(e.size for e in info.files)


def test_bandwidth_is_measured_from_a_real_download(in_process):
    from coldswarm.worker.capabilities import measure_bandwidth

    rate = measure_bandwidth(in_process, max_bytes=4 * 2**20)
    assert rate > 0, "a 4 MiB download over loopback was timed"


class CoordinatorProcess:
    """``coldswarm-coordinator serve`` as a child process that a test can kill and restart."""

    def __init__(self, processes, data_dir: Path, base_model: Path, port: int):
        self.processes = processes
        self.data_dir = data_dir
        self.base_model = base_model
        self.address = f"127.0.0.1:{port}"
        self.proc = None

    def start(self) -> CoordinatorProcess:
        self.proc = self.processes.python(
            "coldswarm.coordinator.cli",
            "serve",
            f"--data-dir={self.data_dir}",
            f"--listen={self.address}",
            f"--base-model={self.base_model}",
            f"--join-token-file={self.data_dir / 'join.token'}",
            "--tick-s=0.2",
            "--heartbeat-interval-s=1",
        )
        # open_channel caps gRPC's reconnect backoff (else it grows towards 2 minutes between attempts).
        with open_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 180
            while True:
                assert self.proc.poll() is None, "the coordinator exited"
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the coordinator at {self.address} did not become ready")
                time.sleep(0.3)
        self.channel = grpc.insecure_channel(self.address)
        self.admin = pb_grpc.AdminServiceStub(self.channel)
        self.md = bearer((self.data_dir / "admin.token").read_text().strip())
        return self

    def kill(self) -> None:
        self.channel.close()
        self.processes.kill(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=30)


def join_swarm(processes, coordinator: CoordinatorProcess, tmp_path: Path, *flags: str, **popen):
    """``join-swarm`` as a child process, with the coordinator's join token unless ``flags`` give one."""
    token = (
        []
        if any(f.startswith("--token") for f in flags)
        else [f"--token-file={coordinator.data_dir / 'join.token'}"]
    )
    return processes.start(
        [
            sys.executable,
            "-m",
            "coldswarm.worker.cli",
            f"--coordinator={coordinator.address}",
            *token,
            f"--work-dir={tmp_path / 'worker'}",
            *flags,
        ],
        **popen,
    )


@pytest.mark.slow
@pytest.mark.timeout(1500)  # its own waits add up past the suite's 600 s per test
def test_fusion_assignment_survives_a_coordinator_kill(processes, tmp_path, version0, port):
    coordinator = CoordinatorProcess(processes, tmp_path / "coord", version0, port).start()
    worker = join_swarm(
        processes, coordinator, tmp_path, "--device=cpu", "--max-assignments=1", "--log-format=json"
    )
    # Long enough (seconds even on an idle machine) that heartbeats report the training phase before it
    # ends: with TINY_FUSION's 8 steps the worker could upload before the test ever saw it train.
    options = {**TINY_FUSION, "hyperparameters": {**TINY_FUSION["hyperparameters"], "steps": 40}}
    rnd = coordinator.admin.OpenRound(
        pb.OpenRoundRequest(kind="fusion", quorum=1, method="fisher", options_json=json.dumps(options)),
        metadata=coordinator.md,
    )

    def training():
        rounds = coordinator.admin.ListRounds(pb.ListRoundsRequest(), metadata=coordinator.md).rounds
        r = next(r for r in rounds if r.id == rnd.id)
        assert r.state == "open", f"the round moved on ({r.state}) before the test saw the worker train"
        workers = coordinator.admin.ListWorkers(pb.ListWorkersRequest(), metadata=coordinator.md).workers
        progress = [json.loads(w.progress_json or "{}") for w in workers]
        return any(p.get("phase") == "training" or p.get("step", 0) >= 1 for p in progress)

    wait_for(training, 300, "the worker to start training", poll=0.5)
    coordinator.kill()
    time.sleep(2)  # the worker keeps training; its heartbeats fail meanwhile
    coordinator.start()

    def published():
        rounds = coordinator.admin.ListRounds(pb.ListRoundsRequest(), metadata=coordinator.md).rounds
        r = next(r for r in rounds if r.id == rnd.id)
        assert r.state not in ("failed", "cancelled"), r.error
        return r if r.state == "published" else None

    done = wait_for(published, 600, "the round to merge and publish", poll=0.5)
    contributions = coordinator.admin.ListContributions(
        pb.ListContributionsRequest(round_id=rnd.id), metadata=coordinator.md
    ).contributions
    assert len(contributions) == 1 and contributions[0].form == "lora"
    assert done.result_version == 1
    assert worker.wait(timeout=120) == 0, "join-swarm exits 0 after --max-assignments"


def test_worker_stops_cleanly_on_sigterm_while_waiting_for_work(processes, tmp_path, version0, port):
    coordinator = CoordinatorProcess(processes, tmp_path / "coord", version0, port).start()
    worker = join_swarm(processes, coordinator, tmp_path)

    def registered():
        return coordinator.admin.ListWorkers(pb.ListWorkersRequest(), metadata=coordinator.md).workers

    wait_for(registered, 120, "the worker to register", poll=0.5)
    processes.kill(worker, signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    gone = coordinator.admin.ListWorkers(pb.ListWorkersRequest(include_gone=True), metadata=coordinator.md)
    assert [w.state for w in gone.workers] == ["gone"], "Leave tells the coordinator"
    assert (tmp_path / "worker" / "session.json").stat().st_mode & 0o777 == 0o600


def test_bad_token_exits_non_zero_with_advice(processes, tmp_path, version0, port):
    coordinator = CoordinatorProcess(processes, tmp_path / "coord", version0, port).start()
    result = join_swarm(
        processes, coordinator, tmp_path, "--token=not-a-token", stderr=subprocess.PIPE, text=True
    )
    _, err = result.communicate(timeout=120)
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in err and "join token" in err
