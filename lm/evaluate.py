"""Evaluation of a version: what every published version carries in its manifest.

    from coldswarm.lm.evaluate import EvalConfig, evaluate_version, format_table
    metrics = evaluate_version("versions/4")            # quick preset: well under a minute for tiny on CPU
    print(format_table(metrics))

Three measures:

* ``mod_loss``: MoD denoising loss (mean over target tokens) per mode (R, X, S; and per
  denoiser in ``mod_loss_by_denoiser``) on the default corpus's held-out documents, which
  no training shard contains. Masks come from a fixed seed, so versions compare on the
  very same examples.
* ``seen``: exact match (greedy decoding) and token loss on each seen task's test split, over
  distinct questions (``questions`` says how many; a small task has fewer than asked);
  ``seen_exact_match``/``seen_token_loss`` are the means over tasks.
* ``heldout``: exact match on the held-out tasks' test splits after a short, fixed, seeded
  finetune on their train splits, starting from the version: ColD Fusion's "better
  starting point" measure (``heldout_exact_match``; ``heldout_exact_match_before`` is the
  same before finetuning).

Tune the cost with :class:`EvalConfig` (``EvalConfig.quick()`` default, ``EvalConfig.standard()``,
``EvalConfig.full()``). A coordinator names one with ``--evaluator``: ``evaluate_version`` (quick),
``evaluate_standard``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from coldswarm.common.manifest import EVALUATION_PROTOCOL_KEY

from .batching import Seq2SeqConfig, collate_seq2seq, tokenize_documents, tokenize_record
from .cache import content_hash
from .corpus import CorpusConfig, corpus_key, iter_documents
from .mod import MoDCollator, MoDConfig
from .tasks import HELDOUT_TASKS, SEEN_TASKS, TaskConfig, load_task_split, tasks_key
from .tokenizer import special_ids


@dataclass
class EvalConfig:
    """Sizes and steps of an evaluation (defaults = the quick preset)."""

    mod_inputs_length: int = field(default=64, metadata={"help": "MoD inputs length for the denoising loss"})
    mod_examples_per_denoiser: int = field(default=8, metadata={"help": "held-out MoD examples per denoiser"})
    seen_tasks: tuple[str, ...] | None = field(
        default=None, metadata={"help": "seen tasks to score (None = all)"}
    )
    seen_examples_per_task: int = field(
        default=12, metadata={"help": "distinct test questions per seen task"}
    )
    heldout_tasks: tuple[str, ...] = field(
        default=HELDOUT_TASKS, metadata={"help": "held-out tasks to finetune on"}
    )
    heldout_finetune_steps: int = field(default=20, metadata={"help": "finetune steps (0 = no finetune)"})
    heldout_batch_size: int = field(default=16, metadata={"help": "finetune batch size"})
    heldout_learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate of the finetune"}
    )
    heldout_examples_per_task: int = field(
        default=12, metadata={"help": "distinct test questions per held-out task"}
    )
    batch_size: int = field(default=16, metadata={"help": "evaluation batch size"})
    max_new_tokens: int = field(
        default=32, metadata={"help": "generation cap (also capped by the longest target + 2)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of masks, finetune order and init of the finetune"})
    device: str = field(default="cpu", metadata={"help": "torch device"})

    @classmethod
    def quick(cls) -> EvalConfig:
        """The default: what the coordinator runs after each merge (seconds for tiny on CPU)."""
        return cls()

    @classmethod
    def standard(cls) -> EvalConfig:
        """48 distinct test questions per seen and per held-out task (quick's 12 move a task's exact match
        by 0.08 an answer; here 0.02; the lexicon tasks have fewer: past_tense 5, plural 19, antonym 20,
        spell_number 33), for gating and reporting on targets near a threshold."""
        return cls(seen_examples_per_task=48, heldout_examples_per_task=48)

    @classmethod
    def full(cls) -> EvalConfig:
        """Bigger samples for reported numbers (minutes for tiny on CPU)."""
        return cls(
            mod_inputs_length=512,
            mod_examples_per_denoiser=64,
            seen_examples_per_task=100,
            heldout_finetune_steps=200,
            heldout_examples_per_task=100,
        )


def _batches(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def question_of(record: dict) -> str:
    """The question a record asks: its input without the few-shot exemplars before it (they are joined
    to it by blank lines, which no template contains)."""
    return record["inputs"].rsplit("\n\n", 1)[-1]


def distinct_questions(records: list[dict], n: int) -> list[dict]:
    """The first ``n`` records that ask distinct questions. A test split of a task with a small instance
    space (the lexicon tasks) repeats its questions, zero-shot or after other exemplars; scoring a
    repeat again weights that one answer twice, so a score over repeats measures luck on a few
    questions, not the task. Fewer than ``n`` when the split has fewer distinct questions."""
    seen, out = set(), []
    if n <= 0:
        return out
    for r in records:
        question = question_of(r)
        if question not in seen:
            seen.add(question)
            out.append(r)
            if len(out) == n:
                break
    return out


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _summed_token_loss(logits, labels) -> tuple[float, int]:
    """Cross-entropy summed over the labelled tokens, and their count (padding is -100)."""
    import torch

    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return float(loss), int((labels != -100).sum())


def mod_losses(model, tokenizer, config: EvalConfig) -> dict:
    """Held-out MoD loss per denoiser and per mode (token-weighted mean over the mode's denoisers)."""
    import torch

    collator = MoDCollator(
        special_ids(tokenizer), MoDConfig(inputs_length=config.mod_inputs_length, seed=config.seed)
    )
    # Every denoiser sees the same documents (from their start), so modes compare on equal text.
    need = config.mod_examples_per_denoiser * collator.max_chunk_length
    docs, total = [], 0
    for ids in tokenize_documents(iter_documents(CorpusConfig(), split="heldout"), tokenizer):
        docs.append(ids)
        total += len(ids) + 1
        if total >= need:
            break
    by_denoiser, mode_sums = {}, {}
    model.eval()
    for d in collator.denoisers:
        pairs = []
        for pair in collator.iter_examples(iter(docs), d.name):
            pairs.append(pair)
            if len(pairs) == config.mod_examples_per_denoiser:
                break
        loss_sum, count = 0.0, 0
        for chunk in _batches(pairs, config.batch_size):
            batch = _to(collator.collate_examples(chunk), config.device)
            with torch.no_grad():
                batch_loss, batch_count = _summed_token_loss(model(**batch).logits, batch["labels"])
            loss_sum += batch_loss
            count += batch_count
        by_denoiser[d.name] = loss_sum / count if count else math.nan
        s = mode_sums.setdefault(d.mode, [0.0, 0])
        s[0] += loss_sum
        s[1] += count
    return {
        "by_denoiser": by_denoiser,
        "by_mode": {m: s / c if c else math.nan for m, (s, c) in mode_sums.items()},
    }


def score_records(model, tokenizer, records: list[dict], config: EvalConfig) -> dict:
    """Exact match (greedy) and token loss of a model on instruction records."""
    import torch

    s2s = Seq2SeqConfig()
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for chunk in _batches(records, config.batch_size):
        pairs = [tokenize_record(r, tokenizer, s2s) for r in chunk]
        batch = _to(collate_seq2seq(pairs, tokenizer.pad_token_id), config.device)
        with torch.no_grad():
            batch_loss, batch_count = _summed_token_loss(model(**batch).logits, batch["labels"])
            loss_sum += batch_loss
            count += batch_count
            max_new = min(config.max_new_tokens, max(len(p[1]) for p in pairs) + 2)
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=1,
                decoder_start_token_id=model.config.decoder_start_token_id,
            )
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        correct += sum(t.strip() == r["targets"].strip() for t, r in zip(texts, chunk, strict=True))
    return {"exact_match": correct / max(len(records), 1), "token_loss": loss_sum / max(count, 1)}


