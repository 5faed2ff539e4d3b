"""The gRPC channel to a coordinator and the bearer metadata every call carries.

Used by the worker, the admin CLI and ``coldswarm-local``; usable by anything that talks to a coordinator::

    channel = open_channel("127.0.0.1:50051", ca_file=None)
    admin = AdminServiceStub(channel)
    admin.Status(StatusRequest(), metadata=bearer(token))
"""

from __future__ import annotations

from pathlib import Path

import grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Larger TCP reads for 1 MiB chunks (the server sets the same: TCP_TUNING in coordinator/server.py).
    ("grpc.experimental.tcp_min_read_chunk_size", 1024 * 1024),
    ("grpc.experimental.tcp_read_chunk_size", 8 * 1024 * 1024),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 * 1024 * 1024),
    # gRPC's reconnect backoff grows to 120 s by default: a client that started before the coordinator,
    # or outlived its restart, would sit idle for minutes after it is back. Callers retry on their own.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 3000),
]


def open_channel(address: str, ca_file: Path | str | None = None) -> grpc.Channel:
    """A channel to ``HOST:PORT``; TLS when ``ca_file`` names the PEM of the CA that signed the server."""
    if not ca_file:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    root = Path(ca_file).read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), CHANNEL_OPTIONS)


def bearer(token: str) -> list[tuple[str, str]]:
    """The ``authorization: Bearer <token>`` metadata the coordinator authenticates every call by."""
    return [("authorization", f"Bearer {token}")]
