"""Benchmark: what training together over hivemind costs a peer. Prints ratios; asserts nothing.

    python benchmarks/swarm.py [--seconds-per-epoch-target ...] [--batch-size 16] [--target-batch-size 2048]
    python benchmarks/swarm.py --security [--repeats 2] ...   # admission + robust aggregation on vs off

Two figures, each against a baseline measured in the same run:

1. **Throughput** — samples/s per peer for 2 peers training a tiny T5 together (``SwarmTrainer``: 8-bit
   gradient all-reduce every ``target_batch_size`` samples, fp16 state averaging) vs the same peers training
   alone with a plain torch loop, same per-peer batch. The solo baseline also runs *two processes at
   once*, so both sides see the same CPU contention (on a small machine two peers share the cores; that is not
   a cost of averaging). Target: >= 0.8.
2. **Bytes per averaging round** — what one peer encodes and sends in one gradient all-reduce with the 8-bit
   codec vs fp32 (hivemind's ``NoCompression``). Method: the peer's gradient codec is wrapped in
   ``ByteCountingCompression`` (shared-memory counters, so the averager's forked process counts too), and
   hivemind's codec registry, through which a reducer encodes the averaged deltas it sends back, is wrapped as
   well; state averaging is switched off in these runs so only gradient rounds are counted. The counts are
   tensor payload bytes (protobuf/libp2p framing excluded, a few dozen bytes per part). Target: <= 0.3.

The model is a T5 built from a config in this file (``--d-model`` etc., ~180K parameters by default),
``--lm-size tiny`` (the embedded default's ~10M-parameter model) or ``--model-dir`` (any HF seq2seq
directory), trained on random-token batches either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def build_model(args):
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if args.model_dir:
        return AutoModelForSeq2SeqLM.from_pretrained(args.model_dir)
    if args.lm_size:
        from coldswarm.lm.model import build_model as build_lm_model  # the embedded default's sizes

        return build_lm_model(args.lm_size, seed=0)
    config = T5Config(
        vocab_size=args.vocab,
        d_model=args.d_model,
        d_kv=args.d_model // 4,
        d_ff=args.d_model * 2,
        num_layers=args.layers,
        num_decoder_layers=args.layers,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config)


def batches(seed: int, batch_size: int, vocab: int, src_len: int = 32, tgt_len: int = 16):
    generator = torch.Generator().manual_seed(seed)
    while True:
        input_ids = torch.randint(2, vocab, (batch_size, src_len), generator=generator)
        labels = torch.randint(2, vocab, (batch_size, tgt_len), generator=generator)
        yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def wait_for_file(path: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while path and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- one peer (a subprocess) --------------------------------------------------------------------------------


def run_solo(args, ready: Path) -> dict:
    model = build_model(args)
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(args.seed, args.batch_size, vocab)
    model.train()
    for _ in range(3):  # warm-up, like the swarm peers' first steps
        model(**next(data)).loss.backward()
        opt.zero_grad()
    ready.touch()
    wait_for_file(args.go)
    samples, began = 0, time.perf_counter()
    while time.perf_counter() - began < args.solo_seconds:
        loss = model(**next(data)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        samples += args.batch_size
    seconds = time.perf_counter() - began
    return dict(samples=samples, seconds=seconds, samples_per_s=samples / seconds)


def run_peer(args, ready: Path) -> dict:
    from coldswarm.swarm.averaging_codecs import (
        ByteCountingCompression,
        count_registry_bytes,
        make_compression,
    )
    from coldswarm.worker.swarm import SwarmConfig, SwarmTrainer

    model = build_model(args)
    vocab = model.config.vocab_size
    counter = ByteCountingCompression(make_compression(args.codec, args.size_threshold))
    count_registry_bytes(counter)  # the reducer's averaged deltas go out through hivemind's registry
    config = SwarmConfig(
        run_id=args.run_id,
        initial_peers=args.initial_peers.split(","),
        target_batch_size=args.target_batch_size,
        lr=1e-3,
        max_epochs=args.epochs,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=60.0,
        request_timeout=min(3.0, args.matchmaking_time / 2),
        average_state_every=args.average_state_every,
        grad_compression=args.codec,
        size_threshold=args.size_threshold,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    )
    data = batches(args.seed, args.batch_size, vocab)
    with SwarmTrainer(model, config, grad_compression=counter) as trainer:
        for _ in range(3):  # same warm-up as solo (forward/backward only, nothing reported)
            model(**next(data)).loss.backward()
            model.zero_grad()
        ready.touch()  # built and joined
        wait_for_file(args.go)
        result = trainer.train(data)
        out = dict(
            samples=result.samples,
            seconds=result.seconds,
            samples_per_s=result.samples_per_s,
            epochs=result.epoch,
            local_fallbacks=result.local_fallbacks,
            bytes_sent=counter.bytes_sent,
            values_sent=counter.values_sent,
            params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        )
        time.sleep(2.0)  # let the other peer finish its last round before we leave
    return out


# -- orchestration ------------------------------------------------------------------------------------------


def spawn(args, mode: str, out: Path, extra: list[str]) -> subprocess.Popen:
    argv = [sys.executable, str(HERE), "--role", mode, "--out", str(out)]
    for key in ("batch_size", "target_batch_size", "epochs", "matchmaking_time", "size_threshold", "vocab"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    argv += [
        "--d-model",
        str(args.d_model),
        "--layers",
        str(args.layers),
        "--solo-seconds",
        str(args.solo_seconds),
    ]
    if args.model_dir:
        argv += ["--model-dir", args.model_dir]
    if args.lm_size:
        argv += ["--lm-size", args.lm_size]
    argv += extra  # last: overrides the shared settings
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_pair(
    args, workdir: Path, name: str, mode: str, extra: list[str], initial_peers: str = ""
) -> list[dict]:
    go = workdir / f"{name}.go"
    procs, outs = [], []
    for i in range(2):
        out = workdir / f"{name}{i}.json"
        more = ["--seed", str(100 + i), "--go", str(go), *extra]
        if initial_peers:
            more += ["--initial-peers", initial_peers, "--run-id", name]
        procs.append(spawn(args, mode, out, more))
        outs.append(out)
    try:
        # Start together: each writes <out>.ready once built (and joined) and waits for `go`.
        deadline = time.monotonic() + 300
        while not all(o.with_suffix(".ready").exists() for o in outs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: a peer did not start; see {workdir}/{name}*.log")
            time.sleep(0.2)
        go.touch()
        for proc in procs:
            proc.wait(timeout=1200)
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{name}: a peer failed; see {workdir}/{name}*.log")
        return [json.loads(o.read_text()) for o in outs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", default="main", choices=["main", "solo", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--go", default="", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--initial-peers", default="", help=argparse.SUPPRESS)
    ap.add_argument("--codec", default="uniform8bit", help=argparse.SUPPRESS)
    ap.add_argument("--average-state-every", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=16, help="samples per local step (both sides)")
    ap.add_argument(
        "--target-batch-size",
        type=int,
        default=12288,
        help="swarm samples per averaging round in the throughput run (~20 s of compute per round here)",
    )
    ap.add_argument("--bytes-target-batch-size", type=int, default=1024, help="same, in the bytes runs")
    ap.add_argument("--epochs", type=int, default=3, help="averaging rounds in the throughput run")
    ap.add_argument("--bytes-epochs", type=int, default=3, help="averaging rounds in each bytes run")
    ap.add_argument("--matchmaking-time", type=float, default=3.0)
    ap.add_argument("--size-threshold", type=int, default=2**12, help="smaller tensors go fp16")
    ap.add_argument("--solo-seconds", type=float, default=30.0, help="how long the solo baseline trains")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--model-dir", default="", help="HF model dir to train instead of the built-in tiny T5")
    ap.add_argument(
        "--lm-size", default="", help="train coldswarm.lm's model of this size (tiny: ~10M params)"
    )
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--security",
        action="store_true",
        help="instead: admission and robust aggregation on vs off (benchmarks/swarm_security.py; its flags)",
    )
    known, _rest = ap.parse_known_args(argv)
    if known.security:  # a separate benchmark with its own flags
        sys.path.insert(0, str(HERE.parent))
        from swarm_security import main as security_main

        return security_main(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.role in ("solo", "peer"):
        out = Path(args.out)
        result = (run_solo if args.role == "solo" else run_peer)(args, out.with_suffix(".ready"))
        out.write_text(json.dumps(result))
        return 0

    from coldswarm.swarm.dht import start_dht

    workdir = Path(tempfile.mkdtemp(prefix="coldswarm-bench-"))
    dht = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = ",".join(str(a) for a in dht.get_visible_maddrs())
    try:
        print(
            f"# coldswarm swarm benchmark (logs in {workdir}); {os.cpu_count()} CPUs, torch threads/process={args.threads}"
        )
        solo = run_pair(args, workdir, "solo", "solo", [])
        bytes_settings = ["--average-state-every", "0", "--epochs", str(args.bytes_epochs)]
        bytes_settings += ["--target-batch-size", str(args.bytes_target_batch_size)]
        swarm = run_pair(args, workdir, "swarm", "peer", [], peers)
        b8 = run_pair(
            args,
            workdir,
            "bytes8",
            "peer",
            ["--codec", "uniform8bit", *bytes_settings],
            peers,
        )
        b32 = run_pair(
            args,
            workdir,
            "bytes32",
            "peer",
            ["--codec", "none", *bytes_settings],
            peers,
        )
    finally:
        dht.shutdown()

    solo_rate = sum(r["samples_per_s"] for r in solo) / 2
    swarm_rate = sum(r["samples_per_s"] for r in swarm) / 2
    params = swarm[0]["params"]
    print(
        f"model: T5, {params} trained parameters; per-peer batch {args.batch_size}; "
        f"target_batch_size {args.target_batch_size}; matchmaking_time {args.matchmaking_time}s"
    )
    print(f"solo  (2 processes, plain torch):   {solo_rate:8.1f} samples/s per process")
    print(
        f"swarm (2 peers, 8-bit grads, fp16 state): {swarm_rate:8.1f} samples/s per peer over "
        f"{swarm[0]['epochs']} rounds, local fallbacks {[r['local_fallbacks'] for r in swarm]}"
    )
    print(f"throughput ratio swarm/solo: {swarm_rate / solo_rate:.3f}   (target >= 0.8)")

    def per_round(runs):
        # Per peer and per round that actually averaged (a round a peer took alone sends nothing).
        rounds = [max(r["epochs"] - r["local_fallbacks"], 1) for r in runs]
        sent = sum(r["bytes_sent"] / n for r, n in zip(runs, rounds, strict=True)) / len(runs)
        values = sum(r["values_sent"] / n for r, n in zip(runs, rounds, strict=True)) / len(runs)
        return sent, sent / max(values, 1)

    # Rounds a peer took alone (the tracker had not seen the other yet) send nothing and are not counted as
    # fallbacks, so the robust figure is bytes per averaged value; one 2-peer round moves `params` values
    # per peer (its share of the other's parts, plus the deltas of the part it reduced).
    (_, per_value8), (_, per_value32) = per_round(b8), per_round(b32)
    bytes8, bytes32 = per_value8 * params, per_value32 * params
    print(
        f"bytes sent per peer per gradient round: 8-bit {bytes8:,.0f} ({per_value8:.3f} B/value)   "
        f"fp32 {bytes32:,.0f} ({per_value32:.3f} B/value)"
    )
    print(f"bytes ratio 8-bit/fp32: {bytes8 / max(bytes32, 1):.3f}   (target <= 0.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
