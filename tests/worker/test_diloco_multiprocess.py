"""DiLoCo pretraining over hivemind with real processes on loopback (``diloco_peer.py`` peers, the
coordinator's Checkpointer as the DHT bootstrap peer, as in ``test_swarm_multiprocess.py``).

The outer step is checked against its closed form: from a common start ``theta0``, each peer takes H AdamW
steps on its own batches (recomputed here from the same seeds; a peer that kept training while the other
finished its H took more, and says how many), and after one outer step every peer must hold
``theta1 = theta0 - lr * (1 + mu) * mean_i(theta0 - x_i)`` (torch's Nesterov SGD from a zero buffer), with
the momentum buffer equal to that mean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig

pytestmark = pytest.mark.slow

_SHM_MANAGER_STARTER = torch.empty(1).share_memory_()  # see test_swarm_multiprocess.py

HERE = Path(__file__).parent
PEER = HERE / "diloco_peer.py"
sys.path.insert(0, str(HERE))
import swarm_peer  # noqa: E402
from test_swarm_multiprocess import tail, wait_until  # noqa: E402
from test_swarm_multiprocess import wait_for_file as wait_for  # noqa: E402

BATCH, H, LR, OUTER_LR, MU = 4, 6, 1e-3, 0.7, 0.9


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
    argv = [
        sys.executable,
        str(PEER),
        "--run-id",
        run_id,
        "--initial-peers",
        ",".join(bootstrap.initial_peers),
    ]
    argv += ["--out", str(out), "--verbose", "--batch-size", str(BATCH), "--inner-steps", str(H)]
    argv += ["--lr", str(LR), "--outer-lr", str(OUTER_LR), "--outer-momentum", str(MU), *admitted, *args]
    proc = processes.start(argv, stdout=log, stderr=log)
    proc.out = out
    proc.log_path = tmp_path / f"{name}.log"
    return proc


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def split_outer(path: Path) -> tuple[dict, dict]:
    state = load_file(str(path))
    theta = {k[len("theta.") :]: v for k, v in state.items() if k.startswith("theta.")}
    momentum = {k[len("momentum.") :]: v for k, v in state.items() if k.startswith("momentum.")}
    return theta, momentum


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten().float() for k in sorted(tensors)])


def inner_period(seed: int, steps: int) -> dict[str, torch.Tensor]:
    """What a peer holds after its first ``steps`` AdamW steps from theta0 on its own batches (its local-only
    result; ``steps`` is H, or more for a peer that kept training while the other finished its H)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the peers run: the same reduction order
    try:
        model = swarm_peer.tiny_t5(0)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
        for _, batch in zip(range(steps), swarm_peer.batches(seed, BATCH), strict=False):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return swarm_peer.params_of(model)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "blocking"])
def test_outer_step_is_nesterov_on_the_mean_pseudo_gradient(processes, bootstrap, tmp_path, overlap):
    run_id = f"diloco-{'o' if overlap else 'b'}"
    go = tmp_path / "go"
    # fp32 all-reduce (the closed form is exact up to float rounding); two outer epochs, so that with the
    # overlap the first sync runs while the second period trains (the round's last sync always blocks).
    common = ["--max-epochs", "2", "--grad-compression", "none", "--step-delay", "0.4", "--serve", "120"]
    common += ["--wait-file", str(go), *([] if overlap else ["--no-overlap"])]
    seeds = (10, 11)
    peers = [
        start_peer(processes, tmp_path, f"p{i}", bootstrap, run_id, "--data-seed", str(seed), *common)
        for i, seed in enumerate(seeds)
    ]
    for proc in peers:
        wait_for(proc.out / "ready.json", peers, 120, f"{proc.out.name} to join")
    go.touch()
    for proc in peers:
        wait_for(proc.out / "result.json", peers, 150, f"{proc.out.name} to finish two outer steps")
    results = [read_json(p.out / "result.json") for p in peers]
    assert [(r["epoch"], r["reason"]) for r in results] == [(2, "max_epochs")] * 2, results
    assert [r["stats"]["syncs"] for r in results] == [2, 2], [r["stats"] for r in results]
    if overlap:
        # The first sync ran in the background: inner steps of period 2 were taken while it was in flight.
        assert all(r["stats"]["overlapped_steps"] >= 1 for r in results), [r["stats"] for r in results]

    theta0 = swarm_peer.params_of(swarm_peer.tiny_t5(0))
    assert all(r["period_steps"][0] >= H for r in results), [r["period_steps"] for r in results]
    local = [inner_period(seed, r["period_steps"][0]) for seed, r in zip(seeds, results, strict=True)]
    mean_delta = {k: sum(theta0[k] - x[k] for x in local) / len(local) for k in theta0}
    expected = {k: theta0[k] - OUTER_LR * (1 + MU) * mean_delta[k] for k in theta0}
    step = (flat(expected) - flat(theta0)).norm()
    spread = (flat(local[0]) - flat(local[1])).norm()
    assert spread > 0.1 * (flat(local[0]) - flat(theta0)).norm(), "the peers' batches must differ"
    for proc in peers:
        theta1, momentum1 = split_outer(proc.out / "outer1.safetensors")
        assert (flat(theta1) - flat(expected)).norm() < 1e-3 * step, tail(proc.log_path)
        assert (flat(momentum1) - flat(mean_delta)).norm() < 1e-3 * flat(mean_delta).norm()
        # Not what the peer would hold on its own, nor a plain average of the peers' parameters.
        assert (flat(theta1) - flat(local[peers.index(proc)])).norm() > 0.1 * step
    finals = [split_outer(p.out / "outer_final.safetensors")[0] for p in peers]
    assert (flat(finals[0]) - flat(finals[1])).abs().max() < 1e-5, "outer parameters must agree"
    if not overlap:
        # Blocking DiLoCo: after the last sync the model *is* the outer point.
        assert torch.equal(flat(load_file(str(peers[0].out / "final.safetensors"))), flat(finals[0]))

    # The checkpointer collects the synchronized outer parameters (an exact copy of one peer's).
    base = tmp_path / "base"
    swarm_peer.tiny_t5(0).save_pretrained(base)
    out_dir = tmp_path / "v1"
    metrics = bootstrap.collect(run_id, base, out_dir, min_epoch=2, timeout=60)
    assert metrics["epoch"] == 2 and metrics["swarm_peers"] == 2
    collected = load_file(str(out_dir / "model.safetensors"))
    assert min((flat({k: collected[k] for k in f}) - flat(f)).abs().max().item() for f in finals) == 0.0
    for proc in peers:
        wait_for(proc.out / "served.json", peers, 30, f"{proc.out.name} to see the collection")
        proc.wait(timeout=30)
        assert proc.returncode == 0, tail(proc.log_path)


