"""Finetuning a base version on an instruction shard with PEFT (LoRA, IA3) or in full.

The fusion job (:mod:`coldswarm.worker.fusion_job`) and the fusion-quality
benchmark both call :func:`attach_adapter` and :func:`train`, so what the
benchmark measures is what volunteers run.

Tuning: LoRA (the default) trains ~1-2% of a T5's weights and gives the merge a
low-rank delta; raise ``lora_r`` for more capacity, ``lr`` around 1e-3 suits it.
IA3 trains only scaling vectors (far fewer weights, a larger ``lr`` ~3e-3 to
1e-2). ``full`` finetunes every weight (``lr`` ~1e-4 to 3e-4) and makes the
largest contribution.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from coldswarm.fusion.codecs import get_codec
from coldswarm.worker.devices import autocast, make_optimizer

# T5 module names (attention q/k/v/o and the gated FFN wi_0/wi_1/wo).
T5_LORA_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
T5_IA3_TARGETS = ["k", "v", "wo"]
T5_IA3_FEEDFORWARD = ["wo"]


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class FusionHyperparameters:
    """Hyperparameters of a fusion (instruction-shard) assignment; the round's options set them."""

    peft_method: str = field(default="lora", metadata=_h("lora, ia3 or full"))
    steps: int = field(default=60, metadata=_h("optimizer steps"))
    batch_size: int = field(default=16, metadata=_h("examples per step"))
    lr: float = field(default=0.0, metadata=_h("learning rate; 0 picks the method's default"))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay"))
    warmup_steps: int = field(default=5, metadata=_h("linear warm-up steps"))
    max_input_length: int = field(default=128, metadata=_h("inputs are truncated to this many tokens"))
    max_target_length: int = field(default=32, metadata=_h("targets are truncated to this many tokens"))
    lora_r: int = field(default=8, metadata=_h("LoRA rank"))
    lora_alpha: int = field(default=16, metadata=_h("LoRA scaling numerator (scale = alpha / r)"))
    lora_dropout: float = field(default=0.0, metadata=_h("dropout on the LoRA path"))
    target_modules: list[str] = field(
        default_factory=list, metadata=_h("modules to adapt; empty: all T5 ones")
    )
    load_in_4bit: bool = field(default=False, metadata=_h("QLoRA: load the base in 4-bit NF4 (CUDA only)"))
    statistics: list[str] = field(default_factory=list, metadata=_h("fisher and/or regmean"))
    fisher_examples: int = field(default=64, metadata=_h("examples the diagonal Fisher is averaged over"))
    fisher_kind: str = field(default="expected", metadata=_h("expected (sampled targets) or empirical"))
    regmean_batches: int = field(
        default=8, metadata=_h("batches the RegMean Gram matrices are averaged over")
    )
    eval_examples: int = field(default=64, metadata=_h("validation examples scored before and after"))
    codec: str = field(default="bytegroup", metadata=_h("codec the payload is encoded with"))
    seed: int = field(default=0, metadata=_h("seed for shuffling and dropout"))

    @classmethod
    def from_options(cls, options: dict) -> FusionHyperparameters:
        """Build from a round's options, refusing names it does not know (a typo must not be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown fusion hyperparameter(s) {unknown}; known: {sorted(known)}")
        hp = cls(**options)
        if hp.peft_method not in ("lora", "ia3", "full"):
            raise ValueError(f"peft_method must be lora, ia3 or full, not {hp.peft_method!r}")
        if hp.steps < 1 or hp.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        if hp.fisher_kind not in ("expected", "empirical"):
            raise ValueError(f"fisher_kind must be expected or empirical, not {hp.fisher_kind!r}")
        unknown_stats = sorted(set(hp.statistics) - {"fisher", "regmean"})
        if unknown_stats:
            raise ValueError(f"unknown statistics {unknown_stats}: the worker collects fisher and regmean")
        get_codec(hp.codec)  # an unknown codec fails here, before any training (CodecError names the choices)
        if hp.load_in_4bit and hp.peft_method == "full":
            raise ValueError(
                "4-bit weights cannot be finetuned directly: use peft_method lora (QLoRA) or ia3"
            )
        if hp.load_in_4bit and "fisher" in hp.statistics:
            raise ValueError(
                "a diagonal Fisher needs floating-point merged weights, which a 4-bit base (load_in_4bit) "
                "does not have: merge QLoRA rounds with regmean, average, task_arithmetic or ties"
            )
        if not hp.lr:
            hp.lr = {"lora": 1e-3, "ia3": 5e-3, "full": 3e-4}[hp.peft_method]
        return hp

    @classmethod
    def from_json(cls, text: str) -> FusionHyperparameters:
        options = json.loads(text) if text else {}
        if not isinstance(options, dict):
            raise ValueError("fusion hyperparameters must be a JSON object")
        return cls.from_options(options)


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


def cycle(batches: Iterable[dict]) -> Iterator[dict]:
    """Repeat a finite batch source for as many steps as asked."""
    while True:
        empty = True
        for batch in batches:
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
) -> dict[str, float]:
    """Train for ``hp.steps`` optimizer steps; stops between steps when ``should_stop()`` says so.

    Returns ``{"train_loss": mean loss of the last 10 steps, "train_examples": examples seen}``.
    """
    torch.manual_seed(hp.seed)
    model.train()
    optimizer = make_optimizer(model.parameters(), device, lr=hp.lr, weight_decay=hp.weight_decay)
    recent: list[float] = []
    examples = 0
    source = cycle(batches)
    for step in range(hp.steps):
        if should_stop is not None and should_stop():
            from coldswarm.worker.jobs import Cancelled

            raise Cancelled(f"stopped at step {step} of {hp.steps}")
        batch = {k: v.to(device) for k, v in next(source).items()}
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, hp)
        with autocast(device):
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
