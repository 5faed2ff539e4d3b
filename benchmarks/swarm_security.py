"""Benchmark: what the swarm's admission and robust aggregation cost a peer. Prints ratios; asserts nothing.

    python benchmarks/swarm.py --security [--repeats 2] [--target-batch-size 1024] [--lm-size tiny]
    python benchmarks/swarm_security.py ...          # the same

Four modes, each run by 2 peers (``SwarmTrainer``, 8-bit gradients, fp16 state averaging every round) in the
same run, interleaved ``--repeats`` times so that load that comes and goes on the machine hits every mode:

* ``off``: an open swarm with hivemind's own averagers (no credentials, no authorizer, plain weighted mean);
* ``auth``: admission on (coordinator-signed credentials, hivemind's token authorizer on every DHT RPC, signed
  records), hivemind's own averagers (so no caller checks either: this isolates the DHT's share);
* ``auth+mean``: admission on and the guarded averagers (the averagers' caller checks, finite parts only,
  screened reducer results, checked downloads) with the plain mean;
* ``auth+clip``: the same with CenteredClip, the default.

Per mode: samples/s per peer (training wall time, stalls included), the payload bytes each peer encodes per
averaged value (as ``benchmarks/swarm.py`` counts them), and the bytes on the wire per peer per round, counted
at the socket: the whole benchmark re-runs itself in a private network namespace (``unshare --net``, when
available), where the loopback's transmit counter holds every byte the peers and the bootstrap sent and
nothing else (libp2p framing, DHT requests with their tokens and signatures, tensors). Also the reducer's
aggregation time per 2^17-value part, CenteredClip against the mean, on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from swarm import batches, build_model, wait_for_file  # noqa: E402  - the swarm benchmark's model and data

#: mode -> (admission on, aggregator of the guarded averagers or None for hivemind's own)
MODES = {
    "off": (False, None),
    "auth": (True, None),
    "auth+mean": (True, "mean"),
    "auth+clip": (True, "centered_clip"),
}
_NETNS_ENV = "COLDSWARM_BENCH_OWN_NETNS"


def lo_tx_bytes() -> int | None:
    """Bytes sent on loopback in this network namespace (None outside a private one: shared with others)."""
    if os.environ.get(_NETNS_ENV) != "1":
        return None
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    return None


# -- one peer (a subprocess) --------------------------------------------------------------------------------


def run_peer(args) -> dict:
    from coldswarm.swarm.authorizer import CredentialFile
    from coldswarm.swarm.averaging_codecs import (
        ByteCountingCompression,
        count_registry_bytes,
        make_compression,
    )
    from coldswarm.swarm.security import PeerSecurity
    from coldswarm.worker.swarm import SwarmConfig, SwarmTrainer

    torch.set_num_threads(1)
    model = build_model(args)
    counter = ByteCountingCompression(make_compression("uniform8bit", 2**12))
    count_registry_bytes(counter)
    config = SwarmConfig(
        run_id=args.run_id,
        initial_peers=args.initial_peers.split(","),
        target_batch_size=args.target_batch_size,
        lr=1e-3,
        max_epochs=args.epochs,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=60.0,
        request_timeout=min(3.0, args.matchmaking_time / 2),
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        aggregator=args.aggregator or "mean",
    )
    security = None
    if args.keys:
        keys = Path(args.keys)
        security = PeerSecurity(
            keys / "identity.key", (keys / "authority.pub").read_bytes(), CredentialFile(keys / "credential")
        )
    data = batches(args.seed, args.batch_size, model.config.vocab_size)
    ready = Path(args.out).with_suffix(".ready")
    with SwarmTrainer(
        model, config, grad_compression=counter, security=security, guard=bool(args.aggregator)
    ) as t:
        for _ in range(3):  # warm-up (forward/backward only)
            model(**next(data)).loss.backward()
            model.zero_grad()
        ready.touch()
        wait_for_file(args.go)
        result = t.train(data)
        out = dict(
            samples_per_s=result.samples_per_s,
            epochs=result.epoch,
            local_fallbacks=result.local_fallbacks,
            bytes_sent=counter.bytes_sent,
            values_sent=counter.values_sent,
            refusals=result.refusals,
            params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        )
        time.sleep(2.0)  # let the other peer finish its last round before we leave
    return out


# -- one mode: a bootstrap and two peers --------------------------------------------------------------------


def run_mode(args, workdir: Path, name: str, auth: bool, aggregator: str | None) -> dict:
    from hivemind.utils import get_dht_time

    from coldswarm.coordinator.checkpointer import Checkpointer, CheckpointerConfig
    from coldswarm.swarm.authorizer import CredentialFile
    from coldswarm.swarm.credentials import ROLE_WORKER, load_or_create_identity
    from coldswarm.swarm.dht import start_dht

    run_id = name.replace("+", "-")
    bootstrap = checkpointer = None
    if not auth:
        bootstrap = start_dht(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        peers = ",".join(str(a) for a in bootstrap.get_visible_maddrs())
    else:
        checkpointer = Checkpointer(CheckpointerConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"])).start()
        peers = ",".join(checkpointer.initial_peers)
    go = workdir / f"{name}.go"
    procs, outs = [], []
    try:
        for i in range(2):
            out = workdir / f"{name}{i}.json"
            argv = [sys.executable, str(HERE), "--role", "peer", "--out", str(out), "--go", str(go)]
            argv += ["--run-id", run_id, "--initial-peers", peers, "--seed", str(100 + i)]
            argv += ["--aggregator", aggregator or ""]
            if auth:  # what the coordinator's GetSwarmCredential gives a worker
                keys = workdir / f"{name}{i}-keys"
                keys.mkdir()
                public = load_or_create_identity(keys / "identity.key").get_public_key().to_bytes()
                authority = checkpointer.authority
                credential = authority.issue(
                    public,
                    role=ROLE_WORKER,
                    run_id=run_id,
                    worker_id=f"w-{i}",
                    expires_at=get_dht_time() + 3600,
                )
                CredentialFile(keys / "credential").write(credential)
                (keys / "authority.pub").write_bytes(authority.public_key_bytes)
                argv += ["--keys", str(keys)]
            argv += _shared(args)
            log = open(out.with_suffix(".log"), "w")
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            outs.append(out)
        deadline = time.monotonic() + 600
        while not all(o.with_suffix(".ready").exists() for o in outs):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: a peer did not start; see {workdir}/{name}*.log")
            time.sleep(0.2)
        before = lo_tx_bytes()
        go.touch()
        for proc in procs:
            proc.wait(timeout=1800)
        after = lo_tx_bytes()
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{name}: a peer failed; see {workdir}/{name}*.log")
        runs = [json.loads(o.read_text()) for o in outs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        if bootstrap is not None:
            bootstrap.shutdown()
        if checkpointer is not None:
            checkpointer.shutdown()
    rounds = max(max(r["epochs"] for r in runs), 1)  # the swarm's global steps in this run
    return dict(
        rate=sum(r["samples_per_s"] for r in runs) / 2,
        per_value=sum(r["bytes_sent"] / max(r["values_sent"], 1) for r in runs) / 2,
        wire_per_round=None if before is None else (after - before) / 2 / rounds,
        fallbacks=[r["local_fallbacks"] for r in runs],
        refusals=[r["refusals"] for r in runs],
        params=runs[0]["params"],
    )


def _shared(args) -> list[str]:
    argv = []
    for key in (
        "batch_size",
        "target_batch_size",
        "epochs",
        "matchmaking_time",
        "vocab",
        "d_model",
        "layers",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.lm_size:
        argv += ["--lm-size", args.lm_size]
    return argv


def dht_get_bytes(tmp: Path, gets: int = 50) -> dict[str, float]:
    """Bytes on the wire per ``dht.get(key, latest=True)`` in a 3-node DHT, without and with the token
    authorizer (every request and response then carries a credential and a signature)."""
    from hivemind.utils import get_dht_time

    from coldswarm.swarm.authorizer import CredentialFile
    from coldswarm.swarm.credentials import ROLE_WORKER, load_or_create_identity
    from coldswarm.swarm.dht import start_dht
    from coldswarm.swarm.security import PeerSecurity

    out = {}
    for mode in ("off", "auth"):
        started = []
        try:
            kwargs = []
            if mode == "auth":
                coordinator = PeerSecurity.for_authority(tmp / "dht-authority.key")
                authority = coordinator.credentials.authority
                first = coordinator.dht_kwargs()
                for i in range(2):
                    key = load_or_create_identity(tmp / f"dht-{i}.key").get_public_key().to_bytes()
                    source = CredentialFile(tmp / f"dht-{i}.credential")
                    source.write(
                        authority.issue(key, role=ROLE_WORKER, run_id="dht", expires_at=get_dht_time() + 600)
                    )
                    kwargs.append(
                        PeerSecurity(tmp / f"dht-{i}.key", authority.public_key_bytes, source).dht_kwargs()
                    )
            else:
                first, kwargs = {}, [{}, {}]
            bootstrap = start_dht(**first)
            started.append(bootstrap)
            peers = [str(a) for a in bootstrap.get_visible_maddrs()]
            nodes = [start_dht(peers, **kw) for kw in kwargs]
            started += nodes
            nodes[0].store("bench", subkey=b"x", value=1, expiration_time=get_dht_time() + 600)
            before = lo_tx_bytes()
            for _ in range(gets):
                nodes[1].get("bench", latest=True)
            out[mode] = (lo_tx_bytes() - before) / gets
        finally:
            for dht in reversed(started):
                dht.shutdown()
    return out


def aggregation_seconds(parts: int = 3, size: int = 2**17, repeats: int = 20) -> dict[str, float]:
    """Seconds one reducer spends aggregating one part of ``size`` values from ``parts`` senders."""
    from coldswarm.swarm.robust import AGGREGATORS, RobustAggregation

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(parts, size, generator=gen)
    x[-1] *= 1e4  # an outlier: CenteredClip's worst case runs all its iterations
    w = torch.ones(parts)
    config = RobustAggregation()
    out = {}
    for name, spec in AGGREGATORS.items():
        spec.fn(x, w, config)
        began = time.perf_counter()
        for _ in range(repeats):
            spec.fn(x, w, config)
        out[name] = (time.perf_counter() - began) / repeats
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", default="main", choices=["main", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--go", default="", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--initial-peers", default="", help=argparse.SUPPRESS)
    ap.add_argument("--aggregator", default="", help=argparse.SUPPRESS)
    ap.add_argument("--keys", default="", help=argparse.SUPPRESS)
    ap.add_argument("--security", action="store_true", help=argparse.SUPPRESS)  # swarm.py's flag, passed on
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each mode")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per local step")
    ap.add_argument("--target-batch-size", type=int, default=1024, help="swarm samples per round")
    ap.add_argument("--epochs", type=int, default=3, help="rounds per run")
    ap.add_argument("--matchmaking-time", type=float, default=3.0)
    ap.add_argument(
        "--lm-size", default="", help="train coldswarm.lm's model of this size (tiny: ~10M params)"
    )
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)

    if args.role == "peer":
        Path(args.out).write_text(json.dumps(run_peer(args)))
        return 0
    if os.environ.get(_NETNS_ENV) is None and shutil.which("unshare") and shutil.which("ip"):
        # Again, alone in a network namespace of its own: its loopback counts only this benchmark's bytes.
        inner = f"ip link set lo up && exec {sys.executable} {HERE} " + " ".join(
            a for a in (sys.argv[1:] if argv is None else argv)
        )
        env = {**os.environ, _NETNS_ENV: "1"}
        done = subprocess.run(["unshare", "--net", "sh", "-c", inner], env=env)
        if done.returncode == 0:
            return 0
        print(
            "# could not run in a private network namespace; bytes at the socket are not counted", flush=True
        )
        os.environ[_NETNS_ENV] = "0"

    workdir = Path(tempfile.mkdtemp(prefix="coldswarm-bench-security-"))
    print(
        f"# swarm security benchmark (logs in {workdir}); {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}"
    )
    results: dict[str, list[dict]] = {name: [] for name in MODES}
    for repeat in range(args.repeats):
        for name, (auth, aggregator) in MODES.items():
            results[name].append(run_mode(args, workdir, f"{name}-{repeat}", auth, aggregator))
    print(f"# load average after: {os.getloadavg()}")
    params = results["off"][0]["params"]
    print(
        f"model: T5, {params} trained parameters; 2 peers; per-peer batch {args.batch_size}; target_batch_size "
        f"{args.target_batch_size}; {args.epochs} rounds per run; 8-bit gradients, fp16 state every round"
    )
    off_rate = sum(r["rate"] for r in results["off"]) / args.repeats
    off_wire = [r["wire_per_round"] for r in results["off"]]
    print("mode        samples/s/peer (runs)      vs off   payload B/value   wire bytes/peer/round   vs off")
    for name, runs in results.items():
        rate = sum(r["rate"] for r in runs) / len(runs)
        wire = [r["wire_per_round"] for r in runs]
        wire_mean = None if None in wire else sum(wire) / len(wire)
        off_mean = None if None in off_wire else sum(off_wire) / len(off_wire)
        per_value = sum(r["per_value"] for r in runs) / len(runs)
        each = ", ".join(f"{r['rate']:.2f}" for r in runs)
        print(
            f"{name:10s}  {rate:7.2f} ({each})"
            f"{'':>6s}{rate / off_rate:6.3f}   {per_value:15.3f}   "
            + (
                f"{wire_mean:21,.0f}   {wire_mean / off_mean:6.3f}"
                if wire_mean is not None
                else f"{'n/a':>21s}"
            )
            + f"   fallbacks {[r['fallbacks'] for r in runs]}"
        )
    if lo_tx_bytes() is not None:
        per_get = dht_get_bytes(workdir)
        print(
            f"bytes on the wire per DHT get(latest) over 3 nodes: off {per_get['off']:,.0f}, auth "
            f"{per_get['auth']:,.0f} ({per_get['auth'] / per_get['off']:.2f}x: a credential and a signature each way)"
        )
    seconds = aggregation_seconds()
    print(
        "reducer aggregation per 2^17-value part from 3 senders (one outlier): "
        + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in seconds.items())
        + f" (CenteredClip/mean {seconds['centered_clip'] / seconds['mean']:.1f}x)"
    )
    refused = [r["refusals"] for runs in results.values() for r in runs]
    print(f"refusals in honest runs (should be none): {refused}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
