"""The worker's identity with one coordinator, kept across restarts in a file only its owner reads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from coldswarm.common.durable import write_private


@dataclass
class Session:
    coordinator: str
    worker_id: str
    session_token: str
    heartbeat_interval_s: float
    dht_initial_peers: list[str]
    bandwidth_bytes_per_s: float = 0.0
    """Measured after registering; sent with the next registration's capabilities."""


def load_session(path: Path, coordinator: str) -> Session | None:
    """The saved session for ``coordinator``, or None (none saved, another coordinator, unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
        session = Session(**data)
    except (OSError, ValueError, TypeError):
        return None
    return session if session.coordinator == coordinator else None


def save_session(path: Path, session: Session) -> None:
    write_private(Path(path), json.dumps(asdict(session)))
