"""Heartbeat load: many simulated workers heartbeating one coordinator at once.

Starts a coordinator (its own process, a tiny base model built here), registers
``--workers`` workers, then runs them as asyncio tasks on grpc.aio channels for
``--duration`` seconds, each heartbeating every ``--interval`` seconds (jittered
start, like real workers). Prints latency percentiles, throughput and errors;
asserts nothing. Target on a 2-core machine: 500 workers, p99 < 50 ms, no errors.

A second phase (``--burst``) fires every worker's heartbeat at the same instant,
the worst case of synchronised clients, and reports it separately.

    python benchmarks/heartbeat_load.py [--workers 500] [--interval 1.0] [--duration 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from coldswarm.common.channel import bearer, open_channel
from coldswarm.coordinator.local_cluster import free_port
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc


def build_tiny_model(out: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _channels(address: str, n: int) -> list:
    """``n`` client connections. Each channel gets its own subchannel pool: grpc otherwise puts channels to
    the same target on one shared TCP connection, and 500 calls at once on one connection exceed the
    coordinator's 100 concurrent streams per connection (REFUSED_STREAM, seen as UNAVAILABLE). Real workers
    are separate processes, one connection each."""
    return [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)
    ]


async def run_workers(address: str, tokens: list[str], interval: float, duration: float, channels: int):
    chans = _channels(address, channels)
    stubs = [pb_grpc.WorkerServiceStub(c) for c in chans]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + duration

    async def worker(i: int, token: str):
        stub = stubs[i % channels]
        md = bearer(token)
        await asyncio.sleep(random.random() * interval)
        step = 0
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                await stub.Heartbeat(
                    pb.HeartbeatRequest(
                        phase="training", step=step, total_steps=1000, loss=2.0, samples_per_s=10.0
                    ),
                    metadata=md,
                    timeout=10,
                )
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            step += 1
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))

    t0 = time.monotonic()
    await asyncio.gather(*(worker(i, t) for i, t in enumerate(tokens)))
    elapsed = time.monotonic() - t0
    for c in chans:
        await c.close()
    return latencies, errors, elapsed


async def burst(address: str, tokens: list[str], rounds: int, channels: int):
    chans = _channels(address, channels)
    stubs = [pb_grpc.WorkerServiceStub(c) for c in chans]
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def one(i, token):
        t0 = time.perf_counter()
        try:
            await stubs[i % channels].Heartbeat(
                pb.HeartbeatRequest(phase="idle"), metadata=bearer(token), timeout=30
            )
            latencies.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            examples.setdefault(exc.code().name, (exc.details() or "")[:160])

    examples: dict[str, str] = {}
    for _ in range(rounds):
        await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
        await asyncio.sleep(0.5)
    for c in chans:
        await c.close()
    for code, detail in examples.items():
        print(f"  e.g. {code}: {detail}")
    return latencies, errors


def report(name: str, latencies: list[float], errors: dict[str, int], extra: str = "") -> None:
    ms = [x * 1000 for x in latencies]
    print(
        f"{name:28s} n={len(ms):6d}  p50={pct(ms, 0.50):6.1f} ms  p90={pct(ms, 0.90):6.1f} ms  "
        f"p99={pct(ms, 0.99):6.1f} ms  max={max(ms) if ms else float('nan'):6.1f} ms  "
        f"mean={statistics.fmean(ms) if ms else float('nan'):5.1f} ms  errors={sum(errors.values())} {errors or ''}{extra}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=500)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between one worker's heartbeats")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of steady load")
    ap.add_argument("--channels", type=int, default=8, help="client connections the workers share")
    ap.add_argument(
        "--burst", type=int, default=3, help="synchronised bursts after the steady phase (0: none)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="the coordinator's --threads (default: its own)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="coldswarm-hb-") as tmp:
        work = Path(tmp)
        base = build_tiny_model(work / "base")
        port = free_port()
        address = f"127.0.0.1:{port}"
        data_dir = work / "data"
        coord = subprocess.Popen(
            [
                sys.executable, "-m", "coldswarm.coordinator.cli", "serve", "--data-dir", str(data_dir),
                "--listen", address, "--base-model", str(base), "--log-level", "WARNING",
                *(["--threads", str(args.threads)] if args.threads else []),
            ],
            stdout=subprocess.DEVNULL, stderr=open(work / "coordinator.log", "wb"),
        )  # fmt: skip
        try:
            channel = open_channel(address)
            admin, workers = pb_grpc.AdminServiceStub(channel), pb_grpc.WorkerServiceStub(channel)
            for _ in range(600):
                try:
                    amd = bearer((data_dir / "admin.token").read_text().strip())
                    admin.Status(pb.StatusRequest(), metadata=amd, timeout=1)
                    break
                except Exception:
                    if coord.poll() is not None:
                        raise RuntimeError("coordinator exited") from None
                    time.sleep(0.2)
            join = admin.CreateToken(pb.CreateTokenRequest(label="load"), metadata=amd).token
            t0 = time.perf_counter()
            tokens = [
                workers.Register(pb.RegisterRequest(name=f"sim-{i}"), metadata=bearer(join)).session_token
                for i in range(args.workers)
            ]
            reg_s = time.perf_counter() - t0
            print(
                f"{args.workers} workers registered in {reg_s:.1f}s; heartbeat every {args.interval}s for "
                f"{args.duration}s over {args.channels} connections; {os.cpu_count()} CPUs, "
                f"load average {os.getloadavg()[0]:.1f} (client and coordinator share them)"
            )
            lat, err, elapsed = asyncio.run(
                run_workers(address, tokens, args.interval, args.duration, args.channels)
            )
            report("steady", lat, err, f"  ({len(lat) / elapsed:.0f} heartbeats/s)")
            if args.burst:
                lat, err = asyncio.run(burst(address, tokens, args.burst, args.channels))
                report(f"burst ({args.workers} at once)", lat, err)
            st = admin.Status(pb.StatusRequest(), metadata=amd)
            print(f"coordinator says: {st.workers_active} active / {st.workers_total} registered")
            channel.close()
        finally:
            coord.terminate()
            coord.wait(timeout=30)


if __name__ == "__main__":
    main()
