"""The publication gate: its decision on plain metrics, then over a real server (a worse candidate is held
back as a rejected version, a manual publish overrides it, a restart keeps both), for fusion merges and
pretrain results alike."""

from __future__ import annotations

import json
import math
import shutil

import grpc
import pytest
from safetensors.torch import load_file, save_file

from coldswarm.common.channel import open_channel
from coldswarm.coordinator.publication_gate import GateConfig, PublishPolicy, decide, summary
from coldswarm.coordinator.server import start_server
from coldswarm.coordinator.states import RoundState, VersionState
from coldswarm.proto import coldswarm_pb2 as pb

from .conftest import Harness, base_tensors, contribution_bytes, make_config
from .test_rounds import wait_state

LOSS = GateConfig(policy=PublishPolicy.IF_BETTER, metric="seen_token_loss", tolerance=0.0)


# -- the decision -----------------------------------------------------------------------------------------


def test_a_better_candidate_passes_and_a_worse_one_is_held_back():
    better = decide(LOSS, {"seen_token_loss": 4.0}, {"seen_token_loss": 5.0})
    assert better.passed and better.decision == "published"
    worse = decide(LOSS, {"seen_token_loss": 5.5}, {"seen_token_loss": 5.0})
    assert not worse.passed and worse.decision == "rejected" and "worse by 0.5" in worse.reason
    assert worse.record["candidate"] == {"seen_token_loss": 5.5}
    assert worse.record["parent"] == {"seen_token_loss": 5.0}
    assert summary(worse.record) == "HELD BACK (seen_token_loss 5.500 vs 5.000)"


def test_equal_and_within_the_tolerance_pass_beyond_it_fails():
    assert decide(LOSS, {"seen_token_loss": 5.0}, {"seen_token_loss": 5.0}).passed
    tolerant = GateConfig(policy=PublishPolicy.IF_BETTER, metric="seen_token_loss", tolerance=0.1)
    assert decide(tolerant, {"seen_token_loss": 5.09}, {"seen_token_loss": 5.0}).passed
    assert not decide(tolerant, {"seen_token_loss": 5.11}, {"seen_token_loss": 5.0}).passed


def test_a_missing_or_non_finite_metric_fails_on_either_side():
    assert "candidate has no" in decide(LOSS, {"seen_exact_match": 0.5}, {"seen_token_loss": 5.0}).reason
    assert not decide(LOSS, {"seen_token_loss": math.nan}, {"seen_token_loss": 5.0}).passed
    assert "parent has no" in decide(LOSS, {"seen_token_loss": 4.0}, {}).reason
    assert not decide(LOSS, {"seen_token_loss": 4.0}, None).passed


def test_direction_nested_metrics_and_the_mean_of_mod_loss():
    em = GateConfig.for_round("fusion", {"gate": {"metric": "seen_exact_match"}}, has_evaluator=True)
    assert em.higher_is_better
    assert decide(em, {"seen_exact_match": 0.3}, {"seen_exact_match": 0.2}).passed
    assert not decide(em, {"seen_exact_match": 0.1}, {"seen_exact_match": 0.2}).passed
    nested = GateConfig.for_round("fusion", {"gate": {"metric": "seen.upper.token_loss"}}, has_evaluator=True)
    assert decide(
        nested, {"seen": {"upper": {"token_loss": 1.0}}}, {"seen": {"upper": {"token_loss": 2.0}}}
    ).passed
    mod = GateConfig.for_round("pretrain", {}, has_evaluator=True)
    assert (mod.metric, mod.higher_is_better) == ("mod_loss", False)
    # mod_loss is a mapping per denoiser mode; the gate compares its mean (8.0 against 7.0)
    assert not decide(mod, {"mod_loss": {"R": 7.0, "S": 9.0}}, {"mod_loss": {"R": 7.0, "S": 7.0}}).passed


def test_always_publishes_whatever_the_scores():
    always = GateConfig.for_round("fusion", {"gate": {"policy": "always"}}, has_evaluator=True)
    assert decide(always, {}, None).passed


@pytest.mark.parametrize(
    "gate, message",
    [
        ({"policy": "sometimes"}, "gate.policy must be one of"),
        ({"metric": ""}, "gate.metric"),
        ({"tolerance": -1}, "at least 0"),
        ({"tolerance": True}, "finite number"),
        ({"tolerance": "0.1"}, "finite number"),
        ({"higher_is_better": "yes"}, "true or false"),
        ({"treshold": 1}, "unknown gate option"),
        ("if-better", "JSON object"),
    ],
)
def test_gate_options_that_cannot_be_honoured_are_refused(gate, message):
    with pytest.raises(ValueError, match=message):
        GateConfig.for_round("fusion", {"gate": gate}, has_evaluator=True)


def test_without_an_evaluator_the_default_is_always_and_if_better_is_refused():
    assert GateConfig.for_round("fusion", {}, has_evaluator=False).policy == PublishPolicy.ALWAYS
    assert GateConfig.for_round("fusion", {}, has_evaluator=True).policy == PublishPolicy.IF_BETTER
    with pytest.raises(ValueError, match="--evaluator"):
        GateConfig.for_round("fusion", {"gate": {"policy": "if-better"}}, has_evaluator=False)


# -- over a real server -----------------------------------------------------------------------------------

# A real evaluator over the weights (not a stand-in for the gate): the "loss" is the mean square of the
# attention query weights, so a contribution that shrinks them scores better and one that inflates them worse.
EVALUATOR = """
from pathlib import Path
from safetensors.torch import load_file

def evaluate(version_dir):
    weights = load_file(str(Path(version_dir) / "model.safetensors"))
    qs = [t.float() for n, t in weights.items() if n.endswith("q.weight")]
    return {"seen_token_loss": float(sum((q * q).mean() for q in qs) / len(qs))}
"""


