"""The swarm's curves per pretrain round: loss, samples/s and peers over time, durable and bounded.

Two sources feed a round's curves, kept apart (``round_series.source``):

- ``dht``: what the swarm publishes on the DHT, read by the pretrain collector every few seconds
  while the round trains (:meth:`Checkpointer.swarm_metrics`): the loss averaged over the peers
  weighted by their samples (each peer's mean over its last steps), samples/s summed over the
  peers' records, the number of peers that published, the newest epoch;
- ``heartbeats``: what the round's workers send with their heartbeats (``HeartbeatRequest.loss``,
  ``samples_per_s``, ``metrics["epoch"]``), gathered in memory and written by the ticker: the loss
  averaged over the workers training now (each its last step's loss), samples/s summed, the number
  of workers heard from within ``heartbeat_window_s``, the newest epoch.

Points are rows in SQLite, so a restart keeps every curve. A round's source holds at most
``max_points``: points are spaced at least ``min_interval_s`` apart, and further as the round grows
(the span so far over half of ``max_points``), and when a source still reaches ``max_points`` every
other point is dropped (the first and the last kept), halving its resolution evenly.

Values are untrusted (a worker's heartbeat says what it likes): a value that is not finite or lies
outside its field's bound is left out of the point, and a point with no value is not stored.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from coldswarm.coordinator.states import RoundKind
from coldswarm.coordinator.store import Store

log = logging.getLogger(__name__)


class SeriesSource:
    """Where a point came from (``round_series.source``)."""

    DHT = "dht"  # the swarm's own records on the DHT, read by the pretrain collector
    HEARTBEATS = "heartbeats"  # the round's workers' heartbeats


SOURCES = (SeriesSource.DHT, SeriesSource.HEARTBEATS)

#: the fields of a point, and the largest value each may take (anything larger is not believed)
BOUNDS: dict[str, float] = {"loss": 1e6, "samples_per_s": 1e9, "peers": 1e6, "epoch": 2.0**53}
FIELDS = tuple(BOUNDS)

#: the heartbeat phase in which a worker's loss and samples/s describe training
TRAINING_PHASE = "training"


@dataclass(frozen=True)
class SeriesPoint:
    t: float  # seconds since the epoch
    loss: float | None
    samples_per_s: float | None
    peers: float | None
    epoch: float | None


def clean(name: str, value) -> float | None:
    """``value`` as a float when it is finite and within ``[0, BOUNDS[name]]``, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0 or number > BOUNDS[name]:
        return None
    return number


def dht_values(swarm_metrics: Mapping[str, float]) -> dict[str, float]:
    """A point from :meth:`Checkpointer.swarm_metrics` (its ``swarm_*`` names)."""
    return {
        "loss": swarm_metrics.get("swarm_loss"),
        "samples_per_s": swarm_metrics.get("swarm_samples_per_s"),
        "peers": swarm_metrics.get("swarm_peers"),
        "epoch": swarm_metrics.get("swarm_epoch_reported"),
    }


@dataclass
class _Span:
    first: float = 0.0
    last: float = 0.0
    count: int = 0


@dataclass(frozen=True)
class _Beat:
    t: float
    step: int
    loss: float | None
    samples_per_s: float | None
    epoch: float | None


