"""The round-options schema: what OpenRound refuses is exactly what a worker would refuse."""

from __future__ import annotations

import json

import pytest

from coldswarm.common.round_options import (
    FusionHyperparameters,
    RoundOptionsError,
    check_round_options,
    fusion_hyperparameters,
    fusion_task,
    pretrain_hyperparameters,
    statistics_needed,
)
from coldswarm.proto import coldswarm_pb2 as pb

#: the codec names these checks are given (the schema takes them as a parameter: common cannot import fusion)
GIVEN_CODECS = ["none", "zstd", "bytegroup"]


def check(kind: str, options: dict, **kw) -> None:
    check_round_options(kind, options, codecs=GIVEN_CODECS, **kw)


@pytest.mark.parametrize(
    "options, says",
    [
        (
            {"hyperparameters": {"stpes": 10}},
            "unknown fusion hyperparameter(s) ['stpes'] (did you mean 'steps'?)",
        ),
        ({"peft_method": "prompt"}, "peft_method must be lora, ia3 or full"),
        ({"codec": "rar"}, "unknown codec 'rar'; choose one of ['bytegroup', 'none', 'zstd']"),
        ({"statistics": ["hessian"]}, "unknown statistics ['hessian']"),
        ({"hyperparameters": {"steps": 0}}, "steps and batch_size must be at least 1"),
        ({"hyperparameters": [1]}, "JSON object"),
    ],
)
def test_fusion_options_a_worker_would_refuse_are_refused(options, says):
    with pytest.raises(RoundOptionsError) as info:
        check("fusion", options)
    assert str(info.value).startswith("fusion round options: ") and says in str(info.value)


def test_the_methods_statistics_meet_the_options():
    # Fisher merging needs a diagonal Fisher, which a 4-bit base cannot give.
    check("fusion", {"hyperparameters": {"load_in_4bit": True}}, statistics=[])
    with pytest.raises(RoundOptionsError, match="Fisher needs floating-point"):
        check("fusion", {"hyperparameters": {"load_in_4bit": True}}, statistics=["fisher"])
    assert statistics_needed(fisher=True, gram=False) == ["fisher"]
    assert statistics_needed(fisher=False, gram=True) == ["regmean"]
    assert statistics_needed(fisher=False, gram=False) == []


def test_the_task_the_coordinator_writes_is_read_back_by_the_worker():
    options = {"peft_method": "ia3", "codec": "zstd", "hyperparameters": {"steps": 7}, "shard_prefix": "s"}
    task = fusion_task(options, ["regmean"], 2, 4)
    assert task["shard"] == "s:2-of-4" and task["statistics"] == ["regmean"]
    hp = fusion_hyperparameters(pb.FusionTask(**task), codecs=GIVEN_CODECS)
    assert (hp.peft_method, hp.steps, hp.statistics, hp.codec, hp.lr) == ("ia3", 7, ["regmean"], "zstd", 5e-3)
    # The round's own statistics win over what the method would ask for.
    assert fusion_task({"statistics": []}, ["fisher"], 0, 1)["statistics"] == []
    assert FusionHyperparameters.from_json('{"peft_method": "full"}').lr == 3e-4


def test_pretrain_options():
    check(
        "pretrain", {"epochs": 3, "target_batch_size": 64, "hyperparameters": {"batch_size": 4, "lr": 1e-3}}
    )
    check("pretrain", {"epochs": "3"})  # the coordinator reads it with int(), as it always has
    for options, says in (
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"target_batch_size": "many"}, "target_batch_size must be a positive integer"),
        ({"hyperparameters": {"batch_size": 0}}, "batch_size must be a positive integer"),
        ({"hyperparameters": "fast"}, "hyperparameters must be a JSON object"),
    ):
        with pytest.raises(RoundOptionsError, match="^pretrain round options: " + says):
            check("pretrain", options)
    # Swarm options are the worker's SwarmConfig fields: checked where their names are given.
    check("pretrain", {"hyperparameters": {"lrr": 1}})
    with pytest.raises(RoundOptionsError, match="did you mean 'lr'"):
        check("pretrain", {"hyperparameters": {"lrr": 1}}, swarm_fields={"lr", "optimizer"})
    with pytest.raises(RoundOptionsError, match="round kind 'bake' is not one of"):
        check("bake", {})


def test_pretrain_hyperparameters_split_data_from_swarm_options():
    data, swarm = pretrain_hyperparameters(
        json.dumps({"batch_size": 2, "inputs_length": 32, "lr": 0.1, "epochs": 9}), swarm_fields={"lr"}
    )
    assert (data.batch_size, data.inputs_length) == (2, 32)
    assert swarm == {"lr": 0.1}  # epochs is PretrainTask's own field, never a swarm option


def test_the_top_level_algorithm_is_a_shorthand_the_workers_read_in_their_hyperparameters():
    from coldswarm.common.round_options import pretrain_task_hyperparameters

    options = {"algorithm": "diloco", "hyperparameters": {"inner_steps": 50}}
    check("pretrain", options)
    assert pretrain_task_hyperparameters(options) == {"algorithm": "diloco", "inner_steps": 50}
    assert pretrain_task_hyperparameters({"hyperparameters": {"lr": 0.1}}) == {"lr": 0.1}
    check("pretrain", {"algorithm": "diloco", "hyperparameters": {"algorithm": "diloco"}})
    for bad in ({"algorithm": 3}, {"algorithm": "diloco", "hyperparameters": {"algorithm": "sync"}}):
        with pytest.raises(RoundOptionsError, match="agree with hyperparameters.algorithm"):
            check("pretrain", bad)


def test_the_gate_option_must_be_an_object():
    check("fusion", {"gate": {"policy": "always"}})
    with pytest.raises(RoundOptionsError, match="gate must be a JSON object"):
        check("pretrain", {"gate": "if-better"})
