"""An admitted peer that attacks the all-reduce, written against hivemind's public API only
(``attacker_peer.py``: ``hivemind.DHT`` + ``hivemind.Optimizer``, its averagers unguarded), cannot make the honest
peers' parameters non-finite, nor move them far from where an honest-only run with the same seeds ends.

Real processes on loopback: the test process runs the checkpointer (the DHT bootstrap and authority), the
honest peers are ``tests/worker/swarm_peer.py`` (coldswarm's trainer, guarded), the attacker trains along with
NaN gradients or gradients times 1e4. The attacker is also a reducer of a third of the vector and returns the
plain mean of what it received (what hivemind does), so both of the honest peers' guards are exercised: as
reducers they refuse or clip its parts, as senders they refuse its averages.

The stated distance: each honest peer's parameters end within ``DISTANCE_BOUND`` times the honest-only run's
own displacement from the initialisation of that run's parameters. Unguarded, the scaled attack moves them
thousands of times further (issue 12 measured 2,238 L2 against 0.5) and NaN makes every value NaN.

Why a few displacements and not one: the guards bound an admitted attacker's pull per all-reduce by the
honest spread (CenteredClip's radius is the group's median distance; the result screen allows a multiple of
the honest reducers' median move), and with two honest peers on batches of 4 samples (48 per step) that
spread is as large as the gradient itself; the honest peers also lose the averaging of the attacker's slice
(they keep their own values there). Measured over full-suite and module runs: 0.44-0.62 in most runs of the
x1e4 attack, 1.83 once; 3.2 once under the earlier screen (16x our own slice's move), which the median screen
replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig
from coldswarm.coordinator.local_cluster import stop_process_groups

pytestmark = pytest.mark.slow

_SHM_MANAGER_STARTER = torch.empty(1).share_memory_()  # see tests/worker/test_swarm_multiprocess.py

HERE = Path(__file__).resolve().parent
HONEST = HERE.parent / "worker" / "swarm_peer.py"
ATTACKER = HERE / "attacker_peer.py"
sys.path.insert(0, str(HONEST.parent))
import swarm_peer  # noqa: E402

#: an honest peer ends within this many times the honest-only run's displacement from its start
DISTANCE_BOUND = 4.0
EPOCHS = 2
COMMON = ["--batch-size", "4", "--target-batch-size", "48", "--lr", "0.5", "--matchmaking-time", "8"]
COMMON += ["--step-delay", "0.3"]


class _ModuleProcesses:
    """Like the ``processes`` fixture, for the module-scoped honest-only run: own sessions, all reaped."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kwargs):
        proc = subprocess.Popen(
            args, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc) -> None:
        stop_process_groups([proc], grace_s=0)


@pytest.fixture(scope="module")
def module_processes():
    group = _ModuleProcesses()
    try:
        yield group
    finally:
        stop_process_groups(group.procs, grace_s=10)


