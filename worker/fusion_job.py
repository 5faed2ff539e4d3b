"""A fusion assignment: finetune the base on an instruction shard, collect statistics, package.

Steps (each ends at a step boundary where a stop request is honoured):

1. load the base version and its tokenizer; resolve the shard against the
   volunteer's data (``--data``) or the embedded default tasks;
2. score the shard's validation split (exact match, token loss) before training;
3. finetune with PEFT (LoRA by default; IA3 or full by the round's options);
4. score the validation split again;
5. collect the statistics the round asks for on the shard's own training data
   (diagonal Fisher; RegMean Gram matrices) with :mod:`coldswarm.fusion.statistics`;
6. write the contribution as safetensors (:mod:`coldswarm.fusion.contribution`) and
   encode it with the round's codec. Nothing partial is ever written where the
   daemon would upload it.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch

from coldswarm.common.round_options import FusionHyperparameters, fusion_hyperparameters
from coldswarm.fusion import codecs
from coldswarm.fusion.checkpoint import CheckpointReader
from coldswarm.fusion.contribution import ContributionMeta, from_peft_model, save_contribution
from coldswarm.fusion.statistics import collect_fisher, collect_gram
from coldswarm.lm.batching import Seq2SeqConfig, instruction_batches
from coldswarm.lm.data import resolve_shard
from coldswarm.lm.evaluate import EvalConfig, score_records
from coldswarm.lm.tokenizer import load_tokenizer
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.devices import load_seq2seq
from coldswarm.worker.finetune import attach_adapter, passes, train
from coldswarm.worker.jobs import JobContext, JobResult

log = logging.getLogger(__name__)


def hyperparameters_for(task: pb.FusionTask) -> FusionHyperparameters:
    """The round's hyperparameters, with the task's own fields taking precedence (read as the coordinator
    checked them at OpenRound: :func:`coldswarm.common.round_options.fusion_hyperparameters`)."""
    return fusion_hyperparameters(task, codecs=codecs.CODECS)


def adapted_modules(peft_model) -> set[str]:
    """Module paths (base model names) that carry a LoRA or IA3 adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, m in peft_model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)}


def _score(model, tokenizer, records: list[dict], device: str) -> dict[str, float]:
    if not records:
        return {}
    return score_records(model, tokenizer, records, EvalConfig(device=device, batch_size=32))


def run_fusion_job(ctx: JobContext, task: pb.FusionTask) -> JobResult:
    hp = hyperparameters_for(task)
    tokenizer = load_tokenizer(ctx.version_dir)
    train_shard = resolve_shard(task.shard, ctx.data_dir, split="train", on_error=ctx.on_bad_record)
    val_shard = resolve_shard(task.shard, ctx.data_dir, split="validation", on_error=ctx.on_bad_record)
    val_records = list(itertools.islice(val_shard, hp.eval_examples))
    log.info("fusion shard %s: %s; %s", task.shard, train_shard.description, hp)
    s2s = Seq2SeqConfig(max_input_length=hp.max_input_length, max_target_length=hp.max_target_length)

    def batches(seed: int):
        return instruction_batches(
            train_shard, tokenizer, hp.batch_size, s2s, seed=seed, buffer_size=train_shard.shuffle_buffer
        )

    base = load_seq2seq(ctx.version_dir, ctx.device, load_in_4bit=hp.load_in_4bit)
    ctx.progress.update(phase="evaluating")
    before = _score(base, tokenizer, val_records, ctx.device)
    ctx.check_cancel()

    model = attach_adapter(base, hp)
    ctx.progress.update(phase="training", step=0, total_steps=hp.steps)
    started = time.monotonic()

    def on_step(step: int, loss: float, samples_per_s: float) -> None:
        ctx.progress.update(step=step, loss=loss, samples_per_s=samples_per_s)
        if step % 10 == 0 or step == hp.steps:
            log.info("step %d/%d loss %.4f (%.1f samples/s)", step, hp.steps, loss, samples_per_s)

    epochs = passes(batches, hp.seed)
    try:
        train_metrics = train(
            model,
            epochs,
            hp,
            ctx.device,
            on_step=on_step,
            should_stop=ctx.cancel.is_set,
            cpu_bf16=ctx.cpu_bf16,
        )
    finally:
        epochs.close()  # its shuffle buffer goes before the statistics' passes fill theirs
    train_seconds = time.monotonic() - started
    ctx.progress.update(phase="evaluating")
    after = _score(model, tokenizer, val_records, ctx.device)
    ctx.check_cancel()

    # For an adapter, Gram matrices are needed only where the weights changed.
    modules = sorted(adapted_modules(model)) if hp.peft_method != "full" else None
    stats_started = time.monotonic()
    statistics_tensors, statistics_meta = collect_statistics(ctx, model, hp, batches, modules)
    stats_seconds = time.monotonic() - stats_started
    metrics = {
        "train_loss": train_metrics["train_loss"],
        "train_seconds": round(train_seconds, 2),
        "statistics_seconds": round(stats_seconds, 2),
        **{f"val_{k}_before": v for k, v in before.items()},
        **{f"val_{k}_after": v for k, v in after.items()},
    }
    num_examples = int(train_metrics["train_examples"])
    tensors, meta = package(model, hp, ctx, num_examples, statistics_meta, metrics)
    tensors.update(statistics_tensors)
    ctx.check_cancel()

    plain = save_contribution(ctx.scratch_dir / "contribution.safetensors", tensors, meta)
    encoded = ctx.scratch_dir / f"contribution.{hp.codec}"
    size = codecs.encode_file(plain, encoded, hp.codec)
    if not codecs.get_codec(hp.codec).lossless:
        metrics.update(codec_error(plain, encoded, hp.codec))
        log.info("lossy codec %s: relative RMS error %s", hp.codec, metrics["codec_rel_rms_max"])
    plain.unlink()
    log.info("contribution: %d tensors, %d bytes encoded with %s", len(tensors), size, hp.codec)
    return JobResult(payload=encoded, codec=hp.codec, num_examples=num_examples, metrics=metrics)


