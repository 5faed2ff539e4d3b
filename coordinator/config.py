"""The coordinator's configuration: one typed dataclass, every field with its help.

``coldswarm-coordinator serve`` builds its flags from these fields (see
:func:`add_arguments`), so the help text lives in one place.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from coldswarm.common import cli_args
from coldswarm.coordinator.publication_gate import POLICIES

MiB = 1024 * 1024


def _opt(default, help: str, hidden: bool = False):
    """A config field with its ``--help`` text; ``hidden`` keeps a testing knob out of ``--help``."""
    metadata = {"help": help, "hidden": hidden}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class CoordinatorConfig:
    """Settings of one coordinator. Paths are resolved against the working directory."""

    data_dir: Path = _opt(
        Path("coldswarm-data"),
        "Where the coordinator keeps its state (SQLite), blobs, versions and admin token.",
    )
    listen: str = _opt("127.0.0.1:50051", "HOST:PORT to serve gRPC on (port 0 picks a free one).")
    tls_cert: Path | None = _opt(None, "PEM certificate of this server; with --tls-key turns on TLS.")
    tls_key: Path | None = _opt(None, "PEM private key matching --tls-cert.")
    base_model: Path | None = _opt(
        None,
        "An HF model directory (safetensors weights) to become version 0 when the state has no "
        "version yet. Without it the embedded default (coldswarm.lm) is used when installed.",
    )
    threads: int = _opt(64, "gRPC worker threads (each in-flight RPC holds one).")
    # Limits at the door (coordinator/README.md, "Limits"): streams hold a thread while they last.
    max_streams: int = _opt(
        0,
        "Streaming calls (uploads, downloads, reflection) served at once; more get UNAVAILABLE. "
        "0: three quarters of --threads, keeping the rest for unary calls (health, admin, heartbeats).",
    )
    max_streams_per_caller: int = _opt(
        4,
        "Streaming calls one caller (a token; without a valid token, a peer address) may hold at once; "
        "more get RESOURCE_EXHAUSTED.",
    )
    max_anonymous_streams: int = _opt(
        0, "Streaming calls without a valid token (reflection) at once, all peers together. 0: max_streams/4."
    )
    stream_idle_s: float = _opt(
        60.0, "A stream that sends (or reads) nothing for this long is ended with DEADLINE_EXCEEDED."
    )
    stream_max_s: float = _opt(
        3600.0,
        "A stream is ended (DEADLINE_EXCEEDED) after this long however busy; uploads and downloads resume.",
    )
    max_metrics_bytes: int = _opt(
        16 * 1024,
        "Largest metrics a worker may send: BeginUpload's metrics_json, a heartbeat's or report's metrics "
        "as JSON (at most 256 KiB).",
    )
    max_options_bytes: int = _opt(64 * 1024, "Largest round or merge options JSON (at most 256 KiB).")
    max_upload_bytes: int = _opt(
        2048 * MiB,
        "Largest contribution accepted, on the wire and once decoded; larger ones get RESOURCE_EXHAUSTED.",
    )
    chunk_bytes: int = _opt(1 * MiB, "Bytes per chunk in downloads, and the most accepted per upload chunk.")
    heartbeat_interval_s: float = _opt(10.0, "How often workers are told to heartbeat.")
    worker_gone_after_s: float = _opt(
        60.0, "A worker not heard from for this long is shown as gone and its assignment freed."
    )
    default_quorum: int = _opt(2, "Contributions that close a fusion round when the round names none.")
    default_deadline_s: float = _opt(3600.0, "Seconds a round stays open when the round names no deadline.")
    default_method: str = _opt("average", "Merge method of fusion rounds that name none.")
    auto_publish: bool = _opt(
        True, "Publish a round's merged version at once (else it stays a candidate until `publish`)."
    )
    publish_policy: str = _opt(
        "if-better",
        "Publication gate of rounds whose options name none: if-better publishes a result only if its gate "
        "metric is no worse than its parent's (needs --evaluator; without one every result is published), "
        "always publishes every result. A round's gate option overrides it (coordinator/README.md, "
        "'The publication gate').",
    )
    evaluator: str = _opt(
        "",
        "Optional 'module:function' called as function(version_dir) -> metrics dict after a merge "
        "(e.g. an evaluator from coldswarm.lm). Empty: no evaluation.",
    )
    dht_peers: list[str] = _opt([], "Multiaddrs of the swarm's DHT bootstrap peers handed to workers.")
    dht_listen: list[str] = _opt(
        [],
        "Multiaddrs for the swarm's DHT bootstrap peer and pretrain checkpointer, e.g. "
        "/ip4/0.0.0.0/tcp/31337 (needs hivemind). Off when empty: pretrain rounds then use --dht-peers.",
    )
    dht_announce: list[str] = _opt(
        [], "Multiaddrs workers should dial for that peer (public address behind NAT)."
    )
    swarm_credential_ttl_s: float = _opt(
        600.0,
        "Lifetime of the credentials that admit workers' hivemind peers to a pretrain swarm (renewed at half of "
        "it): a worker whose token is revoked drops out of the swarm within this long.",
    )
    join_token_file: Path | None = _opt(
        None,
        "Also mint a join token at first start and write it to this file (mode 0600), e.g. for "
        "workers on the same machine or a shared volume; kept across restarts while valid.",
    )
    merge_delay_s: float = _opt(
        0.0,
        "Testing only: sleep this long inside every merge, after the merged weights are written "
        "and before the version is recorded (env COLDSWARM_TEST_MERGE_DELAY_S), so a test can "
        "kill the coordinator mid-merge.",
        hidden=True,
    )
    tick_s: float = _opt(1.0, "How often deadlines are checked and heartbeats flushed to the state.")
    http_listen: str = _opt(
        "",
        "HOST:PORT to serve the status page and Prometheus /metrics on (read-only; TLS with --tls-cert). "
        "Off when empty; port 0 picks a free one.",
    )
    http_timeout_s: float = _opt(
        10.0,
        "Seconds an HTTP client has to send a complete request; idle connections close after it too.",
    )
    series_max_points: int = _opt(
        2000, "Points kept per pretrain round and source of the swarm's curves (thinned evenly past it)."
    )
    series_interval_s: float = _opt(2.0, "Least seconds between two points of a pretrain round's curve.")

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)
        if self.tls_cert is not None:
            self.tls_cert = Path(self.tls_cert)
        if self.tls_key is not None:
            self.tls_key = Path(self.tls_key)
        if self.base_model is not None:
            self.base_model = Path(self.base_model)
        if self.join_token_file is not None:
            self.join_token_file = Path(self.join_token_file)
        if not self.merge_delay_s:
            self.merge_delay_s = float(os.environ.get("COLDSWARM_TEST_MERGE_DELAY_S", "0") or 0)
        if self.http_timeout_s <= 0:
            raise ValueError("--http-timeout-s must be positive")
        if self.series_max_points < 4:
            raise ValueError("--series-max-points must be at least 4")
        if self.series_interval_s < 0:
            raise ValueError("--series-interval-s must not be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (or neither)")
        if self.publish_policy not in POLICIES:
            raise ValueError(f"--publish-policy must be one of {list(POLICIES)}, not {self.publish_policy!r}")
        self._check_limits()

    def _check_limits(self) -> None:
        if self.threads < 2:
            raise ValueError("--threads must be at least 2 (streams may take at most all but one)")
        if not 0 <= self.max_streams < self.threads:
            raise ValueError("--max-streams must be below --threads (0: three quarters of them)")
        if self.max_streams_per_caller < 1 or self.max_anonymous_streams < 0:
            raise ValueError(
                "--max-streams-per-caller must be at least 1, --max-anonymous-streams not negative"
            )
        if not (self.stream_idle_s > 0 and self.stream_max_s > 0):
            raise ValueError("--stream-idle-s and --stream-max-s must be positive")
        for name in ("max_metrics_bytes", "max_options_bytes"):
            if not 1024 <= getattr(self, name) <= 256 * 1024:
                raise ValueError(f"--{name.replace('_', '-')} must be between 1 KiB and 256 KiB")

    @property
    def stream_slots(self) -> int:
        """Streaming calls served at once (``max_streams``, or three quarters of the threads)."""
        return self.max_streams or max(1, self.threads * 3 // 4)

    @property
    def anonymous_stream_slots(self) -> int:
        """Streaming calls without a valid token served at once."""
        return min(self.max_anonymous_streams or max(1, self.stream_slots // 4), self.stream_slots)

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def swarm_key_path(self) -> Path:
        """The swarm authority's key: it signs swarm credentials and is the DHT peer's identity (owner-only)."""
        return self.data_dir / "dht.key"


def add_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per config field, with the field's help and default."""
    cli_args.add_arguments(parser, CoordinatorConfig, skip=skip)


def from_args(args: argparse.Namespace) -> CoordinatorConfig:
    return cli_args.from_args(CoordinatorConfig, args)
