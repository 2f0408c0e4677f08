"""The labelling service: an HTTP API (FastAPI + uvicorn) and a web page for one model.

Endpoints (all errors are JSON ``{"error": code, "detail": message}``):

* ``POST /predict[?heatmaps=true]`` — one image (multipart field ``file``, or the raw bytes as
  the body) -> per-label probabilities, three-valued labels (1 positive, 0 negative,
  -1 uncertain) from the model's stored thresholds, the thresholds, model id, version and
  test-time augmentation (``tta``, see :mod:`cxrlabel.models.tta`; 1 = none) and,
  when asked, links to the film as the model saw it and to a Grad-CAM heatmap per label.
* ``GET /heatmaps/{result_id}/{label}.png``, ``GET /results/{result_id}/film.png`` — computed
  lazily from a bounded cache of recent results.
* ``GET /health`` (never needs the token), ``GET /model``, ``GET /openapi.json``, and ``GET /``:
  the web page (plain HTML/JS/CSS from ``cxrlabel/static``, nothing from a CDN).

Uploads are checked by content, never by file name or declared type: PNG, JPEG and DICOM
(with or without the 128-byte preamble) are recognised from their first bytes by
:func:`cxrlabel.data.images.sniff_format` and decoded from memory (no temporary file) by
:func:`cxrlabel.data.images.read_image`, so every format and every
:class:`~cxrlabel.data.images.ImageError` behaves exactly as on the command line. Bad input gets a
4xx, never a 500: 413 when the body exceeds the upload limit (enforced from Content-Length and
while reading, before the whole body is in memory), 415 for content that is not a supported
image, 422 for an image that cannot be decoded (an empty body too), 401 without the bearer
token when one is set. A decodable film is always labelled; the input checks of
:mod:`cxrlabel.data.sanity` (tiny, odd shape, colour, blank, non-chest DICOM) are returned with
it as ``flags`` for the client to show.

Browsers are kept from misusing a service without a token (see BrowserGuard and
BrowserHeaders): only allowed Host names are answered (400 otherwise, against DNS rebinding),
cross-origin POSTs get 403 unless their origin is allowed (and then CORS headers), and every
response carries a Content-Security-Policy and the other browser security headers. /model and
heatmap reasons name checkpoints by file name, never by server path.

Inference runs in a worker thread, off the event loop, and one lock per model serialises
forward passes: PyTorch modules are not meant to run concurrently from several threads
(Grad-CAM even attaches hooks to the model). Decoding, the slow part for large films, runs
outside the lock.

Memory is bounded, not proportional to the number of clients: a small upload can decode to a
huge array (a 130 KB 8192 x 8192 PNG is 256 MB as float32). So at most `max_concurrent`
requests decode and predict at once (a semaphore), at most `max_queue` more wait for their
turn, and any further request gets 503 ``busy`` at once. Only a complete body takes one of
those places: bodies still arriving are bounded by :class:`UploadLimit` instead (a deadline, a
minimum rate, and caps on uploads in flight per client address and in all), so stalled
uploads cannot lock genuine ones out. Right after
decoding, in the same worker thread, the film is replaced by its copy scaled to the model's
input (which the model's own resize then leaves unchanged, so the probabilities are the same)
and the full-size array is dropped before waiting for the model lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import numpy as np
from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import cxrlabel
from cxrlabel.data.images import (
    ImageError,
    ImageInfo,
    NotAnImageError,
    UnsupportedImageError,
    read_image_with_info,
    sniff_format,
)
from cxrlabel.data.pictures import encode_png
from cxrlabel.data.sanity import DEFAULT_LIMITS, sanity_flags
from cxrlabel.data.transforms import ResizeGeometry, scale_to_fit
from cxrlabel.labelling.heatmaps import gradcams, heatmap_model, overlay_png
from cxrlabel.models.predictor import Predictor, shared_resize
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_HEATMAP_CACHE = 64
# Requests decoding + predicting at once (each may hold a full-size decoded film for a moment),
# and requests allowed to wait for a turn; beyond both, 503. Two workers keep the model busy
# (one decodes while the other holds the lock) without multiplying peak memory.
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_QUEUE = 16
# Request bodies (see UploadLimit): a deadline for the whole body from the end of the headers,
# a minimum average rate once a grace period has passed, and how many bodies may be arriving
# at once, per client address and in all (memory: DEFAULT_MAX_UPLOADS x the upload limit).
DEFAULT_BODY_TIMEOUT = 30.0  # seconds
DEFAULT_MIN_UPLOAD_RATE = 8 * 1024  # bytes/s
DEFAULT_UPLOAD_GRACE = 5.0  # seconds
DEFAULT_MAX_UPLOADS = 32
DEFAULT_MAX_UPLOADS_PER_CLIENT = 4
TOKEN_ENV = "CXRLABEL_TOKEN"
STATIC_DIR = Path(__file__).with_name("static")

# Multipart framing (boundaries, part headers) around the file; the file itself is checked
# against the exact limit once parsed.
MULTIPART_SLACK = 64 * 1024
# Films shown on the page when no model preprocessing says what size the model sees (only
# the geometry matters here: mean and std are never applied to a preview).
PREVIEW_SIZE = 512
PREVIEW_GEOMETRY = ResizeGeometry(PREVIEW_SIZE, "pad", "bilinear")
MAX_NAME = 255  # characters of the client's file name echoed back in responses
LABEL_TEXT = {1: "positive", 0: "negative", -1: "uncertain"}


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


# --------------------------------------------------------------------------------------------
# Response schemas (they make the OpenAPI document describe the real responses)
# --------------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    error: str = Field(description="stable machine-readable code, e.g. not_an_image")
    detail: str = Field(description="what was wrong, naming the uploaded file")


class HealthBody(BaseModel):
    status: Literal["ok"]
    model_id: str
    version: str


class ModelRef(BaseModel):
    id: str = Field(description="sha256 over the weights of every checkpoint (first 16 hex)")
    name: str
    kind: str = Field(
        description='"single model" or "ensemble of N checkpoints" (", TTA xN" with --tta N)'
    )
    tta: int = Field(1, description="test-time augmentation transforms averaged (1: none)")
    version: str = Field(description="cxrlabel package version")


class FileInfo(BaseModel):
    name: str
    format: Literal["png", "jpeg", "dicom"]
    bytes: int
    width: int
    height: int


class LabelResult(BaseModel):
    label: str
    probability: float
    value: Literal[1, 0, -1] = Field(description="1 positive, 0 negative, -1 uncertain")
    text: Literal["positive", "negative", "uncertain"]
    threshold: float
    band: tuple[float, float] | None = Field(description="uncertainty band (low, high), if any")


class HeatmapInfo(BaseModel):
    requested: bool
    available: bool
    reason: str | None = None
    film: str | None = Field(None, description="the film as the model saw it, PNG")
    links: dict[str, str] = Field(default_factory=dict, description="label -> Grad-CAM PNG")


class PredictBody(BaseModel):
    result_id: str
    model: ModelRef
    file: FileInfo
    labels: dict[str, Literal[1, 0, -1]] = Field(description="label -> 1 / 0 / -1")
    probabilities: dict[str, float]
    results: list[LabelResult]
    thresholds: dict[str, Any] = Field(description="the thresholds used (rule, values, band)")
    heatmaps: HeatmapInfo
    timing_ms: dict[str, float]
    flags: list[str] = Field(
        default_factory=list,
        description="input checks that say not to trust the labels (the film is labelled "
        "anyway): small, aspect, colour, constant, modality:<M>, body_part:<B>; empty when none",
    )


# Every error any route, middleware or handler can answer with, all as ErrorBody; each route
# declares those it can give (see _errors), so that the schema tells clients the truth.
_ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "a Host the service does not answer to (host_not_allowed), or no 'file' part",
    401: "missing or wrong bearer token",
    403: "a cross-origin request from an origin that is not allowed (cross_origin)",
    404: "unknown or expired result, unknown label, or no heatmaps for this model",
    408: "the upload was not received in time",
    413: "upload larger than the limit",
    415: "not a PNG, JPEG or DICOM image",
    422: "an image that cannot be decoded (empty, truncated, ...), or an invalid parameter",
    429: "too many uploads at once from this client",
    503: "busy: too many requests; retry later",
}


def _errors(*statuses: int, token: bool) -> dict[int | str, dict[str, Any]]:
    """Response declarations for `statuses`, plus 400 (the Host check answers any request)
    and, with a token, 401."""
    wanted = sorted({400, *statuses, *([401] if token else [])})
    return {s: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[s]} for s in wanted}


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# --------------------------------------------------------------------------------------------
# Uploads: size limit, content sniffing, decoding
# --------------------------------------------------------------------------------------------


class _BodyRefused(StarletteHTTPException):
    """Raised from `receive` mid-body; an HTTPException so FastAPI's body parsing passes it on
    unchanged (it turns other exceptions into a generic 400). `code` is the JSON error code."""

    code = "bad_body"


class _UploadTooLarge(_BodyRefused):
    code = "too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is larger than the limit of {limit:,} bytes")


class _UploadRefused(_BodyRefused):
    """Too many uploads in progress (from this client, 429, or in all, 503)."""

    def __init__(self, refusal: ServiceError) -> None:
        super().__init__(refusal.status, refusal.detail, refusal.headers)
        self.code = refusal.code


class _UploadTimeout(_BodyRefused):
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
                raise _UploadTooLarge(self.file_limit)
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
        except _BodyRefused as exc:
            if started:
                raise
            refusal = ServiceError(exc.status_code, exc.code, exc.detail, exc.headers)
            await _error_response(refusal)(scope, receive, send)
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
    return _error_response(ServiceError(413, "too_large", _UploadTooLarge(limit).detail))


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
            await _error_response(refusal)(scope, receive, send)
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


def _add_browser_guards(app: FastAPI, hosts: tuple[str, ...], origins: tuple[str, ...]) -> None:
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


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().removesuffix("_error")


def _image_error(exc: ImageError, filename: str) -> ServiceError:
    """415 when the content is not a supported image, 422 when it cannot be decoded; the
    message names the uploaded file."""
    status = 415 if isinstance(exc, NotAnImageError | UnsupportedImageError) else 422
    return ServiceError(status, _snake(type(exc).__name__), f"{filename}: {exc.reason}")


def decode_upload(data: bytes, filename: str) -> tuple[np.ndarray, ImageInfo]:
    """Bytes of an uploaded file -> (float32 (H, W) image in [0, 1], what the reader saw:
    its format, colour, DICOM tags) or ServiceError.

    Only PNG, JPEG and DICOM are accepted (read_image would also take what else Pillow
    reads); empty data is left to read_image, which says so (422).
    """
    fmt = sniff_format(data)
    if fmt is None and data:
        reason = "not a PNG, JPEG or DICOM image (the content is checked, not the file name)"
        raise _image_error(NotAnImageError(filename, reason), filename)
    try:
        image, info = read_image_with_info(data, name=filename)
    except ImageError as exc:
        raise _image_error(exc, filename) from exc
    except Exception as exc:
        # Decoders may fail in ways read_image does not classify; it is still the input.
        log.warning("unclassified decoding failure for %s", filename, exc_info=True)
        raise ServiceError(422, "corrupt_image", f"{filename}: cannot be decoded ({exc})") from exc
    assert fmt is not None  # only empty data has no format, and read_image refused it
    return image, info


async def _read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and name, from multipart field `file` or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ServiceError(400, "missing_file", "send the image as multipart field 'file'")
            data = await upload.read(limit + 1)
            name = upload.filename or "upload"
        finally:
            await form.close()  # removes the spooled temporary file now
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, "too_large", _UploadTooLarge(limit).detail)
            chunks.append(chunk)
        # An empty body is left to decode_upload: 422 empty_image, as for an empty file part.
        data, name = b"".join(chunks), request.headers.get("x-filename", "upload")
    if len(data) > limit:
        raise ServiceError(413, "too_large", _UploadTooLarge(limit).detail)
    return data, name[:MAX_NAME]


# --------------------------------------------------------------------------------------------
# Results kept for heatmaps
# --------------------------------------------------------------------------------------------


@dataclass
class _Result:
    film: np.ndarray  # the film as the heatmap model sees it (float32, [0, 1])
    pngs: dict[str, bytes] = field(default_factory=dict)


class ResultCache:
    """The most recent `capacity` results (least recently used evicted), thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the heatmap cache must hold at least one result")
        self.capacity = capacity
        self._items: OrderedDict[str, _Result] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, result: _Result) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = result
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> _Result | None:
        with self._lock:
            result = self._items.get(key)
            if result is not None:
                self._items.move_to_end(key)
            return result

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


