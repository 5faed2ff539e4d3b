"""Benchmark: does DiLoCo learn as much per sample as synchronous training? MoD validation loss at equal samples.

    python benchmarks/diloco_quality.py [--steps 300] [--inner-steps 50] [--target-batch-size 128]

Three ways to spend the same number of training samples on the embedded ``tiny`` model, from the same
version 0, on the UL2 Mixture-of-Denoisers objective over the embedded corpus (loopback, real hivemind
peers in their own processes, as ``join-swarm`` trains):

* **solo**: one process, AdamW, batch ``2 x --batch-size``, on the whole corpus (``corpus:0-of-1``), for
  ``--steps`` steps: plain training on all the samples;
* **sync**: two peers (``algorithm="sync"``), batch ``--batch-size`` each on their own half of the corpus
  (``corpus:i-of-2``), 8-bit gradients averaged every ``--target-batch-size`` samples, fp16 state averaging,
  until each has taken about ``--steps`` steps;
* **diloco**: two peers (``algorithm="diloco"``), same batches and shards, ``--inner-steps`` AdamW steps per
  peer, then an 8-bit pseudo-gradient all-reduce and an outer Nesterov step (lr 0.7, momentum 0.9), the
  sync overlapped with the next inner steps, ``--steps`` steps each.

Every mode uses the same inner learning rate. The figure is the held-out MoD loss (``coldswarm.lm.evaluate.
mod_losses``: R, X and S denoisers, token-weighted within a mode) of what each mode publishes: solo's model,
a sync peer's model, DiLoCo's outer parameters (what the checkpointer collects). Also printed: how far the
two DiLoCo peers' outer parameters drifted apart (8-bit all-reduce: each reducer keeps its own part exact).
Nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve()
EVAL_EXAMPLES = 64  # held-out MoD examples per denoiser


def mod_loss(model, tokenizer) -> dict:
    from coldswarm.lm.evaluate import EvalConfig, mod_losses

    by_mode = mod_losses(
        model, tokenizer, EvalConfig(mod_inputs_length=128, mod_examples_per_denoiser=EVAL_EXAMPLES)
    )["by_mode"]
    return {"by_mode": by_mode, "mean": sum(by_mode.values()) / len(by_mode)}


def data(args, version: Path, shard: str, batch_size: int, seed: int):
    import itertools

    from coldswarm.lm.batching import mod_batches
    from coldswarm.lm.data import resolve_shard
    from coldswarm.lm.mod import MoDConfig
    from coldswarm.lm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(version)
    texts = resolve_shard(shard)
    mod = MoDConfig(inputs_length=args.inputs_length, seed=seed)
    return tokenizer, (b for _ in itertools.count() for b in mod_batches(texts, tokenizer, batch_size, mod))


def load_model(version: Path):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(version, dtype=torch.float32)


def run_solo(args, version: Path, out: Path) -> None:
    model = load_model(version)
    tokenizer, batches = data(args, version, "corpus:0-of-1", 2 * args.batch_size, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    samples = 0
    for _, batch in zip(range(args.steps), batches, strict=False):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples += batch["input_ids"].shape[0]
    out.write_text(json.dumps(dict(samples=samples, loss=mod_loss(model, tokenizer))))


def run_peer(args, version: Path, out: Path) -> None:
    from coldswarm.worker.algorithms import make_trainer
    from coldswarm.worker.swarm import SwarmConfig

    model = load_model(version)
    tokenizer, batches = data(args, version, f"corpus:{args.index}-of-2", args.batch_size, seed=args.index)
    diloco = args.algorithm == "diloco"
    rounds = (
        args.steps // args.inner_steps
        if diloco
        else args.steps * 2 * args.batch_size // args.target_batch_size
    )
    config = SwarmConfig(
        run_id=f"quality-{args.algorithm}",
        initial_peers=args.initial_peers.split(","),
        algorithm=args.algorithm,
        target_batch_size=args.target_batch_size,
        batch_size_per_step=args.batch_size,
        inner_steps=args.inner_steps,
        lr=args.lr,
        max_epochs=rounds,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=120.0,
        request_timeout=min(3.0, args.matchmaking_time / 2),
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    )
    trainer = make_trainer(model, config)
    with trainer:
        (out.with_suffix(".ready")).touch()
        while not Path(args.go).exists():
            time.sleep(0.1)
        result = trainer.train(batches)
        report = dict(
            samples=result.samples, steps=result.steps, epoch=result.epoch, fallbacks=result.local_fallbacks
        )
        if diloco:
            report["diloco"] = trainer.diloco_stats
            outer = [p.detach().clone() for p in trainer.optimizer.outer_params]
            save_file(
                {str(i): t.contiguous() for i, t in enumerate(outer)},
                str(out.with_suffix(".outer.safetensors")),
            )
            with torch.no_grad():  # what the round publishes: the outer parameters
                for param, theta in zip((p for _, p in _trained(model)), outer, strict=True):
                    param.copy_(theta)
        report["loss"] = mod_loss(model, tokenizer)
        out.write_text(json.dumps(report))
        time.sleep(3.0)  # the other peer may still finish its last round with us


def _trained(model):
    from coldswarm.worker.swarm import swarm_parameters

    return swarm_parameters(model)


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(HERE), *argv], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip


def wait(procs: list[subprocess.Popen], what: str, workdir: Path, timeout: float = 7200) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if proc.returncode:
            raise RuntimeError(f"{what} failed ({proc.returncode}); see the logs in {workdir}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", default="main", choices=["main", "solo", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--version", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--go", default="", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--initial-peers", default="", help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", default="diloco", help=argparse.SUPPRESS)
    ap.add_argument(
        "--steps", type=int, default=300, help="local steps per peer (solo: steps at twice the batch)"
    )
    ap.add_argument("--batch-size", type=int, default=16, help="MoD examples per peer per step")
    ap.add_argument("--inputs-length", type=int, default=128, help="encoder length of MoD examples")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (inner, for DiLoCo)")
    ap.add_argument("--inner-steps", type=int, default=50, help="diloco: H")
    ap.add_argument("--target-batch-size", type=int, default=128, help="sync: swarm samples per global step")
    ap.add_argument("--matchmaking-time", type=float, default=3.0)
    ap.add_argument("--modes", default="solo,sync,diloco")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.role == "solo":
        run_solo(args, Path(args.version), Path(args.out))
        return 0
    if args.role == "peer":
        run_peer(args, Path(args.version), Path(args.out))
        return 0

    from coldswarm.lm.default import build_default_version
    from coldswarm.worker.swarm import start_dht

    workdir = Path(tempfile.mkdtemp(prefix="coldswarm-quality-"))
    version = build_default_version(workdir / "v0")
    modes = args.modes.split(",")
    load = open("/proc/loadavg").read().split()[:3]
    print(f"# DiLoCo quality benchmark (logs in {workdir}); load {' '.join(load)}")
    shared = ["--version", str(version), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    shared += ["--inputs-length", str(args.inputs_length), "--lr", str(args.lr)]
    results = {}
    if "solo" in modes:
        out = workdir / "solo.json"
        wait([spawn(["--role", "solo", "--out", str(out), *shared], workdir / "solo.log")], "solo", workdir)
        results["solo"] = [json.loads(out.read_text())]
    dht = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = ",".join(str(a) for a in dht.get_visible_maddrs())
    try:
        for mode in [m for m in modes if m != "solo"]:
            go = workdir / f"{mode}.go"
            outs = [workdir / f"{mode}{i}.json" for i in range(2)]
            extra = ["--role", "peer", "--algorithm", mode, "--initial-peers", peers, "--go", str(go)]
            extra += [
                "--inner-steps",
                str(args.inner_steps),
                "--target-batch-size",
                str(args.target_batch_size),
            ]
            extra += ["--matchmaking-time", str(args.matchmaking_time)]
            procs = [
                spawn([*extra, "--index", str(i), "--out", str(o), *shared], workdir / f"{mode}{i}.log")
                for i, o in enumerate(outs)
            ]
            try:
                while not all(o.with_suffix(".ready").exists() for o in outs):
                    if any(p.poll() is not None for p in procs):
                        raise RuntimeError(f"{mode}: a peer died; see {workdir}")
                    time.sleep(0.2)
                go.touch()
                wait(procs, mode, workdir)
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        os.killpg(proc.pid, 9)
                        proc.wait()
            results[mode] = [json.loads(o.read_text()) for o in outs]
    finally:
        dht.shutdown()

    print(
        f"tiny, MoD inputs {args.inputs_length}, lr {args.lr}; {args.steps} steps per peer at batch {args.batch_size} "
        f"(solo: {args.steps} at batch {2 * args.batch_size}); sync target_batch_size {args.target_batch_size}; "
        f"diloco H = {args.inner_steps}; held-out MoD loss over {EVAL_EXAMPLES} examples per denoiser"
    )
    base = None
    for mode, runs in results.items():
        first = runs[0]
        samples = sum(r["samples"] for r in runs)
        modes_ = " ".join(f"{m} {v:.3f}" for m, v in sorted(first["loss"]["by_mode"].items()))
        line = f"{mode:7s} samples {samples:6d}  MoD loss {first['loss']['mean']:.4f} ({modes_})"
        if mode == "sync":
            base = first["loss"]["mean"]
        if len(runs) > 1:
            line += f"  rounds {[r['epoch'] for r in runs]}, fallbacks {[r['fallbacks'] for r in runs]}"
        print(line)
    if "diloco" in results:
        files = [load_file(str(workdir / f"diloco{i}.outer.safetensors")) for i in range(2)]
        outer = [[f[str(j)] for j in range(len(f))] for f in files]
        init = [p.detach() for _, p in _trained(load_model(version))]
        apart = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(*outer, strict=True)))
        moved = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(outer[0], init, strict=True)))
        print(
            f"diloco peers' outer parameters: {apart:.4g} apart (L2), {apart / moved:.2e} of how far they moved"
        )
        results["diloco_drift"] = apart / moved
        if base is not None:
            ratio = results["diloco"][0]["loss"]["mean"] / base
            print(f"diloco / sync MoD loss at equal samples: {ratio:.4f}   (target within 5%: <= 1.05)")
    print(f"load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
