"""The coordinator's Prometheus metrics (``GET /metrics`` on the status port).

Two kinds, in one registry per coordinator (never prometheus_client's global one: tests run several):

- **events**, counted as they happen: heartbeats and their handling time, gRPC calls by method and
  code, contribution and version bytes on the wire (fed by :mod:`coldswarm.coordinator.rpc_metrics`,
  a gRPC interceptor), merge and evaluation seconds (fed by the merge pipeline), status page requests;
- **state**, read from the coordinator's state at each scrape (:class:`StateCollector`): rounds,
  versions and contributions by state, workers, the live round, and the live pretrain round's
  swarm (its latest point per source, :mod:`coldswarm.coordinator.series`).

Every name is documented in coordinator/README.md (*Metrics*); a test checks the two agree.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coldswarm.coordinator.series import SOURCES
from coldswarm.coordinator.states import (
    ROUND_KINDS,
    ContributionState,
    RoundKind,
    RoundState,
    VersionState,
)

# The text format has no place for the `_created` timestamps (OpenMetrics does): without this each
# counter and histogram would come with a second family, `<name>_created`. (prometheus_client's switch is
# process-wide; nothing else in the coordinator's process exports Prometheus metrics.)
disable_created_metrics()

#: the text format's media type, as Prometheus asks for it
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def constants(namespace: type) -> list[str]:
    """The values of a ``states`` constants class, in definition order."""
    return [v for k, v in vars(namespace).items() if k.isupper() and isinstance(v, str)]


class CoordinatorMetrics:
    """The registry of one coordinator and its event metrics; ``render()`` is the scrape."""

    def __init__(self, app):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.heartbeats = Counter(
            "coldswarm_heartbeats", "Heartbeat calls handled (refused ones too).", registry=r
        )
        self.heartbeat_seconds = Histogram(
            "coldswarm_heartbeat_seconds",
            "Time the coordinator took to handle one heartbeat (in the gRPC handler).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rpcs = Counter(
            "coldswarm_rpcs", "gRPC calls handled, by method and status code.", ["method", "code"], registry=r
        )
        self.upload_bytes = Counter(
            "coldswarm_upload_bytes", "Contribution bytes received in UploadContribution chunks.", registry=r
        )
        self.download_bytes = Counter(
            "coldswarm_download_bytes", "Version file bytes sent in DownloadVersion chunks.", registry=r
        )
        self.merge_seconds = Histogram(
            "coldswarm_merge_seconds",
            "Time to merge a fusion round's contributions into a candidate (weights written).",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.evaluation_seconds = Histogram(
            "coldswarm_evaluation_seconds",
            "Time the evaluator took on one version (merged or collected).",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "coldswarm_http_requests",
            "Status page requests, by route and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        r.register(StateCollector(app))

    def observe_stage(self, stage: str, seconds: float) -> None:
        """The merge pipeline's ``on_stage_seconds`` listener."""
        if stage == "merge":
            self.merge_seconds.observe(seconds)
        elif stage == "evaluate":
            self.evaluation_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Gauges read from the coordinator's state at each scrape (a few small SQL counts)."""

    def __init__(self, app):
        self.app = app

    def describe(self) -> list:
        return []  # nothing to check at registration: the names are fixed and collect() reads the state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        app = self.app
        store = app.store
        rounds = GaugeMetricFamily("coldswarm_rounds", "Rounds by kind and state.", labels=["kind", "state"])
        counts = {
            (r[0], r[1]): r[2] for r in store.all("SELECT kind, state, COUNT(*) FROM rounds GROUP BY 1, 2")
        }
        for kind in ROUND_KINDS:
            for state in constants(RoundState):
                rounds.add_metric([kind, state], counts.get((kind, state), 0))
        yield rounds

        versions = GaugeMetricFamily("coldswarm_versions", "Versions by state.", labels=["state"])
        by_state = dict(store.all("SELECT state, COUNT(*) FROM versions GROUP BY state"))
        for state in sorted(set(constants(VersionState)) | set(by_state)):
            versions.add_metric([state], by_state.get(state, 0))
        yield versions

        published = GaugeMetricFamily("coldswarm_published_version", "The published version's number.")
        current = app.versions.current()
        if current is not None:
            published.add_metric([], current)
        yield published

        contributions = GaugeMetricFamily(
            "coldswarm_contributions", "Contributions by state.", labels=["state"]
        )
        by_state = dict(store.all("SELECT state, COUNT(*) FROM contributions GROUP BY state"))
        for state in sorted(set(constants(ContributionState)) | set(by_state)):
            contributions.add_metric([state], by_state.get(state, 0))
        yield contributions

        registered, active = app.workers.counts()
        yield GaugeMetricFamily(
            "coldswarm_registered_workers", "Workers registered and not left.", value=registered
        )
        yield GaugeMetricFamily(
            "coldswarm_active_workers", "Workers heard from within --worker-gone-after-s.", value=active
        )

        # The live round's families are always there, without a sample while no round is live.
        live = app.rounds.live()
        values = {
            ("coldswarm_live_round", "The live round's id."): lambda r: r.id,
            ("coldswarm_live_round_contributions", "Contributions the live round has."): lambda r: (
                r.contributions
            ),
            ("coldswarm_live_round_quorum", "Contributions that close the live round."): lambda r: r.quorum,
            (
                "coldswarm_live_round_deadline_seconds",
                "Seconds until the live round's deadline (negative: past it).",
            ): lambda r: r.deadline - time.time(),
        }
        for (name, doc), value in values.items():
            family = GaugeMetricFamily(name, doc)
            if live is not None:
                family.add_metric([], value(live))
            yield family
        yield from self._swarm(live)

    def _swarm(self, live) -> Iterator[GaugeMetricFamily]:
        """The live pretrain round's latest point of each curve, when it has one."""
        families = {
            "loss": GaugeMetricFamily(
                "coldswarm_swarm_loss",
                "The live pretrain round's training loss, by source.",
                labels=["source"],
            ),
            "samples_per_s": GaugeMetricFamily(
                "coldswarm_swarm_samples_per_second",
                "The live pretrain round's throughput in samples/s, by source.",
                labels=["source"],
            ),
            "peers": GaugeMetricFamily(
                "coldswarm_swarm_peers", "The live pretrain round's peers, by source.", labels=["source"]
            ),
        }
        if live is not None and live.kind == RoundKind.PRETRAIN:
            for source in SOURCES:
                point = self.app.series.latest(live.id, source)
                if point is None:
                    continue
                for name, family in families.items():
                    value = getattr(point, name)
                    if value is not None:
                        family.add_metric([source], value)
        yield from families.values()
