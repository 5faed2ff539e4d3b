"""The DHT keys of a pretrain run and the typed records stored under them.

Each key of a run is ``<run_id>_<field>`` for a field of :class:`RunRecords`, the naming hivemind's
:class:`~hivemind.dht.schema.SchemaValidator` uses with ``prefix=run_id``: a peer that adds
:func:`run_validator` to its DHT refuses to store a record under these keys that does not match the
schema exactly (strict types, no conversion, no extra field), as hivemind does for its own progress
records (``hivemind/optim/progress_tracker.py``). The worker adds it before it publishes, the
coordinator's checkpointer before it reads, and the reader also parses every value with the schema,
so what reaches the round's metrics is typed, bounded and finite, whatever a peer sent.

=======================  ===================================================================
key                      value
=======================  ===================================================================
``metrics_key(run)``     one :class:`PeerMetrics` per peer (subkey: its peer id), written by
                         the worker's trainer, summed by the checkpointer into the round's
                         ``swarm_*`` metrics
``collected_key(run)``   the epoch the checkpointer collected, or :data:`ENDED_UNCOLLECTED`:
                         either way the peers serving their state may leave
=======================  ===================================================================
"""

# No `from __future__ import annotations`: pydantic v1 reads these annotations as objects.
import itertools
import math
from collections.abc import Iterable

from hivemind.dht.schema import SchemaValidator
from hivemind.utils import ValueWithExpiration
from pydantic.v1 import BaseModel, Extra, ValidationError, confloat, conint, constr, parse_obj_as

__all__ = [
    "ENDED_UNCOLLECTED",
    "PeerMetrics",
    "RunRecords",
    "collected_epoch",
    "collected_key",
    "metrics_key",
    "metrics_record",
    "peer_metrics",
    "run_validator",
]

#: the value of :func:`collected_key` when the round ended without a collection (cancelled, failed)
ENDED_UNCOLLECTED = -1
#: counts stay exact in every JSON reader and far from overflow
MAX_COUNT = 2**53
#: the most peer records one read takes from a run's metrics (a DHT value is untrusted input)
MAX_PEER_RECORDS = 10_000

_Count = conint(ge=0, le=MAX_COUNT, strict=True)
_Finite = confloat(strict=True, allow_inf_nan=False)
_Collected = conint(ge=ENDED_UNCOLLECTED, le=MAX_COUNT, strict=True)


class PeerMetrics(BaseModel):
    """One peer's progress in a run (what ``SwarmTrainer`` publishes every ``metrics_period``)."""

    epoch: _Count
    steps: _Count
    samples: _Count
    #: mean loss over the peer's last steps; None before its first step (or when it is not finite)
    loss: _Finite | None
    samples_per_s: confloat(ge=0.0, strict=True, allow_inf_nan=False)
    #: when the record was written (hivemind's DHT time)
    time: _Finite

    class Config:
        extra = Extra.forbid


class RunRecords(BaseModel):
    """The keys of one run, one field each (DHT key ``<run_id>_<field name>``), and their values."""

    coldswarm_metrics: dict[constr(min_length=1, max_length=128, strict=True), PeerMetrics | None]
    coldswarm_collected: _Collected


def _key(run_id: str, field: str) -> str:
    assert field in RunRecords.__fields__, field
    return f"{run_id}_{field}"  # SchemaValidator's prefix + "_" + field name


def metrics_key(run_id: str) -> str:
    """DHT key under which each peer publishes its :class:`PeerMetrics` (subkey: its peer id)."""
    return _key(run_id, "coldswarm_metrics")


def collected_key(run_id: str) -> str:
    """DHT key the checkpointer sets once it holds the round's final state (value: the epoch it collected),
    or to :data:`ENDED_UNCOLLECTED` when the round ended without one: either way peers may leave."""
    return _key(run_id, "coldswarm_collected")


def run_validator(run_id: str) -> SchemaValidator:
    """The validator that makes a DHT peer refuse malformed records under ``run_id``'s keys
    (``dht.add_validators([run_validator(run_id)])``, after the DHT has started)."""
    return SchemaValidator(RunRecords, allow_extra_keys=True, prefix=run_id)


def metrics_record(
    *, epoch: int, steps: int, samples: int, loss: float, samples_per_s: float, time: float
) -> dict:
    """The value a peer stores under :func:`metrics_key`: a :class:`PeerMetrics` as the plain dict the
    DHT serialises. A loss that is not finite (no step yet, or diverged) is sent as None."""
    return PeerMetrics(
        epoch=int(epoch),
        steps=int(steps),
        samples=int(samples),
        loss=float(loss) if math.isfinite(loss) else None,
        samples_per_s=float(samples_per_s) if math.isfinite(samples_per_s) else 0.0,
        time=float(time),
    ).dict()


def _values(found) -> Iterable:
    if isinstance(found, ValueWithExpiration) and isinstance(found.value, dict):
        for entry in itertools.islice(found.value.values(), MAX_PEER_RECORDS):
            yield entry.value if isinstance(entry, ValueWithExpiration) else None


def peer_metrics(found) -> list[PeerMetrics]:
    """The well-formed peer records in what ``dht.get(metrics_key(run_id), latest=True)`` returned;
    anything else (a value of another shape, a wrong type, a negative count, NaN) is left out."""
    records = []
    for value in _values(found):
        try:
            records.append(PeerMetrics.parse_obj(value))
        except ValidationError:
            continue
    return records


def collected_epoch(found) -> int | None:
    """The value under :func:`collected_key` (an epoch or :data:`ENDED_UNCOLLECTED`) in what
    ``dht.get(collected_key(run_id), latest=True)`` returned, or None when there is none (or it is
    malformed)."""
    if not isinstance(found, ValueWithExpiration):
        return None
    try:
        return parse_obj_as(_Collected, found.value)
    except ValidationError:
        return None
