"""What every kind of assignment receives and returns, so the daemon can run any of them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.worker.progress import Progress


class Cancelled(Exception):
    """The job stopped at a step boundary because the worker is stopping or the round closed."""


@dataclass
class JobContext:
    assignment: pb.Assignment
    version_dir: Path
    """The base version, downloaded and verified."""
    scratch_dir: Path
    """This assignment's own folder for intermediate files; removed when the assignment ends."""
    data_dir: Path | None
    """The volunteer's own data (``--data``), or None for the embedded default."""
    device: str
    progress: Progress
    cancel: threading.Event
    """Set when the worker must stop: check it at every step boundary and raise :class:`Cancelled`."""
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set (with ``cancel``) only when the volunteer stops the worker; ``cancel`` alone means the coordinator
    ended the assignment (its round closed), after which a pretrain job still serves the swarm's state."""
    dht_initial_peers: list[str] = field(default_factory=list)
    """The coordinator's DHT peers (from registration), when a pretrain task names none."""
    swarm_host_maddrs: list[str] = field(default_factory=list)
    """Where this worker's hivemind peer listens (empty: hivemind's default, all interfaces)."""
    swarm_announce_maddrs: list[str] = field(default_factory=list)
    """Addresses other peers should dial (a public address behind NAT)."""
    swarm_identity_path: Path | None = None
    """This worker's hivemind identity key (kept in its work dir: one peer id across assignments)."""
    swarm_credential: Callable[[bytes], pb.SwarmCredential] | None = None
    """``public_key -> SwarmCredential``: asks the coordinator to admit this worker's peer to the assignment's
    swarm (one ``GetSwarmCredential`` call, no retries)."""
    cpu_bf16: bool = False
    """Finetune in bf16 autocast on a CPU that computes bf16 natively (``--cpu-bf16``)."""
    on_bad_record: str = "skip"
    """A malformed record in ``data_dir``: "skip" it (logged with its file and line) or "raise" (the
    assignment fails, naming it)."""

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("stopped at a step boundary")


@dataclass
class JobResult:
    payload: Path | None = None
    """An encoded contribution to upload (fusion jobs); None when nothing is uploaded (pretrain)."""
    codec: str = "none"
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
