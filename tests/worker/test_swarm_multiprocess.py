"""Pretrain rounds over hivemind with real processes on loopback.

Topology as in production: this test process runs the coordinator's Checkpointer (the DHT bootstrap peer);
each worker is a separate process (``swarm_peer.py``) bootstrapped from the checkpointer's visible
multiaddrs. The model is a tiny T5 on random tokens, trained with plain SGD so that averaging can be checked
against a closed form: after one global step from a common start, every peer must hold
``p0 - lr * (weighted mean of the peers' gradients)``, i.e. the sample-weighted mean of what each peer would
hold had it applied only its own gradients, and not its own local-only result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import support
import torch
from safetensors.torch import load_file

from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig

pytestmark = pytest.mark.slow

# hivemind switches torch to the "file_system" sharing strategy, whose first use spawns a torch_shm_manager
# child of this process. Spawned inside a test, the `processes` fixture would reap it as a leak and the next
# share_memory_() here fails with "Broken pipe"; start it now, before any test takes its snapshot of children.
_SHM_MANAGER_STARTER = torch.empty(1).share_memory_()

PEER = Path(__file__).with_name("swarm_peer.py")
sys.path.insert(0, str(PEER.parent))
import swarm_peer  # noqa: E402


@pytest.fixture
def bootstrap(processes):  # after `processes`, so its DHT is shut down before the leak check
    checkpointer = Checkpointer(CheckpointerConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"])).start()
    try:
        yield checkpointer
    finally:
        checkpointer.shutdown()


def start_peer(processes, tmp_path: Path, name: str, bootstrap: Checkpointer, run_id: str, *args: str):
    out = tmp_path / name
    out.mkdir()
    admitted = swarm_peer.admit(bootstrap.authority, out / "swarm", run_id)  # as the coordinator would
    log = open(tmp_path / f"{name}.log", "w")
    proc = processes.start(
        [
            sys.executable,
            str(PEER),
            "--run-id",
            run_id,
            "--initial-peers",
            ",".join(bootstrap.initial_peers),
            "--out",
            str(out),
            "--verbose",
            *admitted,
            *args,
        ],
        stdout=log,
        stderr=log,
    )
    proc.out = out
    proc.log_path = tmp_path / f"{name}.log"
    return proc


def wait_for_file(path: Path, procs, timeout: float, what: str = "") -> None:
    wait_until(path.exists, procs, timeout, what or str(path))


def wait_until(predicate, procs, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail at once (with the peers' logs) if a peer died or on timeout."""

    def holds() -> bool:
        if predicate():
            return True
        for proc in procs:
            if proc.poll() is not None and not (proc.out / "result.json").exists():
                pytest.fail(f"peer {proc.out.name} exited with {proc.returncode}:\n{tail(proc.log_path)}")
        return False

    def logs() -> str:
        return "\n".join(f"--- {p.out.name}\n{tail(p.log_path)}" for p in procs)

    support.wait_for(holds, timeout, what, poll=0.25, detail=logs)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten().float() for k in sorted(tensors)])


