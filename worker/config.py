"""How a volunteer runs ``join-swarm``: one typed dataclass whose fields are the command's flags.

``join-swarm --help`` is generated from these fields (:mod:`coldswarm.common.cli_args`), so each
flag's help text lives here once. Standard library only: building the parser (``--help``) must not
import torch or grpc.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_WORK_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "coldswarm" / "worker"


def _flag(default=None, help: str | None = None, **metadata):
    """A field with its flag's metadata (see :mod:`coldswarm.common.cli_args`); ``default=...``: required."""
    metadata = {"help": help, **metadata} if help is not None else metadata
    if default is ...:
        return field(metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# kw_only: the fields keep the order of `join-swarm --help`, required ones among them.
@dataclass(kw_only=True)
class WorkerConfig:
    """How a volunteer runs ``join-swarm``; every field is a command-line flag."""

    coordinator: str = _flag(..., "the coordinator's gRPC address", metavar="HOST:PORT")
    token: str = _flag(
        ..., "join token from the coordinator's admin (default: $COLDSWARM_TOKEN)", env="COLDSWARM_TOKEN"
    )
    token_file: Path | None = _flag(
        None, "read the join token from FILE instead (keeps it out of the process list)", metavar="FILE"
    )
    data_dir: Path | None = _flag(
        None,
        "your own data: instruction files (FLAN, Alpaca, ShareGPT or chat JSONL) and pretraining "
        "text (.txt, .jsonl, .parquet); default: the embedded default tasks and corpus",
        flag="--data",
        metavar="DIR",
    )
    strict_data: bool = _flag(
        False,
        "fail an assignment at the first malformed record in --data (default: skip it, logging its "
        "file and line)",
        action="store_true",
    )
    work_dir: Path = _flag(DEFAULT_WORK_DIR, "cache and state (default: %(default)s)", metavar="DIR")
    device: str = _flag("auto", "where to train (default: auto)", choices=["auto", "cpu", "cuda"])
    name: str = _flag("", "label shown to the coordinator's admin (default: host name)")
    cpu_threads: int | None = _flag(
        None,
        "CPU threads for training (default: torch's choice, every core). On a machine busy with other "
        "work give fewer than its cores: threads that wait on descheduled siblings make steps many times "
        "slower",
        metavar="N",
    )
    cpu_bf16: bool = _flag(
        False,
        "finetune in bf16 autocast on a CPU that computes bf16 natively (AVX512-BF16 or AMX, e.g. Zen 4, "
        "Sapphire Rapids): about 1.6x fp32's steps per second; ignored, with a warning, on any other CPU",
        action="store_true",
    )
    ca_file: Path | None = _flag(None, "CA certificate when the coordinator serves TLS")
    max_assignments: int = _flag(0, "exit after N assignments (default: never)")
    exit_when_idle_s: float = _flag(
        0.0,
        "exit after this long with no work offered (default: wait forever)",
        flag="--exit-when-idle",
        metavar="SECONDS",
    )
    swarm_host_maddrs: list[str] = _flag(
        [],
        "where the hivemind peer listens in pretrain rounds, e.g. /ip4/0.0.0.0/tcp/31400 (repeatable)",
        flag="--swarm-listen",
        action="append",
        metavar="MULTIADDR",
    )
    swarm_announce_maddrs: list[str] = _flag(
        [],
        "address other peers should dial, e.g. /ip4/<public ip>/tcp/31400 behind NAT (repeatable)",
        flag="--swarm-announce",
        action="append",
        metavar="MULTIADDR",
    )
    log_level: str = _flag("info", choices=["debug", "info", "warning", "error"])
    log_format: str = _flag(
        "auto",
        "auto: human with progress bars on a terminal, JSON lines otherwise",
        choices=["auto", "plain", "json"],
    )
