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
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key (or neither)")

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
