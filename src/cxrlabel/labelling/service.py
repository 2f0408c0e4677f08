"""The labelling service: an HTTP API (FastAPI + uvicorn) and a web page for one model.

Endpoints (all errors are JSON ``{"error": code, "detail": message}``):

* ``POST /predict[?heatmaps=true]`` — one image (multipart field ``file``, or the raw bytes as
  the body) -> per-label probabilities, three-valued labels (1 positive, 0 negative,
  -1 uncertain) from the model's stored thresholds, the thresholds, model id, version and
  test-time augmentation (``tta``, see :mod:`cxrlabel.models.tta`; 1 = none) and,
  when asked, links to the film as the model saw it and to a Grad-CAM heatmap per label.
  ``?format=fhir`` answers instead with a FHIR R4 transaction Bundle (``application/fhir+json``,
  :mod:`cxrlabel.hospital.fhir`) for the film as a one-film study: its Study Instance UID and
  Patient ID when it is DICOM, no study and no patient otherwise.
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

The HTTP-level protections, which know nothing of models, live in
:mod:`cxrlabel.labelling.guards`. Browsers are kept from misusing a service without a token
(BrowserGuard and BrowserHeaders there): only allowed Host names are answered (400 otherwise,
against DNS rebinding), cross-origin POSTs get 403 unless their origin is allowed (and then
CORS headers), and every response carries a Content-Security-Policy and the other browser
security headers. /model and heatmap reasons name checkpoints by file name, never by server
path.

Inference runs in a worker thread, off the event loop, and one lock per model serialises
forward passes: PyTorch modules are not meant to run concurrently from several threads
(Grad-CAM even attaches hooks to the model). Decoding, the slow part for large films, runs
outside the lock.

Memory is bounded, not proportional to the number of clients: a small upload can decode to a
huge array (a 130 KB 8192 x 8192 PNG is 256 MB as float32). So at most `max_concurrent`
requests decode and predict at once (a semaphore), at most `max_queue` more wait for their
turn, and any further request gets 503 ``busy`` at once. Only a complete body takes one of
those places: bodies still arriving are bounded by :class:`UploadLimit` instead (a deadline, a
minimum rate, and caps on uploads in flight per client address and in all), so stalled uploads
cannot lock genuine ones out. Right after decoding, in the same worker thread, the film is
replaced by its copy scaled to the model's input (which the model's own resize then leaves
unchanged, so the probabilities are the same) and the full-size array is dropped before waiting
for the model lock.
"""

from __future__ import annotations

import dataclasses
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
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

import cxrlabel
from cxrlabel.data.images import (
    ImageError,
    ImageInfo,
    NotAnImageError,
    UnsupportedImageError,
    read_dicom_metadata,
    read_image_with_info,
    sniff_format,
)
from cxrlabel.data.pictures import encode_png
from cxrlabel.data.sanity import DEFAULT_LIMITS, sanity_flags
from cxrlabel.data.transforms import ResizeGeometry, scale_to_fit
from cxrlabel.hospital import fhir
from cxrlabel.hospital.findings import Algorithm, Finding, SourceFilm, StudyFindings
from cxrlabel.labelling.guards import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_UPLOADS,
    DEFAULT_MAX_UPLOADS_PER_CLIENT,
    DEFAULT_MIN_UPLOAD_RATE,
    DEFAULT_UPLOAD_GRACE,
    LOOPBACK_HOSTS,
    BodyRefused,
    BodyTiming,
    ErrorBody,
    ServiceError,
    UploadGate,
    UploadLimit,
    UploadTooLarge,
    add_browser_guards,
    check_origin,
    default_allowed_hosts,
    error_response,
    host_name,
)
from cxrlabel.labelling.heatmaps import gradcams, heatmap_model, overlay_png
from cxrlabel.models.predictor import Predictor, model_id, shared_resize
from cxrlabel.models.thresholds import Thresholds

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_HEATMAP_CACHE = 64
# Requests decoding + predicting at once (each may hold a full-size decoded film for a moment),
# and requests allowed to wait for a turn; beyond both, 503. Two workers keep the model busy
# (one decodes while the other holds the lock) without multiplying peak memory.
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_QUEUE = 16
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


