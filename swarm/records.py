"""The DHT keys of a pretrain run and the typed, signed records stored under them.

Each key of a run is ``<run_id>_<field>`` for a field of :class:`RunRecords`, the naming hivemind's
:class:`~hivemind.dht.schema.SchemaValidator` uses with ``prefix=run_id``. Every record is a dictionary entry
whose subkey is its writer's ``[owner:<RSA public key>]`` marker, so hivemind's ``RSASignatureValidator``
stores it only with that key's signature: a peer cannot write another peer's record. On top of the schema
(strict types, no conversion, no extra field, as hivemind checks its own progress records,
``hivemind/optim/progress_tracker.py``), :class:`RunAuthorityValidator` holds what only the coordinator may
write and what only a credential may prove. Both sides add :func:`run_validators` to their DHT peer, which
then refuses to store anything else; readers parse every value again, so what reaches the round's metrics is
typed, bounded, finite, signed, and written by an admitted peer.

========================  =====================================================================================
key                       value (one entry per writer, subkey: the writer's owner marker)
========================  =====================================================================================
``admitted_key(run)``     each peer's credential (a serialised ``AccessToken``), under its own key: valid only
                          if the coordinator signed it for this run and it names that key. Averagers look up
                          the peers they talk to here (:mod:`coldswarm.swarm.admission`)
``metrics_key(run)``      one :class:`PeerMetrics` per peer, written by the worker's trainer, summed by the
                          checkpointer into the round's ``swarm_*`` metrics and its participants
``collected_key(run)``    under the coordinator's own key only: the epoch the checkpointer collected, or
                          :data:`ENDED_UNCOLLECTED`; either way the peers serving their state may leave
========================  =====================================================================================
"""

# No `from __future__ import annotations`: pydantic v1 reads these annotations as objects.
import itertools
import math
import re
from collections.abc import Iterable

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import ValueWithExpiration
from pydantic.v1 import BaseModel, Extra, ValidationError, conbytes, confloat, conint, parse_obj_as

from coldswarm.swarm.credentials import (
    MAX_CREDENTIAL_BYTES,
    Credential,
    CredentialError,
    owner_marker,
    parse_credential,
    public_key_from_bytes,
    verify_credential,
)

__all__ = [
    "ENDED_UNCOLLECTED",
    "PeerMetrics",
    "RunAuthorityValidator",
    "RunRecords",
    "admitted_credentials",
    "admitted_key",
    "collected_epoch",
    "collected_key",
    "metrics_key",
    "metrics_record",
    "owner_of",
    "peer_metrics",
    "run_validators",
]

#: the value of :func:`collected_key` when the round ended without a collection (cancelled, failed)
ENDED_UNCOLLECTED = -1
#: counts stay exact in every JSON reader and far from overflow
MAX_COUNT = 2**53
#: the most peer records one read takes from a run's key (a DHT value is untrusted input)
MAX_PEER_RECORDS = 10_000

_Count = conint(ge=0, le=MAX_COUNT, strict=True)
_Finite = confloat(strict=True, allow_inf_nan=False)
_Collected = conint(ge=ENDED_UNCOLLECTED, le=MAX_COUNT, strict=True)
_CredentialBytes = conbytes(min_length=1, max_length=MAX_CREDENTIAL_BYTES, strict=True)
_OWNER = re.compile(re.escape(b"[owner:") + rb"(.+?)" + re.escape(b"]"))


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

    coldswarm_admitted: dict[BytesWithPublicKey, _CredentialBytes]
    coldswarm_metrics: dict[BytesWithPublicKey, PeerMetrics | None]
    coldswarm_collected: dict[BytesWithPublicKey, _Collected]


def _key(run_id: str, field: str) -> str:
    assert field in RunRecords.__fields__, field
    return f"{run_id}_{field}"  # SchemaValidator's prefix + "_" + field name


def admitted_key(run_id: str) -> str:
    """DHT key under which each admitted peer publishes its credential (subkey: its owner marker)."""
    return _key(run_id, "coldswarm_admitted")


def metrics_key(run_id: str) -> str:
    """DHT key under which each peer publishes its :class:`PeerMetrics` (subkey: its owner marker)."""
    return _key(run_id, "coldswarm_metrics")


def collected_key(run_id: str) -> str:
    """DHT key the checkpointer sets, under the coordinator's owner marker, once it holds the round's final
    state (value: the epoch it collected), or to :data:`ENDED_UNCOLLECTED` when the round ended without one:
    either way peers may leave."""
    return _key(run_id, "coldswarm_collected")


