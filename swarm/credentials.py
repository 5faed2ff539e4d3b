"""Swarm credentials: the coordinator's signed, short-lived admission of one peer identity to one run.

A peer's hivemind identity is an RSA key (hivemind's ``identity_path`` file, which its libp2p daemon reads):
the peer id is the hash of its public key, and libp2p's handshake proves on every connection that the remote
side holds that key. A credential names that public key, so it names the peer id too, and nobody else can use
it. The same key signs the peer's DHT requests (:mod:`coldswarm.swarm.authorizer`) and its DHT records
(hivemind's ``RSASignatureValidator``), so a peer has one key and one identity everywhere.

A credential is hivemind's own ``AccessToken`` (``hivemind.proto.auth_pb2``, what ``TokenAuthorizerBase``
carries in every DHT request), filled as the sahajBERT run's authority filled it:

=================== ===========================================================================
field               value
=================== ===========================================================================
``username``        ``<role>/<run_id>/<worker_id>``: ``worker/coldswarm-r3/w-1a2b`` for a worker
                    admitted to one run; ``coordinator/*/`` for the coordinator's own peer (all runs)
``public_key``      the peer's RSA public key, OpenSSH encoding (hivemind's ``RSAPublicKey.to_bytes``)
``expiration_time`` unix seconds (hivemind's DHT time), e.g. ``1712345678.250``
``signature``       the authority's RSA-PSS signature over :func:`signed_bytes` (base64, as hivemind signs)
=================== ===========================================================================

The authority (:class:`SwarmAuthority`) is the coordinator's own DHT identity key, kept in its data directory
(``dht.key``, owner-only): workers learn its public key with their credential, verify the coordinator's DHT
records with it, and always admit its peer (the checkpointer).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time

from coldswarm.common.durable import atomic_write_bytes

__all__ = [
    "MAX_CREDENTIAL_BYTES",
    "MAX_LIFETIME_S",
    "ROLE_COORDINATOR",
    "ROLE_WORKER",
    "Credential",
    "CredentialError",
    "SwarmAuthority",
    "load_or_create_identity",
    "owner_marker",
    "parse_credential",
    "peer_id_of",
    "public_key_from_bytes",
    "verify_credential",
]

ROLE_WORKER = "worker"
ROLE_COORDINATOR = "coordinator"
#: the run a coordinator credential names: it serves every run
ALL_RUNS = "*"
#: a serialised credential is at most this long (a 4096-bit key and its signature fit); longer is refused unread
MAX_CREDENTIAL_BYTES = 4096
#: smallest RSA key admitted (hivemind makes 2048-bit keys)
MIN_KEY_BITS = 2048
#: the longest credential lifetime anyone will accept, whatever the authority signed (bounds a stolen clock)
MAX_LIFETIME_S = 7 * 24 * 3600.0

_DOMAIN = b"coldswarm swarm credential v1"
_NAME = re.compile(r"^[A-Za-z0-9_*-]{1,128}$")
_WORKER = re.compile(r"^[A-Za-z0-9_-]{0,128}$")


class CredentialError(ValueError):
    """A credential that is malformed, not signed by the authority, expired, or for another run or peer."""


@dataclass(frozen=True)
class Credential:
    """A verified credential (what :func:`verify_credential` returns)."""

    role: str
    run_id: str
    worker_id: str
    public_key: bytes  # OpenSSH encoding
    expires_at: float
    token: AccessToken

    @property
    def peer_id(self) -> PeerID:
        return peer_id_of(public_key_from_bytes(self.public_key))

    def admits(self, run_id: str) -> bool:
        """Whether this credential lets its peer take part in ``run_id``'s averaging."""
        return self.run_id == run_id or (self.role == ROLE_COORDINATOR and self.run_id == ALL_RUNS)

    def to_bytes(self) -> bytes:
        return self.token.SerializeToString()


# -- keys ------------------------------------------------------------------------------------------------


def _wrap_private(key: rsa.RSAPrivateKey) -> RSAPrivateKey:
    """hivemind's RSAPrivateKey around an existing key (its constructor always generates a new one)."""
    wrapped = RSAPrivateKey.__new__(RSAPrivateKey)
    wrapped._private_key = key
    return wrapped


def load_or_create_identity(path: str | os.PathLike) -> RSAPrivateKey:
    """This peer's RSA identity from ``path`` (hivemind's ``identity_path`` format: a libp2p ``PrivateKey``
    protobuf holding the DER key), made and written owner-only (0600, atomically) when missing. Pass the same
    path to the DHT as ``identity_path`` so the libp2p peer id is this key's."""
    path = Path(path)
    if path.exists():
        message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        if message.key_type != crypto_pb2.KeyType.RSA:
            raise CredentialError(f"{path} holds a {message.key_type} key; the swarm needs an RSA identity")
        key = serialization.load_der_private_key(message.data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CredentialError(f"{path} does not hold an RSA private key")
        return _wrap_private(key)
    private = RSAPrivateKey()
    message = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=private.to_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, message.SerializeToString())  # owner-only (0600) from its first byte
    return private


