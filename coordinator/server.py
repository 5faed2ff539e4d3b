"""The gRPC server: coordinator services, health, reflection, optional TLS."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coldswarm.coordinator.app import Coordinator
from coldswarm.coordinator.config import CoordinatorConfig
from coldswarm.coordinator.service import AdminServicer, WorkerServicer
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

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.collector is not None:
            self.collector.stop()
        self.app.stop()


def start_server(config: CoordinatorConfig) -> RunningServer:
    """Initialise the state (admin token, version 0), recover, and serve on ``config.listen``.

    With ``--dht-listen`` the coordinator runs the pretrain collector and hands out its DHT peer.
    """
    collector = None
    if config.dht_listen:
        from coldswarm.coordinator.pretrain_collector import PretrainCollector

        collector = PretrainCollector(config.dht_listen, config.dht_announce, config.swarm_key_path)
    app = Coordinator(config, dht_peers=None if collector is None else collector.initial_peers)
    token = app.init_state()
    if token is not None:
        # Said once, at first start; the file stays readable only by this user.
        print(f"admin token written to {config.admin_token_path} (readable only by you)", flush=True)
    app.start()
    if collector is not None:
        collector.start(app)  # before the server takes RPCs, so every Register gets its peer
    # An upload chunk is at most chunk_bytes of data plus a little framing.
    limit = config.chunk_bytes + 64 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="coldswarm-rpc"),
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            *TCP_TUNING,
        ],
        maximum_concurrent_rpcs=None,
    )
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
        if collector is not None:
            collector.stop()
        app.stop()
        raise OSError(f"cannot listen on {config.listen} (address in use?)")
    server.start()
    host = config.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    log.info("serving on %s%s", address, " with TLS" if config.tls_cert else "")
    return RunningServer(server, app, port, address, health_servicer, collector)