def owner_of(subkey) -> bytes | None:
    """The public key (OpenSSH bytes) in an ``[owner:...]`` subkey, or None when it holds none."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNER.fullmatch(subkey)
    return match.group(1) if match else None


class RunAuthorityValidator(RecordValidatorBase):
    """What the schema cannot say about ``run_id``'s records, checked by every peer before it stores one:

    * ``collected_key``: only the coordinator (the authority's own owner marker) writes it;
    * ``admitted_key``: the value is a credential the authority signed for this run, not expired, naming the
      very key of the subkey it is stored under, and the record expires no later than the credential.

    Runs after hivemind's signature validator (which checks and strips the owner's signature) and beside the
    schema validator; picklable (the DHT process receives it), so keys are kept as bytes.
    """

    def __init__(self, run_id: str, authority_public_key: bytes):
        self.run_id = run_id
        self.authority_public_key = bytes(authority_public_key)
        self._collected_id = DHTID.generate(source=collected_key(run_id)).to_bytes()
        self._admitted_id = DHTID.generate(source=admitted_key(run_id)).to_bytes()
        self._authority = None

    def __getstate__(self):
        return {**self.__dict__, "_authority": None}  # cryptography's key objects do not pickle

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10): it sees values with the signature already stripped

    def validate(self, record: DHTRecord) -> bool:
        if record.key not in (self._collected_id, self._admitted_id):
            return True
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return False  # these keys hold dictionaries only
        try:
            subkey = DHTProtocol.serializer.loads(record.subkey)
            if record.key == self._collected_id:
                return subkey == owner_marker(self.authority_public_key)
            owner = owner_of(subkey)
            if owner is None:
                return False
            # Valid over the record's whole life (not just now): a record that outlived its credential by
            # more than a second would make every reply holding it fail validation.
            credential = self._verify(
                DHTProtocol.serializer.loads(record.value), record.expiration_time - 1.0
            )
        except (CredentialError, ValueError, TypeError, KeyError):  # msgpack raises ValueError subclasses
            return False
        return credential.public_key == owner

    def _verify(self, value, now: float) -> Credential:
        if self._authority is None:
            self._authority = public_key_from_bytes(self.authority_public_key)
        return verify_credential(parse_credential(value), self._authority, now=now, run_id=self.run_id)


def run_validators(run_id: str, authority_public_key: bytes | None) -> list[RecordValidatorBase]:
    """The validators that make a DHT peer refuse malformed, unsigned or unauthorised records under
    ``run_id``'s keys (``dht.add_validators(run_validators(run_id, authority))``, after the DHT has started
    with its ``RSASignatureValidator``, see :class:`coldswarm.swarm.security.PeerSecurity`). Without an
    authority (an open swarm) only the schema and the writers' signatures are checked."""
    validators: list[RecordValidatorBase] = [
        SchemaValidator(RunRecords, allow_extra_keys=True, prefix=run_id)
    ]
    if authority_public_key is not None:
        validators.append(RunAuthorityValidator(run_id, authority_public_key))
    return validators


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


def _entries(found) -> Iterable[tuple[bytes, object]]:
    """(owner public key, value) of each owner-marked entry of a dictionary DHT value."""
    if isinstance(found, ValueWithExpiration) and isinstance(found.value, dict):
        for subkey, entry in itertools.islice(found.value.items(), MAX_PEER_RECORDS):
            owner = owner_of(subkey)
            if owner is not None and isinstance(entry, ValueWithExpiration):
                yield owner, entry.value


def peer_metrics(found) -> list[tuple[bytes, PeerMetrics]]:
    """(writer's public key, record) of each well-formed peer record in what
    ``dht.get(metrics_key(run_id), latest=True)`` returned; anything else (an entry not under an owner marker,
    a value of another shape, a wrong type, a negative count, NaN) is left out."""
    records = []
    for owner, value in _entries(found):
        try:
            records.append((owner, PeerMetrics.parse_obj(value)))
        except ValidationError:
            continue
    return records


def admitted_credentials(found, authority, run_id: str) -> dict[bytes, Credential]:
    """{public key: credential} of each valid credential in what ``dht.get(admitted_key(run_id), latest=True)``
    returned: signed by ``authority`` (an ``RSAPublicKey``) for ``run_id``, not expired, stored under the key it
    names."""
    admitted = {}
    for owner, value in _entries(found):
        try:
            credential = verify_credential(parse_credential(value), authority, run_id=run_id)
        except CredentialError:
            continue
        if credential.public_key == owner:
            admitted[owner] = credential
    return admitted


def collected_epoch(found, authority_public_key: bytes | None) -> int | None:
    """The coordinator's entry under :func:`collected_key` (an epoch or :data:`ENDED_UNCOLLECTED`) in what
    ``dht.get(collected_key(run_id), latest=True)`` returned, or None when it has none (or it is malformed).
    Entries under any other key are ignored (``authority_public_key`` None, an open swarm: anyone's)."""
    for owner, value in _entries(found):
        if authority_public_key is None or owner == authority_public_key:
            try:
                return parse_obj_as(_Collected, value)
            except ValidationError:
                return None
    return None