@pytest.fixture(scope="module")
def bootstrap():
    checkpointer = Checkpointer(CheckpointerConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"])).start()
    try:
        yield checkpointer
    finally:
        checkpointer.shutdown()


def _start(processes, script: Path, out: Path, run_id: str, peers: list[str], *args: str):
    out.mkdir(parents=True)
    log = open(out.with_suffix(".log"), "w")
    proc = processes.start(
        [
            sys.executable,
            str(script),
            "--run-id",
            run_id,
            "--initial-peers",
            ",".join(peers),
            "--out",
            str(out),
            *args,
        ],
        stdout=log,
        stderr=log,
    )
    proc.out, proc.log_path = out, out.with_suffix(".log")
    return proc


def _wait(paths, procs, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None and not (proc.out / "result.json").exists():
                pytest.fail(f"{proc.out.name} exited with {proc.returncode}:\n{_tail(proc.log_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n" + "\n".join(_tail(p.log_path) for p in procs))
        time.sleep(0.25)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"--- {path.name}: no log"


def _flat(path: Path) -> torch.Tensor:
    tensors = load_file(str(path))
    return torch.cat([tensors[k].flatten().double() for k in sorted(tensors)])


def run_swarm(
    processes, tmp: Path, bootstrap: Checkpointer, run_id: str, attack: list[str] | None, codec: str
):
    """Two honest peers (data seeds 10, 11) and, with ``attack``, one admitted attacker; returns the honest peers'
    (final parameters, result) and the attacker's process."""
    go = tmp / "go"
    honest = []
    for i in range(2):
        admitted = swarm_peer.admit(bootstrap.authority, tmp / f"h{i}-swarm", run_id)
        args = [*COMMON, "--optimizer", "sgd", "--max-epochs", str(EPOCHS), "--grad-compression", codec]
        args += ["--data-seed", str(10 + i), "--wait-file", str(go), "--verbose", *admitted]
        honest.append(_start(processes, HONEST, tmp / f"h{i}", run_id, bootstrap.initial_peers, *args))
    everyone = list(honest)
    if attack is not None:
        admitted = swarm_peer.admit(bootstrap.authority, tmp / "a-swarm", run_id)
        args = [*COMMON, "--max-epochs", str(EPOCHS + 1), "--grad-compression", codec, "--wait-file", str(go)]
        attacker = _start(
            processes, ATTACKER, tmp / "a", run_id, bootstrap.initial_peers, *admitted, *attack, *args
        )
        everyone.append(attacker)
    _wait([p.out / "ready.json" for p in everyone], everyone, 180, "the peers to join")
    go.touch()
    _wait([p.out / "result.json" for p in honest], everyone, 240, "the honest peers to finish")
    finals = [_flat(p.out / "final.safetensors") for p in honest]
    results = [json.loads((p.out / "result.json").read_text()) for p in honest]
    for proc in everyone:
        processes.kill(proc)
    return finals, results


@pytest.fixture(scope="module")
def honest_only(module_processes, tmp_path_factory, bootstrap):
    """The honest peers alone, same seeds: where the parameters end without an attacker."""
    tmp = tmp_path_factory.mktemp("honest")
    finals, results = run_swarm(module_processes, tmp, bootstrap, "honest-only", None, "fp16")
    start = _flat(tmp / "h0" / "joined.safetensors")
    return finals, results, start


def _check_against_honest_run(finals, results, honest_only):
    honest_finals, _, start = honest_only
    reference = honest_finals[0]
    displacement = (reference - start).norm()
    assert displacement > 0, "the honest-only run did not train"
    for final, result in zip(finals, results, strict=True):
        assert bool(torch.isfinite(final).all()), "an honest peer's parameters are not finite"
        assert result["epoch"] >= EPOCHS, result
        distance = (final - reference).norm()
        assert distance < DISTANCE_BOUND * displacement, (distance, displacement)
    ratios = [float((f - reference).norm() / displacement) for f in finals]
    print("distance / honest displacement:", ratios)
    return ratios


@pytest.mark.timeout(900)
def test_admitted_peer_sending_nan_gradients(bootstrap, honest_only, processes, tmp_path):
    finals, results = run_swarm(processes, tmp_path, bootstrap, "nan-attack", ["--grads", "nan"], "fp16")
    ratios = _check_against_honest_run(finals, results, honest_only)
    # The guards did the work: the attacker's parts (as a sender) or its averages (as a reducer) were refused.
    refused = [r["refusals"].get("parts", 0) + r["refusals"].get("results", 0) for r in results]
    assert all(n > 0 for n in refused), (refused, ratios)


@pytest.mark.timeout(900)
def test_admitted_peer_sending_gradients_times_1e4(bootstrap, honest_only, processes, tmp_path):
    attack = ["--grads", "scale", "--scale", "1e4"]
    finals, results = run_swarm(processes, tmp_path, bootstrap, "scale-attack", attack, "fp16")
    ratios = _check_against_honest_run(finals, results, honest_only)
    refused = [r["refusals"].get("results", 0) for r in results]
    assert all(n > 0 for n in refused), (refused, ratios)
