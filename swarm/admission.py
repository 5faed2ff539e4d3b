"""Who may take part in a run's averaging: the peers whose credential for the run is on the DHT.

hivemind's authorizer covers the DHT's RPCs only; the averagers' own (join a group, send a part of an
all-reduce, download state) are served to anyone who dials them. Their caller is known, though: libp2p
authenticates every connection with the remote peer's identity key, so ``context.remote_id`` *is* the caller.
An averager asks :class:`AdmittedPeers` whether that peer id is admitted to its run: every admitted peer
publishes its credential under ``admitted_key(run)`` (:mod:`coldswarm.swarm.records`), and a credential names
the key the peer id is the hash of (:func:`~coldswarm.swarm.credentials.peer_id_of`). The coordinator's own
peer (the authority) is always admitted.

Lookups run in the averager's process, on its event loop. Answers are cached until the credential expires;
a peer not (yet) known triggers one DHT read, at most every ``refresh_s`` however many unknown callers knock,
so an outsider hammering an averager costs it one DHT read per ``refresh_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from coldswarm.swarm.credentials import peer_id_of, public_key_from_bytes
from coldswarm.swarm.records import admitted_credentials, admitted_key

log = logging.getLogger(__name__)

__all__ = ["AdmittedPeers"]


class AdmittedPeers:
    """The peer ids admitted to ``run_id`` by the authority whose public key (OpenSSH bytes) is given.

    Built in the host process and used in the averager's (after the fork: its asyncio state is made lazily).
    """

    def __init__(self, run_id: str, authority_public_key: bytes, refresh_s: float = 1.0):
        self.run_id = run_id
        self.authority_public_key = bytes(authority_public_key)
        self.authority_peer_id = peer_id_of(public_key_from_bytes(self.authority_public_key))
        self.refresh_s = refresh_s
        self._authority = None
        self._expiry: dict[PeerID, float] = {}
        self._last_refresh = -float("inf")
        self._lock: asyncio.Lock | None = None

    def cached(self, peer_id: PeerID) -> bool:
        """Whether ``peer_id`` is known to be admitted, without asking the DHT."""
        return peer_id == self.authority_peer_id or self._expiry.get(peer_id, 0.0) > get_dht_time()

    async def is_admitted(self, peer_id: PeerID, dht) -> bool:
        """Whether ``peer_id`` holds a live credential for this run (reads the DHT when it is not cached)."""
        if self.cached(peer_id):
            return True
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # concurrent unknown callers share one read
            if not self.cached(peer_id) and time.monotonic() - self._last_refresh >= self.refresh_s:
                await self.refresh(dht)
        return self.cached(peer_id)

    async def refresh(self, dht) -> None:
        """Read the run's published credentials from the DHT, verify them, and cache the admitted peer ids."""
        self._last_refresh = time.monotonic()
        if self._authority is None:
            self._authority = public_key_from_bytes(self.authority_public_key)
        try:
            found = await dht.get(admitted_key(self.run_id), latest=True, return_future=True)
        except Exception as exc:  # the DHT is away: keep what is cached
            log.warning("could not read run %s's admitted peers: %r", self.run_id, exc)
            return
        now = get_dht_time()
        self._expiry = {peer: t for peer, t in self._expiry.items() if t > now}
        for credential in admitted_credentials(found, self._authority, self.run_id).values():
            peer = credential.peer_id
            self._expiry[peer] = max(self._expiry.get(peer, 0.0), credential.expires_at)
