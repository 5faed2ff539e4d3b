"""MoD collator throughput against a tiny training step, measured in the same run.

    python benchmarks/mod.py [--batch-size 32] [--inputs-length 512] [--steps 3] [--batches 50]

Prints collator examples/s, the training step time of the `tiny` model (forward, backward
and AdamW) on batches of the same shape, and the ratio collator time / step time, which
should stay below 10%. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from coldswarm.lm.batching import tokenize_documents
from coldswarm.lm.corpus import CorpusConfig, iter_documents
from coldswarm.lm.mod import MoDCollator, MoDConfig
from coldswarm.lm.model import build_model
from coldswarm.lm.tokenizer import build_default_tokenizer, load_tokenizer, padded_vocab_size, special_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--inputs-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--batches", type=int, default=50, help="timed collator batches")
    p.add_argument("--size", default="tiny")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()

    tok = load_tokenizer(build_default_tokenizer(args.cache_dir))
    collator = MoDCollator(special_ids(tok), MoDConfig(inputs_length=args.inputs_length))
    need = 20 * args.batch_size * collator.max_chunk_length  # then cycled
    docs, total = [], 0
    for ids in tokenize_documents(iter_documents(CorpusConfig()), tok):
        docs.append(np.asarray(ids, dtype=np.int64))
        total += len(ids) + 1
        if total >= need:
            break

    # Collator alone: packing + masking + padding + conversion to torch tensors (tokenization excluded:
    # it happens once per document, before the collator, and is cached by any real pipeline).
    batches = collator.iter_batches(itertools.cycle(docs), args.batch_size, drop_last=True)
    next(batches)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    collate_s = (time.perf_counter() - t0) / args.batches

    model = build_model(args.size, vocab_size=padded_vocab_size(tok))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(next(batches))  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(next(batches))
    step_s = (time.perf_counter() - t0) / args.steps

    print(f"torch threads            {torch.get_num_threads()}")
    print(
        f"batch                    {args.batch_size} x {args.inputs_length} inputs, 7 UL2 denoisers, uniform mix"
    )
    print(
        f"collator                 {collate_s * 1e3:8.2f} ms/batch  {args.batch_size / collate_s:10.0f} examples/s"
    )
    print(
        f"{args.size} training step      {step_s * 1e3:8.0f} ms/batch  {args.batch_size / step_s:10.1f} examples/s"
    )
    print(f"collator / step          {collate_s / step_s:8.2%}  (target < 10%)")


if __name__ == "__main__":
    main()
