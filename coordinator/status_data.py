"""What the status page shows, as one JSON-able snapshot, and who may see which part of it.

:class:`StatusData` reads the coordinator's parts (no HTTP here) into a plain dict: the lineage
(:mod:`coldswarm.coordinator.lineage`) and its charts, the rounds and the live one, a pretrain
round's swarm curves (:mod:`coldswarm.coordinator.series`) and the workers.

Anyone may see what a volunteer may know: versions and their metrics, round progress, how many
workers there are and their total throughput. Only the admin sees per-worker rows (ids, names, join
token labels, addresses), the worker ids behind each version's contributions and rounds' error
messages (they may name paths on the coordinator). No token is ever in a snapshot: tokens are
stored as hashes and only the join token's *label* is read.

Snapshots are cached for ``cache_s`` per view, so any number of open pages cost the coordinator
one read per second.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass

from coldswarm.coordinator import lineage
from coldswarm.coordinator.errors import NotFound
from coldswarm.coordinator.series import FIELDS, SOURCES, TRAINING_PHASE, SeriesSource
from coldswarm.coordinator.states import AssignmentState, RoundKind, WorkerState
from coldswarm.proto import coldswarm_pb2 as pb

#: the most rows of each kind one snapshot carries (newest kept); the page says when it shows fewer
MAX_VERSIONS = 500
MAX_ROUNDS = 200
MAX_WORKERS = 500
#: how the page names each source of a round's curves, and the colour it draws it in
SOURCE_LABELS = {
    SeriesSource.DHT: {"label": "swarm (DHT records)", "color": lineage.PALETTE[0]},
    SeriesSource.HEARTBEATS: {"label": "workers' heartbeats", "color": lineage.PALETTE[1]},
}


@dataclass(frozen=True)
class View:
    """Which snapshot: the admin's or anyone's, and the pretrain round whose curves it carries (None:
    the live pretrain round, else the latest with curves)."""

    admin: bool = False
    series_round: int | None = None


def jsonable(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _capabilities(blob: bytes) -> pb.Capabilities:
    caps = pb.Capabilities()
    try:
        caps.ParseFromString(blob)
    except Exception:  # stored by us from a parsed message; an old row must not break the page
        pass
    return caps


def _progress(progress_json: str) -> dict:
    try:
        progress = json.loads(progress_json or "{}")
    except ValueError:
        return {}
    return progress if isinstance(progress, dict) else {}


def _number(value, upper: float = 1e12) -> float | None:
    """A worker-reported number, if believable (heartbeats are untrusted)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and 0 <= number <= upper else None


