"""The worker's identity with one coordinator, kept across restarts in a file only its owner reads."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Session:
    coordinator: str
    worker_id: str
    session_token: str
    heartbeat_interval_s: float
    dht_initial_peers: list[str]
    bandwidth_bytes_per_s: float = 0.0
    """Measured after registering; sent with the next registration's capabilities."""


def write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` with mode 0600 from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
