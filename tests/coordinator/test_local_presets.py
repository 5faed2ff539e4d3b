"""``coldswarm-local --preset``: a named recipe sets flags; a flag given explicitly still wins."""

import dataclasses

import pytest

from coldswarm.common.round_options import FusionHyperparameters
from coldswarm.coordinator.local_cluster import PRESETS, LocalClusterConfig, parse_config
from coldswarm.coordinator.merge_pipeline import load_evaluator
from coldswarm.coordinator.rounds import check_fusion_options, fusion_task
from coldswarm.lm.data import TASK_LAYOUTS, resolve_shard


def test_the_demo_preset_is_the_defaults():
    assert parse_config([]) == LocalClusterConfig()
    assert parse_config(["--preset", "demo"]) == LocalClusterConfig()


def test_the_long_preset_sets_its_values_and_explicit_flags_win():
    long = parse_config(["--preset", "long"])
    for name, value in PRESETS["long"].items():
        assert getattr(long, name) == value, name
    tuned = parse_config(["--fusion-rounds", "3", "--preset", "long", "--method", "ties"])
    assert (tuned.fusion_rounds, tuned.method, tuned.peft) == (3, "ties", "full")


def test_every_preset_names_real_fields():
    names = {f.name for f in dataclasses.fields(LocalClusterConfig)}
    for preset in PRESETS.values():
        assert set(preset) <= names


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_round_shuffles_anew_with_options_a_worker_accepts(preset):
    config = parse_config(["--preset", preset])
    first, second = config.fusion_options(0), config.fusion_options(1)
    assert first["hyperparameters"]["seed"] != second["hyperparameters"]["seed"]
    hp = FusionHyperparameters.from_options({"peft_method": config.peft, **first["hyperparameters"]})
    assert (hp.steps, hp.batch_size) == (config.fusion_steps, config.fusion_batch_size)


def test_an_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--preset", "huge"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("shards", TASK_LAYOUTS)
def test_fusion_shards_name_shards_the_coordinator_accepts_and_a_worker_resolves(shards):
    config = parse_config(["--fusion-shards", shards])
    options = config.fusion_options(0)
    check_fusion_options(options, config.method)
    specs = [fusion_task(options, config.method, i, config.workers)["shard"] for i in range(config.workers)]
    assert specs == [f"{shards}:{i}-of-{config.workers}" for i in range(config.workers)]
    for spec in specs:
        assert resolve_shard(spec).kind == "instructions"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_names_an_evaluator_the_coordinator_loads(preset):
    assert callable(load_evaluator(parse_config(["--preset", preset]).evaluator))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_presets_workers_get_flags_join_swarm_parses(preset):
    from pathlib import Path

    from coldswarm.coordinator.local_cluster import worker_command
    from coldswarm.worker import cli as worker_cli

    config = parse_config(["--preset", preset])
    argv = worker_command("h:1", Path("/t"), Path("/w"), "cpu", config.worker_flags(1))
    args = worker_cli.build_parser().parse_args(argv[1:])
    assert (args.name, args.cpu_bf16) == ("local-1", config.cpu_bf16)
    assert args.cpu_threads >= 1