def load(path: Path) -> torch.Tensor:
    return flat(load_file(str(path)))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_two_peers_average_with_8bit_codec_and_checkpointer_collects(processes, bootstrap, tmp_path):
    run_id = "avg"
    go = tmp_path / "go"
    # Slow steps: a peer is invisible to the others until it has reported samples, and a peer that believes
    # it is alone finishes the global step alone; the epoch must outlast the trackers' first refresh (3 s).
    common = [
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--target-batch-size",
        "48",
        "--max-epochs",
        "1",
        "--step-delay",
        "0.5",
        # Generous matchmaking (request timeout 3 s): a peer that times out looking for its group falls back
        # to its own gradients, and the closed form below no longer holds.
        "--matchmaking-time",
        "8",
    ]
    common += ["--grad-compression", "uniform8bit", "--local-only", "--serve", "120", "--wait-file", str(go)]
    peers = [
        start_peer(processes, tmp_path, f"p{i}", bootstrap, run_id, "--data-seed", str(10 + i), *common)
        for i in range(2)
    ]
    for proc in peers:
        wait_for_file(proc.out / "ready.json", peers, 120, f"{proc.out.name} to join")
    go.touch()  # both have joined: train at the same time, so the first global step is a 2-peer one
    for proc in peers:
        wait_for_file(proc.out / "result.json", peers, 120, f"{proc.out.name} to finish an epoch")

    results = [read_json(p.out / "result.json") for p in peers]
    assert [r["epoch"] for r in results] == [1, 1], results
    assert all(r["reason"] == "max_epochs" for r in results)
    assert [r["local_fallbacks"] for r in results] == [0, 0], "a peer stepped alone: no averaging to check"
    finals = [load(p.out / "final.safetensors") for p in peers]
    local_only = [load(p.out / "local_only.safetensors") for p in peers]
    samples = [r["epoch0_samples"] for r in results]
    expected = (samples[0] * local_only[0] + samples[1] * local_only[1]) / sum(samples)

    spread = (local_only[0] - local_only[1]).norm()  # how far apart the peers' local-only results are
    assert spread > 0.1, "peers drew different batches, their local-only results must differ"
    # Equal across peers (within what 8-bit gradients and fp16 state averaging lose) ...
    assert (finals[0] - finals[1]).norm() < 0.1 * spread
    assert (finals[0] - finals[1]).abs().max() < 5e-3
    # ... equal to the closed form of an averaged SGD step ...
    for final in finals:
        assert (final - expected).norm() < 0.1 * spread
    # ... and not what any peer would hold on its own (the numpy>=2.4 trap would leave exactly that).
    for final, own in zip(finals, local_only, strict=True):
        assert (final - own).norm() > 0.3 * spread

    # The checkpointer pulls the averaged state into a model of the base architecture: HF dir, exact weights.
    base = tmp_path / "base"
    swarm_peer.tiny_t5(0).save_pretrained(base)
    (base / "spiece.model").write_bytes(b"tokenizer stand-in")
    out_dir = tmp_path / "versions" / "v1"
    metrics = bootstrap.collect(run_id, base, out_dir, min_epoch=1, timeout=60)
    assert metrics["epoch"] == 1
    assert metrics["swarm_peers"] == 2
    assert metrics["swarm_samples"] == sum(r["samples"] for r in results)
    assert 0 < metrics["swarm_loss"] < 10
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "spiece.model",
    ]
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"
    from transformers import AutoModelForSeq2SeqLM

    loaded = AutoModelForSeq2SeqLM.from_pretrained(out_dir)
    collected = flat({n: p.detach() for n, p in loaded.named_parameters()})
    # Bit-exact copy of one peer's state (downloads are uncompressed), within codec tolerance of the other.
    assert min((collected - final).abs().max().item() for final in finals) == 0.0
    assert max((collected - final).abs().max().item() for final in finals) < 5e-3

    # Peers were waiting for the collection announcement and leave on their own.
    for proc in peers:
        wait_for_file(proc.out / "served.json", peers, 30, f"{proc.out.name} to see the collection")
        assert read_json(proc.out / "served.json") == {"collected": True}
        proc.wait(timeout=30)
        assert proc.returncode == 0, tail(proc.log_path)


