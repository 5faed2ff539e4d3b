"""Benchmark: compression ratio and speed of coldswarm.fusion's codecs on a *trained* checkpoint.

    python benchmarks/codecs.py              # trains a ~6M-parameter T5 for 200 steps (a few minutes on CPU)
    python benchmarks/codecs.py --steps 50   # a quicker, less trained check

Random tensors are the wrong test data (random mantissas do not compress, and neither do
random exponents drawn from a fresh init's distribution in quite the same way as a trained
model's), so the script first trains a small T5 on a synthetic structured seq2seq task (reverse
a sequence of "words" drawn from a Zipfian vocabulary), then measures on

* the trained weights in fp32 and in bf16 (what a version directory holds),
* the task vector ``trained - init`` as a contribution (``delta/...`` tensors), fp32 and bf16,

for ``zstd`` (baseline: plain zstd over the same safetensors bytes), ``bytegroup`` (lossless, byte
planes) and, for the deltas, ``int8_blockwise`` (lossy; its relative error is printed). It prints
ratio = original / encoded size, encode and decode MB/s (of original bytes), and checks round trips.
Targets (printed, never asserted): bytegroup ratio >= 1.3 on bf16 and >= 1.1 on fp32, above zstd's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def train(steps: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, float]:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    vocab = 512
    cfg = T5Config(vocab_size=vocab, d_model=256, d_ff=1024, num_layers=3, num_decoder_layers=3, num_heads=4,
                   d_kv=64, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    model = T5ForConditionalGeneration(cfg)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, vocab - 1, dtype=torch.float64) ** 1.1  # natural-language-like frequencies

    def batch(n=16, length=24):
        ids = torch.multinomial(zipf.expand(n, -1), length, replacement=True, generator=g) + 2
        return ids, ids.flip(1)  # task: reverse the sequence

    model.train()
    first = last = 0.0
    for step in range(steps):
        x, y = batch()
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = loss.item()
        last = loss.item()
    trained = {k: v.detach().clone() for k, v in model.named_parameters()}
    return init, trained, first, last


def measure(name: str, data: bytes, codec: str, repeats: int = 2) -> dict:
    from coldswarm.fusion.codecs import CODECS, measure_error

    c = CODECS[codec]
    enc_t = dec_t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        enc = c.encode(data)
        t1 = time.perf_counter()
        dec = c.decode(enc)
        t2 = time.perf_counter()
        enc_t, dec_t = min(enc_t, t1 - t0), min(dec_t, t2 - t1)
    mb = len(data) / 1e6
    out = {"payload": name, "codec": codec, "mb": mb, "ratio": len(data) / len(enc), "enc_mbs": mb / enc_t,
           "dec_mbs": mb / dec_t}  # fmt: skip
    if c.lossless:
        assert dec == data, f"{codec} round trip of {name} is not bit-exact"
        out["exact"] = True
    else:
        err = measure_error(data, dec)
        out["rel_rms_max"] = max(e["rel_rms"] for e in err.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import save

    t0 = time.perf_counter()
    init, trained, first, last = train(args.steps)
    n = sum(v.numel() for v in trained.values())
    print(f"trained a {n / 1e6:.1f}M-parameter T5 for {args.steps} steps in {time.perf_counter() - t0:.0f}s "
          f"(loss {first:.2f} -> {last:.2f})\n")  # fmt: skip

    payloads = {
        "weights fp32": save({k: v.contiguous() for k, v in trained.items()}),
        "weights bf16": save({k: v.to(torch.bfloat16).contiguous() for k, v in trained.items()}),
        "delta fp32": save({f"delta/{k}": (trained[k] - init[k]).contiguous() for k in trained}),
        "delta bf16": save(
            {f"delta/{k}": (trained[k] - init[k]).to(torch.bfloat16).contiguous() for k in trained}
        ),
    }
    rows = []
    for name, data in payloads.items():
        for codec in ("zstd", "bytegroup") + (("int8_blockwise",) if name.startswith("delta") else ()):
            rows.append(measure(name, data, codec))
    print(f"{'payload':>13} {'MB':>6} {'codec':>15} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9}  note")
    for r in rows:
        note = "bit-exact" if r.get("exact") else f"max rel. RMS error {r['rel_rms_max']:.4f}"
        print(
            f"{r['payload']:>13} {r['mb']:6.1f} {r['codec']:>15} {r['ratio']:6.3f} {r['enc_mbs']:9.0f} {r['dec_mbs']:9.0f}  {note}"
        )
    print()
    by = {(r["payload"], r["codec"]): r for r in rows}
    for payload, target in (("weights bf16", 1.3), ("weights fp32", 1.1)):
        bg, z = by[(payload, "bytegroup")]["ratio"], by[(payload, "zstd")]["ratio"]
        verdict = "met" if bg >= target and bg > z else "MISSED"
        print(
            f"target: bytegroup on {payload} >= {target} and above zstd: {bg:.3f} vs zstd {z:.3f} ({verdict})"
        )
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; zstd level 3, one thread)")


if __name__ == "__main__":
    main()