# --------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------


def model_id(info: dict[str, Any]) -> str:
    """A short stable id: sha256 over the members' weight hashes (else over the info)."""
    hashes = [str(m.get("sha256")) for m in info.get("members", []) if m.get("sha256")]
    text = "\n".join(hashes) if hashes else json.dumps(info, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# Absolute paths inside free text (exception messages): POSIX and Windows; the last part is
# kept. The paths of the model's own files are replaced by name before this catch-all.
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.~:/-])(?:[A-Za-z]:[\\/]|/)(?:[^\\/\s'"`,;()]+[\\/])+""")


def _model_files(info: Mapping[str, Any]) -> list[str]:
    """The server-side paths an info names: each member's checkpoint and an ONNX source."""
    paths = [str(m["path"]) for m in info.get("members", []) if m.get("path")]
    return [*paths, *([str(info["onnx_source"])] if info.get("onnx_source") else [])]


def redact_paths(value: Any, files: Sequence[str]) -> Any:
    """`value` (a string, or lists and dicts of them) with each of `files` and any other
    absolute path cut to its file name: clients get names, never the server's folders."""
    if isinstance(value, str):
        for path in sorted(files, key=len, reverse=True):
            value = value.replace(path, Path(path).name)
        return _ABSOLUTE_PATH.sub("", value)
    if isinstance(value, list | tuple):
        return [redact_paths(v, files) for v in value]
    if isinstance(value, dict):
        return {k: redact_paths(v, files) for k, v in value.items()}
    return value


def public_info(info: Mapping[str, Any]) -> dict[str, Any]:
    """`model_info()` as /model shows it: members' checkpoints by file name (``file``, not
    ``path``) and no server-side path anywhere."""
    files = _model_files(info)
    members = [
        {"file": Path(str(m["path"])).name, **{k: v for k, v in m.items() if k != "path"}}
        if m.get("path")
        else dict(m)
        for m in info.get("members", [])
    ]
    return redact_paths({**info, "members": members}, files)


@dataclass
class _Labelled:
    """One upload, decoded and scored; the full-size film is not kept."""

    probs: np.ndarray
    fmt: str
    width: int
    height: int
    film: np.ndarray | None  # the film as the heatmap model sees it, when asked for
    decode_s: float
    queued_s: float
    predict_s: float
    flags: tuple[str, ...] = ()


class _Service:
    """Everything a request handler needs; one per app, no module-level state."""

    def __init__(
        self,
        model: Predictor,
        *,
        max_upload_bytes: int,
        token: str | None,
        heatmap_cache: int,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if max_upload_bytes < 1:
            raise ValueError("max_upload_bytes must be positive")
        if token is not None and not token.strip():
            raise ValueError("the bearer token must not be empty")
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must not be negative")
        self.model = model
        self.max_upload_bytes = max_upload_bytes
        self.token = token
        self.lock = threading.Lock()
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        # Taken in the worker thread around decode + predict: at most `max_concurrent`
        # decoded films exist at once, however many requests arrive.
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self.cache = ResultCache(heatmap_cache)
        self.info = model.model_info()
        self.ref = ModelRef(
            id=model_id(self.info),
            name=model.name,
            kind=model.kind,
            tta=int(self.info.get("tta", 1)),
            version=cxrlabel.__version__,
        )
        # Heatmaps are optional here: without them the service still labels, and says why.
        self.cam = heatmap_model(model, required=False)
        if self.cam.available:
            log.info("heatmaps: %s", self.cam.note)
        # What clients are told: the same, without the server's paths (the log keeps them).
        files = _model_files(self.info)
        self.public_info = public_info(self.info)
        self.cam_note: str = redact_paths(self.cam.note, files)
        self.cam_reason: str | None = redact_paths(self.cam.reason, files)
        self.input_geometry = shared_resize([model])
        # The film kept for a result is scaled as the heatmap model scales it (else as the
        # model does); members that resize differently and no heatmaps get a preview size.
        cam_prep = self.cam.model.preprocessing if self.cam.model is not None else None
        self.film_geometry: ResizeGeometry = (
            cam_prep.geometry if cam_prep else self.input_geometry or PREVIEW_GEOMETRY
        )

    def check_token(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            raise ServiceError(
                401,
                "unauthorized",
                "this service needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @contextmanager
    def admit(self) -> Iterator[None]:
        """A place among the requests working or waiting, or 503 at once when all are taken.

        Never blocks: it runs on the event loop once the body is complete, so a refused
        request costs no worker thread, and a slow upload holds no place (UploadLimit bounds
        bodies still arriving).
        """
        limit = self.max_concurrent + self.max_queue
        with self._admit_lock:
            if self._admitted >= limit:
                raise ServiceError(
                    503,
                    "busy",
                    f"the service is busy ({self.max_concurrent} requests being labelled and "
                    f"{self.max_queue} waiting); try again shortly",
                    headers={"Retry-After": "1"},
                )
            self._admitted += 1
        try:
            yield
        finally:
            with self._admit_lock:
                self._admitted -= 1

    @property
    def admitted(self) -> int:
        """Requests working or waiting now."""
        with self._admit_lock:
            return self._admitted

    def label(self, data: bytes, filename: str, keep_film: bool) -> _Labelled:
        """Decode and score one upload; runs in a worker thread, holding one of the slots."""
        waiting = time.perf_counter()
        with self.slots:
            started = time.perf_counter()
            image, info = decode_upload(data, filename)
            height, width = image.shape
            flags = sanity_flags(image, info)
            model_input = self.model_view(image)
            film = None
            if keep_film:
                shared = self.input_geometry == self.film_geometry
                film = model_input if shared else self.film_view(image)
            # Drop the full-size film before waiting for the model lock: only model-sized
            # copies wait (unless members differ in their resize; see model_view).
            del image
            decoded = time.perf_counter()
            probs = self.predict(model_input)
            predicted = time.perf_counter()
        return _Labelled(
            probs=probs,
            fmt=info.format,
            width=width,
            height=height,
            film=film,
            decode_s=decoded - started,
            queued_s=started - waiting,
            predict_s=predicted - decoded,
            flags=flags,
        )

    def model_view(self, image: np.ndarray) -> np.ndarray:
        """The film scaled to the model's input before its pad or crop, which the model's own
        resize then leaves unchanged: the same probabilities from a model-sized array. An
        ensemble whose members resize differently gets the film itself."""
        return image if self.input_geometry is None else scale_to_fit(image, self.input_geometry)

    def predict(self, image: np.ndarray) -> np.ndarray:
        with self.lock:
            return np.asarray(self.model.predict_images([image]), dtype=np.float64)[0]

    def film_view(self, image: np.ndarray) -> np.ndarray:
        """The film scaled as the heatmap model scales it, before its pad or crop.

        Preprocessing this again scales by exactly 1, so the model input (and so the heatmap)
        is identical to the one scored, while a result keeps only a model-sized film rather
        than the full upload; the page shows it without the padding.
        """
        return scale_to_fit(image, self.film_geometry)

    def heatmap_png(self, result: _Result, label: str) -> bytes:
        cached = result.pngs.get(label)
        if cached is not None:
            return cached
        with self.lock:
            cam = gradcams(self.cam.model, result.film, [label], target_layer=self.cam.layer)
        png = overlay_png(result.film, cam[label])
        result.pngs[label] = png
        return png


def _results(probs: np.ndarray, thresholds: Thresholds) -> list[LabelResult]:
    values = thresholds.apply(probs[None, :])[0]
    out = []
    for k, label in enumerate(thresholds.labels):
        value = int(values[k])
        out.append(
            LabelResult(
                label=label,
                probability=float(probs[k]),
                value=value,  # type: ignore[arg-type]
                text=LABEL_TEXT[value],  # type: ignore[arg-type]
                threshold=float(thresholds.values[k]),
                band=None if thresholds.band is None else thresholds.band[k],
            )
        )
    return out


def _error_response(exc: ServiceError) -> JSONResponse:
    body = ErrorBody(error=exc.code, detail=exc.detail).model_dump()
    headers = dict(exc.headers or {})
    if exc.status in (408, 413, 429, 503):
        # Close the connection rather than read and discard the rest of a body refused
        # unread or part-read: too slow (408), too large (413), too many uploads (429, 503).
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=exc.status, headers=headers)


def create_app(
    model: Predictor,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    token: str | None = None,
    heatmap_cache: int = DEFAULT_HEATMAP_CACHE,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_queue: int = DEFAULT_MAX_QUEUE,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    min_upload_rate: float = DEFAULT_MIN_UPLOAD_RATE,
    upload_grace: float = DEFAULT_UPLOAD_GRACE,
    max_uploads: int = DEFAULT_MAX_UPLOADS,
    max_uploads_per_client: int = DEFAULT_MAX_UPLOADS_PER_CLIENT,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
) -> FastAPI:
    """The HTTP API and web page for `model` (an Ensemble, an OnnxModel, or anything with
    their interface).

    Args:
        max_upload_bytes: largest accepted image file; larger uploads get 413.
        token: when set, every endpoint but /health, / and the page's static files needs
            ``Authorization: Bearer <token>``.
        heatmap_cache: how many recent results keep their film for heatmaps.
        max_concurrent: uploads decoded and scored at once (each holds its full-size decoded
            film while it is being scaled down).
        max_queue: further /predict requests that may wait for their turn; beyond that they
            get 503 ``busy``. Waiting requests hold a worker thread each, so keep
            ``max_concurrent + max_queue`` under the thread pool's size (40 by default).
            Only requests whose body is complete are admitted: a slow upload holds no place.
        body_timeout: seconds for a whole request body, from the end of its headers; 408
            beyond.
        min_upload_rate: bytes/s a body must average once `upload_grace` seconds have
            passed (0: no minimum); 408 below.
        max_uploads: bodies being received at once; further uploads get 503 ``busy``. Upload
            memory is bounded by ``max_uploads x max_upload_bytes``.
        max_uploads_per_client: bodies being received at once from one client address;
            further ones get 429 ``too_many_uploads``.
        allowed_hosts: Host names answered besides loopback (localhost, 127.0.0.1, ::1),
            with any port; ``*.example.org`` for subdomains, ``*`` for any name. Others: 400.
        allowed_origins: origins (``https://viewer.example.org``) whose pages may POST and
            get CORS headers; other cross-origin POSTs get 403.
    """
    origins = tuple(dict.fromkeys(check_origin(o) for o in allowed_origins))
    hosts = tuple(dict.fromkeys(host_name(h) for h in (*LOOPBACK_HOSTS, *allowed_hosts)))
    timing = BodyTiming(body_timeout, min_upload_rate, upload_grace)
    uploads = UploadGate(max_uploads, max_uploads_per_client)
    service = _Service(
        model,
        max_upload_bytes=max_upload_bytes,
        token=token,
        heatmap_cache=heatmap_cache,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
    )
    app = FastAPI(
        title="cxrlabel",
        version=cxrlabel.__version__,
        description="Labels chest radiographs with the 14 CheXpert observations.",
        # The interactive docs load their scripts from a CDN; the schema is at /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.uploads = uploads
    app.state.upload_timing = timing
    app.add_middleware(
        UploadLimit,
        max_bytes=max_upload_bytes + MULTIPART_SLACK,
        file_limit=max_upload_bytes,
        timing=timing,
        gate=uploads,
    )
    _add_browser_guards(app, hosts, origins)
    _add_error_handlers(app)
    _add_routes(app, service)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = exc.code if isinstance(exc, _BodyRefused) else f"http_{exc.status_code}"
        headers = getattr(exc, "headers", None)
        return _error_response(ServiceError(exc.status_code, code, str(exc.detail), headers))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return _error_response(ServiceError(422, "invalid_request", "; ".join(parts)))


def _add_routes(app: FastAPI, service: _Service) -> None:
    bearer = HTTPBearer(auto_error=False, description="set when the service has a token")

    def authorised(
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),  # noqa: B008
    ) -> None:
        service.check_token(credentials)

    # Declared (and so in the schema) only when there is a token to check.
    token = service.token is not None
    auth = [Security(authorised)] if token else []

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get(
        "/health",
        response_model=HealthBody,
        responses=_errors(token=False),
        summary="liveness; needs no token",
    )
    async def health() -> HealthBody:
        return HealthBody(status="ok", model_id=service.ref.id, version=service.ref.version)

    @app.get("/model", dependencies=auth, responses=_errors(token=token), summary="model details")
    async def model_info() -> dict[str, Any]:
        return {
            **service.public_info,
            "tta": service.ref.tta,
            "id": service.ref.id,
            "version": service.ref.version,
            "heatmaps": {
                "available": service.cam.available,
                "reason": service.cam_reason,
                "note": service.cam_note,  # which checkpoint; that they are drawn without TTA
            },
            "max_upload_bytes": service.max_upload_bytes,
            "max_concurrent": service.max_concurrent,
            "max_queue": service.max_queue,
            "auth": service.token is not None,
            "uploads": _upload_limits(app),
            "input_checks": _limits_json(),
        }

    @app.post(
        "/predict",
        dependencies=auth,
        response_model=PredictBody,
        responses=_errors(403, 408, 413, 415, 422, 429, 503, token=token),
        openapi_extra=_UPLOAD_BODY,
        summary="label one chest radiograph (PNG, JPEG or DICOM)",
    )
    async def predict(
        request: Request,
        heatmaps: bool = Query(False, description="also return heatmap and film links"),
    ) -> PredictBody:
        started = time.perf_counter()
        # The body first (UploadLimit bounds its time, size and how many arrive at once), then
        # a place among the requests scoring or waiting (or 503): a slow upload must not hold
        # a place that a complete one could use.
        data, filename = await _read_upload(request, service.max_upload_bytes)
        read_s = time.perf_counter() - started
        with service.admit():
            done = await run_in_threadpool(service.label, data, filename, heatmaps)
        result_id = uuid.uuid4().hex
        heatmap_info = HeatmapInfo(requested=heatmaps, available=False)
        if done.film is not None:
            result_id = service.cache.put(_Result(done.film))
            heatmap_info = _heatmap_links(service, result_id)
        results = _results(done.probs, service.model.thresholds)
        return PredictBody(
            result_id=result_id,
            model=service.ref,
            file=FileInfo(
                name=filename,
                format=done.fmt,  # type: ignore[arg-type]
                bytes=len(data),
                width=done.width,
                height=done.height,
            ),
            labels={r.label: r.value for r in results},
            probabilities={r.label: r.probability for r in results},
            results=results,
            thresholds=service.model.thresholds.to_dict(),
            heatmaps=heatmap_info,
            timing_ms={
                "read_and_decode": round((read_s + done.decode_s) * 1e3, 2),
                "queued": round(done.queued_s * 1e3, 2),
                "predict": round(done.predict_s * 1e3, 2),
            },
            flags=list(done.flags),
        )

    @app.get(
        "/results/{result_id}/film.png",
        dependencies=auth,
        responses={200: {"content": {"image/png": {}}}, **_errors(404, 422, token=token)},
        summary="the film of a recent result as the model saw it",
    )
    async def film(result_id: str) -> Response:
        result = _cached(service, result_id)
        return Response(await run_in_threadpool(encode_png, result.film), media_type="image/png")

    @app.get(
        "/heatmaps/{result_id}/{filename}",
        dependencies=auth,
        responses={200: {"content": {"image/png": {}}}, **_errors(404, 422, token=token)},
        summary="Grad-CAM heatmap of one label for a recent result, e.g. Edema.png",
    )
    async def heatmap(result_id: str, filename: str) -> Response:
        label = filename.removesuffix(".png")
        if not service.cam.available:
            raise ServiceError(404, "heatmaps_unavailable", str(service.cam_reason))
        if label not in service.model.labels:
            raise ServiceError(404, "unknown_label", f"the model does not predict {label!r}")
        result = _cached(service, result_id)
        png = await run_in_threadpool(service.heatmap_png, result, label)
        return Response(png, media_type="image/png")


def _upload_limits(app: FastAPI) -> dict[str, float]:
    timing: BodyTiming = app.state.upload_timing
    return {
        "body_timeout_s": timing.timeout,
        "min_upload_rate": timing.min_rate,
        "upload_grace_s": timing.grace,
        "max_uploads": app.state.uploads.max_uploads,
        "max_uploads_per_client": app.state.uploads.max_per_client,
    }


def _limits_json() -> dict[str, Any]:
    """The input checks' thresholds, for /model."""
    limits = dataclasses.asdict(DEFAULT_LIMITS)
    limits["modalities"] = sorted(limits["modalities"])
    return limits


def _heatmap_links(service: _Service, result_id: str) -> HeatmapInfo:
    film = f"/results/{result_id}/film.png"
    if not service.cam.available:
        return HeatmapInfo(requested=True, available=False, reason=service.cam_reason, film=film)
    links = {label: f"/heatmaps/{result_id}/{quote(label)}.png" for label in service.model.labels}
    return HeatmapInfo(requested=True, available=True, film=film, links=links)


def _cached(service: _Service, result_id: str) -> _Result:
    result = service.cache.get(result_id)
    if result is None:
        raise ServiceError(
            404,
            "unknown_result",
            f"result {result_id!r} is unknown or expired (the service keeps the last "
            f"{service.cache.capacity}); POST the image again with heatmaps=true",
        )
    return result


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def token_from_env(name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from environment variable `name`, else from CXRLABEL_TOKEN if set.

    Read from the environment rather than the command line, where `ps` would show it. A
    variable that is named explicitly must be set and non-empty.
    """
    env = os.environ if environ is None else environ
    if name is None:
        return env.get(TOKEN_ENV) or None
    value = env.get(name, "").strip()
    if not value:
        raise ValueError(f"--token-env {name}: environment variable {name} is not set or empty")
    return value


def uvicorn_settings() -> dict[str, Any]:
    """The uvicorn settings `serve` and `serve_in_thread` share, chosen rather than left to
    whatever uvicorn picks:

    * ``http="h11"``: the protocol the limits are tested with (uvicorn would switch to
      httptools, with other limits, whenever it happens to be installed).
    * ``timeout_keep_alive=5``: an idle keep-alive connection is closed after 5 s.
    * ``h11_max_incomplete_event_size=16 KiB``: request line and headers above it get 400.
    * no ``limit_concurrency``: it counts open connections, so idle or stalled ones would
      turn every genuine request into a 503; UploadLimit and the admission bound the work.

    uvicorn (0.54) has no timeout for a connection that never completes its headers: such a
    connection never reaches the app, so it takes no upload or scoring place, but it holds
    a socket (and at most 16 KiB of headers) until the client goes. Put a reverse proxy with
    a header timeout in front of a service exposed beyond trusted clients.
    """
    return {"http": "h11", "timeout_keep_alive": 5, "h11_max_incomplete_event_size": 16 * 1024}


def serve(
    model: Predictor,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    allowed_hosts: Sequence[str] = (),
    **settings: Any,
) -> None:
    """Serve `model` with uvicorn until interrupted (one process: the model is loaded once).

    The service answers to the Host names of `default_allowed_hosts(host)` and to
    `allowed_hosts`. The other `settings` are `create_app`'s keyword arguments (upload limit,
    token, heatmap cache, concurrency, queue and upload limits, allowed origins), passed on
    unchanged."""
    import uvicorn

    hosts = [*default_allowed_hosts(host), *allowed_hosts]
    log.info("answering to Host %s (more with --allowed-hosts)", ", ".join(hosts))
    app = create_app(model, allowed_hosts=hosts, **settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_settings())


@contextmanager
def serve_in_thread(
    app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread; yield its base URL, stop on exit.

    Port 0 picks a free port: the socket is bound here, so the URL is known before startup
    and no other process can take the port in between.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", **uvicorn_settings())
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: server.started or not thread.is_alive(), timeout)
        if not server.started:
            raise RuntimeError(f"uvicorn did not start on {host}:{sock.getsockname()[1]}")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