def public_key_from_bytes(data: bytes) -> RSAPublicKey:
    """An RSA public key in OpenSSH encoding, of at least :data:`MIN_KEY_BITS`; CredentialError otherwise."""
    if not isinstance(data, bytes) or not 0 < len(data) <= MAX_CREDENTIAL_BYTES:
        raise CredentialError("a public key is 1 to 4096 bytes of OpenSSH text")
    try:
        key = RSAPublicKey.from_bytes(data)
    except (ValueError, TypeError, IndexError) as exc:
        raise CredentialError(f"not an OpenSSH RSA public key ({type(exc).__name__})") from None
    if key._public_key.key_size < MIN_KEY_BITS:
        raise CredentialError(
            f"RSA keys of {key._public_key.key_size} bits are too short (>= {MIN_KEY_BITS})"
        )
    return key


def peer_id_of(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key (what a DHT started with its identity file reports): the
    sha2-256 multihash of the protobuf-wrapped DER key, as ``PeerID.from_identity`` derives it."""
    der = public_key._public_key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    wrapped = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(wrapped).digest(), multihash.coerce_code("sha2-256")))


def owner_marker(public_key: bytes) -> bytes:
    """The ``[owner:<key>]`` bytes hivemind's ``RSASignatureValidator`` looks for in a DHT key or subkey: a
    record under such a subkey is stored only with that key's signature."""
    from hivemind.dht.crypto import RSASignatureValidator

    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public_key)


# -- signing and verifying ----------------------------------------------------------------------------------


def _username(role: str, run_id: str, worker_id: str) -> str:
    if role not in (ROLE_WORKER, ROLE_COORDINATOR):
        raise CredentialError(f"unknown role {role[:32]!r}")
    if not _NAME.match(run_id) or not _WORKER.match(worker_id):
        raise CredentialError("run and worker ids are short [A-Za-z0-9_-] names")
    return f"{role}/{run_id}/{worker_id}"


def _expiration(expires_at: float) -> str:
    return f"{expires_at:.3f}"


def signed_bytes(token: AccessToken) -> bytes:
    """What the authority signs: a domain tag and the three fields, newline-separated (none may hold one)."""
    return b"\n".join(
        (_DOMAIN, token.username.encode(), bytes(token.public_key), token.expiration_time.encode())
    )


class SwarmAuthority:
    """The key that admits peers to the swarm: it signs credentials. It is also its holder's peer identity."""

    def __init__(self, private_key: RSAPrivateKey):
        self.private_key = private_key
        self.public_key = private_key.get_public_key()
        self.public_key_bytes = self.public_key.to_bytes()
        self.peer_id = peer_id_of(self.public_key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> SwarmAuthority:
        """The authority whose key is the identity file ``path`` (made, owner-only, when missing)."""
        return cls(load_or_create_identity(path))

    def issue(
        self,
        public_key: bytes,
        *,
        role: str,
        run_id: str,
        worker_id: str = "",
        expires_at: float,
    ) -> Credential:
        """Sign a credential for the peer whose RSA public key (OpenSSH bytes) is ``public_key``."""
        public_key_from_bytes(public_key)  # refuse what no verifier would accept
        token = AccessToken(
            username=_username(role, run_id, worker_id),
            public_key=public_key,
            expiration_time=_expiration(expires_at),
        )
        token.signature = self.private_key.sign(signed_bytes(token))
        return Credential(role, run_id, worker_id, public_key, float(token.expiration_time), token)

    def issue_own(self, lifetime_s: float) -> Credential:
        """A coordinator credential for this authority's own peer, valid for every run."""
        return self.issue(
            self.public_key_bytes,
            role=ROLE_COORDINATOR,
            run_id=ALL_RUNS,
            expires_at=get_dht_time() + lifetime_s,
        )


def parse_credential(data: bytes) -> AccessToken:
    """An ``AccessToken`` from bytes received from anyone (size bounded); CredentialError if it is not one."""
    if not isinstance(data, bytes) or not 0 < len(data) <= MAX_CREDENTIAL_BYTES:
        raise CredentialError(f"a credential is 1 to {MAX_CREDENTIAL_BYTES} bytes")
    try:
        return AccessToken.FromString(data)
    except Exception:  # protobuf's DecodeError, or anything a malformed message raises
        raise CredentialError("not a serialised AccessToken") from None


def verify_credential(
    token: AccessToken, authority: RSAPublicKey, *, now: float | None = None, run_id: str | None = None
) -> Credential:
    """The credential ``token`` holds, if ``authority`` signed it, it has not expired (at ``now``, DHT time),
    and (given ``run_id``) it admits its peer to that run; CredentialError saying why not otherwise."""
    if len(token.SerializeToString()) > MAX_CREDENTIAL_BYTES:
        raise CredentialError("credential too long")
    if not authority.verify(signed_bytes(token), bytes(token.signature)):
        raise CredentialError("not signed by this swarm's authority")
    # Signed by the authority: its fields are the authority's own, but still parsed defensively.
    parts = token.username.split("/")
    if len(parts) != 3 or parts[0] not in (ROLE_WORKER, ROLE_COORDINATOR):
        raise CredentialError("malformed credential name")
    role, run, worker = parts
    try:
        expires_at = float(token.expiration_time)
    except ValueError:
        raise CredentialError("malformed expiration time") from None
    now = get_dht_time() if now is None else now
    if not math.isfinite(expires_at) or expires_at <= now:
        raise CredentialError(f"expired {max(0.0, now - expires_at):.0f}s ago")
    if expires_at - now > MAX_LIFETIME_S:
        raise CredentialError("credential lifetime beyond the accepted maximum")
    credential = Credential(role, run, worker, bytes(token.public_key), expires_at, token)
    if run_id is not None and not credential.admits(run_id):
        raise CredentialError(f"credential is for run {run[:64]!r}, not {run_id[:64]!r}")
    return credential
