"""A real coordinator with a story to show: the status page's tests (HTTP and browser) read it.

Versions 0-4: 0 (init), 1 (a finished pretrain round, collected the way the pretrain collector
records it), 2 (a fusion round, published), 3 (a fusion round the gate rejected: its state set
through the store as the gate does), 4 (an admin re-merge of round 2: a candidate). The pretrain
round's curves come from real heartbeats (both workers training) and from DHT readings recorded
through the same call the collector makes. Every version is scored by a stand-in evaluator (the
thing under test is the page, not the evaluation).
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

from coldswarm.common.channel import bearer, open_channel
from coldswarm.coordinator.series import SeriesSource, dht_values
from coldswarm.coordinator.server import RunningServer, start_server
from coldswarm.coordinator.states import RoundState
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

from .conftest import chunks, delta_contribution, make_config

EVALUATOR_MODULE = "coldswarm_status_test_evaluator"

# What the stand-in evaluator says of each version, in the order versions are evaluated (0, 1, 2, 3, 4).
SCORES = [
    {
        "mod_loss": {"R": 9.02, "S": 9.11, "X": 8.95},
        "seen_exact_match": 0.0,
        "seen_token_loss": 8.97,
        "heldout_exact_match": 0.167,
        "eval_seconds": 1.5,
    },
    {
        "mod_loss": {"R": 6.81, "S": 7.05, "X": 6.92},
        "seen_exact_match": 0.0,
        "seen_token_loss": 6.41,
        "heldout_exact_match": 0.139,
        "eval_seconds": 1.4,
    },
    {
        "mod_loss": {"R": 7.12, "S": 7.33, "X": 7.20},
        "seen_exact_match": 0.062,
        "seen_token_loss": 4.95,
        "heldout_exact_match": 0.194,
        "eval_seconds": 1.6,
    },
    {
        "mod_loss": {"R": 8.20, "S": 8.41, "X": 8.33},
        "seen_exact_match": 0.031,
        "seen_token_loss": 5.81,
        "heldout_exact_match": 0.167,
        "eval_seconds": 1.5,
    },
    {
        "mod_loss": {"R": 7.30, "S": 7.52, "X": 7.41},
        "seen_exact_match": 0.055,
        "seen_token_loss": 5.02,
        "heldout_exact_match": 0.181,
        "eval_seconds": 1.5,
    },
]


def install_evaluator() -> None:
    calls = {"n": 0}

    def evaluate(_version_dir):
        i = min(calls["n"], len(SCORES) - 1)
        calls["n"] += 1
        return dict(SCORES[i])

    module = types.ModuleType(EVALUATOR_MODULE)
    module.evaluate = evaluate
    sys.modules[EVALUATOR_MODULE] = module


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} within {timeout:.0f}s")


@dataclass
class Scenario:
    running: RunningServer
    admin_token: str
    tokens: list[str] = field(default_factory=list)  # every token of any kind this scenario used
    worker_ids: list[str] = field(default_factory=list)
    worker_names: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    pretrain_round: int = 0

    @property
    def url(self) -> str:
        return self.running.status_url

    @property
    def app(self):
        return self.running.app


def build(tmp: Path, tiny_model: Path, **config) -> Scenario:
    install_evaluator()
    config.setdefault("http_listen", "127.0.0.1:0")
    cfg = make_config(
        tmp / "data", tiny_model, evaluator=f"{EVALUATOR_MODULE}:evaluate", series_interval_s=0.05, **config
    )
    running = start_server(cfg)
    try:
        return _story(running, cfg, tiny_model)
    except BaseException:
        running.stop(grace=0)
        raise


def _story(running: RunningServer, cfg, tiny_model: Path) -> Scenario:
    app = running.app
    admin_token = cfg.admin_token_path.read_text().strip()
    s = Scenario(running, admin_token, tokens=[admin_token])
    channel = open_channel(running.address)
    admin, workers = pb_grpc.AdminServiceStub(channel), pb_grpc.WorkerServiceStub(channel)
    amd = bearer(admin_token)
    sessions = []
    for label, name in (("alice", "alice-laptop"), ("bob", "bob-gpu-box")):
        join = admin.CreateToken(pb.CreateTokenRequest(label=label), metadata=amd).token
        reply = workers.Register(
            pb.RegisterRequest(name=name, capabilities=pb.Capabilities(device="cpu", cpu_count=2)),
            metadata=bearer(join),
        )
        s.tokens += [join, reply.session_token]
        s.worker_ids.append(reply.worker_id)
        s.worker_names.append(name)
        s.labels.append(label)
        sessions.append(bearer(reply.session_token))

    # Round 1: pretrain. Both workers train and heartbeat; the DHT readings go through the collector's call.
    rnd = admin.OpenRound(
        pb.OpenRoundRequest(kind="pretrain", quorum=2, options_json='{"epochs": 3}'), metadata=amd
    )
    s.pretrain_round = rnd.id
    assignments = [workers.GetAssignment(pb.GetAssignmentRequest(), metadata=md).id for md in sessions]
    assert all(assignments), assignments
    for step in range(1, 9):
        for i, (md, aid) in enumerate(zip(sessions, assignments, strict=True)):
            workers.Heartbeat(
                pb.HeartbeatRequest(
                    assignment_id=aid,
                    phase="training",
                    step=step,
                    loss=9.0 - 0.35 * step + 0.1 * i,
                    samples_per_s=18.0 + 2 * i + step * 0.3,
                    metrics={"epoch": float(step // 3), "swarm_peers": 2.0},
                ),
                metadata=md,
            )
        reading = {
            "swarm_loss": 9.1 - 0.33 * step,
            "swarm_samples_per_s": 38.0 + step * 0.5,
            "swarm_peers": 2.0,
            "swarm_epoch_reported": float(step // 3),
        }
        # Refused while the last point is under series_interval_s old: the collector's next poll then.
        wait_for(
            lambda r=reading: app.series.record(rnd.id, SeriesSource.DHT, dht_values(r)), what="DHT point"
        )
        wait_for(
            lambda n=step: len(app.series.points(rnd.id).get(SeriesSource.HEARTBEATS, [])) >= n,
            what=f"heartbeat point {step}",
        )
    collected = {"epoch": 3.0, "swarm_loss": 6.5, "swarm_peers": 2.0, "swarm_samples_per_s": 42.0}
    version = app.merges.record_version(
        tiny_model, rnd.id, metrics={**collected, **app.merges.evaluate(tiny_model)}
    )
    app.rounds.close_round(rnd.id, reason="collected")
    assert app.rounds.get(rnd.id).state == RoundState.PUBLISHED and version.number == 1
    for md in sessions:
        workers.Heartbeat(pb.HeartbeatRequest(phase="idle"), metadata=md)

    # Rounds 2 and 3: fusion. Round 3's candidate scores worse than its parent (seen_token_loss 5.81 against
    # 4.95), so the publication gate holds it back: a rejected version.
    def fusion_round(base: int) -> int:
        r = admin.OpenRound(pb.OpenRoundRequest(kind="fusion", quorum=2), metadata=amd)
        for i, md in enumerate(sessions):
            a = workers.GetAssignment(pb.GetAssignmentRequest(), metadata=md)
            data = delta_contribution(tiny_model, seed=10 * base + i, base_version=base)
            begin = workers.BeginUpload(
                pb.BeginUploadRequest(
                    assignment_id=a.id,
                    round_id=r.id,
                    base_version=base,
                    total_size=len(data),
                    codec="none",
                    num_examples=32,
                ),
                metadata=md,
            )
            workers.UploadContribution(chunks(begin.upload_id, data, begin.offset), metadata=md)
        done = wait_for(
            lambda: (
                app.rounds.get(r.id).state in (RoundState.PUBLISHED, RoundState.REJECTED, RoundState.FAILED)
            ),
            what=f"round {r.id} merged",
        )
        assert done and app.rounds.get(r.id).state != RoundState.FAILED, app.rounds.get(r.id).error
        return r.id

    second = fusion_round(1)
    third = fusion_round(2)
    assert app.rounds.get(third).state == RoundState.REJECTED, app.rounds.get(third).error
    admin.Merge(pb.MergeRequest(round_id=second, method="average"), metadata=amd)
    for md in sessions:
        workers.Heartbeat(pb.HeartbeatRequest(phase="idle"), metadata=md)
    channel.close()
    states = [v.state for v in app.versions.list()]
    assert states == ["published", "published", "published", "rejected", "candidate"], states
    return s
