"""Benchmark: what training together over hivemind costs a peer, synchronous vs DiLoCo. Prints ratios.

    python benchmarks/swarm.py --lm-size tiny                          # loopback (also a quick smoke run)
    sudo python benchmarks/swarm.py --lm-size tiny --net netns --rate 20mbit   # each peer behind 20 Mbit/s
    python benchmarks/swarm.py --security [--repeats 2] ...   # admission + robust aggregation on vs off

One run measures, one after the other on the same machine and settings:

1. **solo**: two processes training at once with a plain torch loop (AdamW, same per-peer batch), so both
   sides see the same CPU contention (on a small machine two peers share the cores; that is not a cost of
   averaging); measured before, between and after the swarm modes, each mode against the two beside it;
2. **sync**: two peers with ``SwarmTrainer`` (``algorithm="sync"``): 8-bit gradient all-reduce every
   ``--target-batch-size`` samples, fp16 parameter averaging every epoch;
3. **diloco**: two peers with ``algorithm="diloco"``: ``--inner-steps`` AdamW steps per peer, then an 8-bit
   pseudo-gradient all-reduce and an outer Nesterov step, the sync overlapped with the next inner steps;

and for each swarm mode: per-peer samples/s against solo; the **stall** (time the optimizer's ``step``
blocked beyond its median, i.e. waiting on the network), per round and as a share of training time; the
bytes each peer **encoded** (every codec it ran: its outgoing parts and, through hivemind's codec registry,
the averaged deltas it returned as a reducer) per value; and, with ``--net netns``, the bytes each peer
**sent on the wire** (its veth's tx counter: framing, DHT and retransmissions included), per round and per
sample.

``--net netns`` (root): each peer and the DHT bootstrap run in their own network namespace on a private
bridge (``benchmarks/netns.py``), each peer's egress limited by ``tc tbf`` at ``--rate``; the shaping is
checked with a TCP transfer first; every namespace is deleted at the end (also on Ctrl-C or an error;
``python benchmarks/netns.py sweep`` removes those of a killed run). ``--net loopback`` runs everything on
127.0.0.1 (no socket counts) and, unless ``--no-codec-runs``, the original 8-bit vs fp32 gradient-bytes
comparison (state averaging off, so only gradient rounds are counted).

The model is a T5 built from a config in this file (``--d-model`` etc., ~180K parameters by default),
``--lm-size tiny|small`` (the embedded default's 10.0M / 60.9M-parameter models) or ``--model-dir``,
trained on random-token batches: the mechanism's cost does not depend on what the loss means (the
convergence comparison is ``benchmarks/diloco_quality.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))


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


def wait_for_file(path: str, timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    while path and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- one process of a run ---------------------------------------------------------------------------------


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


def run_bootstrap(args, ready: Path) -> dict:
    """The DHT bootstrap peer (netns mode: in its own namespace); writes its multiaddrs, serves until --go."""
    from coldswarm.swarm.dht import start_dht

    dht = start_dht(host_maddrs=[f"/ip4/{args.host}/tcp/0"])
    try:
        (ready.parent / "bootstrap.maddrs").write_text(",".join(str(a) for a in dht.get_visible_maddrs()))
        ready.touch()
        wait_for_file(args.go, timeout=24 * 3600)
    finally:
        dht.shutdown()
    return {}


def run_peer(args, ready: Path) -> dict:
    from coldswarm.swarm.averaging_codecs import (
        ByteCountingCompression,
        count_registry_bytes,
        make_compression,
    )
    from coldswarm.worker.algorithms import make_trainer
    from coldswarm.worker.swarm import SwarmConfig

    model = build_model(args)
    vocab = model.config.vocab_size
    # One counter for everything this peer encodes: its gradient (or pseudo-gradient) parts, its state-
    # averaging parts, and, through hivemind's registry, the averaged deltas it returns as a reducer.
    grad_counter = ByteCountingCompression(make_compression(args.codec, args.size_threshold))
    state_counter = ByteCountingCompression(make_compression("fp16", args.size_threshold))
    registry_counter = ByteCountingCompression(make_compression("none"))
    count_registry_bytes(registry_counter)
    diloco = args.algorithm == "diloco"
    config = SwarmConfig(
        run_id=args.run_id,
        initial_peers=args.initial_peers.split(","),
        algorithm=args.algorithm,
        target_batch_size=args.target_batch_size,
        batch_size_per_step=args.batch_size,
        inner_steps=args.inner_steps,
        lr=1e-3,
        max_epochs=args.outer_epochs if diloco else args.epochs,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        request_timeout=min(3.0, args.matchmaking_time / 2),
        load_state_timeout=args.averaging_timeout,
        average_state_every=args.average_state_every,
        grad_compression=args.codec,
        size_threshold=args.size_threshold,
        host_maddrs=[f"/ip4/{args.host}/tcp/0"],
    )
    data = batches(args.seed, args.batch_size, vocab)
    trainer = make_trainer(model, config, grad_compression=grad_counter, state_compression=state_counter)
    with trainer:
        for _ in range(3):  # same warm-up as solo (forward/backward only, nothing reported)
            model(**next(data)).loss.backward()
            model.zero_grad()
        # Time every optimizer step: the stall is what a step took beyond the typical (median) step.
        opt, step_seconds = trainer.optimizer, []
        timed = opt.step

        def timed_step(*a, **kw):
            began = time.perf_counter()
            try:
                return timed(*a, **kw)
            finally:
                step_seconds.append(time.perf_counter() - began)

        opt.step = timed_step
        ready.touch()  # built and joined
        wait_for_file(args.go)
        result = trainer.train(data)
        median = statistics.median(step_seconds) if step_seconds else 0.0
        out = dict(
            samples=result.samples,
            seconds=result.seconds,
            samples_per_s=result.samples_per_s,
            epochs=result.epoch,
            local_fallbacks=result.local_fallbacks,
            stall_seconds=sum(max(0.0, s - median) for s in step_seconds),
            bytes_encoded=grad_counter.bytes_sent + state_counter.bytes_sent + registry_counter.bytes_sent,
            values_encoded=grad_counter.values_sent
            + state_counter.values_sent
            + registry_counter.values_sent,
            grad_bytes=grad_counter.bytes_sent,
            grad_values=grad_counter.values_sent,
            params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            diloco=trainer.diloco_stats if diloco else {},
        )
        time.sleep(2.0)  # let the other peer finish its last round before we leave
    return out


# -- orchestration ------------------------------------------------------------------------------------------


SHARED = ("batch_size", "target_batch_size", "epochs", "inner_steps", "outer_epochs", "matchmaking_time")
SHARED += ("averaging_timeout", "size_threshold", "vocab", "d_model", "layers", "solo_seconds", "codec")
SHARED += ("average_state_every",)


class Runner:
    """Starts each run's processes (in the peers' namespaces with --net netns) and collects their results."""

    def __init__(self, args, workdir: Path, net=None):
        self.args, self.workdir, self.net = args, workdir, net

    def host(self, node: int) -> str:
        return self.net.ip(node) if self.net else "127.0.0.1"

    def spawn(self, role: str, out: Path, node: int, extra: list[str]) -> subprocess.Popen:
        args = self.args
        argv = [sys.executable, str(HERE), "--role", role, "--out", str(out), "--host", self.host(node)]
        for key in SHARED:
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if args.model_dir:
            argv += ["--model-dir", args.model_dir]
        if args.lm_size:
            argv += ["--lm-size", args.lm_size]
        argv += extra  # last: overrides the shared settings
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
        argv = [*argv, "--threads", str(args.threads)]
        if self.net is not None:
            argv = self.net.exec_argv(node, argv)  # `ip netns exec` keeps the environment
        log = open(out.with_suffix(".log"), "w")
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def start_bootstrap(self) -> tuple[subprocess.Popen | None, str]:
        """The DHT bootstrap peer: node 0's namespace with --net netns, this process's own otherwise."""
        if self.net is None:
            from coldswarm.swarm.dht import start_dht

            self._dht = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            return None, ",".join(str(a) for a in self._dht.get_visible_maddrs())
        out = self.workdir / "bootstrap.json"
        proc = self.spawn("bootstrap", out, 0, ["--go", str(self.workdir / "bootstrap.stop")])
        self._wait_ready([proc], [out], "bootstrap")
        return proc, (self.workdir / "bootstrap.maddrs").read_text()

    def stop_bootstrap(self, proc) -> None:
        if self.net is None:
            self._dht.shutdown()
            return
        (self.workdir / "bootstrap.stop").touch()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()

    def _wait_ready(self, procs, outs, name: str) -> None:
        deadline = time.monotonic() + 600
        while not all(o.with_suffix(".ready").exists() for o in outs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: a process did not start; see {self.workdir}/{name}*.log")
            time.sleep(0.2)

    def pair(self, name: str, role: str, extra: list[str], initial_peers: str = "") -> list[dict]:
        """Two processes (nodes 1 and 2), started together once both are ready; their results, with the
        bytes each sent on its link between the start and its exit when in namespaces."""
        go = self.workdir / f"{name}.go"
        procs, outs = [], []
        for i in range(2):
            out = self.workdir / f"{name}{i}.json"
            more = ["--seed", str(100 + i), "--go", str(go), *extra]
            if initial_peers:
                more += ["--initial-peers", initial_peers, "--run-id", name]
            procs.append(self.spawn(role, out, i + 1, more))
            outs.append(out)
        try:
            self._wait_ready(procs, outs, name)
            before = [self.net.tx_bytes(i + 1) for i in range(2)] if self.net else [0, 0]
            go.touch()
            after = [0, 0]
            for i, proc in enumerate(procs):
                proc.wait(timeout=3600)
                after[i] = self.net.tx_bytes(i + 1) if self.net else 0
            if any(p.returncode for p in procs):
                raise RuntimeError(f"{name}: a process failed; see {self.workdir}/{name}*.log")
            results = [json.loads(o.read_text()) for o in outs]
            for result, b, a in zip(results, before, after, strict=True):
                result["wire_bytes"] = a - b if self.net else None
            return results
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
                    proc.wait()


def summarise(name: str, runs: list[dict], solo_rate: float) -> dict:
    rate = sum(r["samples_per_s"] for r in runs) / len(runs)
    rounds = [max(r["epochs"], 1) for r in runs]
    seconds = sum(r["seconds"] for r in runs) / len(runs)
    stall = sum(r["stall_seconds"] for r in runs) / len(runs)
    samples = sum(r["samples"] for r in runs) / len(runs)
    wire = [r["wire_bytes"] for r in runs]
    row = dict(
        name=name,
        samples_per_s=rate,
        solo_samples_per_s=solo_rate,
        ratio_to_solo=rate / solo_rate,
        rounds=min(rounds),
        local_fallbacks=[r["local_fallbacks"] for r in runs],
        stall_per_round=stall / min(rounds),
        stall_share=stall / seconds,
        bytes_per_value=sum(r["bytes_encoded"] for r in runs)
        / max(sum(r["values_encoded"] for r in runs), 1),
        encoded_per_round=sum(r["bytes_encoded"] / n for r, n in zip(runs, rounds, strict=True)) / len(runs),
        wire_per_round=None
        if None in wire
        else sum(w / n for w, n in zip(wire, rounds, strict=True)) / len(runs),
        wire_per_sample=None if None in wire else sum(wire) / len(runs) / samples,
        samples_per_peer=samples,
        params=runs[0]["params"],
    )
    if runs[0].get("diloco"):
        stats = [r["diloco"] for r in runs]
        row["diloco"] = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        row["final_sync_share"] = row["diloco"]["final_sync_seconds"] / seconds
    return row


def print_row(row: dict) -> None:
    wire = (
        f"wire {row['wire_per_round'] / 1e6:8.2f} MB/round/peer, {row['wire_per_sample']:9.1f} B/sample"
        if row["wire_per_round"] is not None
        else "wire -"
    )
    print(
        f"{row['name']:7s} {row['samples_per_s']:7.2f} samples/s/peer  x{row['ratio_to_solo']:.3f} of solo  "
        f"{row['rounds']} rounds  stall {row['stall_per_round']:6.2f} s/round ({100 * row['stall_share']:.1f}% of "
        f"training)  encoded {row['encoded_per_round'] / 1e6:7.2f} MB/round/peer ({row['bytes_per_value']:.3f} "
        f"B/value)  {wire}  fallbacks {row['local_fallbacks']}"
    )
    if "diloco" in row:
        d = row["diloco"]
        print(
            f"        diloco: syncs {d['syncs']:.0f}, missed {d['missed_syncs']:.0f}, solo {d['solo_steps']:.0f}, "
            f"inner steps overlapped with a sync {d['overlapped_steps']:.0f}, mean sync {d['sync_seconds'] / max(d['syncs'], 1):.1f} s, "
            f"stall {d['stall_seconds']:.1f} s of which the round's last sync {d['final_sync_seconds']:.1f} s "
            f"({100 * row['final_sync_share']:.1f}% of training; the others "
            f"{max(d['stall_seconds'] - d['final_sync_seconds'], 0):.1f} s)"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--role", default="main", choices=["main", "solo", "peer", "bootstrap"], help=argparse.SUPPRESS
    )
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--go", default="", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--initial-peers", default="", help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", default="sync", help=argparse.SUPPRESS)
    ap.add_argument("--net", default="loopback", choices=["loopback", "netns"], help="where the peers talk")
    ap.add_argument("--rate", default="20mbit", help="netns: each peer's egress rate (tc tbf), or 'none'")
    ap.add_argument("--algorithms", default="sync,diloco", help="which swarm modes to run, comma-separated")
    ap.add_argument("--codec", default="uniform8bit", help="gradient / pseudo-gradient codec")
    ap.add_argument("--average-state-every", type=int, default=1, help="sync: parameter averaging period")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per local step (every mode)")
    ap.add_argument("--target-batch-size", type=int, default=2048, help="sync: swarm samples per round")
    ap.add_argument("--epochs", type=int, default=3, help="sync: rounds (global steps) per run")
    ap.add_argument("--inner-steps", type=int, default=100, help="diloco: inner steps per peer per round (H)")
    ap.add_argument("--outer-epochs", type=int, default=3, help="diloco: rounds (outer steps) per run")
    ap.add_argument("--matchmaking-time", type=float, default=3.0)
    ap.add_argument("--averaging-timeout", type=float, default=300.0, help="must exceed one all-reduce")
    ap.add_argument("--size-threshold", type=int, default=2**12, help="smaller tensors go fp16")
    ap.add_argument("--solo-seconds", type=float, default=40.0, help="how long the solo baseline trains")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument(
        "--no-codec-runs", action="store_true", help="loopback: skip the 8-bit vs fp32 bytes runs"
    )
    ap.add_argument("--bytes-target-batch-size", type=int, default=256, help="codec runs: samples per round")
    ap.add_argument("--bytes-epochs", type=int, default=3, help="codec runs: rounds each")
    ap.add_argument("--json", default="", help="also write every figure to this JSON file")
    ap.add_argument("--model-dir", default="", help="HF model dir to train instead of the built-in toy T5")
    ap.add_argument(
        "--lm-size", default="", help="coldswarm.lm's model of this size (tiny 10.0M, small 60.9M)"
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

    if args.role != "main":
        out = Path(args.out)
        role = {"solo": run_solo, "peer": run_peer, "bootstrap": run_bootstrap}[args.role]
        result = role(args, out.with_suffix(".ready"))
        out.write_text(json.dumps(result))
        return 0

    # SIGTERM unwinds like Ctrl-C, so the namespaces and processes are cleaned up in the `finally`s.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="coldswarm-bench-"))
    algorithms = [a for a in args.algorithms.split(",") if a]
    load = open("/proc/loadavg").read().split()[:3]
    print(
        f"# coldswarm swarm benchmark ({args.net}{' ' + args.rate if args.net == 'netns' else ''}; logs in "
        f"{workdir}); {os.cpu_count()} CPUs, load {' '.join(load)}, torch threads/process={args.threads}"
    )
    net = None
    if args.net == "netns":
        from netns import Network

        net = Network(3, None if args.rate == "none" else args.rate, shaped={1, 2})  # node 0: the bootstrap
    report: dict = dict(net=args.net, rate=args.rate if net else None, load_before=load, args=vars(args))
    try:
        if net is not None:
            net.__enter__()
            if args.rate != "none":
                report["tcp_mbit_s"] = net.tcp_rate(1, 2)
                print(
                    f"shaping check: one TCP stream between two peers at {args.rate}: {report['tcp_mbit_s']:.1f} Mbit/s"
                )
        runner = Runner(args, workdir, net)
        bootstrap, peers = runner.start_bootstrap()
        try:
            # A solo baseline before and after each swarm mode: other work on a shared machine comes and
            # goes, so each mode is compared with the mean of the solos measured on either side of it.
            solos, runs = [runner.pair("solo0", "solo", [])], {}
            for i, algorithm in enumerate(algorithms):
                runs[algorithm] = runner.pair(algorithm, "peer", ["--algorithm", algorithm], peers)
                solos.append(runner.pair(f"solo{i + 1}", "solo", []))
            codec_runs = {}
            if net is None and not args.no_codec_runs:
                settings = ["--average-state-every", "0", "--epochs", str(args.bytes_epochs)]
                settings += ["--target-batch-size", str(args.bytes_target_batch_size)]
                for codec in ("uniform8bit", "none"):
                    codec_runs[codec] = runner.pair(
                        f"bytes-{codec}", "peer", ["--codec", codec, *settings], peers
                    )
        finally:
            runner.stop_bootstrap(bootstrap)
    finally:
        if net is not None:
            net.close()
    report["load_after"] = open("/proc/loadavg").read().split()[:3]

    solo_rates = [sum(r["samples_per_s"] for r in solo) / 2 for solo in solos]
    params = next(iter(runs.values()))[0]["params"] if runs else 0
    print(
        f"model: T5, {params:,} trained parameters; per-peer batch {args.batch_size}; sync: target_batch_size "
        f"{args.target_batch_size}, {args.epochs} rounds; diloco: H = {args.inner_steps} inner steps, "
        f"{args.outer_epochs} rounds; codec {args.codec}; matchmaking_time {args.matchmaking_time}s"
    )
    print(
        "solo    "
        + ", ".join(f"{rate:.2f}" for rate in solo_rates)
        + " samples/s per process (2 processes, plain torch AdamW; before, between and after the modes)"
    )
    rows = {
        name: summarise(name, r, (solo_rates[i] + solo_rates[i + 1]) / 2)
        for i, (name, r) in enumerate(runs.items())
    }
    for row in rows.values():
        print_row(row)
    if {"sync", "diloco"} <= set(rows):
        key = "wire_per_sample" if net is not None else "bytes_per_sample_encoded"
        for row in rows.values():
            row["bytes_per_sample_encoded"] = (
                row["encoded_per_round"] * row["rounds"] / row["samples_per_peer"]
            )
        ratio = rows["sync"][key] / rows["diloco"][key] if rows["diloco"][key] else float("nan")
        what = "on the wire (veth tx)" if net is not None else "encoded"
        print(f"bytes per sample {what}, sync/diloco: {ratio:.1f}x fewer with diloco   (target >= 100x)")
        print(
            f"diloco/solo throughput {rows['diloco']['ratio_to_solo']:.3f} (target >= 0.9), "
            f"stall {100 * rows['diloco']['stall_share']:.2f}% of training (target < 2%)"
        )
        report["bytes_per_sample_ratio"] = ratio
    if codec_runs:
        per_value = {}
        for codec, runs_ in codec_runs.items():
            # Its parts and the deltas it returned as a reducer (state averaging is off in these runs).
            per_value[codec] = sum(r["bytes_encoded"] for r in runs_) / max(
                sum(r["values_encoded"] for r in runs_), 1
            )
        ratio = per_value["uniform8bit"] / per_value["none"] if per_value["none"] else float("nan")
        print(
            f"gradient bytes per value (gradient rounds only, state averaging off): 8-bit {per_value['uniform8bit']:.3f}"
            f"  fp32 {per_value['none']:.3f}  ratio {ratio:.3f}  (target <= 0.3; nan: the peers never averaged)"
        )
        report["codec_bytes_per_value"] = per_value
    print(f"load average after: {' '.join(report['load_after'])}")
    report.update(solo_samples_per_s=solo_rates, rows=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