class StatusData:
    def __init__(self, app, cache_s: float = 1.0, coordinator_version: str = ""):
        self.app = app
        self.cache_s = cache_s
        self.coordinator_version = coordinator_version
        self._lock = threading.Lock()
        self._cache: dict[View, tuple[float, dict]] = {}

    def snapshot(self, view: View) -> dict:
        """The snapshot for ``view`` (cached ``cache_s``). Raises NotFound for a round without curves."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(view)
            if hit is not None and now - hit[0] < self.cache_s:
                return hit[1]
        data = jsonable(self._build(view))
        with self._lock:
            if len(self._cache) > 64:  # bounded: views differ only by the admin bit and a round id
                self._cache.clear()
            self._cache[view] = (now, data)
        return data

    # -- the parts ------------------------------------------------------------------------

    def _build(self, view: View) -> dict:
        app = self.app
        rounds = app.rounds.list()
        live = app.rounds.live()
        series = self._series(view.series_round, live, {r.id: r for r in rounds})  # first: it may refuse
        entries = self._entries()
        return {
            "generated_at": time.time(),
            "admin": view.admin,
            "coordinator": {
                "version": self.coordinator_version,
                "uptime_s": app.uptime(),
                "published_version": app.versions.current(),
                "versions": len(entries),
                "rounds": len(rounds),
            },
            "versions": [e.as_dict(with_contributors=view.admin) for e in entries[-MAX_VERSIONS:]],
            "versions_shown": min(len(entries), MAX_VERSIONS),
            "lineage_charts": lineage.charts(entries[-MAX_VERSIONS:]),
            "state_styles": {
                **lineage.STATE_STYLE,
                "other": lineage.OTHER_STATE_STYLE,
                "current": lineage.CURRENT_STYLE,
            },
            "series_sources": SOURCE_LABELS,
            "live_round": self._live(live),
            "rounds": [self._round(r, view.admin) for r in rounds[-MAX_ROUNDS:]][::-1],
            "rounds_shown": min(len(rounds), MAX_ROUNDS),
            "series": series,
            "series_rounds": app.series.rounds(),
            "workers": self._workers(view.admin),
        }

    def _entries(self) -> list[lineage.LineageEntry]:
        current = self.app.versions.current()
        worker_of = {
            r["id"]: r["worker_id"]
            for r in self.app.store.all(
                "SELECT c.id, c.worker_id FROM contributions c JOIN versions v ON v.round_id = c.round_id "
                "WHERE v.number > (SELECT COALESCE(MAX(number), 0) FROM versions) - ?",
                (MAX_VERSIONS,),
            )
        }
        return [
            lineage.entry(
                number=r["number"],
                parent=r["parent"],
                round_id=r["round_id"],
                method=r["method"],
                state=r["state"],
                is_current=r["number"] == current,
                created_at=r["created_at"],
                manifest=r["manifest_json"],
                worker_of=worker_of,
            )
            for r in self.app.store.all(
                "SELECT number, parent, round_id, method, state, created_at, manifest_json FROM versions "
                "ORDER BY number"
            )
        ]

    @staticmethod
    def _round(r, admin: bool) -> dict:
        return {
            "id": r.id,
            "kind": r.kind,
            "state": r.state,
            "base_version": r.base_version,
            "result_version": r.result_version,
            "contributions": r.contributions,
            "quorum": r.quorum,
            "method": r.method,
            "opened_at": r.opened_at,
            "closed_at": r.closed_at or None,
            "deadline": r.deadline,
            "epochs": int(r.options.get("epochs", 1)) if r.kind == RoundKind.PRETRAIN else None,
            "error": r.error if admin else ("(the admin sees why)" if r.error else ""),
        }

    def _live(self, live) -> dict | None:
        if live is None:
            return None
        out = self._round(live, admin=False)
        del out["error"]
        out["working"] = int(
            self.app.store.one(
                "SELECT COUNT(*) FROM assignments WHERE round_id=? AND state=?",
                (live.id, AssignmentState.ACTIVE),
            )[0]
        )
        out["deadline_in_s"] = live.deadline - time.time()
        if live.kind == RoundKind.PRETRAIN:
            out["swarm"] = {
                source: (None if p is None else {name: getattr(p, name) for name in ("t", *FIELDS)})
                for source in SOURCES
                for p in [self.app.series.latest(live.id, source)]
            }
        return out

    def _series(self, wanted: int | None, live, rounds: dict) -> dict | None:
        series = self.app.series
        if wanted is not None:
            if wanted not in rounds or rounds[wanted].kind != RoundKind.PRETRAIN:
                raise NotFound(f"round {wanted} is not a pretrain round of this coordinator")
            round_id = wanted
        elif live is not None and live.kind == RoundKind.PRETRAIN:
            round_id = live.id
        else:
            with_points = series.rounds()
            if not with_points:
                return None
            round_id = with_points[-1]
        rnd = rounds[round_id]
        sources = {}
        for source, points in series.points(round_id).items():
            sources[source] = {
                "t": [p.t - rnd.opened_at for p in points],
                **{name: [getattr(p, name) for p in points] for name in FIELDS},
            }
        return {
            "round": round_id,
            "state": rnd.state,
            "opened_at": rnd.opened_at,
            "epochs": int(rnd.options.get("epochs", 1)),
            "sources": sources,
        }

    def _workers(self, admin: bool) -> dict:
        app = self.app
        rows = [row for _, row in app.workers.list(include_gone=admin)]
        active = [w for w in rows if w.state != WorkerState.GONE]
        by_device: dict[str, int] = {}
        by_state: dict[str, int] = {}
        throughput = 0.0
        details = []
        contributions = dict(
            app.store.all("SELECT worker_id, COUNT(*) FROM contributions GROUP BY worker_id")
        )
        labels = {t.id: t.label for t in app.auth.list()}
        for w in rows:
            caps = _capabilities(w.capabilities)
            progress = _progress(w.progress_json)
            # A worker's loss and rate describe its training; an idle worker's last ones are history.
            training = progress.get("phase") == TRAINING_PHASE
            rate = _number(progress.get("samples_per_s")) if training else None
            loss = _number(progress.get("loss"), 1e6) if training and _number(progress.get("step")) else None
            if w.state != WorkerState.GONE:
                device = caps.device or "unknown"
                by_device[device] = by_device.get(device, 0) + 1
                by_state[w.state] = by_state.get(w.state, 0) + 1
                throughput += rate or 0.0
            if admin:
                details.append(
                    {
                        "id": w.id,
                        "name": w.name,
                        "label": labels.get(w.token_id, ""),
                        "address": w.address,
                        "device": caps.device,
                        "accelerator": caps.accelerator_name,
                        "state": w.state,
                        "phase": str(progress.get("phase", ""))[:40],
                        "step": _number(progress.get("step")),
                        "total_steps": _number(progress.get("total_steps")),
                        "loss": loss,  # none before its first step (it reports 0 then)
                        "samples_per_s": rate,
                        "last_seen": w.last_seen,
                        "registered_at": w.registered_at,
                        "contributions": int(contributions.get(w.id, 0)),
                    }
                )
        details.sort(key=lambda d: (d["state"] == WorkerState.GONE, -d["last_seen"]))
        return {
            "active": len(active),
            "registered": app.workers.counts()[0],
            "by_state": by_state,
            "by_device": by_device,
            "samples_per_s": throughput,
            "rows": details[:MAX_WORKERS] if admin else None,
        }
