"""Benchmark: compression ratio and speed of coldswarm.fusion's codecs on a *trained* checkpoint,
optionally beside a peer library on the same bytes in the same run.

    python benchmarks/codecs.py                    # trains a 5.6M-parameter T5 for 200 steps (a few minutes on CPU)
    python benchmarks/codecs.py --peer zipnn       # also ZipNN (pip install zipnn==0.5.4), interleaved
    python benchmarks/codecs.py --steps 50         # a quicker, less trained check

Random tensors are the wrong test data (random mantissas do not compress, and neither do
random exponents drawn from a fresh init's distribution in quite the same way as a trained
model's), so the script first trains a small T5 on a synthetic structured seq2seq task (reverse
a sequence of "words" drawn from a Zipfian vocabulary), then measures on

* the trained weights in fp32 and in bf16 (what a version directory holds),
* the task vector ``trained - init`` as a contribution (``delta/...`` tensors), fp32 and bf16,

for ``zstd`` (baseline: plain zstd over the same safetensors bytes), ``bytegroup`` (lossless, the
default for contributions) and, for the deltas, ``int8_blockwise`` (lossy; its relative error is
printed). Each codec encodes and decodes every payload ``--repeats`` times, the codecs taking turns
(interleaved, so load changes hit all of them alike), on one thread; the tables print medians of
wall-clock time and of process CPU time (the CPU column is the steadier one on a shared machine).
ratio = original / encoded size; MB/s are of original bytes; "max |diff|" is the largest absolute
difference between decoded and original tensor values (0 for a lossless codec).

``--peer zipnn`` runs ZipNN (https://github.com/zipnn/zipnn) on the same bytes: ``ZipNN(input_format=
"byte", bytearray_dtype=<payload dtype>, threads=1)``, the way its README compresses a safetensors
file. ZipNN's ``compress`` rewrites the buffer it is given (a ``bytes`` object too), so it is handed a
fresh ``bytearray`` copy each time, made outside the timing. Without ZipNN installed the script says so
and measures coldswarm's codecs alone.

Targets (printed, never asserted): bytegroup's ratio >= ZipNN's on all four payloads (>= zstd's
without the peer), and bytegroup decoding >= 1000 MB/s on one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

DECODE_TARGET_MBS = 1000.0


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


class Subject:
    """One thing to measure: encode/decode callables and whether its output must be bit-exact."""

    def __init__(self, name: str, encode, decode, lossless: bool, fresh_input: bool = False):
        self.name, self.encode, self.decode, self.lossless = name, encode, decode, lossless
        self.fresh_input = fresh_input  # hand encode a private bytearray copy (it writes to its input)


def coldswarm_subject(codec: str) -> Subject:
    from coldswarm.fusion.codecs import CODECS

    c = CODECS[codec]
    return Subject(codec, c.encode, c.decode, c.lossless)


def zipnn_subject(dtype: str) -> Subject | None:
    try:
        from zipnn import ZipNN
    except ImportError:
        return None
    z = ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1)
    return Subject("zipnn", z.compress, z.decompress, True, fresh_input=True)  # decompress: a bytearray


def max_abs_diff(original: bytes, decoded: bytes) -> float:
    from safetensors.torch import load

    a, b = load(original), load(bytes(decoded))
    worst = 0.0
    for name, x in a.items():
        if x.numel():
            worst = max(worst, float((x.double() - b[name].double()).abs().max()))
    return worst


def measure(data: bytes, subjects: list[Subject], repeats: int) -> dict[str, dict]:
    """Interleaved: every repeat runs every subject once, in turn. Medians of wall and CPU time."""
    times = {s.name: {"enc": [], "dec": [], "enc_cpu": [], "dec_cpu": []} for s in subjects}
    encoded: dict[str, bytes] = {}
    decoded: dict[str, bytes] = {}
    for _ in range(repeats):
        for s in subjects:
            src = bytearray(data) if s.fresh_input else data
            w0, c0 = time.perf_counter(), time.process_time()
            enc = s.encode(src)
            w1, c1 = time.perf_counter(), time.process_time()
            dec = s.decode(enc)
            w2, c2 = time.perf_counter(), time.process_time()
            t = times[s.name]
            (
                t["enc"].append(w1 - w0),
                t["dec"].append(w2 - w1),
                t["enc_cpu"].append(c1 - c0),
                t["dec_cpu"].append(c2 - c1),
            )
            encoded[s.name], decoded[s.name] = bytes(enc), dec
    mb = len(data) / 1e6
    out = {}
    for s in subjects:
        t = {k: statistics.median(v) for k, v in times[s.name].items()}
        row = {"ratio": len(data) / len(encoded[s.name]), "exact": bytes(decoded[s.name]) == data,
               "max_abs": max_abs_diff(data, decoded[s.name]), "lossless": s.lossless}  # fmt: skip
        row.update({k + "_mbs": mb / max(v, 1e-9) for k, v in t.items()})
        if not s.lossless:
            from coldswarm.fusion.codecs import measure_error

            row["rel_rms"] = max(e["rel_rms"] for e in measure_error(data, bytes(decoded[s.name])).values())
        if s.lossless and not row["exact"]:
            raise SystemExit(f"{s.name}: the round trip is not bit-exact")
        out[s.name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for training (0: default)")
    ap.add_argument(
        "--repeats", type=int, default=7, help="interleaved runs per codec and payload (default 7)"
    )
    ap.add_argument("--peer", choices=["zipnn"], action="append", default=[],
                    help="also measure this library on the same bytes, where it is installed")  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import save

    t0 = time.perf_counter()
    init, trained, first, last = train(args.steps)
    n = sum(v.numel() for v in trained.values())
    print(f"trained a {n / 1e6:.1f}M-parameter T5 for {args.steps} steps in {time.perf_counter() - t0:.0f}s "
          f"(loss {first:.2f} -> {last:.2f})\n")  # fmt: skip
    torch.set_num_threads(1)  # the codecs run on one thread; so does everything measured below

    payloads = {
        "weights bf16": save({k: v.to(torch.bfloat16).contiguous() for k, v in trained.items()}),
        "delta bf16": save(
            {f"delta/{k}": (trained[k] - init[k]).to(torch.bfloat16).contiguous() for k in trained}
        ),
        "weights fp32": save({k: v.contiguous() for k, v in trained.items()}),
        "delta fp32": save({f"delta/{k}": (trained[k] - init[k]).contiguous() for k in trained}),
    }
    peer_missing = []
    results: dict[str, dict[str, dict]] = {}
    for name, data in payloads.items():
        subjects = [coldswarm_subject("zstd"), coldswarm_subject("bytegroup")]
        if name.startswith("delta"):
            subjects.append(coldswarm_subject("int8_blockwise"))
        if "zipnn" in args.peer:
            peer = zipnn_subject("bfloat16" if "bf16" in name else "float32")
            if peer is None:
                peer_missing = ["zipnn"]
            else:
                subjects.append(peer)
        results[name] = measure(data, subjects, args.repeats)

    print(f"{'payload':>12} {'MB':>5} {'codec':>15} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9} "
          f"{'enc CPU':>8} {'dec CPU':>8} {'max |diff|':>10}  note")  # fmt: skip
    for name, rows in results.items():
        for codec, r in rows.items():
            print(f"{name:>12} {len(payloads[name]) / 1e6:5.1f} {codec:>15} {r['ratio']:6.3f} {r['enc_mbs']:9.0f} "
                  f"{r['dec_mbs']:9.0f} {r['enc_cpu_mbs']:8.0f} {r['dec_cpu_mbs']:8.0f} {r['max_abs']:10.3g}  "
                  + ("bit-exact" if r["exact"] else f"max rel. RMS error {r.get('rel_rms', float('nan')):.4f}"))  # fmt: skip
    print("(MB/s: medians of wall-clock and of process CPU time; max |diff|: decoded vs original values)\n")

    if peer_missing:
        print("peer zipnn: SKIPPED -- zipnn is not installed here (pip install zipnn==0.5.4 to compare)\n")
    for name, rows in results.items():
        bg = rows["bytegroup"]
        base, label = (rows["zipnn"], "ZipNN") if "zipnn" in rows else (rows["zstd"], "zstd")
        verdict = "met" if bg["ratio"] >= base["ratio"] else "MISSED"
        print(f"target: bytegroup ratio >= {label}'s on {name}: {bg['ratio']:.4f} vs {base['ratio']:.4f} "
              f"({bg['ratio'] / base['ratio']:.4f}x, {verdict})")  # fmt: skip
    for name, rows in results.items():
        bg = rows["bytegroup"]
        verdict = "met" if min(bg["dec_mbs"], bg["dec_cpu_mbs"]) >= DECODE_TARGET_MBS else (
            "met on CPU time" if bg["dec_cpu_mbs"] >= DECODE_TARGET_MBS else "MISSED")  # fmt: skip
        peer = ""
        if "zipnn" in rows:
            z = rows["zipnn"]
            peer = (f"; vs ZipNN: decode {bg['dec_mbs'] / z['dec_mbs']:.2f}x wall, {bg['dec_cpu_mbs'] / z['dec_cpu_mbs']:.2f}x CPU, "
                    f"encode {bg['enc_mbs'] / z['enc_mbs']:.2f}x wall, {bg['enc_cpu_mbs'] / z['enc_cpu_mbs']:.2f}x CPU")  # fmt: skip
        print(f"target: bytegroup decode >= {DECODE_TARGET_MBS:.0f} MB/s on {name}: {bg['dec_mbs']:.0f} wall, "
              f"{bg['dec_cpu_mbs']:.0f} CPU ({verdict}){peer}")  # fmt: skip
    load1, load5, _ = os.getloadavg()
    print(f"(load average {load1:.1f} / {load5:.1f} on {os.cpu_count()} CPUs; zstd level 3, one thread; "
          f"{args.repeats} interleaved runs)")  # fmt: skip


if __name__ == "__main__":
    main()