@pytest.mark.timeout(1500)  # its own waits add up past the suite's 600 s per test
def test_late_joiner_loads_state_from_peers(processes, bootstrap, tmp_path):
    run_id = "late"
    go, stop = tmp_path / "go", tmp_path / "stop"
    # No epoch limit: the round ends when the test says so (through the trainers' stop flag), so the late
    # joiner (10-20 s to start on a loaded machine) surely arrives mid-round.
    common = ["--optimizer", "sgd", "--lr", "0.5", "--target-batch-size", "24", "--max-epochs", "0"]
    common += ["--snapshots", "--step-delay", "0.3", "--stop-file", str(stop)]
    # fp16 gradients: this test is about state loading; with 8-bit gradients each peer receives a slightly
    # different lossy average (a reducer keeps its own part exact) until the next state averaging.
    common += ["--grad-compression", "fp16"]
    early = [
        start_peer(
            processes,
            tmp_path,
            f"p{i}",
            bootstrap,
            run_id,
            "--data-seed",
            str(20 + i),
            *common,
            "--wait-file",
            str(go),
        )
        for i in range(2)
    ]
    # Joins mid-round with a *different* initialisation: it must take the swarm's state, not keep its own.
    # Started now (imports are slow on a loaded machine); it joins the DHT only once `join` appears.
    join = tmp_path / "join"
    # Its own initialisation is not a state it would refuse to leave (a real worker starts from the round's base
    # version, as the others do): the bound on how far a downloaded state may be from its own is off here.
    late_args = [
        "--data-seed",
        "29",
        "--model-seed",
        "7",
        *common,
        "--join-file",
        str(join),
        "--max-state-jump",
        "0",
    ]
    late = start_peer(processes, tmp_path, "late", bootstrap, run_id, *late_args)
    everyone = [*early, late]
    for proc in early:
        wait_for_file(proc.out / "ready.json", everyone, 120, f"{proc.out.name} to join")
    go.touch()
    wait_for_file(early[0].out / "epoch1.safetensors", everyone, 120, "the swarm's first global step")
    join.touch()
    wait_for_file(late.out / "ready.json", everyone, 120, "the late joiner to join")
    ready = read_json(late.out / "ready.json")
    assert ready["loaded_state_from_peers"], tail(late.log_path)
    assert ready["epoch"] >= 1

    # Let it train along until it has reached two more global steps (hivemind may skip an epoch number when
    # a peer catches up) and taken part in a 3-peer all-reduce (hivemind's own status line, verbose mode),
    # then end the round through the trainers' stop flag.
    def trained_along() -> bool:
        epochs = [int(p.stem[5:]) for p in late.out.glob("epoch*.safetensors")]
        return max(epochs, default=-1) >= ready["epoch"] + 2 and "Averaged gradients with 3 peers" in (
            late.log_path.read_text(errors="replace")
        )

    wait_until(trained_along, everyone, 240, "the late joiner to average with both others")
    stop.touch()
    for proc in everyone:
        wait_for_file(proc.out / "result.json", everyone, 60, f"{proc.out.name} to stop")
        assert read_json(proc.out / "result.json")["reason"] == "stopped"

    # The downloaded state is one the swarm held: closest to some early peer's snapshot of an epoch >= 1,
    # far closer than consecutive global steps are to each other, and nowhere near its own initialisation.
    joined = load(late.out / "joined.safetensors")
    own_init = flat({n: p.detach() for n, p in swarm_peer.tiny_t5(7).named_parameters()})
    snapshots = {}
    for proc in early:
        snapshots[(proc.out.name, 0)] = load(proc.out / "joined.safetensors")  # they joined at epoch 0
        for path in proc.out.glob("epoch*.safetensors"):
            snapshots[(proc.out.name, int(path.stem[5:]))] = load(path)
    (name, epoch), closest = min(snapshots.items(), key=lambda item: (item[1] - joined).norm())
    assert epoch >= 1
    previous = max(e for n, e in snapshots if n == name and e < epoch)  # an epoch number may be skipped
    step_size = (snapshots[(name, epoch)] - snapshots[(name, previous)]).norm()
    assert (closest - joined).norm() < 0.25 * step_size
    assert (own_init - joined).norm() > 10 * (closest - joined).norm()
    # It then took part in the swarm's all-reduce (checked above, before the stop). Its epoch *number* may
    # trail the others' by one: a peer that loads state just as the swarm steps counts the next round as its
    # own step (hivemind's "catch up" rule), so snapshots are not compared by epoch number.
    assert read_json(late.out / "result.json")["steps"] > 0


def test_killed_peer_does_not_stall_the_other(processes, bootstrap, tmp_path):
    run_id = "kill"
    go = tmp_path / "go"
    averaging_timeout, matchmaking_time = 10.0, 4.0
    common = ["--optimizer", "sgd", "--lr", "0.5", "--target-batch-size", "24", "--max-epochs", "3"]
    common += ["--snapshots", "--step-delay", "0.2", "--wait-file", str(go)]
    common += ["--averaging-timeout", str(averaging_timeout), "--matchmaking-time", str(matchmaking_time)]
    peers = [
        start_peer(processes, tmp_path, f"p{i}", bootstrap, run_id, "--data-seed", str(30 + i), *common)
        for i in range(2)
    ]
    survivor, victim = peers
    for proc in peers:
        wait_for_file(proc.out / "ready.json", peers, 120, f"{proc.out.name} to join")
    go.touch()
    wait_for_file(survivor.out / "epoch1.safetensors", peers, 120, "the first global step")
    time.sleep(1.0)  # mid-round: both are accumulating towards epoch 2
    processes.kill(victim)  # SIGKILL to the whole group: the peer, its DHT and averager processes, p2pd
    killed_at = time.time()
    victim.wait(timeout=10)

    wait_for_file(
        survivor.out / "result.json", [survivor], 40 + 4 * averaging_timeout, "the survivor to finish"
    )
    result = read_json(survivor.out / "result.json")
    assert result["reason"] == "max_epochs" and result["epoch"] == 3, result
    # Never stuck longer than one averaging timeout (plus scheduling slack on a loaded machine) at any step.
    times = [killed_at] + [t for t, _ in result["step_log"] if t > killed_at]
    worst_gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    # One step can spend a matchmaking attempt and an averaging timeout on the dead peer, the next
    # matchmake against its DHT record until that expires; a stall would be unbounded.
    assert worst_gap < matchmaking_time + averaging_timeout + 15, (worst_gap, tail(survivor.log_path))
    survivor.wait(timeout=30)
    assert survivor.returncode == 0, tail(survivor.log_path)
