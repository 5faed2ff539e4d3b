"""The lineage as data: every version with its parent and metrics, and the charts drawn from them.

One description serves both drawings of the lineage: the status page's charts (Chart.js, in the
browser) and ``coldswarm-admin plot`` (matplotlib, a PNG). A chart plots metrics against the version
number; each version is a point, joined to its parent's point by a line, so a candidate the gate held
back shows as a branch off the published line. A point's marker says the version's state
(:data:`STATE_STYLE`); each metric has its colour.

Everything here is pure: entries come from manifests (:func:`entry`), charts from entries
(:func:`charts`); no I/O, no gRPC, no plotting library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from coldswarm.coordinator.states import VersionState

#: how each state is drawn: a Chart.js point style and a matplotlib marker, filled or hollow
STATE_STYLE: dict[str, dict] = {
    VersionState.PUBLISHED: {"label": "published", "chartjs": "circle", "mpl": "o", "filled": True},
    VersionState.CANDIDATE: {"label": "candidate", "chartjs": "circle", "mpl": "o", "filled": False},
    VersionState.REJECTED: {
        "label": "rejected by the gate",
        "chartjs": "crossRot",
        "mpl": "X",
        "filled": True,
    },
}
#: the state a version has that this table does not know yet (drawn, never dropped)
OTHER_STATE_STYLE = {"label": "other", "chartjs": "triangle", "mpl": "^", "filled": False}
#: the published pointer's version is drawn larger, with this marker
CURRENT_STYLE = {"label": "published now", "chartjs": "rectRot", "mpl": "D"}

#: one colour per metric line, in order (colour-blind safe: Okabe & Ito)
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

#: manifest metric subtrees that are settings, not measurements
NOT_METRICS = ("eval_config",)
#: metrics that are a mapping of numbers and also get their mean under their own name (the evaluator's
#: ``mod_loss`` is one loss per MoD mode; the demo's table and the headline chart show their mean)
MEAN_OF = ("mod_loss",)


@dataclass(frozen=True)
class ChartSpec:
    """A chart of the lineage: ``keys`` are metric names, or a ``prefix.*`` for every metric under it."""

    id: str
    title: str
    keys: tuple[str, ...]
    y_label: str


#: the headline charts, in page order; every other metric a manifest carries goes to "more metrics"
HEADLINE_CHARTS = (
    ChartSpec(
        "mod_loss", "MoD loss on held-out text, mean over modes (lower is better)", ("mod_loss",), "MoD loss"
    ),
    ChartSpec(
        "exact_match",
        "Exact match (higher is better)",
        ("seen_exact_match", "heldout_exact_match", "heldout_exact_match_before"),
        "exact match",
    ),
    ChartSpec(
        "token_loss", "Token loss on the seen tasks (lower is better)", ("seen_token_loss",), "token loss"
    ),
)


@dataclass(frozen=True)
class LineageEntry:
    """One version as the lineage shows it."""

    number: int
    parent: int | None
    round: int | None
    kind: str
    method: str
    state: str
    is_current: bool
    created_at: float
    contributions: int
    examples: int
    metrics: dict[str, float] = field(default_factory=dict)  # flat: "seen.reverse_words.exact_match"
    gate: dict[str, float | str] = field(
        default_factory=dict
    )  # the gate's scores, when the manifest has them
    contributors: tuple[str, ...] = ()  # worker ids (shown to the admin only)

    def as_dict(self, with_contributors: bool) -> dict:
        out = asdict(self)
        out["contributors"] = list(self.contributors) if with_contributors else None
        return out


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flat_metrics(metrics: Mapping, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Every finite number under ``metrics`` by its dotted path; the mappings :data:`MEAN_OF` names also
    get their numbers' mean under their own name."""
    out: dict[str, float] = {}
    if depth > 4:  # manifests are written by this coordinator, but a bound costs nothing
        return out
    for key, value in metrics.items():
        if key in NOT_METRICS:
            continue
        name = f"{prefix}{key}"
        number = _finite(value)
        if number is not None:
            out[name] = number
        elif isinstance(value, Mapping):
            inner = flat_metrics(value, f"{name}.", depth + 1)
            out.update(inner)
            leaves = [_finite(v) for v in value.values()]
            if name in MEAN_OF and leaves and all(v is not None for v in leaves):
                out.setdefault(name, sum(leaves) / len(leaves))
    return out


def _gate(manifest: Mapping) -> dict[str, float | str]:
    """The publication gate's record in a manifest (its ``gate`` object), flattened: numbers, and short
    strings such as a decision or a reason."""
    gate = manifest.get("gate")
    if not isinstance(gate, Mapping):
        return {}
    out: dict[str, float | str] = dict(flat_metrics(gate))
    for key, value in gate.items():
        if isinstance(value, str):
            out[str(key)] = value[:200]
        elif isinstance(value, bool):
            out[str(key)] = "yes" if value else "no"
    return out


