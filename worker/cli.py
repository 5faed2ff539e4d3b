"""``join-swarm``: give coldswarm one command and a GPU (or a CPU) and walk away."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from coldswarm.worker.progress import setup_logging

DEFAULT_WORK_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coldswarm" / "worker"

EPILOG = """\
examples:
  join-swarm --coordinator coord.example.org:50051 --token $JOIN_TOKEN
  join-swarm --coordinator 127.0.0.1:50051 --data ~/my-instructions --device cuda
  COLDSWARM_TOKEN=... join-swarm --coordinator coord:50051 --ca-file coord-ca.pem

The worker registers, takes fusion (PEFT instruction shard) or pretrain (UL2 MoD over
hivemind) assignments, uploads what it produced, and repeats. Ctrl-C (or SIGTERM) stops at
the next step boundary, uploads nothing partial and tells the coordinator; a second Ctrl-C
exits at once. Versions, the saved session and unfinished uploads live in --work-dir, so a
restarted worker resumes where it was.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="join-swarm",
        description="Join a coldswarm coordinator as a worker.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's gRPC address")
    p.add_argument(
        "--token",
        default=os.environ.get("COLDSWARM_TOKEN"),
        help="join token from the coordinator's admin (default: $COLDSWARM_TOKEN)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="read the join token from FILE instead (keeps it out of the process list)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="your own data: instruction files (FLAN, Alpaca, ShareGPT or chat JSONL) and pretraining "
        "text (.txt, .jsonl, .parquet); default: the embedded default tasks and corpus",
    )
    p.add_argument(
        "--strict-data",
        action="store_true",
        help="fail an assignment at the first malformed record in --data (default: skip it, logging its "
        "file and line)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        metavar="DIR",
        help="cache and state (default: %(default)s)",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train (default: auto)"
    )
    p.add_argument("--name", default="", help="label shown to the coordinator's admin (default: host name)")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for training (default: torch's choice, every core). On a machine busy with other "
        "work give fewer than its cores: threads that wait on descheduled siblings make steps many times "
        "slower",
    )
    p.add_argument(
        "--ca-file", type=Path, default=None, help="CA certificate when the coordinator serves TLS"
    )
    p.add_argument("--max-assignments", type=int, default=0, help="exit after N assignments (default: never)")
    p.add_argument(
        "--exit-when-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="exit after this long with no work offered (default: wait forever)",
    )
    p.add_argument(
        "--swarm-listen",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="where the hivemind peer listens in pretrain rounds, e.g. /ip4/0.0.0.0/tcp/31400 (repeatable)",
    )
    p.add_argument(
        "--swarm-announce",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="address other peers should dial, e.g. /ip4/<public ip>/tcp/31400 behind NAT (repeatable)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "plain", "json"],
        help="auto: human with progress bars on a terminal, JSON lines otherwise",
    )
    return p


def limit_cpu_threads(n: int) -> None:
    """Train on ``n`` CPU threads: torch's intra-op pool, and OpenMP in processes started from here."""
    os.environ["OMP_NUM_THREADS"] = str(n)  # before torch starts its pool, and inherited by hivemind's
    import torch

    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    log = logging.getLogger("coldswarm.worker")
    if args.token_file is not None:
        try:
            args.token = args.token_file.read_text().strip()
        except OSError as exc:
            print(f"join-swarm: cannot read --token-file {args.token_file}: {exc}", file=sys.stderr)
            return 2
    if not args.token:
        print(
            "join-swarm: no token: pass --token or --token-file, or set COLDSWARM_TOKEN (ask the coordinator's admin for one)",
            file=sys.stderr,
        )
        return 2
    if args.data is not None and not args.data.is_dir():
        print(f"join-swarm: --data {args.data} is not a directory", file=sys.stderr)
        return 2

    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            print(f"join-swarm: --cpu-threads must be at least 1, not {args.cpu_threads}", file=sys.stderr)
            return 2
        limit_cpu_threads(args.cpu_threads)

    from coldswarm.worker.daemon import Worker, WorkerConfig

    config = WorkerConfig(
        coordinator=args.coordinator,
        token=args.token,
        work_dir=args.work_dir,
        data_dir=args.data,
        device=args.device,
        name=args.name,
        ca_file=args.ca_file,
        max_assignments=args.max_assignments,
        exit_when_idle_s=args.exit_when_idle,
        swarm_host_maddrs=args.swarm_listen,
        swarm_announce_maddrs=args.swarm_announce,
        strict_data=args.strict_data,
    )
    try:
        worker = Worker(config)
    except ValueError as exc:
        print(f"join-swarm: {exc}", file=sys.stderr)
        return 2
    worker.install_signal_handlers()
    import grpc

    try:
        return worker.run()
    except grpc.RpcError as exc:
        code = exc.code()
        hint = {
            grpc.StatusCode.UNAUTHENTICATED: "the token was not accepted: ask the admin for a valid join token",
            grpc.StatusCode.PERMISSION_DENIED: "the token may not do this: use a join token, not an admin token",
        }.get(code, "see the coordinator's log")
        log.error("coordinator refused: %s: %s (%s)", code.name, exc.details(), hint)
        return 1


if __name__ == "__main__":
    sys.exit(main())
