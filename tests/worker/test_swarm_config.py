"""SwarmConfig: the guards hivemind needs and the mapping from a PretrainTask (no DHT, no peers)."""

from __future__ import annotations

import pytest

from coldswarm.worker.swarm import SwarmConfig


def test_config_guards_hivemind_deadlock_and_maps_the_task():
    with pytest.raises(ValueError, match="matchmaking_time"):
        SwarmConfig(run_id="r", matchmaking_time=2.0, request_timeout=3.0)
    with pytest.raises(ValueError, match="run_id"):
        SwarmConfig(run_id="a.b")

    class Task:  # the PretrainTask fields SwarmConfig reads
        run_id, initial_peers, target_batch_size, epochs = "round7", ["/ip4/1.2.3.4/tcp/1/p2p/X"], 512, 3

    config = SwarmConfig.from_task(Task(), {"lr": 1e-3, "betas": [0.9, 0.98]}, batch_size_per_step=8)
    assert (config.run_id, config.target_batch_size, config.max_epochs) == ("round7", 512, 3)
    assert config.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/X"]
    assert config.betas == (0.9, 0.98) and config.lr == 1e-3 and config.batch_size_per_step == 8
    with pytest.raises(ValueError, match="unknown pretrain hyperparameter"):
        SwarmConfig.from_task(Task(), {"learning_rate": 1})
