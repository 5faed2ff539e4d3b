"""A fusion assignment in-process on the real default version: its payload must validate against the base."""

import json
import threading

import pytest

from coldswarm.fusion.checkpoint import CheckpointReader
from coldswarm.fusion.contribution import open_contribution
from coldswarm.fusion.validate import validate_contribution
from coldswarm.lm.default import build_default_version
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.fusion_job import hyperparameters_for, run_fusion_job
from coldswarm.worker.jobs import Cancelled, JobContext
from coldswarm.worker.progress import Progress

QUICK = {"steps": 3, "batch_size": 4, "eval_examples": 4, "fisher_examples": 4, "regmean_batches": 1}


@pytest.fixture(scope="module")
def version0(tmp_path_factory):
    return build_default_version(tmp_path_factory.mktemp("v") / "0")


def context(version_dir, tmp_path, task, cancel=None):
    assignment = pb.Assignment(id="a-1", round_id=1, base_version=0, fusion=task)
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return JobContext(assignment, version_dir, scratch, None, "cpu", Progress(), cancel or threading.Event())


@pytest.mark.parametrize(
    "method,form,codec",
    [("lora", "lora", "int8_blockwise"), ("ia3", "ia3", "zstd"), ("full", "delta", "zstd")],
)
def test_fusion_job_produces_a_valid_contribution(version0, tmp_path, method, form, codec):
    task = pb.FusionTask(
        shard="default:0-of-2",
        peft_method=method,
        hyperparameters_json=json.dumps(QUICK),
        statistics=["fisher", "regmean"],
        codec=codec,
    )
    ctx = context(version0, tmp_path, task)
    result = run_fusion_job(ctx, task)
    assert result.codec == codec and result.num_examples == 3 * 4
    assert {"train_loss", "val_exact_match_before", "val_token_loss_after"} <= set(result.metrics)
    if codec == "int8_blockwise":  # a lossy codec's error is measured and reported with the contribution
        assert 0 < result.metrics["codec_rel_rms_mean"] <= result.metrics["codec_rel_rms_max"] < 0.05
    else:
        assert "codec_rel_rms_max" not in result.metrics
    with open_contribution(result.payload) as contribution:
        assert contribution.meta.form == form
        assert contribution.meta.base_version == 0
        assert set(contribution.meta.statistics) == {"fisher", "regmean"}
        report = validate_contribution(contribution, CheckpointReader(version0))
        assert report.fisher_params > 0 and report.gram_modules > 0
    assert [p.name for p in ctx.scratch_dir.iterdir()] == [result.payload.name], "only the payload is left"


def test_strict_data_fails_on_a_malformed_record_before_training(version0, tmp_path):
    from coldswarm.lm.data import DataError

    data = tmp_path / "data"
    data.mkdir()
    (data / "mine.jsonl").write_text('{"inputs": "q", "targets": "a"}\n{"inputs": "no target"}\n')
    task = pb.FusionTask(shard="local:0-of-1", hyperparameters_json=json.dumps(QUICK), codec="zstd")
    ctx = context(version0, tmp_path, task)
    ctx.data_dir, ctx.on_bad_record = data, "raise"
    with pytest.raises(DataError, match="mine.jsonl:2"):
        run_fusion_job(ctx, task)


def test_cancel_stops_before_anything_is_packaged(version0, tmp_path):
    task = pb.FusionTask(shard="default:1-of-2", hyperparameters_json=json.dumps(QUICK), codec="zstd")
    cancel = threading.Event()
    cancel.set()
    ctx = context(version0, tmp_path, task, cancel)
    with pytest.raises(Cancelled):
        run_fusion_job(ctx, task)
    assert not any(ctx.scratch_dir.iterdir())


def test_task_fields_override_round_options():
    task = pb.FusionTask(
        peft_method="ia3",
        statistics=["regmean"],
        codec="bytegroup",
        hyperparameters_json='{"peft_method": "lora"}',
    )
    hp = hyperparameters_for(task)
    assert (hp.peft_method, hp.statistics, hp.codec) == ("ia3", ["regmean"], "bytegroup")


def test_bad_round_options_fail_before_training():
    with pytest.raises(ValueError, match="JSON object"):
        hyperparameters_for(pb.FusionTask(hyperparameters_json="[1]"))
    with pytest.raises(ValueError, match="unknown statistics"):
        hyperparameters_for(pb.FusionTask(statistics=["hessian"]))


def test_passes_reshuffle_each_pass_and_an_empty_shard_fails_at_once():
    from coldswarm.worker.finetune import passes

    seeds = []

    def batches(seed):
        seeds.append(seed)
        return [f"{seed}a", f"{seed}b"]

    got = passes(batches, 5)
    assert [next(got) for _ in range(5)] == ["5a", "5b", "6a", "6b", "7a"] and seeds == [5, 6, 7]
    with pytest.raises(ValueError, match="no training batch"):
        next(passes(lambda seed: [], 0))
