"""``coldswarm-coordinator``: run the coordinator.

    coldswarm-coordinator serve [--data-dir DIR] [--listen HOST:PORT] [--tls-cert F --tls-key F]
                                [--base-model DIR] [...]
    coldswarm-coordinator init  [--data-dir DIR] [--base-model DIR]
    coldswarm-coordinator health [--address HOST:PORT] [--ca-file F]

``init`` makes the admin token and version 0 and exits; ``serve`` does the same
when needed and then serves until SIGINT/SIGTERM; ``health`` asks a running
coordinator's gRPC health service (exit 0 when serving; for container health checks).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from coldswarm.common.signals import install_stop_handler
from coldswarm.coordinator.app import ConfigError, Coordinator
from coldswarm.coordinator.config import add_arguments, from_args
from coldswarm.coordinator.errors import CoordinatorError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coldswarm-coordinator", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the coordinator (initialises the state on first start)")
    add_arguments(serve)
    serve.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    init = sub.add_parser("init", help="make the admin token and version 0, then exit")
    add_arguments(init)
    init.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    health = sub.add_parser("health", help="ask a coordinator's gRPC health service; exit 0 when serving")
    health.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)")
    health.add_argument("--ca-file", default=None, help="CA certificate when the coordinator serves TLS")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return parser


def health_check(address: str, ca_file: str | None, timeout: float) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from coldswarm.common.channel import open_channel

    try:
        with open_channel(address, ca_file) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
    except grpc.RpcError as exc:
        print(
            f"coldswarm-coordinator: {address} is not answering: {exc.code().name} {exc.details()}",
            file=sys.stderr,
        )
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
    print(f"{address}: {name}")
    return 0 if status.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":
        return health_check(args.address, args.ca_file, args.timeout)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = from_args(args)
    except ValueError as exc:
        print(f"coldswarm-coordinator: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "init":
            app = Coordinator(config)
            token = app.init_state()
            print(f"state in {config.data_dir}; version {app.versions.current()} is published")
            if token:
                print(f"admin token written to {config.admin_token_path} (readable only by you)")
            app.stop()
            return 0
        from coldswarm.coordinator.server import start_server

        running = start_server(config)
    except (ConfigError, CoordinatorError) as exc:
        print(f"coldswarm-coordinator: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"coldswarm-coordinator: {exc}", file=sys.stderr)
        return 1
    print(
        f"coldswarm coordinator serving on {running.address}{' (TLS)' if config.tls_cert else ''}; "
        f"data in {config.data_dir}",
        flush=True,
    )
    if running.status_url:
        print(
            f"status page on {running.status_url} (Prometheus metrics at {running.status_url}metrics)",
            flush=True,
        )
    done = threading.Event()
    # Only in this process: the checkpointer's hivemind children are forked from it and must still die of
    # the SIGTERM hivemind ends them with.
    install_stop_handler(lambda _signum: done.set())
    done.wait()
    running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