def test_late_joiner_gets_the_outer_state(processes, bootstrap, tmp_path):
    run_id = "diloco-late"
    go, stop, join = tmp_path / "go", tmp_path / "stop", tmp_path / "join"
    common = [
        "--max-epochs",
        "0",
        "--grad-compression",
        "fp16",
        "--step-delay",
        "0.3",
        "--stop-file",
        str(stop),
    ]
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
    # A different initialisation: it must take the swarm's outer state, not keep its own.
    late = start_peer(
        processes,
        tmp_path,
        "late",
        bootstrap,
        run_id,
        "--data-seed",
        "29",
        "--model-seed",
        "7",
        *common,
        "--join-file",
        str(join),
        # Its own parameters are far from the swarm's by construction (another initialisation), so the
        # download guard's bound on how far a state may move from ours is off for it; real workers all
        # start from the round's base version.
        "--max-state-jump",
        "0",
    )
    everyone = [*early, late]
    for proc in early:
        wait_for(proc.out / "ready.json", everyone, 120, f"{proc.out.name} to join")
    go.touch()
    wait_for(early[0].out / "outer2.safetensors", everyone, 120, "the swarm's second outer step")
    join.touch()
    wait_for(late.out / "ready.json", everyone, 120, "the late joiner to join")
    ready = read_json(late.out / "ready.json")
    assert ready["loaded_state_from_peers"] and ready["epoch"] >= 2, (ready, tail(late.log_path))

    # What it downloaded is the outer state an early peer held at that epoch: parameters *and* momentum,
    # exactly (state downloads are uncompressed); its model starts from those parameters.
    theta, momentum = split_outer(late.out / "joined_outer.safetensors")
    matches = [
        split_outer(p.out / f"outer{ready['epoch']}.safetensors")
        for p in early
        if (p.out / f"outer{ready['epoch']}.safetensors").exists()
    ]
    assert any(torch.equal(flat(theta), flat(t)) and torch.equal(flat(momentum), flat(m)) for t, m in matches)
    assert flat(momentum).norm() > 0, "outer momentum after two outer steps cannot be zero"
    assert torch.equal(flat(load_file(str(late.out / "joined.safetensors"))), flat(theta))
    own = flat(swarm_peer.params_of(swarm_peer.tiny_t5(7)))
    assert (own - flat(theta)).norm() > 1.0

    # It then takes part in a 3-peer sync.
    wait_until(
        lambda: "averaged pseudo-gradients with 3 peers" in late.log_path.read_text(errors="replace"),
        everyone,
        180,
        "the late joiner to sync with both others",
    )
    stop.touch()
    for proc in everyone:
        wait_for(proc.out / "result.json", everyone, 90, f"{proc.out.name} to stop")
        assert read_json(proc.out / "result.json")["reason"] == "stopped"


def test_a_faster_peer_keeps_training_instead_of_waiting(processes, bootstrap, tmp_path):
    """Dynamic local updates: the faster peer takes more than H inner steps while the slower one finishes
    its H, so it does not sit idle at the sync; both still step together."""
    run_id = "diloco-dylu"
    go = tmp_path / "go"
    common = ["--max-epochs", "2", "--grad-compression", "fp16", "--wait-file", str(go)]
    fast = start_peer(
        processes, tmp_path, "fast", bootstrap, run_id, "--data-seed", "40", "--step-delay", "0.05", *common
    )
    slow = start_peer(
        processes, tmp_path, "slow", bootstrap, run_id, "--data-seed", "41", "--step-delay", "0.8", *common
    )
    peers = [fast, slow]
    for proc in peers:
        wait_for(proc.out / "ready.json", peers, 120, f"{proc.out.name} to join")
    go.touch()
    for proc in peers:
        wait_for(proc.out / "result.json", peers, 150, f"{proc.out.name} to finish")
    results = {p.out.name: read_json(p.out / "result.json") for p in peers}
    assert [results[n]["stats"]["syncs"] for n in ("fast", "slow")] == [2, 2], results
    assert results["slow"]["period_steps"][0] >= H
    # The slow peer's H steps take >= H x 0.8 s; the fast one trained through most of that.
    assert results["fast"]["period_steps"][0] > 2 * H, results["fast"]["period_steps"]
    assert results["fast"]["steps"] > results["slow"]["steps"]
