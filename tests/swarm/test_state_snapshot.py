"""A guarded training-state averager serves peers a copy of its state, not its live tensors: the averager's
process compresses what it is given after the lock is released, while training goes on (real DHT and
averager on loopback)."""

from __future__ import annotations

import functools

import hivemind
import torch
from hivemind.optim.state_averager import TrainingStateAverager

from coldswarm.swarm.guarded_averagers import AveragerGuard, GuardedTrainingStateAverager

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_the_served_state_is_a_snapshot_that_later_steps_leave_alone():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    dht = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    averager = GuardedTrainingStateAverager(
        guard=AveragerGuard(),
        dht=dht,
        prefix="snapshot-test",
        optimizer=functools.partial(torch.optim.Adam, lr=0.1),
        params=model.parameters(),
        offload_optimizer=True,
        custom_gradients=True,
        start=True,
    )
    try:
        metadata, served, infos = averager.get_current_state()
        params = [p for group in averager.optimizer.param_groups for p in group["params"]]
        _, live_optimizer_tensors = hivemind.optim.state_averager.dump_optimizer_state(averager.optimizer)
        live = params + list(averager.extra_tensors) + list(live_optimizer_tensors)
        assert len(served) == len(live) == len(infos) and metadata["epoch"] == 0
        # The same state as hivemind's own answer, in the same order, with the same descriptions.
        hm_metadata, hm_tensors, hm_infos = TrainingStateAverager.get_current_state(averager)
        assert metadata == hm_metadata
        assert all(torch.equal(a, b) for a, b in zip(served, hm_tensors, strict=True))
        assert [(i.key, i.role, i.descriptor) for i in infos] == [
            (i.key, i.role, i.descriptor) for i in hm_infos
        ]
        before = [t.clone() for t in served]
        # What the next optimizer step does to the live state while a peer is still downloading.
        with torch.no_grad():
            for t in live:
                t.add_(1.0)
        assert all(torch.equal(a, b) for a, b in zip(served, before, strict=True))
        assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(served, live, strict=True))
    finally:
        averager.shutdown()
        dht.shutdown()
