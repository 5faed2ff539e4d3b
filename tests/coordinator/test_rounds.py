"""Round life cycles: deadlines, evaluation hook, candidates, the pretrain checkpointer's door, state."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest
from support import save_tiny_t5, wait_for

from coldswarm.coordinator.store import SCHEMA_VERSION, Store
from coldswarm.proto import coldswarm_pb2 as pb

from .conftest import delta_contribution


def rounds(h):
    return h.admin.ListRounds(pb.ListRoundsRequest(), metadata=h.amd).rounds


def wait_state(h, round_id, states, timeout=30.0):
    def reached():
        r = next(r for r in rounds(h) if r.id == round_id)
        return r if r.state in states else None

    def now() -> str:
        return f"round {round_id} is {next(r for r in rounds(h) if r.id == round_id).state}"

    return wait_for(reached, timeout, f"round {round_id} to be {' or '.join(states)}", poll=0.05, detail=now)


def test_deadline_closes_and_merges_what_arrived(harness, tiny_model):
    # Everything slow happens before the round opens: the deadline only has to outlast one upload.
    worker, payload = harness.register(), delta_contribution(tiny_model)
    rnd = harness.open_fusion(quorum=5, deadline_s=5)
    worker.upload(payload, rnd.id)
    r = wait_state(harness, rnd.id, ("published", "failed"))
    assert r.state == "published" and r.contributions == 1 and r.result_version == 1
    # A round nobody contributed to fails at its deadline, and the next one can open.
    rnd = harness.open_fusion(quorum=5, deadline_s=0.3)
    r = wait_state(harness, rnd.id, ("published", "failed"))
    assert r.state == "failed" and "no contributions" in r.error
    harness.open_fusion()


def test_evaluator_hook_and_candidates(make_harness, tiny_model, tmp_path, monkeypatch):
    (tmp_path / "fake_eval.py").write_text(
        "from pathlib import Path\n"
        "def evaluate(d):\n"
        "    return {'seen_token_loss': 0.5, 'has_weights': (Path(d) / 'model.safetensors').exists()}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    h = make_harness(evaluator="fake_eval:evaluate", auto_publish=False)
    rnd = h.open_fusion(quorum=1)
    h.register().upload(delta_contribution(tiny_model), rnd.id)
    r = wait_state(h, rnd.id, ("merged", "failed"))
    assert r.state == "merged", r.error
    v = h.admin.GetVersion(pb.GetVersionRequest(version=str(r.result_version)), metadata=h.amd)
    assert v.state == "candidate" and not v.is_current
    manifest = json.loads(v.manifest_json)
    assert manifest["metrics"] == {"seen_token_loss": 0.5, "has_weights": True}
    # As good as its parent (version 0, the same evaluator's 0.5): it passed the gate, and awaits `publish`.
    assert manifest["gate"]["passed"] and manifest["evaluated_by"] == "fake_eval:evaluate"
    assert h.admin.Status(pb.StatusRequest(), metadata=h.amd).current_version == 0
    assert h.admin.Publish(pb.PublishRequest(version=v.number), metadata=h.amd).is_current


def test_the_gate_scores_a_parent_again_when_the_evaluators_protocol_changed(
    make_harness, tiny_model, tmp_path, monkeypatch
):
    # An evaluator whose test set an upgrade changed: under protocol "b" every model scores 0.7, where
    # the parent's stored score (protocol "a") says 0.5. Compared with that, the candidate looks worse.
    (tmp_path / "protocol.txt").write_text("a")
    (tmp_path / "versioned_eval.py").write_text(
        "from pathlib import Path\n"
        f"STATE = Path({str(tmp_path)!r})\n"
        "def evaluate(d):\n"
        "    p = (STATE / 'protocol.txt').read_text()\n"
        "    with open(STATE / 'calls.txt', 'a') as f:\n"
        "        f.write(p)\n"
        "    return {'seen_token_loss': {'a': 0.5, 'b': 0.7}[p], 'protocol': p}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    h = make_harness(evaluator="versioned_eval:evaluate", auto_publish=False)
    assert (tmp_path / "calls.txt").read_text() == "a"  # version 0, scored when it was made
    (tmp_path / "protocol.txt").write_text("b")
    rnd = h.open_fusion(quorum=1)
    h.register().upload(delta_contribution(tiny_model), rnd.id)
    r = wait_state(h, rnd.id, ("merged", "rejected", "failed"))
    assert r.state == "merged", r.error
    gate = json.loads(h.admin.GetVersion(pb.GetVersionRequest(version="1"), metadata=h.amd).manifest_json)[
        "gate"
    ]
    assert gate["passed"] and gate["parent"] == {"seen_token_loss": 0.7}, gate
    assert (tmp_path / "calls.txt").read_text() == "abb"  # the candidate, then its parent again


def test_assignments(harness):
    harness.open_fusion(quorum=2, options_json=json.dumps({"peft_method": "ia3", "codec": "zstd"}))
    w = harness.register()
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    assert a.fusion.peft_method == "ia3" and a.fusion.codec == "zstd" and a.deadline > time.time()
    assert w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md).id == a.id  # idempotent
    w.stub.ReportAssignment(pb.ReportAssignmentRequest(assignment_id=a.id, outcome="failed"), metadata=w.md)
    b = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    assert b.id != a.id and b.fusion.shard == "default:1-of-2"
    other = harness.register()
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        other.stub.ReportAssignment(
            pb.ReportAssignmentRequest(assignment_id=b.id, outcome="done"), metadata=other.md
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_worker_done_with_a_pretrain_round_gets_no_more_work_in_it(harness):
    harness.admin.OpenRound(pb.OpenRoundRequest(kind="pretrain", quorum=2), metadata=harness.amd)
    w = harness.register()
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    assert a.pretrain.run_id
    w.stub.ReportAssignment(pb.ReportAssignmentRequest(assignment_id=a.id, outcome="done"), metadata=w.md)
    # The checkpointer may still be collecting: starting the run again would be wasted (and confusing).
    assert w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md).id == ""
    other = harness.register()
    assert other.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=other.md).id


def test_statistics_follow_the_method(harness):
    harness.admin.OpenRound(pb.OpenRoundRequest(kind="fusion", method="average"), metadata=harness.amd)
    w = harness.register()
    assert list(w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md).fusion.statistics) == []


def test_pretrain_round_records_a_version(make_harness, tiny_model, tmp_path):
    harness = make_harness(dht_peers=["/ip4/127.0.0.1/tcp/31337/p2p/Qm"])
    closed = []
    harness.app.rounds.on_round_closed.append(closed.append)  # what the checkpointer hooks in
    rnd = harness.admin.OpenRound(
        pb.OpenRoundRequest(
            kind="pretrain", quorum=2, options_json='{"target_batch_size": 128, "epochs": 3}'
        ),
        metadata=harness.amd,
    )
    w = harness.register()
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    assert a.pretrain.target_batch_size == 128 and a.pretrain.epochs == 3
    assert list(a.pretrain.initial_peers) == ["/ip4/127.0.0.1/tcp/31337/p2p/Qm"]
    r = harness.admin.CloseRound(pb.CloseRoundRequest(), metadata=harness.amd)
    assert r.state == "closing" and [c.id for c in closed] == [rnd.id]
    averaged = save_tiny_t5(tmp_path / "averaged", seed=7)
    v = harness.app.merges.record_version(averaged, rnd.id, kind="pretrain", metrics={"loss": 3.2})
    assert v.number == 1 and v.parent == 0 and v.kind == "pretrain" and v.is_current
    assert v.manifest["metrics"] == {"loss": 3.2}
    r = rounds(harness)[0]
    assert r.state == "published" and r.result_version == 1


def test_pretrain_close_without_checkpointer_fails_clearly(harness):
    harness.admin.OpenRound(pb.OpenRoundRequest(kind="pretrain"), metadata=harness.amd)
    r = harness.admin.CloseRound(pb.CloseRoundRequest(), metadata=harness.amd)
    assert r.state == "failed" and "checkpointer" in r.error


def test_schema_migrations(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    assert store.schema_version() == SCHEMA_VERSION
    assert store.one("PRAGMA journal_mode")[0] == "wal"
    store.close()
    assert Store(tmp_path / "s.sqlite").migrate() == SCHEMA_VERSION  # idempotent
    conn = sqlite3.connect(tmp_path / "s.sqlite")
    conn.execute("INSERT INTO migrations VALUES (?, 'from the future', 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="upgrade coldswarm"):
        Store(tmp_path / "s.sqlite")


def test_init_subcommand(tmp_path, tiny_model):
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "coldswarm.coordinator.cli", "init", "--data-dir", str(data)]
    out = subprocess.run([*cmd, "--base-model", str(tiny_model)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "admin token written to" in out.stdout and "version 0 is published" in out.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "admin token" not in again.stdout  # said once
    bad = subprocess.run(
        [*cmd[:-1], str(tmp_path / "other"), "--base-model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "config.json" in bad.stderr


def test_silent_workers_lose_their_assignment(make_harness):
    h = make_harness(worker_gone_after_s=0.5)
    h.open_fusion(quorum=2)
    w = h.register()
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    time.sleep(1.0)
    h.app.tick()  # what the ticker thread does; a starved ticker must not decide this test
    assert h.admin.ListWorkers(pb.ListWorkersRequest(), metadata=h.amd).workers == []
    gone = h.admin.ListWorkers(pb.ListWorkersRequest(include_gone=True), metadata=h.amd).workers
    assert [x.state for x in gone] == ["gone"]
    # Back again: the old assignment expired, it gets a fresh one.
    assert w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md).id != a.id


def test_health_and_reflection(harness):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(harness.channel)
    for service in ("", "coldswarm.v1.WorkerService", "coldswarm.v1.AdminService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"coldswarm.v1.WorkerService", "coldswarm.v1.AdminService", "grpc.health.v1.Health"} <= names


def test_join_token_file_and_health_subcommand(make_harness, tmp_path, capsys):
    from coldswarm.common.channel import bearer
    from coldswarm.coordinator import cli

    token_file = tmp_path / "join.token"
    h = make_harness(join_token_file=token_file)
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    token = token_file.read_text().strip()
    h.workers.Register(pb.RegisterRequest(name="local"), metadata=bearer(token))
    # Kept across restarts while valid; replaced once revoked.
    assert not h.app.auth.ensure_join_token_file(token_file)
    tid = [t.id for t in h.app.auth.list() if t.kind == "join"][0]
    h.app.auth.revoke(tid)
    assert h.app.auth.ensure_join_token_file(token_file) and token_file.read_text().strip() != token
    assert cli.main(["health", "--address", h.address]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_health_subcommand_unreachable(port, capsys):
    from coldswarm.coordinator import cli

    assert cli.main(["health", "--address", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert "not answering" in capsys.readouterr().err
