"""The lineage's last defence: the checkpointer never records a state that is not finite or jumped from its base.

Admitted peers written against hivemind's public API (``attacker_peer.py``) serve what an attacker would: NaN
parameters announced at epoch 1,000,000 (issue 12's "fake state"), or finite parameters ten times the base's.
The checkpointer refuses both and collects the honest peer's state; with only the attackers left it fails
with the reasons and writes nothing.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

import pytest
import torch

from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig, CollectError

pytestmark = pytest.mark.slow

_SHM_MANAGER_STARTER = torch.empty(1).share_memory_()  # see tests/worker/test_swarm_multiprocess.py

HERE = Path(__file__).resolve().parent
ATTACKER = HERE / "attacker_peer.py"
sys.path.insert(0, str(HERE.parent / "worker"))
import swarm_peer  # noqa: E402

RUN = "lineage"


@pytest.fixture
def bootstrap(processes):  # after `processes`: its DHT is shut down before the leak check
    checkpointer = Checkpointer(CheckpointerConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"])).start()
    try:
        yield checkpointer
    finally:
        checkpointer.shutdown()


def _serve(processes, bootstrap, tmp: Path, name: str, *args: str):
    out = tmp / name
    admitted = swarm_peer.admit(bootstrap.authority, tmp / f"{name}-swarm", RUN)
    log = open(tmp / f"{name}.log", "w")
    proc = processes.start(
        [
            sys.executable,
            str(ATTACKER),
            "--run-id",
            RUN,
            "--initial-peers",
            ",".join(bootstrap.initial_peers),
            "--out",
            str(out),
            "--serve",
            "600",
            *admitted,
            *args,
        ],
        stdout=log,
        stderr=log,
    )
    proc.out, proc.log_path = out, tmp / f"{name}.log"
    return proc


def _wait_served(procs, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not all((p.out / "result.json").exists() for p in procs):
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.out.name} exited with {p.returncode}:\n{p.log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("the peers did not start serving in time")
        time.sleep(0.25)


@pytest.mark.timeout(600)
def test_checkpointer_refuses_non_finite_or_jumped_states(processes, bootstrap, tmp_path):
    base = tmp_path / "base"
    swarm_peer.tiny_t5(0).save_pretrained(base)
    (base / "spiece.model").write_bytes(b"tokenizer stand-in")
    nan = _serve(processes, bootstrap, tmp_path, "nan", "--params", "nan", "--fake-epoch", "1000000")
    jumped = _serve(
        processes, bootstrap, tmp_path, "jumped", "--params", "scale", "--scale", "10", "--fake-epoch", "1000"
    )
    honest = _serve(processes, bootstrap, tmp_path, "honest", "--fake-epoch", "1")
    _wait_served([nan, jumped, honest])

    # The attackers claim the newest epochs, so they are asked first; both are refused, the honest one is taken.
    out = tmp_path / "v1"
    metrics = bootstrap.collect(RUN, base, out, min_epoch=1, timeout=120)
    assert metrics["epoch"] == 1
    collected = swarm_peer.params_of(__import__("transformers").AutoModelForSeq2SeqLM.from_pretrained(out))
    initial = swarm_peer.params_of(swarm_peer.tiny_t5(0))
    assert all(torch.equal(collected[k], initial[k]) for k in initial)

    processes.kill(honest)
    honest.wait(timeout=30)
    with pytest.raises(CollectError) as refused:
        bootstrap.collect(RUN, base, tmp_path / "v2", min_epoch=1, timeout=40)
    assert "not finite" in str(refused.value) and "moved" in str(refused.value), refused.value
    assert not (tmp_path / "v2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v2")], "temp dir left behind"


def test_lineage_check_itself():
    base = [torch.ones(10), torch.ones(5)]
    Checkpointer._check_lineage(RUN, [torch.ones(10) * 1.1, torch.ones(5)], base, 0.5)
    with pytest.raises(CollectError, match="not finite"):
        Checkpointer._check_lineage(RUN, [torch.full((10,), float("nan")), torch.ones(5)], base, 0.5)
    with pytest.raises(CollectError, match="moved"):
        Checkpointer._check_lineage(RUN, [torch.ones(10) * 2, torch.ones(5)], base, 0.5)
    Checkpointer._check_lineage(RUN, [torch.ones(10) * 2, torch.ones(5)], base, 0)  # 0: no bound


def test_a_download_that_outlives_the_deadline_ends_as_a_collect_error():
    # hivemind's future raises concurrent.futures.TimeoutError when a download outlives the wait: a slow
    # donor in the deadline's last moments. The collect ends in a CollectError with the refusals, and it
    # never starts a second download beside one still running.
    class SlowDonor:
        started = 0

        def load_state_from_peers(self, wait, timeout):
            assert not wait
            self.started += 1
            return self

        def result(self, timeout):
            time.sleep(min(timeout, 0.3))
            raise FuturesTimeout

        def refusals(self):
            return ["peer X: parameter 0 is not finite"]

    donor = SlowDonor()
    checkpointer = Checkpointer(CheckpointerConfig(load_state_timeout=0.05, poll_interval=0.01))
    with pytest.raises(CollectError, match="no peer served.*not finite"):
        checkpointer._download(donor, RUN, min_epoch=1, deadline=time.monotonic() + 0.2)
    assert donor.started == 1
