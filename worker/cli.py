"""``join-swarm``: give coldswarm one command and a GPU (or a CPU) and walk away."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from coldswarm.common import cli_args
from coldswarm.worker.config import WorkerConfig
from coldswarm.worker.progress import setup_logging

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
        description="Join a coldswarm swarm as a worker: train for its coordinator.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # One flag per WorkerConfig field, with the field's help (the help texts say their defaults in words).
    cli_args.add_arguments(p, WorkerConfig, show_defaults=False)
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
    if args.data_dir is not None and not args.data_dir.is_dir():
        print(f"join-swarm: --data {args.data_dir} is not a directory", file=sys.stderr)
        return 2

    if args.cpu_threads is not None:
        if args.cpu_threads < 1:
            print(f"join-swarm: --cpu-threads must be at least 1, not {args.cpu_threads}", file=sys.stderr)
            return 2
        limit_cpu_threads(args.cpu_threads)

    from coldswarm.worker.daemon import Worker

    config = cli_args.from_args(WorkerConfig, args)
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