@pytest.fixture
def gated(tmp_path, tiny_model, monkeypatch):
    (tmp_path / "weight_eval.py").write_text(EVALUATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = make_config(tmp_path / "data", tiny_model, evaluator="weight_eval:evaluate")
    started: list[Harness] = []

    def start() -> Harness:
        """Start (or restart) the coordinator on the same data directory."""
        running = start_server(config)
        h = Harness(
            running=running,
            address=running.address,
            admin_token=config.admin_token_path.read_text().strip(),
            channel=open_channel(running.address),
        )
        started.append(h)
        return h

    yield start
    for h in started:
        h.channel.close()
        h.running.stop(grace=0)


def _scaled(tiny_model, factor: float, base_version: int) -> bytes:
    """A contribution moving every query weight by ``factor`` times itself."""
    base = base_tensors(tiny_model)
    deltas = {f"delta/{n}": base[n] * factor for n in sorted(base) if n.endswith("q.weight")}
    return contribution_bytes(deltas, base_version)


def _fusion_round(h: Harness, data: bytes) -> pb.Round:
    rnd = h.open_fusion(quorum=1)
    h.register().upload(data, rnd.id)
    return wait_state(h, rnd.id, (RoundState.PUBLISHED, RoundState.REJECTED, RoundState.FAILED), timeout=60)


def test_a_worse_candidate_is_rejected_a_manual_publish_overrides_and_a_restart_keeps_it(gated, tiny_model):
    h = gated()
    worse = _fusion_round(h, _scaled(tiny_model, 0.5, 0))  # |q| grows: worse
    assert worse.state == RoundState.REJECTED and "held back by the publication gate" in worse.error
    v = h.admin.GetVersion(pb.GetVersionRequest(version=str(worse.result_version)), metadata=h.amd)
    gate = json.loads(v.manifest_json)["gate"]
    assert v.state == VersionState.REJECTED and not v.is_current
    assert (
        gate["passed"] is False and gate["candidate"]["seen_token_loss"] > gate["parent"]["seen_token_loss"]
    )
    assert h.admin.Status(pb.StatusRequest(), metadata=h.amd).current_version == 0
    # Workers may not read it: it is not published.
    w = h.register()
    with pytest.raises(grpc.RpcError) as refused:
        w.stub.GetVersion(pb.GetVersionRequest(version=str(v.number)), metadata=w.md)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # A better one passes and is published on top of version 0 (the rejected one is nobody's parent).
    better = _fusion_round(h, _scaled(tiny_model, -0.5, 0))
    assert better.state == RoundState.PUBLISHED, better.error
    b = h.admin.GetVersion(pb.GetVersionRequest(version=str(better.result_version)), metadata=h.amd)
    assert b.is_current and b.parent == 0 and json.loads(b.manifest_json)["gate"]["passed"] is True

    # The admin can still publish the rejected one by hand, and a restart keeps all of it.
    assert h.admin.Publish(pb.PublishRequest(version=v.number), metadata=h.amd).is_current
    h.channel.close()
    h.running.stop(grace=0)
    h = gated()
    listed = {x.number: x for x in h.admin.ListVersions(pb.ListVersionsRequest(), metadata=h.amd).versions}
    assert listed[v.number].state == VersionState.PUBLISHED and listed[v.number].is_current
    assert json.loads(listed[v.number].manifest_json)["gate"]["passed"] is False  # the gate's record stays
    rounds = {r.id: r for r in h.admin.ListRounds(pb.ListRoundsRequest(), metadata=h.amd).rounds}
    assert rounds[worse.id].state == RoundState.REJECTED and rounds[better.id].state == RoundState.PUBLISHED


def test_a_round_opened_with_if_better_needs_an_evaluator(harness):
    with pytest.raises(grpc.RpcError) as refused:
        harness.admin.OpenRound(
            pb.OpenRoundRequest(kind="fusion", options_json=json.dumps({"gate": {"policy": "if-better"}})),
            metadata=harness.amd,
        )
    assert (
        refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--evaluator" in refused.value.details()
    )


def test_a_pretrain_result_that_got_worse_is_held_back(gated, tiny_model, tmp_path):
    h = gated()
    options = {"gate": {"metric": "seen_token_loss"}}  # this evaluator's only metric (the default: mod_loss)
    rnd = h.admin.OpenRound(
        pb.OpenRoundRequest(kind="pretrain", options_json=json.dumps(options)), metadata=h.amd
    )
    # The swarm's collected state, as the checkpointer writes it: here with inflated query weights.
    state = tmp_path / "collected"
    shutil.copytree(tiny_model, state)
    weights = load_file(str(state / "model.safetensors"))
    inflated = {n: t * 2 if n.endswith("q.weight") else t for n, t in weights.items()}
    save_file(inflated, str(state / "model.safetensors"))
    app = h.app
    version = app.merges.record_version(state, rnd.id, metrics=app.merges.evaluate(state))
    assert version.state == VersionState.REJECTED
    assert json.loads(version.manifest_json)["gate"]["metric"] == "seen_token_loss"
    app.rounds.close_round(rnd.id, reason="collected")
    assert app.rounds.get(rnd.id).state == RoundState.REJECTED
    assert app.versions.current() == 0


def test_the_coordinators_default_policy_is_checked_at_start():
    from coldswarm.coordinator.config import CoordinatorConfig

    assert CoordinatorConfig().publish_policy == PublishPolicy.IF_BETTER
    with pytest.raises(ValueError, match="--publish-policy must be one of"):
        CoordinatorConfig(publish_policy="sometimes")
