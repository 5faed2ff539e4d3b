"""The gRPC server: coordinator services, health, reflection, optional TLS; the status page beside it."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coldswarm.coordinator.app import Coordinator
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.metrics import CoordinatorMetrics
from coldswarm.coordinator.rpc_metrics import MetricsInterceptor
from coldswarm.coordinator.service import COORDINATOR_VERSION, AdminServicer, WorkerServicer
from coldswarm.coordinator.stream_guard import StreamGuard, StreamLimits
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Larger TCP reads: version files and uploads move in 1 MiB messages; with the default read
# sizes gRPC handles them in many small pieces (measured: ~20% more throughput on loopback).
TCP_TUNING = [
    ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
    ("grpc.experimental.tcp_read_chunk_size", 8 * 1024 * 1024),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 * 1024 * 1024),
]
# gRPC's own bounds on connections (a connection's streams are bounded by StreamGuard): dead peers are
# found by keepalive pings and their calls cancelled; connections with no call are closed after a while;
# no connection lives for ever (after its age, GOAWAY, then a grace for calls in flight), which also bounds
# a call whose client never finishes sending its request; a connection carries at most so many streams.
CONNECTION_LIMITS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_connection_idle_ms", 10 * 60_000),
    ("grpc.max_connection_age_ms", 4 * 3600_000),
    ("grpc.max_connection_age_grace_ms", 10 * 60_000),
    ("grpc.max_concurrent_streams", 100),
]
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["WorkerService"].full_name,
    pb.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


@dataclass
class RunningServer:
    """A started server; ``stop()`` ends it and the coordinator's threads."""

    server: grpc.Server
    app: Coordinator
    port: int
    address: str
    health: health.HealthServicer
    collector: object | None = None  # the PretrainCollector, with --dht-listen
    metrics: CoordinatorMetrics | None = None
    status: object | None = None  # the StatusServer, with --http-listen
    guard: StreamGuard | None = None

    @property
    def status_url(self) -> str:
        """The status page's address ("" without --http-listen)."""
        return self.status.url if self.status is not None else ""

    def stop(self, grace: float = 2.0) -> None:
        if self.status is not None:
            self.status.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.guard is not None:
            self.guard.stop()
        if self.collector is not None:
            self.collector.stop()
        self.app.stop()


def _grpc_server(config: CoordinatorConfig, guard: StreamGuard, metrics: CoordinatorMetrics) -> grpc.Server:
    """The gRPC server with the coordinator's limits: message sizes, connections, the queue, interceptors."""
    # An upload chunk is at most chunk_bytes of data plus a little framing; the coordinator refuses a
    # larger one itself (and discards the upload), so gRPC's own limit, whose refusal the server cannot
    # tell from a client breaking off, is set well above it. Replies (a page of a listing) stay below 1 MiB.
    receive_limit = 4 * config.chunk_bytes + 64 * 1024
    send_limit = max(config.chunk_bytes, 1024 * 1024) + 64 * 1024
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="coldswarm-rpc"),
        interceptors=[guard, MetricsInterceptor(metrics)],
        options=[
            ("grpc.max_receive_message_length", receive_limit),
            ("grpc.max_send_message_length", send_limit),
            ("grpc.so_reuseport", 0),
            *CONNECTION_LIMITS,
            *TCP_TUNING,
        ],
        # Calls beyond this wait for no thread: RESOURCE_EXHAUSTED at once (a queue, not a backlog).
        maximum_concurrent_rpcs=config.threads * 8,
    )


def start_server(config: CoordinatorConfig) -> RunningServer:
    """Initialise the state (admin token, version 0), recover, and serve on ``config.listen``.

    With ``--dht-listen`` the coordinator runs the pretrain collector and hands out its DHT peer.
    """
    collector = None
    if config.dht_listen:
        from coldswarm.coordinator.pretrain_collector import PretrainCollector

        collector = PretrainCollector(config.dht_listen, config.dht_announce, config.swarm_key_path)
    app = Coordinator(config, dht_peers=None if collector is None else collector.initial_peers)
    metrics = CoordinatorMetrics(app)
    app.merges.on_stage_seconds.append(metrics.observe_stage)  # before start(): recovery may merge
    token = app.init_state()
    if token is not None:
        # Said once, at first start; the file stays readable only by this user.
        print(f"admin token written to {config.admin_token_path} (readable only by you)", flush=True)
    app.start()
    if collector is not None:
        collector.start(app)  # before the server takes RPCs, so every Register gets its peer
    guard = StreamGuard(
        StreamLimits(
            total=config.stream_slots,
            per_caller=config.max_streams_per_caller,
            anonymous=config.anonymous_stream_slots,
            idle_s=config.stream_idle_s,
            max_s=config.stream_max_s,
        ),
        caller_of=app.auth.caller_id,
    )
    server = _grpc_server(config, guard, metrics)
    pb_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(app), server)
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(app), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if config.tls_cert is not None:
        creds = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
        port = server.add_secure_port(config.listen, creds)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        guard.stop()
        if collector is not None:
            collector.stop()
        app.stop()
        raise OSError(f"cannot listen on {config.listen} (address in use?)")
    server.start()
    host = config.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    log.info("serving on %s%s", address, " with TLS" if config.tls_cert else "")
    running = RunningServer(server, app, port, address, health_servicer, collector, metrics, guard=guard)
    if config.http_listen:
        from coldswarm.coordinator.status_http import StatusServer

        try:
            running.status = StatusServer(app, config, metrics, COORDINATOR_VERSION).start()
        except BaseException:
            running.stop(grace=0)
            raise
    return running
