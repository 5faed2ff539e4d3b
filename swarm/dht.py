"""Starting a swarm's DHT peer (:func:`start_dht`), in a process that survives the death of the processes it
answers (:class:`ResilientDHT`).

Both the worker's trainer and the coordinator's bootstrap peer start theirs with :func:`start_dht`.

Every DHT request carries an ``MPFuture`` whose reply pipe is a pickled ``Connection``. Unpickling it in the
DHT process fetches the file descriptor from the *requesting* process's ``multiprocessing`` resource sharer.
When that process has already exited (an averager shut down, or SIGKILLed, right after it asked), the fetch
fails inside ``Connection.recv()``: with ``OSError`` (which hivemind 1.1.12 logs with a traceback, then
sleeps for ``wait_timeout`` before reading the next request) or, when the requester exits mid-handshake,
with ``EOFError``, which ends hivemind's DHT process: every later request then waits forever, and a
coordinator's DHT peer stops bootstrapping the swarm. Seen in about one run in three of an averager started
and shut down at once.

:class:`ResilientDHT` turns such a request into a no-op (its requester is gone; nobody waits for the reply),
logged as a warning, and reads the next one at once; an end of the pipe itself (the owner of the DHT died)
still ends the process as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from hivemind import DHT

from coldswarm.swarm.averaging_codecs import register_safe_codecs

log = logging.getLogger(__name__)

LOOPBACK_MADDRS = ("/ip4/127.0.0.1/tcp/0",)

#: the request a dropped one becomes: ``ResilientDHT._requester_gone(reason)``
DROPPED = "_requester_gone"


class _RequestPipe:
    """The DHT's receiving pipe, with a failure to unpickle a request told apart from the pipe's end."""

    def __init__(self, connection: Connection):
        self._connection = connection

    def recv(self):
        buffer = self._connection.recv_bytes()  # EOFError here: the DHT's owner is gone; let the DHT end.
        try:
            return ForkingPickler.loads(buffer)
        except (EOFError, OSError) as exc:  # the file descriptors it carries can no longer be fetched
            return DROPPED, [], {"reason": repr(exc)}

    def __getattr__(self, name):
        return getattr(self._connection, name)


class ResilientDHT(DHT):
    """``hivemind.DHT`` whose process drops requests from processes that have exited instead of dying."""

    def run(self) -> None:
        # Runs in the DHT's own process; hivemind's loop calls getattr(self, method)(*args, **kwargs).
        self._inner_pipe = _RequestPipe(self._inner_pipe)
        super().run()

    async def _requester_gone(self, reason: str) -> None:
        log.warning("dropped a DHT request whose sender has exited (%s)", reason)


def start_dht(
    initial_peers: Iterable[str] = (),
    host_maddrs: Iterable[str] = LOOPBACK_MADDRS,
    announce_maddrs: Iterable[str] = (),
    client_mode: bool = False,
    **kwargs,
) -> ResilientDHT:
    """Start a hivemind DHT peer (a background process plus its p2p daemon). ``kwargs`` go to ``hivemind.DHT``
    (e.g. ``identity_path`` for a peer id that survives restarts)."""
    register_safe_codecs()  # before the DHT process forks: it inherits the codec registry as it is now
    return ResilientDHT(
        initial_peers=list(initial_peers),
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        client_mode=client_mode,
        start=True,
        **kwargs,
    )
