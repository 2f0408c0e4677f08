"""HTTP guards of the labelling service, independent of any model: the error answer every
refusal shares, limits on request bodies while they arrive, and browser-side protection.

* Bodies (:class:`UploadLimit`, :class:`UploadGate`): a size limit (from Content-Length and
  while reading), a deadline for the whole body and a minimum average rate after a grace
  period (408), and caps on bodies arriving at once per client address (429) and in all (503),
  so that stalled or trickling uploads hold a socket, never a scoring place.
* Browsers (:class:`BrowserGuard`, :class:`BrowserHeaders`): only allowed Host names are
  answered (400, against DNS rebinding), cross-origin state-changing requests get 403 unless
  their origin is allowed (then CORS), and every answer carries a Content-Security-Policy and
  the other browser security headers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# Request bodies (see UploadLimit): a deadline for the whole body from the end of the headers,
# a minimum average rate once a grace period has passed, and how many bodies may be arriving
# at once, per client address and in all (memory: DEFAULT_MAX_UPLOADS x the upload limit).
DEFAULT_BODY_TIMEOUT = 30.0  # seconds
DEFAULT_MIN_UPLOAD_RATE = 8 * 1024  # bytes/s
DEFAULT_UPLOAD_GRACE = 5.0  # seconds
DEFAULT_MAX_UPLOADS = 32
DEFAULT_MAX_UPLOADS_PER_CLIENT = 4


class ServiceError(Exception):
    """A request the service refuses: HTTP status, a stable error code and a message."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


class ErrorBody(BaseModel):
    error: str = Field(description="stable machine-readable code, e.g. not_an_image")
    detail: str = Field(description="what was wrong, naming the uploaded file")


def error_response(exc: ServiceError) -> JSONResponse:
    body = ErrorBody(error=exc.code, detail=exc.detail).model_dump()
    headers = dict(exc.headers or {})
    if exc.status in (408, 413, 429, 503):
        # Close the connection rather than read and discard the rest of a body refused
        # unread or part-read: too slow (408), too large (413), too many uploads (429, 503).
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=exc.status, headers=headers)


# --------------------------------------------------------------------------------------------
# Uploads: size limit, content sniffing, decoding
# --------------------------------------------------------------------------------------------


class BodyRefused(StarletteHTTPException):
    """Raised from `receive` mid-body; an HTTPException so FastAPI's body parsing passes it on
    unchanged (it turns other exceptions into a generic 400). `code` is the JSON error code."""

    code = "bad_body"


class UploadTooLarge(BodyRefused):
    code = "too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is larger than the limit of {limit:,} bytes")


class _UploadRefused(BodyRefused):
    """Too many uploads in progress (from this client, 429, or in all, 503)."""

    def __init__(self, refusal: ServiceError) -> None:
        super().__init__(refusal.status, refusal.detail, refusal.headers)
        self.code = refusal.code


class _UploadTimeout(BodyRefused):
    code = "upload_timeout"

    def __init__(self, detail: str) -> None:
        super().__init__(408, detail)


@dataclass(frozen=True)
class BodyTiming:
    """How long a request body may take: `timeout` seconds in all from the end of the headers,
    and, once `grace` seconds have passed, at least `min_rate` bytes/s on average (0: no
    minimum). Without them one stalled upload would hold its place (and its bytes) forever."""

    timeout: float = DEFAULT_BODY_TIMEOUT
    min_rate: float = DEFAULT_MIN_UPLOAD_RATE
    grace: float = DEFAULT_UPLOAD_GRACE

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"body_timeout must be positive, not {self.timeout}")
        if self.min_rate < 0:
            raise ValueError(f"min_upload_rate must not be negative, not {self.min_rate}")
        if self.grace < 0:
            raise ValueError(f"upload_grace must not be negative, not {self.grace}")

    def wait_s(self, elapsed: float, received: int) -> tuple[float, bool]:
        """Seconds the next chunk may take, and whether the minimum rate (not the deadline)
        sets them: the average falls below `min_rate` at ``received / min_rate`` seconds."""
        until = self.timeout
        by_rate = False
        if self.min_rate > 0:
            rate_until = max(self.grace, received / self.min_rate)
            by_rate = rate_until < until
            until = min(until, rate_until)
        return until - elapsed, by_rate

    def refusal(self, elapsed: float, received: int, by_rate: bool) -> _UploadTimeout:
        if by_rate:
            return _UploadTimeout(
                f"the upload is too slow: {received:,} bytes in {elapsed:.1f} s (at least "
                f"{self.min_rate:,.0f} bytes/s are needed after the first {self.grace:g} s)"
            )
        return _UploadTimeout(
            f"the upload was not complete within {self.timeout:g} s ({received:,} bytes received)"
        )