def codec_error(plain: Path, encoded: Path, codec: str) -> dict[str, float]:
    """What a lossy codec did to the contribution, for its metrics: the largest and the mean relative RMS
    error over the tensors it changed (what the coordinator will merge, not what the worker trained)."""
    decoded = codecs.get_codec(codec).decode(encoded.read_bytes())
    errors = [e["rel_rms"] for e in codecs.measure_error(plain.read_bytes(), decoded).values()]
    changed = [e for e in errors if e > 0] or [0.0]
    return {"codec_rel_rms_max": max(changed), "codec_rel_rms_mean": sum(changed) / len(changed)}


def package(
    model, hp: FusionHyperparameters, ctx: JobContext, num_examples: int, statistics: dict, metrics: dict
):
    """The trained weights as contribution tensors: the adapter for LoRA/IA3, a delta for full finetunes."""
    base_version = ctx.assignment.base_version
    if hp.peft_method in ("lora", "ia3"):
        return from_peft_model(
            model,
            num_examples=num_examples,
            base_version=base_version,
            statistics=statistics,
            metrics=metrics,
        )
    # Full finetune: a task vector (finetuned - base) per stored base tensor. Deltas compress and
    # quantise far better than full weights, and every merge method takes them.
    reader = CheckpointReader(ctx.version_dir)
    state = model.state_dict()
    tensors = {}
    for name in reader.names():
        if name not in state:
            continue
        tensors[f"delta/{name}"] = (
            state[name].detach().float().cpu() - reader.get(name).float()
        ).contiguous()
    meta = ContributionMeta(
        form="delta",
        base_version=base_version,
        num_examples=num_examples,
        statistics=statistics,
        metrics=metrics,
    )
    return tensors, meta


def collect_statistics(
    ctx: JobContext, model, hp: FusionHyperparameters, batches, modules
) -> tuple[dict, dict]:
    """Fisher and/or Gram matrices on the shard's training data, as the round asked."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    if "fisher" in hp.statistics:
        ctx.progress.update(phase="statistics")
        fisher = collect_fisher(
            model, batches(hp.seed + 1000), kind=hp.fisher_kind, max_examples=hp.fisher_examples, seed=hp.seed
        )
        tensors.update(fisher)
        meta["fisher"] = fisher.meta
        ctx.check_cancel()
    if "regmean" in hp.statistics:
        ctx.progress.update(phase="statistics")
        gram = collect_gram(model, batches(hp.seed + 2000), modules=modules, max_batches=hp.regmean_batches)
        tensors.update(gram)
        meta["regmean"] = gram.meta
        ctx.check_cancel()
    return tensors, meta
