"""Finetuning a base version on an instruction shard with PEFT (LoRA, IA3) or in full.

The fusion job (:mod:`coldswarm.worker.fusion_job`) and the fusion-quality
benchmark both call :func:`attach_adapter` and :func:`train`, so what the
benchmark measures is what volunteers run. The hyperparameters are the round's
options (:class:`coldswarm.common.round_options.FusionHyperparameters`, which the
coordinator also checks at OpenRound).

Tuning: LoRA (the default) trains ~1-2% of a T5's weights and gives the merge a
low-rank delta; raise ``lora_r`` for more capacity, ``lr`` around 1e-3 suits it.
IA3 trains only scaling vectors (far fewer weights, a larger ``lr`` ~3e-3 to
1e-2). ``full`` finetunes every weight (``lr`` ~1e-4 to 3e-4) and makes the
largest contribution.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from coldswarm.common.round_options import FusionHyperparameters
from coldswarm.worker.devices import autocast, make_optimizer

# T5 module names (attention q/k/v/o and the gated FFN wi_0/wi_1/wo).
T5_LORA_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
T5_IA3_TARGETS = ["k", "v", "wo"]
T5_IA3_FEEDFORWARD = ["wo"]


def attach_adapter(model, hp: FusionHyperparameters):
    """Wrap ``model`` for training: a PEFT LoRA/IA3 model, or the model itself for full finetuning."""
    if hp.peft_method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model

    if hp.peft_method == "lora":
        config = LoraConfig(
            task_type=TaskType.SEQ_2_SEQ_LM,
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=hp.target_modules or T5_LORA_TARGETS,
        )
    else:
        targets = hp.target_modules or T5_IA3_TARGETS
        config = IA3Config(
            task_type=TaskType.SEQ_2_SEQ_LM,
            target_modules=targets,
            feedforward_modules=[m for m in T5_IA3_FEEDFORWARD if m in targets],
        )
    return get_peft_model(model, config)


def lr_at(step: int, hp: FusionHyperparameters) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr`` at the last step."""
    if step < hp.warmup_steps:
        return hp.lr * (step + 1) / hp.warmup_steps
    progress = (step - hp.warmup_steps) / max(1, hp.steps - hp.warmup_steps)
    return hp.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def passes(batches: Callable[[int], Iterable[dict]], seed: int = 0) -> Iterator[dict]:
    """Pass after pass over a finite batch source, ``batches(seed + pass)`` each (a fresh shuffle per pass,
    when the source is seeded); a source with no batch is an error at once, not an endless search."""
    for n in itertools.count():
        empty = True
        for batch in batches(seed + n):
            empty = False
            yield batch
        if empty:
            raise ValueError("the shard produced no training batch: it has no usable examples")


StepCallback = Callable[[int, float, float], None]
"""Called after every step with (step, loss, samples/s)."""


def train(
    model,
    batches: Iterable[dict],
    hp: FusionHyperparameters,
    device: str,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    cpu_bf16: bool = False,
) -> dict[str, float]:
    """Train for ``hp.steps`` optimizer steps; stops between steps when ``should_stop()`` says so.
    ``cpu_bf16``: forward and backward in bf16 on a CPU that computes it natively (:func:`autocast`).

    Returns ``{"train_loss": mean loss of the last 10 steps, "train_examples": examples seen}``.
    """
    torch.manual_seed(hp.seed)
    model.train()
    optimizer = make_optimizer(model.parameters(), device, lr=hp.lr, weight_decay=hp.weight_decay)
    recent: list[float] = []
    examples = 0
    source = passes(lambda _pass: batches)
    for step in range(hp.steps):
        if should_stop is not None and should_stop():
            from coldswarm.worker.jobs import Cancelled

            raise Cancelled(f"stopped at step {step} of {hp.steps}")
        batch = {k: v.to(device) for k, v in next(source).items()}
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, hp)
        with autocast(device, cpu_bf16):
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}: lower lr (now {hp.lr})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n = int(batch["input_ids"].shape[0])
        examples += n
        recent = (recent + [loss.item()])[-10:]
        if on_step is not None:
            on_step(step + 1, recent[-1], n / max(time.perf_counter() - started, 1e-9))
    model.eval()
    return {"train_loss": sum(recent) / len(recent), "train_examples": float(examples)}


@torch.no_grad()
def mean_loss(model, batches: Iterable[dict], device: str) -> float:
    """Token-weighted mean cross-entropy over ``batches`` (labels -100 are ignored)."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            logits = model(**batch).logits.float()
        labels = batch["labels"]
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100, reduction="sum"
        )
        total += loss.item()
        tokens += int((labels != -100).sum())
    return total / max(tokens, 1)