class UploadGate:
    """Request bodies being received now, per client address and in all.

    Memory for bodies in flight is bounded by ``max_uploads x`` the upload limit, and one
    client cannot take every place with stalled uploads. Thread-safe: TestClient may run
    requests on several event loops.
    """

    def __init__(
        self,
        max_uploads: int = DEFAULT_MAX_UPLOADS,
        max_per_client: int = DEFAULT_MAX_UPLOADS_PER_CLIENT,
    ) -> None:
        if max_uploads < 1:
            raise ValueError(f"max_uploads must be at least 1, not {max_uploads}")
        if max_per_client < 1:
            raise ValueError(f"max_uploads_per_client must be at least 1, not {max_per_client}")
        self.max_uploads = max_uploads
        self.max_per_client = max_per_client
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, client: str) -> ServiceError | None:
        """Take a place for `client`'s upload, or say why not (the caller answers with it)."""
        with self._lock:
            if self._by_client.get(client, 0) >= self.max_per_client:
                return ServiceError(
                    429,
                    "too_many_uploads",
                    f"{client} already has {self.max_per_client} uploads in progress (the "
                    "limit per client address); finish one first",
                    headers={"Retry-After": "1"},
                )
            if sum(self._by_client.values()) >= self.max_uploads:
                return ServiceError(
                    503,
                    "busy",
                    f"the service is busy ({self.max_uploads} uploads in progress); try "
                    "again shortly",
                    headers={"Retry-After": "1"},
                )
            self._by_client[client] = self._by_client.get(client, 0) + 1
        return None

    def leave(self, client: str) -> None:
        with self._lock:
            left = self._by_client.get(client, 0) - 1
            if left > 0:
                self._by_client[client] = left
            else:
                self._by_client.pop(client, None)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(self._by_client.values())


class _Body:
    """One request's `receive`, counted and timed until the body is complete."""

    def __init__(
        self,
        receive: Receive,
        max_bytes: int,
        file_limit: int,
        timing: BodyTiming | None,
        place: _Place,
    ) -> None:
        self._receive = receive
        self.place = place
        self.max_bytes = max_bytes
        self.file_limit = file_limit
        self.timing = timing
        self.received = 0
        self.complete = False
        self.started = time.monotonic()

    async def receive(self) -> Message:
        if self.complete:
            # Body read: later calls only listen for a disconnect, which has no deadline.
            return await self._receive()
        self.place.take()
        message = await self._next()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise UploadTooLarge(self.file_limit)
            self.complete = not message.get("more_body", False)
        else:  # http.disconnect: nothing more will come
            self.complete = True
        if self.complete:
            self.place.release()
        return message

    async def _next(self) -> Message:
        if self.timing is None:
            return await self._receive()
        elapsed = time.monotonic() - self.started
        wait, by_rate = self.timing.wait_s(elapsed, self.received)
        try:
            if wait <= 0:
                raise TimeoutError
            # asyncio.timeout, not wait_for: no extra task, so a body that has already
            # arrived is returned without yielding, and holds its place for no time at all.
            async with asyncio.timeout(wait):
                return await self._receive()
        except TimeoutError:
            elapsed = time.monotonic() - self.started
            raise self.timing.refusal(elapsed, self.received, by_rate) from None


class UploadLimit:
    """ASGI middleware for request bodies: size, time and how many are received at once.

    A declared Content-Length over `max_bytes` is answered at once, without reading the body;
    otherwise bytes are counted as they arrive and reading stops at the first byte too many
    (413). With `timing`, a body that misses its deadline or minimum rate gets 408; with
    `gate`, an upload beyond the per-client or total cap gets 429 or 503 when the app first
    reads it (see _Place). Every refusal closes the connection. A client that disconnects
    mid-upload is one info line (address and bytes received; never the file name, which may
    identify a patient), not a traceback.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        file_limit: int,
        timing: BodyTiming | None = None,
        gate: UploadGate | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.file_limit = file_limit
        self.timing = timing
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _too_large(self.file_limit)(scope, receive, send)
            return
        client = _client_address(scope)
        place = _Place(self.gate, client)
        body = _Body(receive, self.max_bytes, self.file_limit, self.timing, place)
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, body.receive, watched_send)
        except BodyRefused as exc:
            if started:
                raise
            refusal = ServiceError(exc.status_code, exc.code, exc.detail, exc.headers)
            await error_response(refusal)(scope, receive, send)
        except ClientDisconnect:
            log.info(
                "client %s disconnected during an upload after %d bytes", client, body.received
            )
        finally:
            place.release()


class _Place:
    """One upload's place in the gate: taken when the app first reads the body (not when the
    request starts, so a burst of quick uploads from one client is not refused while its
    requests wait for their turn to read), given back once the body is complete (it is in
    memory then, and the scoring admission bounds it) or the request ends."""

    def __init__(self, gate: UploadGate | None, client: str) -> None:
        self._gate = gate
        self._client = client
        self._held = False

    def take(self) -> None:
        if self._gate is None or self._held:
            return
        refused = self._gate.enter(self._client)
        if refused is not None:
            self._gate = None  # nothing to give back
            raise _UploadRefused(refused)
        self._held = True

    def release(self) -> None:
        if self._gate is not None and self._held:
            self._gate.leave(self._client)
        self._gate = None


def _client_address(scope: Scope) -> str:
    """The address uvicorn reports (X-Forwarded-For only from its trusted proxies)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> JSONResponse:
    return error_response(ServiceError(413, "too_large", UploadTooLarge(limit).detail))