# --------------------------------------------------------------------------------------------
# Response schemas (they make the OpenAPI document describe the real responses)
# --------------------------------------------------------------------------------------------


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


# What /predict?format=fhir answers, as far as a schema can say without all of FHIR: a
# transaction Bundle whose entries each have a resource and a request (hospital.fhir).
_FHIR_BUNDLE_SCHEMA = {
    "type": "object",
    "required": ["resourceType", "type", "entry"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["Bundle"]},
        "type": {"type": "string", "enum": ["transaction"]},
        "entry": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["fullUrl", "resource", "request"],
                "properties": {"resource": {"type": "object", "required": ["resourceType"]}},
            },
        },
    },
}

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
                raise ServiceError(413, "too_large", UploadTooLarge(limit).detail)
            chunks.append(chunk)
        # An empty body is left to decode_upload: 422 empty_image, as for an empty file part.
        data, name = b"".join(chunks), request.headers.get("x-filename", "upload")
    if len(data) > limit:
        raise ServiceError(413, "too_large", UploadTooLarge(limit).detail)
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
    add_browser_guards(app, hosts, origins)
    _add_error_handlers(app)
    _add_routes(app, service)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = exc.code if isinstance(exc, BodyRefused) else f"http_{exc.status_code}"
        headers = getattr(exc, "headers", None)
        return error_response(ServiceError(exc.status_code, code, str(exc.detail), headers))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return error_response(ServiceError(422, "invalid_request", "; ".join(parts)))


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
        responses={
            200: {
                "description": "the labels (JSON), or with format=fhir a FHIR R4 Bundle",
                "content": {fhir.MEDIA_TYPE: {"schema": _FHIR_BUNDLE_SCHEMA}},
            },
            **_errors(403, 408, 413, 415, 422, 429, 503, token=token),
        },
        openapi_extra=_UPLOAD_BODY,
        summary="label one chest radiograph (PNG, JPEG or DICOM)",
    )
    async def predict(
        request: Request,
        heatmaps: bool = Query(False, description="also return heatmap and film links (json)"),
        response_format: Literal["json", "fhir"] = Query(
            "json",
            alias="format",
            description="json: the labels as below; fhir: a FHIR R4 transaction Bundle "
            "(DiagnosticReport, one Observation per label, the model as Device), "
            "application/fhir+json",
        ),
    ) -> PredictBody | Response:
        started = time.perf_counter()
        # The body first (UploadLimit bounds its time, size and how many arrive at once), then
        # a place among the requests scoring or waiting (or 503): a slow upload must not hold
        # a place that a complete one could use.
        data, filename = await _read_upload(request, service.max_upload_bytes)
        read_s = time.perf_counter() - started
        as_fhir = response_format == "fhir"
        with service.admit():
            done = await run_in_threadpool(service.label, data, filename, heatmaps and not as_fhir)
        if as_fhir:
            bundle = await run_in_threadpool(_fhir_bundle, service, done, data, filename)
            return Response(bundle, media_type=fhir.MEDIA_TYPE)
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


def _fhir_bundle(service: _Service, done: _Labelled, data: bytes, filename: str) -> str:
    """The upload's results as FHIR JSON: a one-film study, named by the DICOM header's Study
    Instance UID and Patient ID when the film is DICOM (read again, header only), else by
    nothing."""
    study_uid = patient_id = ""
    if done.fmt == "dicom":
        try:
            meta = read_dicom_metadata(data, name=filename)
        except ImageError:  # decoded a moment ago; a header that will not parse names nothing
            meta = {}
        study_uid, patient_id = meta.get("study_instance_uid") or "", meta.get("patient_id") or ""
    findings = tuple(
        Finding(r.label, r.probability, r.value, r.threshold)
        for r in _results(done.probs, service.model.thresholds)
    )
    study = StudyFindings(
        study_id=study_uid,
        patient_id=patient_id,
        films=(SourceFilm(Path(filename), filename, done.fmt == "dicom"),),
        findings=findings,
        algorithm=Algorithm.from_model_info(service.info, cxrlabel.__version__),
    )
    bundle = fhir.diagnostic_report(study, study_uid=study_uid or None)
    return bundle.model_dump_json()


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
