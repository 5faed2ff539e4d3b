"""The worker's connection to the coordinator: auth metadata, TLS, and retries.

Every call goes through :meth:`CoordinatorClient.call`, which retries the
failures that mean "the coordinator is away" (:data:`coldswarm.common.rpc_errors.AWAY`:
UNAVAILABLE, DEADLINE_EXCEEDED) with exponential backoff and jitter until it
answers or the worker is told to stop, and raises everything else (a refusal is
an answer, not an outage).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from coldswarm.common.channel import bearer, open_channel
from coldswarm.common.rpc_errors import is_away, status_code
from coldswarm.proto import coldswarm_pb2_grpc as pb_grpc
from coldswarm.worker.backoff import Backoff

log = logging.getLogger(__name__)


class Stopped(Exception):
    """The worker was asked to stop while waiting for the coordinator."""


class CoordinatorClient:
    """WorkerService calls with the current token and retry-on-outage."""

    def __init__(
        self,
        address: str,
        token: str,
        *,
        ca_file: Path | None = None,
        stop: threading.Event | None = None,
        backoff: Backoff | None = None,
        call_timeout_s: float = 30.0,
    ):
        self.address = address
        self.token = token
        self.channel = open_channel(address, ca_file)
        self.stub = pb_grpc.WorkerServiceStub(self.channel)
        self.stop = stop or threading.Event()
        self.backoff = backoff or Backoff()
        self.call_timeout_s = call_timeout_s

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return bearer(self.token)

    def call(self, method: str, request, *, retry: bool = True, timeout: float | None = None):
        """Call a unary WorkerService method; on an outage wait and try again (if ``retry``)."""
        fn: Callable = getattr(self.stub, method)
        return self.retrying(
            lambda: fn(request, metadata=self.metadata, timeout=timeout or self.call_timeout_s),
            what=method,
            retry=retry,
        )

    def retrying(self, attempt: Callable, *, what: str, retry: bool = True):
        while True:
            try:
                result = attempt()
                self.backoff.reset()
                return result
            except grpc.RpcError as exc:
                if not retry or not is_away(exc):
                    raise
                code = status_code(exc)
                delay = self.backoff.next_delay()
                log.warning(
                    "coordinator %s unreachable for %s (%s); retrying in %.1fs",
                    self.address,
                    what,
                    code.name if code else "error",
                    delay,
                )
                if self.stop.wait(delay):
                    raise Stopped(f"stopped while waiting for the coordinator ({what})") from exc

    def stream(self, method: str, request, timeout: float | None = None) -> Iterator:
        """A server-streaming call (no retry here: the caller resumes from its own offset)."""
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)

    def close(self) -> None:
        self.channel.close()
