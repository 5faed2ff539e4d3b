"""This worker's admission to a pretrain round's swarm: its credential, obtained and renewed over gRPC.

The worker's hivemind identity is an RSA key kept in its work dir (``swarm-identity.key``, owner-only), so
it keeps one peer id across assignments and restarts. For each pretrain assignment it asks the coordinator
(``GetSwarmCredential``) for a credential naming that key and the round's run, verifies it, and writes it to
a file only it can read, which its DHT process reads (:class:`~coldswarm.swarm.authorizer.CredentialFile`).
A background thread renews it after ``renew_after_s`` (half its life); each new one is also re-published on
the DHT, where the other peers' averagers look it up.

When the coordinator refuses a renewal (the join token was revoked, the worker left, the round is over) or
cannot be reached until the credential expires, the worker is out of the swarm: ``on_lost`` is called (the
trainer stops) and :attr:`SwarmCredentials.lost` says why.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from coldswarm.common.rpc_errors import is_away, rpc_message
from coldswarm.proto import coldswarm_pb2 as pb
from coldswarm.swarm.authorizer import CredentialFile
from coldswarm.swarm.credentials import (
    CredentialError,
    parse_credential,
    public_key_from_bytes,
    verify_credential,
)
from coldswarm.swarm.security import PeerSecurity

log = logging.getLogger(__name__)

__all__ = ["SwarmCredentials"]

#: while the coordinator is away, ask again this often (and never later than a quarter of what is left)
RETRY_S = 30.0


class SwarmCredentials:
    """Obtains (:meth:`obtain`) and renews (:meth:`start`) one assignment's swarm credential.

    :param fetch: ``public_key -> pb.SwarmCredential``: one ``GetSwarmCredential`` call (no retries; raises
      ``grpc.RpcError``)
    :param identity_path: this worker's identity key file (made, owner-only, when missing)
    :param credential_path: where the current credential is kept for the DHT process
    """

    def __init__(
        self,
        fetch: Callable[[bytes], pb.SwarmCredential],
        identity_path: Path,
        credential_path: Path,
        run_id: str,
    ):
        self.fetch = fetch
        self.identity_path = Path(identity_path)
        self.file = CredentialFile(credential_path)
        self.run_id = run_id
        self.security: PeerSecurity | None = None
        self.expires_at = 0.0
        self.renew_after_s = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def obtain(self) -> PeerSecurity:
        """The first credential: this worker's :class:`PeerSecurity` for the round (raises if refused)."""
        from coldswarm.swarm.credentials import load_or_create_identity

        public_key = load_or_create_identity(self.identity_path).get_public_key().to_bytes()
        reply = self.fetch(public_key)
        self._accept(reply, public_key)
        self.security = PeerSecurity(self.identity_path, bytes(reply.authority_public_key), self.file)
        return self.security

    def _accept(self, reply: pb.SwarmCredential, public_key: bytes) -> None:
        """Check what the coordinator sent (a credential for this key and run, signed by the authority that also
        signed the previous one) before the DHT process uses it."""
        authority = bytes(reply.authority_public_key)
        if self.security is not None and authority != self.security.authority_public_key:
            raise CredentialError("the coordinator's swarm key changed during the round")
        credential = verify_credential(
            parse_credential(bytes(reply.access_token)), public_key_from_bytes(authority), run_id=self.run_id
        )
        if credential.public_key != public_key:
            raise CredentialError("the coordinator sent a credential for another key")
        self.file.write(credential)
        self.expires_at = credential.expires_at
        self.renew_after_s = max(1.0, float(reply.renew_after_s) or (credential.expires_at - _now()) / 2)

    def start(
        self, on_renewed: Callable[[], object] | None = None, on_lost: Callable[[], object] | None = None
    ):
        """Renew in the background until :meth:`stop`; ``on_renewed()`` after each renewal, ``on_lost()`` once
        the credential expires without one."""
        self._thread = threading.Thread(
            target=self._renew_loop, args=(on_renewed, on_lost), name="swarm-credential", daemon=True
        )
        self._thread.start()
        return self

    def _renew_loop(self, on_renewed, on_lost) -> None:
        public_key = self.security.public_key
        wait = self.renew_after_s
        refused = ""
        while not self._stop.wait(max(0.0, min(wait, self.expires_at - _now()))):
            remaining = self.expires_at - _now()
            if remaining <= 0:
                self.lost = (
                    refused or "the credential expired: the coordinator could not be reached to renew it"
                )
                log.warning("left the swarm of run %s: %s", self.run_id, self.lost)
                if on_lost is not None:
                    on_lost()
                return
            if refused:  # keep what is left of the credential, but ask no more
                wait = remaining
                continue
            try:
                self._accept(self.fetch(public_key), public_key)
            except grpc.RpcError as exc:
                if is_away(exc):
                    wait = min(RETRY_S, max(1.0, remaining / 4))
                    log.warning(
                        "could not renew the swarm credential (%s); retrying in %.0fs", rpc_message(exc), wait
                    )
                    continue
                refused = f"the coordinator refused to renew the swarm credential: {rpc_message(exc)}"
                log.warning("%s; it expires in %.0fs", refused, remaining)
                wait = remaining
                continue
            except CredentialError as exc:
                refused = f"the coordinator sent an unusable swarm credential: {exc}"
                log.warning("%s; the current one expires in %.0fs", refused, remaining)
                wait = remaining
                continue
            wait = self.renew_after_s
            log.info("swarm credential renewed until %.0f", self.expires_at)
            if on_renewed is not None:
                try:
                    on_renewed()
                except Exception:  # the next renewal publishes again
                    log.warning("could not publish the renewed swarm credential", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _now() -> float:
    from hivemind.utils.timed_storage import get_dht_time

    return get_dht_time()