def finetune(model, tokenizer, records: list[dict], config: EvalConfig):
    """A fixed, seeded full finetune of a copy of ``model`` (AdamW, constant LR); returns the copy."""
    import torch

    tuned = copy.deepcopy(model)
    tuned.train()
    opt = torch.optim.AdamW(tuned.parameters(), lr=config.heldout_learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(config.seed)
    s2s = Seq2SeqConfig()
    torch.manual_seed(config.seed)
    for _ in range(config.heldout_finetune_steps):
        idx = rng.choice(
            len(records), size=config.heldout_batch_size, replace=len(records) < config.heldout_batch_size
        )
        pairs = [tokenize_record(records[i], tokenizer, s2s) for i in idx]
        batch = _to(collate_seq2seq(pairs, tokenizer.pad_token_id), config.device)
        loss = tuned(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
        opt.step()
    tuned.eval()
    return tuned


def evaluate_model(model, tokenizer, config: EvalConfig | None = None, cache_dir=None) -> dict:
    """All three measures for an in-memory model (see the module docstring)."""
    config = config or EvalConfig()
    t0 = time.monotonic()
    model.to(config.device)
    mod = mod_losses(model, tokenizer, config)
    seen = {}
    for task in config.seen_tasks or SEEN_TASKS:
        recs = distinct_questions(
            load_task_split(task, "test", cache_dir=cache_dir), config.seen_examples_per_task
        )
        seen[task] = {**score_records(model, tokenizer, recs, config), "questions": len(recs)}
    heldout, before = {}, {}
    if config.heldout_tasks:
        tests = {
            t: distinct_questions(
                load_task_split(t, "test", cache_dir=cache_dir), config.heldout_examples_per_task
            )
            for t in config.heldout_tasks
        }
        train = [r for t in config.heldout_tasks for r in load_task_split(t, "train", cache_dir=cache_dir)]
        for t, recs in tests.items():
            before[t] = score_records(model, tokenizer, recs, config)["exact_match"]
        tuned = finetune(model, tokenizer, train, config) if config.heldout_finetune_steps > 0 else model
        for t, recs in tests.items():
            heldout[t] = {**score_records(tuned, tokenizer, recs, config), "questions": len(recs)}
        del tuned
    mean = lambda xs: float(np.mean(xs)) if xs else math.nan  # noqa: E731
    return {
        "mod_loss": mod["by_mode"],
        "mod_loss_by_denoiser": mod["by_denoiser"],
        "seen": seen,
        "seen_exact_match": mean([v["exact_match"] for v in seen.values()]),
        "seen_token_loss": mean([v["token_loss"] for v in seen.values()]),
        "heldout": heldout,
        "heldout_exact_match": mean([v["exact_match"] for v in heldout.values()]),
        "heldout_exact_match_before": mean(list(before.values())),
        "eval_config": asdict(config),
        EVALUATION_PROTOCOL_KEY: protocol(config),
        "eval_seconds": round(time.monotonic() - t0, 2),
    }


def protocol(config: EvalConfig) -> str:
    """A fingerprint of what :func:`evaluate_model` measures under ``config``: this module, the task
    files and the corpus it scores on. Two versions' scores compare only under one protocol."""
    here = Path(__file__).parent
    return content_hash(
        Path(__file__),
        here / "batching.py",  # truncation and padding: the token loss
        here / "mod.py",  # the masks: the MoD loss
        tasks_key(TaskConfig()),
        corpus_key(CorpusConfig()),
        asdict(config),  # all of it, device included: a GPU's numerics differ in the last digits
    )


def evaluate_version(
    version_dir: str | os.PathLike, config: EvalConfig | None = None, cache_dir=None
) -> dict:
    """Evaluate a version directory (or any local HF T5 dir); returns a JSON-able dict for the manifest."""
    from .model import load_model
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(version_dir)
    model = load_model(version_dir)
    return evaluate_model(model, tokenizer, config, cache_dir)


def evaluate_standard(version_dir: str | os.PathLike, cache_dir=None) -> dict:
    """:func:`evaluate_version` with :meth:`EvalConfig.standard` (``--evaluator
    coldswarm.lm.evaluate:evaluate_standard``)."""
    return evaluate_version(version_dir, EvalConfig.standard(), cache_dir)


def evaluate_smoke(version_dir: str | os.PathLike, cache_dir=None) -> dict:
    """The same three measures on a handful of examples: for end-to-end tests, not for comparing versions."""
    config = EvalConfig(
        mod_examples_per_denoiser=1,
        seen_examples_per_task=2,
        heldout_finetune_steps=2,
        heldout_batch_size=4,
        heldout_examples_per_task=2,
    )
    return evaluate_version(version_dir, config, cache_dir)


def format_table(metrics: dict) -> str:
    """The metrics as a plain-text table."""
    lines = ["MoD loss (held-out text)"]
    for k, v in metrics["mod_loss"].items():
        lines.append(f"  {k:<28} {v:8.4f}")
    for k, v in metrics["mod_loss_by_denoiser"].items():
        lines.append(f"    {k:<26} {v:8.4f}")
    lines.append(f"{'seen task':<30} {'exact':>8} {'tok loss':>9}")
    for k, v in metrics["seen"].items():
        lines.append(f"  {k:<28} {v['exact_match']:8.3f} {v['token_loss']:9.4f}")
    lines.append(f"  {'mean':<28} {metrics['seen_exact_match']:8.3f} {metrics['seen_token_loss']:9.4f}")
    lines.append(f"{'held-out task (finetuned)':<30} {'exact':>8} {'tok loss':>9}")
    for k, v in metrics["heldout"].items():
        lines.append(f"  {k:<28} {v['exact_match']:8.3f} {v['token_loss']:9.4f}")
    lines.append(f"  {'mean':<28} {metrics['heldout_exact_match']:8.3f}")
    lines.append(
        f"(before finetune: {metrics['heldout_exact_match_before']:.3f}; {metrics['eval_seconds']}s)"
    )
    return "\n".join(lines)
