"""Streams that wait on their caller must not take the server's threads: caps per caller and in all, and
an end to streams that go idle or last too long.

The sync gRPC server (grpcio) runs each call on a thread of one fixed pool until the call returns, and a
streaming call waits on its client: an upload stream for its next chunk (the request iterator blocks), a
download for its reader (a send blocks once HTTP/2 flow control runs out), reflection for its next
request. Idle streams would hold every thread, and health checks and admin calls would queue behind them
forever. gRPC's own knobs bound connections, not streams that wait (``server.py`` sets them: keepalive,
idle connections, connection age, concurrent streams per connection, ``maximum_concurrent_rpcs``), so
this :class:`StreamGuard` interceptor adds, for every streaming method except those gRPC serves without
a thread (health ``Watch``, which is non-blocking):

- **caps**: at most ``per_caller`` streams per caller (its token's principal when the token is valid,
  else its peer address; RESOURCE_EXHAUSTED), at most ``anonymous`` streams without a valid token in all
  (RESOURCE_EXHAUSTED) and at most ``total`` streams in all (UNAVAILABLE: the server is busy, retry),
  ``total`` being below the thread count, so threads always remain for unary calls;
- **an idle limit and a lifetime**: one watchdog thread ends a stream that waits on its client with
  DEADLINE_EXCEEDED (clients retry that code; uploads and downloads then resume from their offset) when
  no message moved for ``idle_s`` or it is older than ``max_s`` (a stream busy with the coordinator's
  own work, e.g. validating a finished upload, is not ended). gRPC has no server-side per-message timeout: the watchdog
  cancels the call with that status, which wakes the thread blocked in gRPC's iterator.

The interceptor runs on gRPC's polling thread, where it only wraps the handler; the counting happens when
the call starts on its pool thread (the peer address is known only there), before any request is read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

log = logging.getLogger(__name__)

# What each limit answers: a caller over its own share may not retry its way in; a full server says retry.
_CALLER_FULL = grpc.StatusCode.RESOURCE_EXHAUSTED
_SERVER_FULL = grpc.StatusCode.UNAVAILABLE


@dataclass
class StreamLimits:
    total: int  # streams served at once, all callers together (below the thread count)
    per_caller: int  # streams one caller may hold
    anonymous: int  # streams without a valid token, all peers together
    idle_s: float  # a stream in which no message moved for this long is ended
    max_s: float  # a stream is ended at this age


@dataclass(eq=False)  # one per call, in a set by identity
class _Stream:
    caller: str
    anonymous: bool
    context: grpc.ServicerContext
    method: str
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    busy: bool = False  # the handler is working (not waiting on the client): not idle
    ended: bool = False


def _peer_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4`` (the connection's port says nothing about who calls)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return f"{kind}:{rest[: rest.find(']') + 1]}"
    return f"{kind}:{rest.rsplit(':', 1)[0]}" if ":" in rest else peer


def _cancel(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with ``code`` and ``details`` from another thread.

    ``ServicerContext.cancel()`` (public) ends it with CANCELLED, which clients do not retry; the
    underlying core call can be cancelled with a status, which clients then see. Fall back to the
    public one where that private path does not exist (another grpcio)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        from grpc._cython import cygrpc

        call.cancel(getattr(cygrpc.StatusCode, code.name.lower()), details)
    except Exception:  # noqa: BLE001 - the public path still frees the thread
        context.cancel()


class StreamGuard(grpc.ServerInterceptor):
    """Caps on concurrent streams and a watchdog for idle or too-long ones (see the module doc)."""

    def __init__(self, limits: StreamLimits, caller_of: Callable[[tuple], str | None]):
        """``caller_of(invocation_metadata)``: a stable id of a caller with a valid token, else None."""
        self.limits = limits
        self.caller_of = caller_of
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        self._per_caller: dict[str, int] = {}
        self._anonymous = 0
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="coldswarm-stream-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()

    # -- the interceptor ------------------------------------------------------------------------------

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        if handler.response_streaming and not handler.request_streaming:
            behavior = handler.unary_stream
            if getattr(behavior, "experimental_non_blocking", False):
                return handler  # health Watch: served by callbacks, holds no thread
        method = handler_call_details.method
        caller = self.caller_of(handler_call_details.invocation_metadata)
        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}  # fmt: skip
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_stream(handler.stream_stream, method, caller), **kw
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(handler.stream_unary, method, caller), **kw
            )
        return grpc.unary_stream_rpc_method_handler(
            self._unary_stream(handler.unary_stream, method, caller), **kw
        )

    def _stream_unary(self, behavior, method: str, caller: str | None):
        def run(request_iterator, context):
            stream = self._enter(context, method, caller)
            try:
                return behavior(self._requests(stream, request_iterator), context)
            finally:
                self._leave(stream)

        return run

    def _stream_stream(self, behavior, method: str, caller: str | None):
        def run(request_iterator, context):
            stream = self._enter(context, method, caller)
            try:
                yield from self._responses(
                    stream, behavior(self._requests(stream, request_iterator), context)
                )
            finally:
                self._leave(stream)

        return run

    def _unary_stream(self, behavior, method: str, caller: str | None):
        def run(request, context):
            stream = self._enter(context, method, caller)
            try:
                yield from self._responses(stream, behavior(request, context))
            finally:
                self._leave(stream)

        return run

    # -- counting -------------------------------------------------------------------------------------

    def _enter(self, context, method: str, caller: str | None) -> _Stream:
        anonymous = caller is None
        key = f"peer {_peer_host(context.peer())}" if anonymous else caller
        lim = self.limits
        with self._lock:
            refusal = None
            if len(self._streams) >= lim.total:
                refusal = (_SERVER_FULL, f"the coordinator serves {lim.total} streams at once; retry shortly")
            elif self._per_caller.get(key, 0) >= lim.per_caller:
                refusal = (
                    _CALLER_FULL,
                    f"at most {lim.per_caller} streams per caller at once; close one first",
                )
            elif anonymous and self._anonymous >= lim.anonymous:
                refusal = (_CALLER_FULL, f"at most {lim.anonymous} streams without a valid token at once")
            if refusal is None:
                stream = _Stream(key, anonymous, context, method)
                self._streams.add(stream)
                self._per_caller[key] = self._per_caller.get(key, 0) + 1
                self._anonymous += anonymous
        if refusal is not None:
            context.abort(*refusal)
        return stream

    def _leave(self, stream: _Stream) -> None:
        with self._lock:
            if stream not in self._streams:
                return
            self._streams.discard(stream)
            n = self._per_caller[stream.caller] - 1
            if n:
                self._per_caller[stream.caller] = n
            else:
                del self._per_caller[stream.caller]
            self._anonymous -= stream.anonymous

    def active(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- progress -------------------------------------------------------------------------------------

    def _requests(self, stream: _Stream, requests: Iterator) -> Iterator:
        """The request iterator; waiting for the next request is idle time, handling one is not."""
        while True:
            stream.busy, stream.last = False, time.monotonic()
            try:
                request = next(requests)
            except StopIteration:
                stream.busy = True
                return
            stream.busy, stream.last = True, time.monotonic()
            yield request

    def _responses(self, stream: _Stream, responses: Iterator) -> Iterator:
        """The response iterator; gRPC asks for the next response once the last one was sent, so the
        time between yielding a response and being resumed is time spent waiting for the reader."""
        for response in responses:
            stream.busy, stream.last = False, time.monotonic()
            yield response
            stream.busy, stream.last = True, time.monotonic()

    # -- the watchdog ---------------------------------------------------------------------------------

    def _watch(self) -> None:
        period = max(0.05, min(1.0, self.limits.idle_s / 4))
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                streams = list(self._streams)
            for s in streams:
                if s.ended or s.busy:  # only a stream waiting on its client is ended, never our own work
                    continue
                if now - s.started > self.limits.max_s:
                    why = f"stream ended after {self.limits.max_s:g} s, this coordinator's limit"
                elif now - s.last > self.limits.idle_s:
                    why = f"stream idle for {self.limits.idle_s:g} s (nothing sent or read), this coordinator's limit"
                else:
                    continue
                s.ended = True
                log.info("ending %s from %s: %s", s.method, s.caller, why)
                # A transfer resumes from its offset: uploads with BeginUpload, downloads from their size.
                _cancel(s.context, grpc.StatusCode.DEADLINE_EXCEEDED, f"{why}; uploads and downloads resume")
