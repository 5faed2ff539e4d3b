"""The status page and ``/metrics``: a read-only HTTP server beside the gRPC one (``serve --http-listen``).

aiohttp serves it on its own event loop in a thread of the coordinator's process, so nothing it does
waits on the gRPC server's threads, and the reads it makes (:mod:`coldswarm.coordinator.status_data`,
:mod:`coldswarm.coordinator.metrics`) run on a small pool of their own.

Routes:

==================  =======  ==========================================================================
``/``               GET      the page (HTML; refreshes itself; ``?round=N``: that pretrain round's curves)
``/api/status``     GET      the same snapshot as JSON (``?round=N`` too)
``/metrics``        GET      Prometheus text format
``/static/NAME``    GET      the page's script, style and Chart.js, from the installed package
``/login``          POST     form field ``token``: the admin token; sets an HttpOnly session cookie
``/logout``         POST     ends the session
==================  =======  ==========================================================================

Who is admin: a request with ``Authorization: Bearer <admin token>`` (scripts), or with the session
cookie a login set (browsers). Tokens are checked by :meth:`Auth.authenticate`, the same check as the
gRPC service's (a lookup by sha256, never a string comparison of the token). The cookie holds a random
session id, never the token; sessions live in memory (a restart logs the admin out) for
``SESSION_TTL_S``. No response carries a token.

Bad requests get a 4xx with a short message, never a traceback: aiohttp itself refuses request
lines and header fields over 8190 bytes and more than 64 headers (400) and bodies over
``MAX_BODY_BYTES`` (413), and closes connections that send no complete request within
``--http-timeout-s`` (slow clients); the middleware here refuses query strings over
``MAX_QUERY_BYTES`` (414) and unknown or malformed query parameters (400), unknown paths (404) and
methods (405), cross-site form posts (403) and form bodies that do not arrive within the timeout (408);
a connection past ``MAX_CONNECTIONS`` open at once gets a 503 and is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from aiohttp import web

from coldswarm.coordinator.errors import CoordinatorError, NotFound
from coldswarm.coordinator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from coldswarm.coordinator.metrics import CoordinatorMetrics
from coldswarm.coordinator.status_data import StatusData, View
from coldswarm.coordinator.status_page import PageRenderer

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 8190  # request line and each header field (aiohttp's own default, stated here)
MAX_HEADERS = 64
MAX_BODY_BYTES = 16 * 1024  # the login form is the only body this server reads
MAX_QUERY_BYTES = 1024
MAX_SESSIONS = 64
MAX_CONNECTIONS = 256  # open at once; past it a new connection gets a 503 and is closed
SESSION_TTL_S = 12 * 3600.0
SESSION_COOKIE = "coldswarm_session"
#: the query parameters each route takes (anything else is a 400 that names them); ``v`` busts caches
QUERY = {"/": ("round",), "/api/status": ("round",), "/static": ("v",)}
# Everything the page loads comes from here; nothing inline runs (the data block is JSON, not script).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class Sessions:
    """Admin sessions of browsers that logged in: random ids, in memory, expiring, bounded."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, limit: int = MAX_SESSIONS):
        self.ttl_s, self.limit = ttl_s, limit
        self._lock = threading.Lock()
        self._by_hash: dict[str, tuple[str, float]] = {}  # sha256(session id) -> (admin token id, expiry)

    @staticmethod
    def _hash(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    def create(self, token_id: str) -> str:
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._by_hash = {h: v for h, v in self._by_hash.items() if v[1] > now}
            while len(self._by_hash) >= self.limit:  # the oldest goes first
                del self._by_hash[min(self._by_hash, key=lambda h: self._by_hash[h][1])]
            self._by_hash[self._hash(session_id)] = (token_id, now + self.ttl_s)
        return session_id

    def token_id(self, session_id: str) -> str | None:
        """The admin token id behind a live session, else None."""
        with self._lock:
            hit = self._by_hash.get(self._hash(session_id))
        return hit[0] if hit is not None and hit[1] > time.time() else None

    def end(self, session_id: str) -> None:
        with self._lock:
            self._by_hash.pop(self._hash(session_id), None)


class _QuietBadRequests(logging.Filter):
    """aiohttp logs every malformed request at ERROR with a traceback; from strangers that is noise
    (and log volume they control): one INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.levelno >= logging.ERROR:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {str(exc)[:120]}"
            record.args, record.exc_info, record.exc_text = None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


SERVER_LOG = logging.getLogger(__name__ + ".server")
SERVER_LOG.addFilter(_QuietBadRequests())


class _TooManyConnections(asyncio.Protocol):
    """The whole of a connection past :data:`MAX_CONNECTIONS`: a 503, then closed."""

    BODY = b"503 too many connections to the status page; retry shortly\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(self.BODY)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
        )
        transport.write(head.encode() + self.BODY)
        transport.close()


class _CappedSockSite(web.SockSite):
    """aiohttp's SockSite, with at most :data:`MAX_CONNECTIONS` connections: each holds a file descriptor of
    the coordinator's process (the gRPC server needs them too) and may queue work."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server

        def protocol():
            if len(server.connections) >= MAX_CONNECTIONS:
                return _TooManyConnections()
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )


class HttpError(Exception):
    """A refusal with its status and a message for the person or script that sent the request."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _route_name(request: web.Request) -> str:
    """A bounded label for metrics: the route that matched, never the raw path."""
    info = request.match_info
    route = info.route if info is not None else None
    resource = route.resource if route is not None else None
    if resource is None:
        return "unmatched"
    return resource.canonical.split("/{")[0] or "/"


class StatusServer:
    """The HTTP server of one coordinator; :meth:`start` binds and serves in a thread, :meth:`stop` ends it."""

    def __init__(self, app, config, metrics: CoordinatorMetrics, coordinator_version: str = ""):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.data = StatusData(app, coordinator_version=coordinator_version)
        self.sessions = Sessions()
        self.page_renderer = PageRenderer()
        self.coordinator_version = coordinator_version
        self.tls = config.tls_cert is not None
        self.timeout_s = float(config.http_timeout_s)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="coldswarm-http")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.host, self.port = "", 0

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> StatusServer:
        host, _, port = self.config.http_listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        try:
            sock = socket.create_server(
                (host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET
            )
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot serve the status page on {self.config.http_listen}: {exc}") from None
        self.host, self.port = host, sock.getsockname()[1]
        ssl_context = None
        if self.tls:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(str(self.config.tls_cert), str(self.config.tls_key))
        self._loop = asyncio.new_event_loop()
        started = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._serve, args=(sock, ssl_context, started), name="coldswarm-status-http", daemon=True
        )
        self._thread.start()
        started.result(timeout=30)
        log.info("status page on %s", self.url)
        return self

    def _serve(self, sock, ssl_context, started: concurrent.futures.Future) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            self._runner = web.AppRunner(
                self.build_app(),
                access_log=None,
                handle_signals=False,
                shutdown_timeout=2.0,
                keepalive_timeout=self.timeout_s,
                max_line_size=MAX_LINE_BYTES,
                max_field_size=MAX_LINE_BYTES,
                max_headers=MAX_HEADERS,
                logger=SERVER_LOG,
            )
            loop.run_until_complete(self._runner.setup())
            site = _CappedSockSite(self._runner, sock, ssl_context=ssl_context, shutdown_timeout=2.0)
            loop.run_until_complete(site.start())
        except BaseException as exc:
            sock.close()
            started.set_exception(exc)
            return
        started.set_result(None)
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the application ------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._middleware])
        app.router.add_get("/", self.page)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.on_response_prepare.append(self._headers)
        return app

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)
        if self.tls:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        status = 500
        try:
            self._check_query(request)
            response = await handler(request)
            status = response.status
            return response
        except HttpError as exc:
            status = exc.status
            return self._error(request, exc.status, exc.message)
        except NotFound as exc:
            status = 404
            return self._error(request, 404, exc.message)
        except CoordinatorError as exc:
            status = 400
            return self._error(request, 400, exc.message)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, body too large
            status = exc.status
            if exc.status < 400:
                raise
            allow = getattr(exc, "allowed_methods", None) if exc.status == 405 else None
            return self._error(request, exc.status, self._explain(request, exc), allow)
        except Exception:
            log.exception("status page request %s %s failed", request.method, request.path[:100])
            return self._error(request, 500, "internal error (details in the coordinator's log)")
        finally:
            self.metrics.http_requests.labels(_route_name(request), str(status)).inc()

    @staticmethod
    def _explain(request: web.Request, exc: web.HTTPException) -> str:
        if exc.status == 404:
            return f"no page at {request.path[:80]!r}: try / (the page), /api/status (JSON) or /metrics"
        if exc.status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            return f"{request.method[:16]} is not allowed on {request.path[:80]!r} (allowed: {allowed})"
        if exc.status == 413:
            return f"request body too large (at most {MAX_BODY_BYTES} bytes)"
        return exc.reason

    @staticmethod
    def _error(request: web.Request, status: int, message: str, allow=None) -> web.Response:
        headers = {"Cache-Control": "no-store"}
        if allow:
            headers["Allow"] = ", ".join(sorted(allow))
        if request.path.startswith("/api/"):
            return web.json_response(
                {"error": {"status": status, "message": message}}, status=status, headers=headers
            )
        return web.Response(
            status=status, text=f"{status} {message}\n", content_type="text/plain", headers=headers
        )

    @staticmethod
    def _check_query(request: web.Request) -> None:
        if len(request.query_string) > MAX_QUERY_BYTES:
            raise HttpError(
                414, f"query string too long ({len(request.query_string)} bytes; at most {MAX_QUERY_BYTES})"
            )
        known = QUERY.get(_route_name(request), ())
        for name in request.query:
            if name not in known:
                hint = f"known: {', '.join(known)}" if known else "this path takes none"
                raise HttpError(400, f"unknown query parameter {name[:40]!r} ({hint})")

    # -- who is asking --------------------------------------------------------------------

    def _is_admin(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization")
        if header is not None:
            try:
                self.app.auth.authenticate([("authorization", header)], "admin")
            except CoordinatorError:
                # Never the auth's own message here: it names the token file's path on the coordinator.
                raise HttpError(
                    401, "the Authorization header does not hold this coordinator's admin token"
                ) from None
            return True
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            token_id = self.sessions.token_id(session_id)
            if token_id is not None and self._admin_token_valid(token_id):
                return True
        return False

    def _admin_token_valid(self, token_id: str) -> bool:
        return any(t.id == token_id and t.kind == "admin" and not t.revoked for t in self.app.auth.list())

    # -- handlers -------------------------------------------------------------------------

    def _view(self, request: web.Request, admin: bool) -> View:
        raw = request.query.get("round")
        if raw is None:
            return View(admin=admin)
        if not raw.isdigit() or len(raw) > 9:
            raise HttpError(400, f"round must be a round number, not {raw[:20]!r}")
        return View(admin=admin, series_round=int(raw))

    async def _snapshot(self, view: View) -> dict:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.data.snapshot, view)

    async def page(self, request: web.Request, login_error: str = "", status: int = 200) -> web.Response:
        admin = self._is_admin(request)
        data = await self._snapshot(self._view(request, admin))
        html = self.page_renderer.render(data, login_error)
        return web.Response(
            text=html, content_type="text/html", status=status, headers={"Cache-Control": "no-store"}
        )

    async def api_status(self, request: web.Request) -> web.Response:
        data = await self._snapshot(self._view(request, self._is_admin(request)))
        return web.json_response(
            data, headers={"Cache-Control": "no-store"}, dumps=lambda d: json.dumps(d, allow_nan=False)
        )

    async def metrics_text(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(self._pool, self.metrics.render)
        return web.Response(
            body=body, headers={"Content-Type": METRICS_CONTENT_TYPE, "Cache-Control": "no-store"}
        )

    async def static(self, request: web.Request) -> web.Response:
        asset = self.page_renderer.assets.get(request.match_info["name"])
        if asset is None:
            raise HttpError(404, f"no file {request.match_info['name'][:60]!r} under /static/")
        if request.headers.get("If-None-Match") == asset.etag:
            return web.Response(status=304, headers={"ETag": asset.etag})
        return web.Response(
            body=asset.body,
            headers={"Content-Type": asset.content_type, "ETag": asset.etag, "Cache-Control": "no-cache"},
        )

    def _check_same_origin(self, request: web.Request) -> None:
        """A form post must come from this page: browsers send Origin on every POST."""
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            if origin == "null":
                raise HttpError(403, "cross-site form posts are refused")
            return  # a script without a browser: nothing to forge
        if urlsplit(origin).netloc != request.host:
            raise HttpError(403, "cross-site form posts are refused")

    async def _form(self, request: web.Request):
        if request.content_type != "application/x-www-form-urlencoded":
            raise HttpError(415, "send the form as application/x-www-form-urlencoded")
        try:
            return await asyncio.wait_for(request.post(), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {self.timeout_s:.0f} s") from None

    async def login(self, request: web.Request) -> web.Response:
        self._check_same_origin(request)
        form = await self._form(request)
        token = str(form.get("token", "")).strip()
        try:
            principal = self.app.auth.authenticate([("authorization", f"Bearer {token}")], "admin")
        except CoordinatorError:
            return await self.page(
                request, login_error="That is not this coordinator's admin token.", status=401
            )
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(
            SESSION_COOKIE,
            self.sessions.create(principal.token_id),
            max_age=int(SESSION_TTL_S),
            path="/",
            httponly=True,
            secure=self.tls or None,
            samesite="Strict",
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        self._check_same_origin(request)
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            self.sessions.end(session_id)
        response = web.Response(status=303, headers={"Location": "/"})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response
