"""Who may speak the swarm's DHT protocol: hivemind's token authorizer with the coordinator as the authority.

hivemind wraps every DHT RPC (ping, store, find) in ``AuthRPCWrapper`` when its ``DHTNode`` gets an
``authorizer`` (``hivemind/utils/auth.py``, the protocol of learning-at-home/hivemind#253 that the sahajBERT
run used with an external authority). A client then puts its ``AccessToken`` and a fresh time and nonce into
every request and signs it with its private key; the servicer refuses a request whose token the authority did
not sign, has expired, or whose signature does not match the token's key, and one replayed or older than a
minute; each response is signed the same way and checked by the client. :class:`SwarmAuthorizer` supplies the
two things hivemind leaves abstract: where this peer's token comes from and what makes a token valid
(:func:`~coldswarm.swarm.credentials.verify_credential`: the coordinator's signature, not expired).

So a peer without a live credential can neither bootstrap from an admitted peer (its ping is refused), nor
store or read a record, nor be added to anyone's routing table, and its own answers are dropped.

The authorizer lives in the DHT's own process (hivemind forks it with the DHT's arguments), which cannot call
the coordinator. Its token therefore comes from a :class:`CredentialSource` that process can read:

* :class:`CredentialFile`: a file the worker's main process rewrites (atomically, owner-only) each time it
  renews its credential over gRPC; the authorizer re-reads it when it changes;
* :class:`SelfIssued`: the coordinator's own peer, which holds the authority key and signs its own.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from coldswarm.common.durable import atomic_write_bytes
from coldswarm.swarm.credentials import (
    Credential,
    CredentialError,
    SwarmAuthority,
    parse_credential,
    public_key_from_bytes,
    verify_credential,
)

log = logging.getLogger(__name__)

__all__ = ["CredentialFile", "CredentialSource", "NoCredential", "SelfIssued", "SwarmAuthorizer"]

#: a token this close to its expiry is looked up again before the next request
REFRESH_MARGIN_S = 30.0


class NoCredential(RuntimeError):
    """This peer holds no live credential (never issued, expired, or its renewal was refused)."""


class CredentialSource:
    """Where a peer's current credential comes from (must work in a forked process)."""

    def current(self) -> AccessToken | None:
        raise NotImplementedError

    def changed(self, token: AccessToken) -> bool:
        """Whether a newer credential than ``token`` is available."""
        return False


class CredentialFile(CredentialSource):
    """A credential in a file (a serialised ``AccessToken``), rewritten atomically by its renewer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._token: AccessToken | None = None
        self._lock = threading.Lock()

    def write(self, credential: Credential) -> None:
        """Replace the file's credential (owner-only, atomic: a reader sees the old one or the new)."""
        atomic_write_bytes(self.path, credential.to_bytes())

    def _stat(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> AccessToken | None:
        with self._lock:
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._token = parse_credential(self.path.read_bytes()) if stamp else None
                except (OSError, CredentialError) as exc:
                    log.warning("cannot read the swarm credential in %s: %s", self.path.name, exc)
                    self._token = None
            return self._token

    def changed(self, token: AccessToken) -> bool:
        return self._stat() != self._stamp


class SelfIssued(CredentialSource):
    """The authority's own peer: a coordinator credential it signs itself, renewed at half its lifetime."""

    def __init__(self, authority: SwarmAuthority, lifetime_s: float = 3600.0):
        self.authority = authority
        self.lifetime_s = lifetime_s
        self._credential: Credential | None = None

    def current(self) -> AccessToken:
        if self._credential is None or self._credential.expires_at - get_dht_time() < self.lifetime_s / 2:
            self._credential = self.authority.issue_own(self.lifetime_s)
        return self._credential.token

    def changed(self, token: AccessToken) -> bool:
        return self._credential is None or self._credential.expires_at - get_dht_time() < self.lifetime_s / 2


class SwarmAuthorizer(TokenAuthorizerBase):
    """hivemind's token authorizer for a swarm whose authority is the coordinator.

    :param private_key: this peer's identity key (signs its requests and responses; its credential names it)
    :param authority_public_key: the coordinator's public key (OpenSSH bytes), which must have signed every
      token this peer accepts
    :param source: where this peer's own credential comes from
    """

    def __init__(self, private_key: RSAPrivateKey, authority_public_key: bytes, source: CredentialSource):
        super().__init__(private_key)
        self._authority_bytes = bytes(authority_public_key)
        self._authority = public_key_from_bytes(self._authority_bytes)
        self._source = source
        self._own_public_key = private_key.get_public_key().to_bytes()

    async def get_token(self) -> AccessToken:
        token = self._source.current()
        if token is None:
            raise NoCredential("this peer has no swarm credential: ask the coordinator for one first")
        return token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        try:
            verify_credential(access_token, self._authority)
        except CredentialError as exc:
            log.debug("refusing a swarm token: %s", exc)
            return False
        return True

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        try:
            expires_at = float(access_token.expiration_time)
        except ValueError:
            return True
        return self._source.changed(access_token) or expires_at - get_dht_time() < REFRESH_MARGIN_S

    async def refresh_token_if_needed(self) -> None:
        # hivemind asserts that a freshly fetched token is valid; say plainly why it is not instead.
        if self._local_access_token is None or self.does_token_need_refreshing(self._local_access_token):
            async with self._refresh_lock:
                token = await self.get_token()
                try:
                    credential = verify_credential(token, self._authority)
                except CredentialError as exc:
                    raise NoCredential(f"this peer's swarm credential is not valid: {exc}") from None
                if credential.public_key != self._own_public_key:
                    raise NoCredential("this peer's swarm credential names another peer's key")
                self._local_access_token = token
