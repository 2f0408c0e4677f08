"""The service's upload limits over real sockets: stalled and trickling uploads, per-client and
total caps, and a client that disconnects mid-upload (issue 11, findings 1 and 6).

Stalled clients connect from other loopback addresses (127.0.0.x, all of which reach the
server on Linux) so that the per-client cap does not mix them up with the genuine client.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from cxrlabel.labelling.service import create_app, serve_in_thread
from cxrlabel.models.ensemble import Ensemble, load_ensemble
from tests.helpers import banded_checkpoint, local_client


def _loopback_aliases() -> bool:
    """Whether this machine routes all of 127/8 to loopback (Linux does; macOS only .1)."""
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _loopback_aliases(), reason="needs client addresses 127.0.0.2 and up (Linux loopback)"
)

TOKEN = "s3cret-token"
GENUINE_BOUND_S = 10.0  # a genuine /predict on a loaded 2-core machine, stalled clients aside


@pytest.fixture(scope="module")
def film(tiny_dataset: Path) -> Path:
    return sorted(tiny_dataset.glob("train/patient*/study*/view1_frontal.jpg"))[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, film: Path) -> Path:
    path = tmp_path_factory.mktemp("limits") / "tiny.safetensors"
    return banded_checkpoint(path, film, "limits-test")


@pytest.fixture(scope="module")
def ensemble(checkpoint: Path) -> Ensemble:
    return load_ensemble([checkpoint], device="cpu")


# --------------------------------------------------------------------------------------------
# Raw-socket clients
# --------------------------------------------------------------------------------------------


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _headers(port: int, length: int, token: str | None, content_type: str) -> bytes:
    lines = [
        "POST /predict HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _open_upload(
    url: str,
    source: str,
    *,
    token: str | None = None,
    first: bytes = b"\0" * 100,
    declared: int = 100_000,
    content_type: str = "application/octet-stream",
) -> socket.socket:
    """Headers for a `declared`-byte body, then only `first`: an upload that stalls."""
    port = _port(url)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    sock.sendall(_headers(port, declared, token, content_type) + first)
    return sock


def _response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the one response on `sock`."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without a response: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def _closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def _wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _held(app: FastAPI) -> int:
    """Requests the server holds: uploads still arriving plus requests admitted for scoring."""
    uploads = getattr(app.state, "uploads", None)
    return app.state.service.admitted + (uploads.in_flight if uploads is not None else 0)


@contextmanager
def _stalled(url: str, sources: list[str], token: str | None) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        socks = []
        for source in sources:
            sock = _open_upload(url, source, token=token)
            stack.callback(sock.close)
            socks.append(sock)
        yield socks


def _genuine(url: str, film: Path, token: str | None) -> tuple[httpx.Response, float]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
        response = http.post("/predict", files={"file": ("film.jpg", film.read_bytes())})
    return response, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# Finding 1: stalled uploads must not lock out the service
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_stalled_uploads_do_not_lock_out_a_genuine_request(
    ensemble: Ensemble, film: Path, token: str | None
) -> None:
    """18 uploads (max_concurrent 2 + max_queue 16) send headers and 100 bytes, then stall:
    the body is read before a scoring place is taken, so a genuine request is still served."""
    app = create_app(ensemble, token=token, max_concurrent=2, max_queue=16)
    sources = [f"127.0.0.{10 + k}" for k in range(18)]  # one each: under the per-client cap
    with serve_in_thread(app) as url, _stalled(url, sources, token):
        assert _wait_until(lambda: _held(app) >= 18), "the server never saw the 18 uploads"
        response, elapsed = _genuine(url, film, token)
        assert response.status_code == 200, response.text
        assert elapsed < GENUINE_BOUND_S
        assert app.state.service.admitted == 0  # stalled bodies hold no scoring place
    assert _wait_until(lambda: _held(app) == 0, 10)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_uploads_per_client_are_capped_with_429(
    ensemble: Ensemble, film: Path, token: str | None
) -> None:
    app = create_app(ensemble, token=token)  # default: 4 uploads per client address
    with serve_in_thread(app) as url, _stalled(url, ["127.0.0.2"] * 4, token):
        assert _wait_until(lambda: _held(app) >= 4)
        extra = _open_upload(url, "127.0.0.2", token=token)
        try:
            status, headers, body = _response(extra)
            assert status == 429, body
            assert b'"error":"too_many_uploads"' in body and b"127.0.0.2" in body
            assert headers["retry-after"].isdigit()
            assert headers["connection"] == "close" and _closed_by_server(extra)
        finally:
            extra.close()
        response, elapsed = _genuine(url, film, token)  # another address: served
        assert response.status_code == 200, response.text
        assert elapsed < GENUINE_BOUND_S


def test_uploads_in_flight_are_capped_in_all(ensemble: Ensemble) -> None:
    """The total cap bounds upload memory (max_uploads x max_upload_bytes): 503 beyond it."""
    app = create_app(ensemble, max_uploads=3)
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    with serve_in_thread(app) as url, _stalled(url, sources, None):
        assert _wait_until(lambda: _held(app) >= 3)
        extra = _open_upload(url, "127.0.0.5")
        try:
            status, headers, body = _response(extra)
        finally:
            extra.close()
    assert status == 503 and b'"error":"busy"' in body and headers["retry-after"].isdigit()
    info = local_client(app).get("/model").json()["uploads"]
    assert info["max_uploads"] == 3 and info["max_uploads_per_client"] == 4


def _trickle(sock: socket.socket, every: float, give_up: float) -> float:
    """Send one byte every `every` s until the server answers (or `give_up` s pass)."""
    started = time.monotonic()
    while time.monotonic() - started < give_up:
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            break
        try:
            sock.sendall(b"\0")
        except OSError:
            break
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"body_timeout": 2.0, "min_upload_rate": 0}, b"not complete within 2 s"),
        ({"body_timeout": 60.0, "min_upload_rate": 1000, "upload_grace": 1.0}, b"too slow"),
    ],
    ids=["deadline", "minimum-rate"],
)
def test_trickling_upload_is_cut_off_with_408(
    ensemble: Ensemble, film: Path, limits: dict[str, Any], words: bytes
) -> None:
    app = create_app(ensemble, **limits)
    with serve_in_thread(app) as url:
        sock = _open_upload(url, "127.0.0.2", first=b"\0")
        try:
            waited = _trickle(sock, every=0.5, give_up=20.0)
            status, headers, body = _response(sock)
            assert status == 408, body
            assert b'"error":"upload_timeout"' in body and words in body
            assert headers["connection"] == "close" and _closed_by_server(sock)
        finally:
            sock.close()
        assert 0.9 <= waited < 20.0  # cut off by the limit, not before its grace or deadline
        response, _ = _genuine(url, film, None)  # a normal upload passes these limits
        assert response.status_code == 200, response.text
    assert _held(app) == 0


def test_upload_limit_settings_are_checked(ensemble: Ensemble) -> None:
    for name, value in [
        ("body_timeout", 0),
        ("min_upload_rate", -1),
        ("upload_grace", -1),
        ("max_uploads", 0),
        ("max_uploads_per_client", 0),
    ]:
        with pytest.raises(ValueError, match=name):
            create_app(ensemble, **{name: value})


# --------------------------------------------------------------------------------------------
# Finding 6: a client disconnecting mid-upload is one info line, not a traceback
# --------------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _multipart_start(name: str) -> tuple[bytes, str]:
    boundary = "cxrlabelboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + b"\xff\xd8" + b"\0" * 98, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("kind", ["multipart", "raw"])
def test_client_disconnect_mid_upload_logs_one_info_line(
    ensemble: Ensemble, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = "Jane_Doe_19700101.jpg"  # a file name can identify a patient: never logged
    first, content_type = _multipart_start(name)
    if kind == "raw":
        content_type = "application/octet-stream"
    caplog.set_level(logging.INFO, logger="cxrlabel")
    uvicorn_records = _Records()
    uvicorn_logger = logging.getLogger("uvicorn.error")
    app = create_app(ensemble)
    with serve_in_thread(app) as url:
        uvicorn_logger.addHandler(uvicorn_records)
        try:
            sock = _open_upload(url, "127.0.0.2", first=first, content_type=content_type)
            assert _wait_until(lambda: _held(app) >= 1)
            sock.close()
            assert _wait_until(
                lambda: (
                    any("disconnect" in r.getMessage() for r in caplog.records)
                    or bool(uvicorn_records.records)
                ),
                10,
            )
            assert _wait_until(lambda: _held(app) == 0, 10)
        finally:
            uvicorn_logger.removeHandler(uvicorn_records)
    records = [*caplog.records, *uvicorn_records.records]
    assert not [r for r in records if r.exc_info or r.levelno >= logging.WARNING], [
        r.getMessage() for r in records
    ]
    (line,) = [r for r in caplog.records if "disconnect" in r.getMessage()]
    assert line.levelno == logging.INFO and line.name == "cxrlabel.labelling.guards"
    received = re.search(r"after (\d+) bytes", line.getMessage())
    assert "127.0.0.2" in line.getMessage() and received is not None
    assert int(received[1]) <= len(first)  # what had arrived when the client went
    assert all(name not in r.getMessage() for r in records)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_serve_command_passes_the_upload_limits(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrlabel.labelling.service
    from cxrlabel.cli import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        cxrlabel.labelling.service, "serve", lambda model, **kwargs: calls.append(kwargs)
    )
    argv = ["serve", "--model", str(checkpoint), "--device", "cpu"]
    assert main(argv) == 0
    assert {k: calls[0][k] for k in _LIMIT_DEFAULTS} == _LIMIT_DEFAULTS
    changed = ["--body-timeout", "5", "--min-upload-rate", "2", "--upload-grace", "1"]
    changed += ["--max-uploads", "8", "--max-uploads-per-client", "1"]
    assert main([*argv, *changed]) == 0
    assert {k: calls[1][k] for k in _LIMIT_DEFAULTS} == {
        "body_timeout": 5.0,
        "min_upload_rate": 2048,
        "upload_grace": 1.0,
        "max_uploads": 8,
        "max_uploads_per_client": 1,
    }


_LIMIT_DEFAULTS = {
    "body_timeout": 30.0,
    "min_upload_rate": 8192,
    "upload_grace": 5.0,
    "max_uploads": 32,
    "max_uploads_per_client": 4,
}
