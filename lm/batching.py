"""Turning data into model batches: what a worker's training loop calls.

Instruction finetuning (records from :func:`coldswarm.lm.data.resolve_shard`)::

    tok = load_tokenizer(version_dir)
    for batch in instruction_batches(shard, tok, batch_size=16, seed=step_seed):
        loss = model(**batch).loss        # input_ids, attention_mask, labels (-100 padded)

MoD pretraining over a corpus shard::

    for batch in mod_batches(resolve_shard("corpus:0-of-4"), tok, batch_size=32):
        loss = model(**batch).loss
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .mod import LABEL_PAD, MoDCollator, MoDConfig, pad_batch
from .tokenizer import special_ids


@dataclass
class Seq2SeqConfig:
    """Lengths for instruction batches."""

    max_input_length: int = field(
        default=512,
        metadata={"help": "input tokens incl. EOS; longer inputs keep their *end* (the question)"},
    )
    max_target_length: int = field(default=128, metadata={"help": "target tokens incl. EOS; longer are cut"})
    pad_to_multiple_of: int = field(default=8, metadata={"help": "round padded lengths up to this"})


def tokenize_record(
    record: dict, tokenizer, config: Seq2SeqConfig = Seq2SeqConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, label_ids)`` of one ``{"inputs","targets"}`` record, each ending with EOS."""
    eos = tokenizer.eos_token_id
    inp = tokenizer(record["inputs"], add_special_tokens=False).input_ids
    tgt = tokenizer(record["targets"], add_special_tokens=False).input_ids
    # Few-shot prompts put the question last: keep the end of an over-long input.
    inp = inp[-(config.max_input_length - 1) :] if len(inp) >= config.max_input_length else inp
    tgt = tgt[: config.max_target_length - 1]
    return np.array(inp + [eos], dtype=np.int64), np.array(tgt + [eos], dtype=np.int64)


def collate_seq2seq(pairs, pad_id: int = 0, multiple: int = 8, return_tensors: str = "pt") -> dict:
    """Pad ``(input_ids, label_ids)`` pairs: inputs with ``pad_id``, labels with -100."""
    input_ids = pad_batch([p[0] for p in pairs], pad_id, multiple)
    labels = pad_batch([p[1] for p in pairs], LABEL_PAD, multiple)
    batch = {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad_id).astype(np.int64),
        "labels": labels,
    }
    if return_tensors == "pt":
        import torch

        batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    return batch


class Seq2SeqCollator:
    """``DataLoader(records, collate_fn=Seq2SeqCollator(tok))``: records -> padded batch."""

    def __init__(self, tokenizer, config: Seq2SeqConfig = Seq2SeqConfig()):
        self.tokenizer, self.config = tokenizer, config

    def __call__(self, records: list[dict]) -> dict:
        pairs = [tokenize_record(r, self.tokenizer, self.config) for r in records]
        return collate_seq2seq(pairs, self.tokenizer.pad_token_id, self.config.pad_to_multiple_of)


def instruction_batches(
    records: Iterable[dict],
    tokenizer,
    batch_size: int,
    config: Seq2SeqConfig = Seq2SeqConfig(),
    seed: int | None = 0,
    drop_last: bool = False,
    buffer_size: int = 10000,
) -> Iterator[dict]:
    """Batches of tokenized instruction records. ``seed`` shuffles within a streaming buffer of
    ``buffer_size`` records (``None``: keep file order); deterministic for a given seed. A shard's
    ``shuffle_buffer`` says how large a buffer suits it."""
    collate = Seq2SeqCollator(tokenizer, config)
    rng = random.Random(seed)

    def shuffled() -> Iterator[dict]:
        if seed is None:
            yield from records
            return
        buf: list[dict] = []
        for r in records:
            buf.append(r)
            if len(buf) >= buffer_size:
                rng.shuffle(buf)
                yield from buf
                buf = []
        rng.shuffle(buf)
        yield from buf

    batch: list[dict] = []
    for r in shuffled():
        batch.append(r)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and not drop_last:
        yield collate(batch)


def tokenize_documents(texts: Iterable[str], tokenizer, chunk: int = 256) -> Iterator[list[int]]:
    """Token ids of each document (no EOS; packing adds it), tokenized ``chunk`` at a time."""
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) == chunk:
            yield from tokenizer(buf, add_special_tokens=False).input_ids
            buf = []
    if buf:
        yield from tokenizer(buf, add_special_tokens=False).input_ids


def mod_batches(
    texts: Iterable[str],
    tokenizer,
    batch_size: int,
    config: MoDConfig | None = None,
    denoiser: str | None = None,
    drop_last: bool = False,
) -> Iterator[dict]:
    """MoD batches over documents (e.g. a ``corpus:`` shard): packed with EOS, one denoiser per
    example drawn with the config's mixing rates (or ``denoiser`` for all)."""
    collator = MoDCollator(special_ids(tokenizer), config)
    yield from collator.iter_batches(tokenize_documents(texts, tokenizer), batch_size, denoiser, drop_last)
