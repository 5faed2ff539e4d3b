"""A DiLoCo pretrain round end to end: ``coldswarm-coordinator serve --dht-listen``, two ``join-swarm``
workers (admitted to the swarm with coordinator-signed credentials), the round opened with ``coldswarm-admin
round open --kind pretrain --options '{"algorithm": "diloco", ...}'``; the checkpointer collects the
synchronized outer parameters and the round publishes them as a version."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from coldswarm.coordinator.local_cluster import LocalCluster, LocalClusterConfig

pytestmark = pytest.mark.slow


def test_diloco_round_is_collected_and_published(tmp_path, processes):
    config = LocalClusterConfig(
        workers=2,
        run_dir=tmp_path / "run",
        pretrain_rounds=1,
        fusion_rounds=0,
        pretrain_epochs=2,
        pretrain_algorithm="diloco",
        pretrain_inner_steps=4,
        evaluator="",
        round_timeout_s=400,
    )
    cluster = LocalCluster(config)
    try:
        cluster.start()
        options = config.pretrain_options()
        assert options["algorithm"] == "diloco"
        opened = json.loads(
            cluster.admin_cli(
                "--json",
                "round",
                "open",
                "--kind",
                "pretrain",
                "--quorum",
                "2",
                "--options",
                json.dumps(options),
            )
        )
        version = cluster.wait_round(int(opened["id"]))
        manifest = json.loads(version.manifest_json)
        assert (version.number, version.parent, version.method) == (1, 0, "pretrain")
        assert manifest["metrics"]["epoch"] == 2, manifest["metrics"]
        assert manifest["metrics"]["swarm_peers"] == 2, manifest["metrics"]
        # Both workers took at least inner_steps local steps per outer epoch.
        assert manifest["metrics"]["swarm_steps"] >= 2 * 2 * 4, manifest["metrics"]
        base = load_file(str(cluster.versions_dir() / "0" / "model.safetensors"))
        cluster.download("1", tmp_path / "v1")  # coldswarm-admin download, every sha256 checked
        trained = load_file(str(tmp_path / "v1" / "model.safetensors"))
        assert set(trained) == set(base)
        assert not torch.equal(trained["lm_head.weight"], base["lm_head.weight"])
        assert all(torch.isfinite(t).all() for t in trained.values())
    finally:
        cluster.stop()
