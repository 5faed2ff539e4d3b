"""The fusion tests' tiny model (support's tiny T5, two encoder layers, in eval mode) and batches."""

from __future__ import annotations

import support
import torch

#: what the fusion tests' model changes from support.TINY_T5 (their statistics and goldens depend on it)
FUSION_T5 = dict(vocab_size=48, num_layers=2)


def tiny_t5(seed: int = 0, **kw):
    return support.tiny_t5(seed, **{**FUSION_T5, **kw}).eval()


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
