"""Tiny models and batches for fusion tests, built from configs (never downloaded)."""

from __future__ import annotations

import torch


def tiny_t5_config(**kw):
    from transformers import T5Config

    args = dict(vocab_size=48, d_model=16, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=2, d_kv=8,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    args.update(kw)
    return T5Config(**args)


def tiny_t5(seed: int = 0, **kw):
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_t5_config(**kw)).eval()


def seq2seq_batches(n_batches: int = 2, batch: int = 3, seed: int = 0, vocab: int = 48):
    """Batches like a worker's: input_ids + attention_mask (with padding), labels with -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(2, vocab, (batch, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0  # the first row is padded
        ids = ids * mask
        labels = torch.randint(2, vocab, (batch, 4), generator=g)
        labels[1, 3:] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