def entry(
    *,
    number: int,
    parent: int | None,
    round_id: int | None,
    method: str,
    state: str,
    is_current: bool,
    created_at: float,
    manifest: Mapping | str,
    worker_of: Mapping[int, str] | None = None,
) -> LineageEntry:
    """A version's entry from its row's fields and its manifest (a dict, or its JSON).

    Manifests name contributions by id only (every worker reads them); ``worker_of`` (contribution id ->
    worker id, from the coordinator's database) names their workers, for the admin's view."""
    if isinstance(manifest, str):
        try:
            manifest = json.loads(manifest or "{}")
        except ValueError:
            manifest = {}
    if not isinstance(manifest, Mapping):
        manifest = {}
    contributions = [c for c in manifest.get("contributions") or [] if isinstance(c, Mapping)]
    metrics = manifest.get("metrics")
    return LineageEntry(
        number=int(number),
        parent=parent,
        round=round_id,
        kind=str(manifest.get("kind") or method),
        method=method,
        state=state,
        is_current=bool(is_current),
        created_at=float(created_at),
        contributions=len(contributions),
        examples=sum(int(c.get("num_examples") or 0) for c in contributions),
        metrics=flat_metrics(metrics) if isinstance(metrics, Mapping) else {},
        gate=_gate(manifest),
        contributors=tuple(str((worker_of or {}).get(c.get("id"), "")) for c in contributions),
    )


def from_version(v, worker_of: Mapping[int, str] | None = None) -> LineageEntry:
    """The entry of a ``Version`` message (``pb.Version``, as ListVersions sends it)."""
    return entry(
        number=v.number,
        parent=v.parent if v.HasField("parent") else None,
        round_id=v.round_id if v.HasField("round_id") else None,
        method=v.method,
        state=v.state,
        is_current=v.is_current,
        created_at=v.created_at,
        manifest=v.manifest_json,
        worker_of=worker_of,
    )


def document(versions) -> dict:
    """The lineage as data, ``{"versions": [...]}``: per version its number, parent, round and kind, method,
    state (published, candidate or rejected), every evaluation metric (flat, by dotted path) and the
    publication gate's record. ``coldswarm-local`` writes it as ``versions.json``; ``coldswarm-admin --json
    versions`` prints the same fields (with the wire's). ``versions``: ``pb.Version`` messages."""
    out = []
    for v in versions:
        item = from_version(v).as_dict(with_contributors=False)
        del item["contributors"]  # the admin's alone; this document may be shared
        out.append(item)
    return {"versions": out}


def style(state: str, is_current: bool) -> dict:
    """How a version's point is drawn."""
    base = dict(STATE_STYLE.get(state, OTHER_STATE_STYLE))
    if is_current:
        base.update(chartjs=CURRENT_STYLE["chartjs"], mpl=CURRENT_STYLE["mpl"], current=True)
    return base


def _matches(key: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        stem = pattern[:-1]
        return key.startswith(stem) and "." not in key[len(stem) :]
    return key == pattern


def charts(entries: Iterable[LineageEntry]) -> list[dict]:
    """The lineage charts with their data: the headline charts that have data, then one chart per other
    metric, those most versions carry first (``more``: the page offers them in a list, the PNG leaves
    them out).

    Each chart: ``id``, ``title``, ``y_label``, ``more``, and ``lines``: one per metric, with its
    ``metric`` name, ``color``, ``points`` (``x`` version, ``y`` value, ``state``, ``current``) and
    ``edges`` (``[[parent x, parent y], [x, y]]`` for every version whose parent has the metric too).
    """
    entries = sorted(entries, key=lambda e: e.number)
    by_number = {e.number: e for e in entries}
    all_keys = sorted({k for e in entries for k in e.metrics})
    used: set[str] = set()
    out = []
    for spec in HEADLINE_CHARTS:
        keys = [k for pattern in spec.keys for k in all_keys if _matches(k, pattern) and k not in used]
        if keys:
            used.update(keys)
            out.append(_chart(spec.id, spec.title, spec.y_label, keys, entries, by_number, more=False))
    # The rest, those most versions carry first (a metric of one round kind only comes after).
    coverage = {k: sum(k in e.metrics for e in entries) for k in all_keys}
    for key in sorted((k for k in all_keys if k not in used), key=lambda k: (-coverage[k], k)):
        out.append(_chart(f"more:{key}", key, key, [key], entries, by_number, more=True))
    return out


def _chart(chart_id, title, y_label, keys, entries, by_number, more: bool) -> dict:
    lines = []
    for i, key in enumerate(keys):
        points, edges = [], []
        for e in entries:
            if key not in e.metrics:
                continue
            y = e.metrics[key]
            points.append({"x": e.number, "y": y, "state": e.state, "current": e.is_current})
            parent = by_number.get(e.parent) if e.parent is not None else None
            if parent is not None and key in parent.metrics:
                edges.append([[parent.number, parent.metrics[key]], [e.number, y]])
        lines.append({"metric": key, "color": PALETTE[i % len(PALETTE)], "points": points, "edges": edges})
    return {"id": chart_id, "title": title, "y_label": y_label, "more": more, "lines": lines}