# --------------------------------------------------------------------------------------------
# Browser-side guards: Host and Origin checks, security headers
# --------------------------------------------------------------------------------------------

# Names a service bound to loopback is reached by. A DNS-rebinding page reaches 127.0.0.1
# under its own name, which its requests carry in the Host header, so any other name is
# refused (400) before a route runs.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# The page loads its script and style from /static, shows films from blob: URLs and has a
# data: favicon; nothing inline, nothing from elsewhere, never framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
BROWSER_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
CORS_HEADERS = ("Authorization", "Content-Type", "X-Filename")


def host_name(value: str) -> str:
    """The host of a Host header or an allowed-hosts entry, lower case, without its port:
    ``[::1]:8000`` -> ``::1``, ``Localhost:80`` -> ``localhost``, ``::1`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host if rest == "" or re.fullmatch(r":\d+", rest) else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def default_allowed_hosts(bound: str) -> list[str]:
    """The Host names a service bound to address `bound` answers to by default: loopback and
    the address itself; for every interface (0.0.0.0, ::), the machine's own names and
    addresses, which are what clients on other machines reach it by."""
    hosts = list(LOOPBACK_HOSTS)
    if bound not in WILDCARD_BINDS:
        hosts.append(host_name(bound))
        return list(dict.fromkeys(hosts))
    name = socket.gethostname()
    hosts += [name, socket.getfqdn(name)]
    try:
        hosts += socket.gethostbyname_ex(name)[2]
    except OSError:  # a name without an address: the names still count
        log.debug("no address for host name %s", name)
    return list(dict.fromkeys(host_name(h) for h in hosts if h))


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    for pattern in allowed:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


def check_origin(origin: str) -> str:
    """An allowed origin as browsers send it (``scheme://host[:port]``, lower case) or
    ValueError: a wildcard would let any page use a service that may have no token."""
    text = origin.strip().lower().removesuffix("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise ValueError(
            f"allowed origin {origin!r}: give scheme://host[:port], e.g. https://viewer.example.org"
            " (no path, no wildcard)"
        )
    return text


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class BrowserGuard:
    """ASGI middleware: answer only allowed Host names (400) and refuse state-changing
    requests, and CORS preflights, from other origins (403), all as JSON errors.

    A request is cross-origin when its Origin header is neither the service's own (the
    host[:port] it was addressed by) nor an allowed origin, or when the browser says
    ``Sec-Fetch-Site: cross-site`` and its origin is not allowed. Clients that are not
    browsers send neither header and pass. GETs pass too: the browser's same-origin policy
    keeps their answers from other pages, now that a rebinding name cannot make them
    same-origin.
    """

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...], origins: tuple[str, ...]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> ServiceError | None:
        host = _header(scope, b"host")
        if host is None or not _host_allowed(host_name(host), self.hosts):
            return ServiceError(
                400,
                "host_not_allowed",
                f"this service does not answer to Host {host!r}; its operator can allow the "
                "name with --allowed-hosts",
            )
        origin = _header(scope, b"origin")
        preflight = (
            scope["method"] == "OPTIONS"
            and origin is not None
            and (_header(scope, b"access-control-request-method") is not None)
        )
        if scope["method"] in SAFE_METHODS and not preflight:
            return None
        allowed = origin is not None and origin.lower() in self.origins
        own = origin is not None and urlsplit(origin.lower()).netloc == host.lower()
        cross_site = _header(scope, b"sec-fetch-site") == "cross-site"
        if allowed or ((origin is None or own) and not cross_site and not preflight):
            return None
        return ServiceError(
            403,
            "cross_origin",
            f"cross-origin {scope['method']} from {origin or 'another site'} refused; its "
            "operator can allow the origin with --allowed-origins",
        )


class BrowserHeaders:
    """ASGI middleware: the security headers on every response, and ``Cache-Control:
    no-store`` on all but the page's static files (results, model details and errors must
    not stay in shared or browser caches)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cacheable = scope["path"].startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in BROWSER_HEADERS.items():
                    headers.setdefault(name, value)
                if not cacheable:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, with_headers)


def add_browser_guards(app: FastAPI, hosts: tuple[str, ...], origins: tuple[str, ...]) -> None:
    """Outermost first: headers on every answer (refusals too), then the Host and Origin
    checks, then CORS for the allowed origins (only preflights from them reach it)."""
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST"],
            allow_headers=list(CORS_HEADERS),
            expose_headers=["Retry-After"],
        )
    app.add_middleware(BrowserGuard, hosts=hosts, origins=origins)
    app.add_middleware(BrowserHeaders)
