"""Progress a worker shows to its volunteer and reports to the coordinator.

On a terminal: tqdm bars for download, training and upload. Elsewhere (a
service, a container, CI): no bars, one JSON object per log line, so logs stay
quiet and machine-readable.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from coldswarm.proto import coldswarm_pb2 as pb


@dataclass
class Progress:
    """What the heartbeat thread reports; written by the job, read by the heartbeat."""

    assignment_id: str = ""
    phase: str = "idle"
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    samples_per_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    bandwidth_bytes_per_s: float = 0.0
    """Measured download rate from the coordinator, sent with every heartbeat once known."""
    show_bar: bool = False
    """Draw a tqdm bar while training (the daemon sets it on a terminal)."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _bar: object = field(default=None, repr=False)

    def update(self, **fields) -> None:
        with self.lock:
            for key, value in fields.items():
                setattr(self, key, value)
            if self.show_bar:
                self._draw()

    def _draw(self) -> None:
        """One bar per training phase: steps (of total_steps when known), loss and samples/s."""
        if self.phase != "training":
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            return
        if self._bar is None:
            from tqdm import tqdm

            total = self.total_steps or None  # a pretrain run's length is the swarm's, not known here
            self._bar = tqdm(total=total, desc=f"training {self.assignment_id}", unit="step", leave=False)
        self._bar.n = self.step
        self._bar.set_postfix(
            loss=f"{self.loss:.3f}", samples_per_s=f"{self.samples_per_s:.1f}", refresh=False
        )
        self._bar.refresh()

    def heartbeat(self) -> pb.HeartbeatRequest:
        with self.lock:
            return pb.HeartbeatRequest(
                assignment_id=self.assignment_id,
                phase=self.phase,
                step=self.step,
                total_steps=self.total_steps,
                loss=self.loss,
                samples_per_s=self.samples_per_s,
                metrics={k: float(v) for k, v in self.metrics.items()}
                | (
                    {"bandwidth_bytes_per_s": self.bandwidth_bytes_per_s}
                    if self.bandwidth_bytes_per_s
                    else {}
                ),
            )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def interactive() -> bool:
    return sys.stderr.isatty()


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """``fmt``: ``auto`` (human on a terminal, JSON otherwise), ``plain`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not interactive())
    handler.setFormatter(
        JsonFormatter() if use_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hivemind installs its own handler and is chatty at INFO.
    logging.getLogger("hivemind").setLevel(logging.WARNING)


@contextmanager
def byte_bar(description: str, total: int):
    """A callback that counts bytes: a tqdm bar on a terminal, a log line at the end otherwise."""
    started = time.monotonic()
    done = [0]
    bar = None
    if interactive():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, leave=False)

    def advance(n: int) -> None:
        done[0] += n
        if bar is not None:
            bar.update(n)

    try:
        yield advance
    finally:
        if bar is not None:
            bar.close()
        elapsed = max(time.monotonic() - started, 1e-9)
        logging.getLogger("coldswarm.worker").info(
            "%s: %d bytes in %.1fs (%.1f MB/s)", description, done[0], elapsed, done[0] / elapsed / 1e6
        )