class SwarmSeries:
    """Records and reads the ``round_series`` table; gathers heartbeats into points."""

    def __init__(
        self,
        store: Store,
        max_points: int = 2000,
        min_interval_s: float = 2.0,
        heartbeat_window_s: float = 30.0,
    ):
        if max_points < 4:
            raise ValueError("a curve needs room for at least 4 points")
        self.store = store
        self.max_points = int(max_points)
        self.min_interval_s = float(min_interval_s)
        self.heartbeat_window_s = float(heartbeat_window_s)
        self._lock = threading.Lock()
        self._spans: dict[tuple[int, str], _Span] = {}
        self._beats: dict[int, dict[str, _Beat]] = {}  # round -> worker -> its latest training heartbeat
        self._fresh: set[int] = set()  # rounds with heartbeats since their last point
        self._round_of: dict[str, int | None] = {}  # assignment id -> its pretrain round (None: not one)

    # -- writing --------------------------------------------------------------------------

    def record(self, round_id: int, source: str, values: Mapping[str, float], t: float | None = None) -> bool:
        """Store a point of ``round_id``'s ``source`` curve, unless the last one is too recent or no
        value is believable. Returns whether it was stored."""
        if source not in SOURCES:
            raise ValueError(f"unknown series source {source!r}")
        t = time.time() if t is None else float(t)
        point = {name: clean(name, values.get(name)) for name in FIELDS}
        if all(v is None for v in point.values()):
            return False
        with self._lock:
            span = self._span(round_id, source)
            if span.count and t - span.last < self._spacing(span, t):
                return False
            with self.store.tx() as c:
                c.execute(
                    "INSERT INTO round_series(round_id, source, t, loss, samples_per_s, peers, epoch) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (round_id, source, t, *(point[name] for name in FIELDS)),
                )
                if not span.count:
                    span.first = t
                span.last, span.count = max(span.last, t), span.count + 1
                if span.count > self.max_points:
                    span.count = self._halve(c, round_id, source)
        return True

    def _span(self, round_id: int, source: str) -> _Span:
        key = (round_id, source)
        if key not in self._spans:
            r = self.store.one(
                "SELECT MIN(t), MAX(t), COUNT(*) FROM round_series WHERE round_id=? AND source=?",
                (round_id, source),
            )
            self._spans[key] = _Span(float(r[0] or 0.0), float(r[1] or 0.0), int(r[2]))
        return self._spans[key]

    def _spacing(self, span: _Span, t: float) -> float:
        """Seconds a new point keeps from the last: a long round's curve spreads its points evenly."""
        return max(self.min_interval_s, (t - span.first) / (self.max_points / 2))

    @staticmethod
    def _halve(c, round_id: int, source: str) -> int:
        """Drop every other point of a curve (keeping its first and last); returns the points left."""
        c.execute(
            "DELETE FROM round_series WHERE id IN (SELECT id FROM ("
            "  SELECT id, ROW_NUMBER() OVER (ORDER BY t, id) AS n, COUNT(*) OVER () AS total"
            "  FROM round_series WHERE round_id=? AND source=?) WHERE n % 2 = 0 AND n < total)",
            (round_id, source),
        )
        r = c.execute(
            "SELECT COUNT(*) FROM round_series WHERE round_id=? AND source=?", (round_id, source)
        ).fetchone()
        return int(r[0])

    # -- heartbeats -----------------------------------------------------------------------

    def on_heartbeat(self, worker_id: str, progress: Mapping, t: float) -> None:
        """Every heartbeat passes here (:attr:`WorkerRegistry.on_heartbeat`): in memory only, the ticker's
        :meth:`flush` writes the points. A worker that stops training leaves its round's curve."""
        assignment = str(progress.get("assignment_id") or "")
        round_id = self._pretrain_round_of(assignment) if assignment else None
        training = round_id is not None and progress.get("phase") == TRAINING_PHASE
        metrics = progress.get("metrics") or {}
        beat = _Beat(
            t=t,
            step=int(progress.get("step") or 0),
            loss=clean("loss", progress.get("loss")),
            samples_per_s=clean("samples_per_s", progress.get("samples_per_s")),
            epoch=clean("epoch", metrics.get("epoch")) if isinstance(metrics, Mapping) else None,
        )
        with self._lock:
            for rid, beats in self._beats.items():
                if rid != round_id or not training:
                    beats.pop(worker_id, None)
            if training:
                self._beats.setdefault(round_id, {})[worker_id] = beat
                self._fresh.add(round_id)

    def _pretrain_round_of(self, assignment_id: str) -> int | None:
        with self._lock:
            if assignment_id in self._round_of:
                return self._round_of[assignment_id]
        r = self.store.one(
            "SELECT a.round_id, r.kind FROM assignments a JOIN rounds r ON r.id=a.round_id WHERE a.id=?",
            (assignment_id,),
        )
        round_id = int(r["round_id"]) if r is not None and r["kind"] == RoundKind.PRETRAIN else None
        with self._lock:
            if len(self._round_of) > 10_000:  # bounded: assignments of old rounds are asked no more
                self._round_of.clear()
            self._round_of[assignment_id] = round_id
        return round_id

    def flush(self, now: float | None = None) -> None:
        """Write a heartbeat point for each round heard from since its last one (the ticker calls this)."""
        now = time.time() if now is None else now
        with self._lock:
            fresh, self._fresh = self._fresh, set()
            pending = {}
            for round_id in fresh:
                beats = self._beats.get(round_id, {})
                for worker_id in [w for w, b in beats.items() if now - b.t > self.heartbeat_window_s]:
                    del beats[worker_id]
                if beats:
                    pending[round_id] = list(beats.values())
        for round_id, beats in pending.items():
            losses = [b.loss for b in beats if b.loss is not None and b.step > 0]
            rates = [b.samples_per_s for b in beats if b.samples_per_s is not None]
            epochs = [b.epoch for b in beats if b.epoch is not None]
            values = {
                "loss": sum(losses) / len(losses) if losses else None,
                "samples_per_s": sum(rates) if rates else None,
                "peers": float(len(beats)),
                "epoch": max(epochs) if epochs else None,
            }
            if not self.record(round_id, SeriesSource.HEARTBEATS, values, now):
                with self._lock:  # too soon after the last point: the next tick tries again
                    self._fresh.add(round_id)

    # -- reading --------------------------------------------------------------------------

    def points(self, round_id: int) -> dict[str, list[SeriesPoint]]:
        """Every point of ``round_id``'s curves, oldest first, per source (sources without points absent)."""
        out: dict[str, list[SeriesPoint]] = {}
        for r in self.store.all(
            "SELECT source, t, loss, samples_per_s, peers, epoch FROM round_series WHERE round_id=? "
            "ORDER BY source, t, id",
            (round_id,),
        ):
            out.setdefault(r["source"], []).append(
                SeriesPoint(r["t"], r["loss"], r["samples_per_s"], r["peers"], r["epoch"])
            )
        return out

    def latest(self, round_id: int, source: str) -> SeriesPoint | None:
        r = self.store.one(
            "SELECT t, loss, samples_per_s, peers, epoch FROM round_series WHERE round_id=? AND source=? "
            "ORDER BY t DESC, id DESC LIMIT 1",
            (round_id, source),
        )
        return (
            None if r is None else SeriesPoint(r["t"], r["loss"], r["samples_per_s"], r["peers"], r["epoch"])
        )

    def rounds(self) -> list[int]:
        """The rounds that have points, oldest first."""
        return [
            int(r[0]) for r in self.store.all("SELECT DISTINCT round_id FROM round_series ORDER BY round_id")
        ]
