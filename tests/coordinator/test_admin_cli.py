"""coldswarm-admin against a live coordinator: tables, --json, failures, resumable verified download."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from coldswarm.coordinator import admin_cli
from coldswarm.proto import coldswarm_pb2 as pb

from .conftest import delta_contribution


def admin(h, *args, token=None, capsys=None):
    rc = admin_cli.main(["--coordinator", h.address, "--token", token or h.admin_token, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_status_tokens_rounds(harness, capsys):
    rc, out, _ = admin(harness, "status", capsys=capsys)
    assert rc == 0 and "version 0 of 1" in out and "none open" in out
    rc, out, _ = admin(harness, "--json", "tokens", "create", "--label", "bob", capsys=capsys)
    created = json.loads(out)
    assert rc == 0 and created["token"].startswith("csj_") and created["info"]["label"] == "bob"
    rc, out, _ = admin(harness, "tokens", "list", capsys=capsys)
    assert "bob" in out and created["token"] not in out
    rc, out, _ = admin(harness, "tokens", "revoke", created["info"]["id"], capsys=capsys)
    assert rc == 0 and "revoked" in out
    rc, out, _ = admin(
        harness,
        "round",
        "open",
        "--kind",
        "fusion",
        "--quorum",
        "3",
        "--options",
        '{"peft_method": "ia3"}',
        capsys=capsys,
    )
    assert rc == 0 and "open" in out
    rc, out, _ = admin(harness, "status", "--json", capsys=capsys)
    assert json.loads(out)["open_round"]["quorum"] == 3
    rc, out, _ = admin(harness, "round", "close", "--cancel", capsys=capsys)
    assert rc == 0 and "cancelled" in out
    for cmd in ("workers", "versions", "rounds", "contributions"):
        rc, out, _ = admin(harness, cmd, capsys=capsys)
        assert rc == 0, cmd
        rc, out, _ = admin(harness, "--json", cmd, capsys=capsys)
        assert rc == 0 and isinstance(json.loads(out), dict), cmd


def test_failures_say_what_to_do(harness, capsys, port):
    rc, out, err = admin(harness, "status", token="csa_wrong", capsys=capsys)
    assert rc == 1 and "UNAUTHENTICATED" in err and "--token" in err
    rc = admin_cli.main(["--coordinator", f"127.0.0.1:{port}", "--token", "x", "--timeout", "2", "status"])
    _, err = capsys.readouterr()
    assert rc == 1 and "cannot reach the coordinator" in err and "coldswarm-coordinator" in err
    rc, out, err = admin(harness, "--json", "rollback", "5", capsys=capsys)
    assert rc == 1 and json.loads(out)["error"]["code"] == "NOT_FOUND"
    rc, out, err = admin(harness, "merge", capsys=capsys)
    assert rc == 1 and "nothing to re-merge" in err


def test_no_token_anywhere(harness, capsys, monkeypatch):
    monkeypatch.delenv("COLDSWARM_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("COLDSWARM_TOKEN", raising=False)
    rc = admin_cli.main(["--coordinator", harness.address, "status"])
    assert rc == 1 and "admin.token" in capsys.readouterr().err
    monkeypatch.setenv("COLDSWARM_ADMIN_TOKEN", harness.admin_token)
    assert admin_cli.main(["--coordinator", harness.address, "status"]) == 0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_resumes_verifies_and_loads(harness, tmp_path, tiny_model, capsys):
    from transformers import T5ForConditionalGeneration

    out = tmp_path / "v0"
    out.mkdir()
    weights = (tiny_model / "model.safetensors").read_bytes()
    # An interrupted earlier download: half the weights as .part, and a corrupt config .part.
    (out / "model.safetensors.part").write_bytes(weights[: len(weights) // 2])
    (out / "config.json.part").write_bytes(b"{garbage" * 1000)
    rc, text, err = admin(harness, "--json", "download", "latest", "--out", str(out), capsys=capsys)
    assert rc == 0, err
    report = json.loads(text)
    manifest = json.loads((out / "coldswarm-manifest.json").read_text())
    listed = harness.admin.GetVersion(pb.GetVersionRequest(version="0"), metadata=harness.amd).files
    # Resumed: every byte but the weights' first half came over the wire, and nothing twice. (The config's
    # .part is longer than the file itself, so it is discarded and fetched whole.)
    assert report["version"] == 0
    assert report["bytes_fetched"] == sum(f.size for f in listed) - len(weights) // 2
    assert not list(out.glob("*.part"))
    for rel, entry in manifest["files"].items():
        assert _sha(out / rel) == entry["sha256"], rel
    assert (out / "model.safetensors").read_bytes() == weights
    model = T5ForConditionalGeneration.from_pretrained(out)
    assert model.config.d_model == 16
    # Again: everything is already there and verified; nothing is fetched.
    rc, text, _ = admin(harness, "--json", "download", "0", "--out", str(out), capsys=capsys)
    assert json.loads(text)["bytes_fetched"] == 0


def test_a_partial_whose_bytes_are_wrong_is_fetched_again_from_zero(harness, tmp_path, tiny_model, capsys):
    # The bytes already on disk are hashed with those that arrive (nothing is read back afterwards), so a
    # partial with a corrupt prefix fails the whole file's sha256 and is fetched again whole, once.
    out = tmp_path / "v0"
    out.mkdir()
    weights = (tiny_model / "model.safetensors").read_bytes()
    half = bytearray(weights[: len(weights) // 2])
    half[len(half) // 3] ^= 0xFF
    (out / "model.safetensors.part").write_bytes(bytes(half))
    rc, text, err = admin(harness, "--json", "download", "latest", "--out", str(out), capsys=capsys)
    assert rc == 0, err
    listed = harness.admin.GetVersion(pb.GetVersionRequest(version="0"), metadata=harness.amd).files
    assert json.loads(text)["bytes_fetched"] == sum(f.size for f in listed) + len(weights) - len(half)
    assert (out / "model.safetensors").read_bytes() == weights and not list(out.glob("*.part"))


def test_publish_rollback_merge_after_a_round(harness, tiny_model, capsys):
    rnd = harness.open_fusion(quorum=2)
    for seed in (1, 2):
        w = harness.register()
        w.upload(delta_contribution(tiny_model, seed=seed), rnd.id)
    harness.app.merges.wait_idle(60)
    rc, out, _ = admin(harness, "--json", "versions", capsys=capsys)
    versions = json.loads(out)["versions"]
    assert [v.get("is_current", False) for v in versions] == [False, True]
    manifest = json.loads(versions[1]["manifest_json"])
    assert manifest["parent"] == 0 and manifest["round"] == rnd.id and len(manifest["contributions"]) == 2
    rc, out, _ = admin(harness, "rollback", "0", capsys=capsys)
    assert rc == 0
    assert harness.admin.Status(pb.StatusRequest(), metadata=harness.amd).current_version == 0
    # Re-merge the round: a candidate, same weights as the published merge (deterministic).
    rc, out, err = admin(harness, "--json", "merge", "--round", str(rnd.id), capsys=capsys)
    assert rc == 0, err
    cand = json.loads(out)
    assert cand["state"] == "candidate" and cand["number"] == 2
    files = {v["number"]: {f["path"]: f["sha256"] for f in v["files"]} for v in [versions[1], cand]}
    assert files[1]["model.safetensors"] == files[2]["model.safetensors"]
    rc, out, _ = admin(harness, "publish", "2", capsys=capsys)
    assert rc == 0 and harness.app.versions.current() == 2
    assert harness.app.versions.count() == 3  # rollback and publish deleted nothing


@pytest.mark.parametrize("kind", ["fusion", "pretrain"])
def test_heartbeat_cancels_after_close(harness, kind):
    harness.admin.OpenRound(pb.OpenRoundRequest(kind=kind, quorum=1), metadata=harness.amd)
    w = harness.register()
    a = w.stub.GetAssignment(pb.GetAssignmentRequest(), metadata=w.md)
    hb = w.stub.Heartbeat(pb.HeartbeatRequest(assignment_id=a.id, phase="training"), metadata=w.md)
    assert not hb.cancel_assignment
    harness.admin.CloseRound(pb.CloseRoundRequest(cancel=True), metadata=harness.amd)
    hb = w.stub.Heartbeat(pb.HeartbeatRequest(assignment_id=a.id, phase="training"), metadata=w.md)
    assert hb.cancel_assignment
    workers = harness.admin.ListWorkers(pb.ListWorkersRequest(), metadata=harness.amd).workers
    assert [x.id for x in workers] == [w.id]
