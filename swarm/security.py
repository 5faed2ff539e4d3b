"""What one peer brings to a guarded swarm: its identity, the authority it trusts, and its credential.

Both roles build their DHT peer and averagers from a :class:`PeerSecurity`:

* ``start_dht(..., **security.dht_kwargs())``: the DHT runs with this peer's RSA identity (so its libp2p peer
  id is the one its credential names), hivemind's token authorizer (:mod:`coldswarm.swarm.authorizer`: only
  admitted peers speak the DHT protocol with it) and hivemind's ``RSASignatureValidator`` over the same key, so
  the records this peer writes under its owner marker are signed by it;
* ``dht.add_validators(security.run_validators(run_id))``: the run's typed, signed records
  (:mod:`coldswarm.swarm.records`);
* ``security.publish_credential(dht, run_id)``: puts this peer's credential where the run's averagers look
  callers up (call it again after each renewal);
* ``AveragerGuard(admitted=security.admitted(run_id), ...)``: the averagers' admission check
  (:mod:`coldswarm.swarm.guarded_averagers`).

A worker's credential comes from a :class:`~coldswarm.swarm.authorizer.CredentialFile` it renews over gRPC;
the coordinator's peer is the authority and signs its own (:meth:`PeerSecurity.for_authority`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hivemind.dht.crypto import RSASignatureValidator

from coldswarm.swarm.admission import AdmittedPeers
from coldswarm.swarm.authorizer import CredentialSource, SelfIssued, SwarmAuthorizer
from coldswarm.swarm.credentials import (
    SwarmAuthority,
    load_or_create_identity,
    owner_marker,
    public_key_from_bytes,
    verify_credential,
)
from coldswarm.swarm.records import admitted_key, run_validators

__all__ = ["PeerSecurity"]


@dataclass
class PeerSecurity:
    """A peer's identity (an RSA key file, hivemind's ``identity_path``), the swarm authority's public key
    (OpenSSH bytes) and where this peer's credential comes from."""

    identity_path: Path
    authority_public_key: bytes
    credentials: CredentialSource
    private_key: object = field(init=False, repr=False)

    def __post_init__(self):
        self.identity_path = Path(self.identity_path)
        self.authority_public_key = bytes(self.authority_public_key)
        public_key_from_bytes(self.authority_public_key)  # refuse a malformed authority at once
        self.private_key = load_or_create_identity(self.identity_path)

    @classmethod
    def for_authority(cls, identity_path: str | os.PathLike, lifetime_s: float = 3600.0) -> PeerSecurity:
        """The coordinator's peer: its identity is the authority key, and it signs its own credential."""
        authority = SwarmAuthority.load_or_create(identity_path)
        return cls(identity_path, authority.public_key_bytes, SelfIssued(authority, lifetime_s))

    @property
    def public_key(self) -> bytes:
        """This peer's public key (OpenSSH bytes): what its credential names."""
        return self.private_key.get_public_key().to_bytes()

    @property
    def owner_marker(self) -> bytes:
        """The subkey this peer writes its run records under (``[owner:<its key>]``)."""
        return owner_marker(self.public_key)

    @property
    def authority_marker(self) -> bytes:
        """The subkey only the coordinator writes under."""
        return owner_marker(self.authority_public_key)

    def dht_kwargs(self) -> dict:
        """Keyword arguments for ``start_dht``/``hivemind.DHT``: identity, authorizer, record signing."""
        return dict(
            identity_path=str(self.identity_path),
            authorizer=SwarmAuthorizer(self.private_key, self.authority_public_key, self.credentials),
            # The first RSASignatureValidator of a DHT signs its records (hivemind ignores later ones): ours.
            record_validators=[RSASignatureValidator(self.private_key)],
        )

    def run_validators(self, run_id: str) -> list:
        return run_validators(run_id, self.authority_public_key)

    def admitted(self, run_id: str) -> AdmittedPeers:
        return AdmittedPeers(run_id, self.authority_public_key)

    def publish_credential(self, dht, run_id: str, timeout: float = 30.0) -> bool:
        """Store this peer's current credential under ``admitted_key(run_id)`` until it expires (waits)."""
        token = self.credentials.current()
        if token is None:
            return False
        credential = verify_credential(token, public_key_from_bytes(self.authority_public_key), run_id=run_id)
        stored = dht.store(
            admitted_key(run_id),
            subkey=self.owner_marker,
            value=credential.to_bytes(),
            expiration_time=credential.expires_at,
            return_future=True,
        )
        return bool(stored.result(timeout=timeout))
