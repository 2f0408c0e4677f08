"""The service against a hostile browser page: Host and Origin checks, security headers, what
/model gives away, and an OpenAPI schema that tells the truth (issue 11, findings 7 and 11)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cxrlabel.labelling.service import create_app
from cxrlabel.models.ensemble import Ensemble, load_ensemble
from tests.helpers import banded_checkpoint, local_client

TOKEN = "s3cret-token"
RESULT_PATHS = ("/predict", "/model", "/results/", "/heatmaps/")


@pytest.fixture(scope="module")
def film(tiny_dataset: Path) -> Path:
    return sorted(tiny_dataset.glob("train/patient*/study*/view1_frontal.jpg"))[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, film: Path) -> Path:
    folder = tmp_path_factory.mktemp("secret-server-folder")
    return banded_checkpoint(folder / "tiny.safetensors", film, "security-test")


@pytest.fixture(scope="module")
def ensemble(checkpoint: Path) -> Ensemble:
    return load_ensemble([checkpoint], device="cpu")


@pytest.fixture(scope="module")
def client(ensemble: Ensemble) -> TestClient:
    return local_client(create_app(ensemble))


def _post(client: TestClient, film: Path, **kwargs: Any) -> Any:
    return client.post("/predict", files={"file": ("film.jpg", film.read_bytes())}, **kwargs)


# --------------------------------------------------------------------------------------------
# Host header (DNS rebinding)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.2", ""]
)
def test_a_foreign_host_header_is_refused_with_json(client: TestClient, host: str) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: its Host header shows it."""
    for method, path in (("GET", "/model"), ("GET", "/health"), ("GET", "/")):
        response = client.request(method, path, headers={"host": host})
        assert response.status_code == 400, (path, host, response.text)
        assert response.json()["error"] == "host_not_allowed"
        assert "--allowed-hosts" in response.json()["detail"]
    assert _post(client, Path(__file__), headers={"host": host}).status_code == 400


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:9", "[::1]", "[::1]:8000"]
)
def test_loopback_hosts_are_allowed_with_or_without_port(client: TestClient, host: str) -> None:
    assert client.get("/model", headers={"host": host}).status_code == 200


def test_configured_hosts_replace_nothing_but_add_to_loopback(ensemble: Ensemble) -> None:
    client = local_client(create_app(ensemble, allowed_hosts=["cxr.example.org", "*.lab.test"]))
    for host in ("cxr.example.org", "CXR.example.org:443", "a.lab.test", "localhost:1"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    for host in ("example.org", "lab.test.evil", "evil.example"):
        assert client.get("/health", headers={"host": host}).status_code == 400, host
    anything = local_client(create_app(ensemble, allowed_hosts=["*"]))
    assert anything.get("/health", headers={"host": "evil.example"}).status_code == 200


def test_default_hosts_are_the_bound_address_and_loopback() -> None:
    from cxrlabel.labelling.guards import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("10.1.2.3") == ["localhost", "127.0.0.1", "::1", "10.1.2.3"]
    assert "::1" in default_allowed_hosts("::1") and "[::1]" not in default_allowed_hosts("::1")
    # Every interface: the machine's own names are the bound address as far as clients go.
    assert socket.gethostname().lower() in default_allowed_hosts("0.0.0.0")


# --------------------------------------------------------------------------------------------
# Cross-origin requests
# --------------------------------------------------------------------------------------------


def test_cross_origin_posts_are_refused(client: TestClient, film: Path) -> None:
    """A page on another origin may send a POST (a form, fetch no-cors) without a preflight."""
    for headers in (
        {"origin": "http://evil.example"},
        {"origin": "http://localhost:3000"},  # same site, other port: another origin
        {"origin": "null"},  # sandboxed frames, file:// pages
        {"sec-fetch-site": "cross-site"},
        {"origin": "http://localhost", "sec-fetch-site": "cross-site"},
    ):
        response = _post(client, film, headers=headers)
        assert response.status_code == 403, (headers, response.text)
        assert response.json()["error"] == "cross_origin"
    for headers in (
        {},  # curl, scripts: no Origin
        {"origin": "http://localhost"},  # the page itself
        {"origin": "http://localhost", "sec-fetch-site": "same-origin"},
        {"sec-fetch-site": "none"},
    ):
        assert _post(client, film, headers=headers).status_code == 200, headers
    # Reading is not state-changing; the browser's same-origin policy guards the answer.
    assert client.get("/model", headers={"origin": "http://evil.example"}).status_code == 200


def test_allowed_origins_may_post_and_get_cors_headers(ensemble: Ensemble, film: Path) -> None:
    app = create_app(ensemble, allowed_origins=["https://viewer.example.org"])
    client = local_client(app)
    good = {"origin": "https://viewer.example.org", "sec-fetch-site": "cross-site"}
    response = _post(client, film, headers=good)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == "https://viewer.example.org"
    preflight = client.options(
        "/predict",
        headers={
            "origin": "https://viewer.example.org",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = client.options(
        "/predict",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert refused.status_code == 403 and refused.json()["error"] == "cross_origin"
    assert _post(client, film, headers={"origin": "https://evil.example"}).status_code == 403


def test_allowed_origins_are_checked(ensemble: Ensemble) -> None:
    for bad in ("viewer.example.org", "https://viewer.example.org/path", "*"):
        with pytest.raises(ValueError, match="allowed origin"):
            create_app(ensemble, allowed_origins=[bad])


# --------------------------------------------------------------------------------------------
# Response headers
# --------------------------------------------------------------------------------------------


def _assert_browser_headers(response: Any) -> None:
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def test_every_response_carries_the_browser_headers(client: TestClient, film: Path) -> None:
    body = _post(client, film, params={"heatmaps": "true"}).json()
    responses = {
        "/": client.get("/"),
        "/static/app.js": client.get("/static/app.js"),
        "/health": client.get("/health"),
        "/model": client.get("/model"),
        "/predict": _post(client, film),
        "/results/": client.get(body["heatmaps"]["film"]),
        "/heatmaps/": client.get(body["heatmaps"]["links"]["Edema"]),
        "error": client.post("/predict", content=b"not an image"),
        "refused host": client.get("/model", headers={"host": "evil.example"}),
    }
    for name, response in responses.items():
        _assert_browser_headers(response)
        no_store = response.headers.get("cache-control") == "no-store"
        assert no_store == (not name.startswith("/static")), name


def test_csp_allows_what_the_page_uses() -> None:
    """The page sets images from blob: URLs and a data: favicon; no inline script or style."""
    static = Path(__file__).resolve().parents[2] / "src/cxrlabel/labelling/static"
    html = (static / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert "<style" not in html and " style=" not in html, "inline style"
    assert "createObjectURL" in (static / "app.js").read_text()


# --------------------------------------------------------------------------------------------
# /model gives no server-side paths; empty uploads
# --------------------------------------------------------------------------------------------


def test_model_shows_no_server_side_paths(client: TestClient, checkpoint: Path, film: Path) -> None:
    text = client.get("/model").text
    assert str(checkpoint.parent) not in text and "secret-server-folder" not in text
    info = client.get("/model").json()
    assert info["members"][0]["file"] == checkpoint.name and "path" not in info["members"][0]
    assert checkpoint.name in info["heatmaps"]["note"]
    assert "secret-server-folder" not in _post(client, film, params={"heatmaps": "true"}).text


def test_onnx_model_shows_no_server_side_paths(checkpoint: Path, tmp_path: Path) -> None:
    from cxrlabel.models.checkpoint import checkpoint_paths
    from cxrlabel.models.onnx import export_onnx
    from cxrlabel.models.predictor import load_model
    from tests.helpers import copy_checkpoint

    copy = copy_checkpoint(checkpoint, tmp_path / "gone-folder")
    onnx_path = export_onnx([copy], tmp_path / "model.onnx")
    for path in checkpoint_paths(copy):
        path.unlink(missing_ok=True)  # heatmaps unavailable: the reason names the missing file
    client = local_client(create_app(load_model([onnx_path], backend="native", device="cpu")))
    info = client.get("/model").json()
    assert str(tmp_path) not in client.get("/model").text
    assert info["onnx_source"] == "model.onnx"
    assert info["heatmaps"]["available"] is False
    assert "tiny.safetensors was not found" in info["heatmaps"]["reason"]


def test_an_empty_raw_upload_is_422_like_an_empty_multipart_one(client: TestClient) -> None:
    multipart = client.post("/predict", files={"file": ("empty.jpg", b"")})
    raw = client.post("/predict", content=b"", headers={"content-type": "image/png"})
    no_body = client.post("/predict")
    for response in (multipart, raw, no_body):
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "empty_image"


# --------------------------------------------------------------------------------------------
# The OpenAPI schema
# --------------------------------------------------------------------------------------------


def _operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": op
        for path, item in schema["paths"].items()
        for method, op in item.items()
    }


def test_schema_declares_bearer_auth_only_with_a_token(ensemble: Ensemble) -> None:
    open_schema = local_client(create_app(ensemble)).get("/openapi.json").json()
    assert "securitySchemes" not in open_schema.get("components", {})
    assert all("security" not in op for op in _operations(open_schema).values())
    assert all("401" not in op["responses"] for op in _operations(open_schema).values())
    client = local_client(create_app(ensemble, token=TOKEN))
    schema = client.get("/openapi.json", headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    secured = {name for name, op in _operations(schema).items() if "security" in op}
    assert secured == set(_operations(schema)) - {"GET /health"}
    assert all("401" in _operations(schema)[name]["responses"] for name in secured)


def test_schema_declares_every_error_with_error_body(ensemble: Ensemble) -> None:
    schema = local_client(create_app(ensemble)).get("/openapi.json").json()
    operations = _operations(schema)
    expected = {"400", "403", "408", "413", "415", "422", "429", "503"}
    assert expected <= set(operations["POST /predict"]["responses"])
    for name, op in operations.items():
        assert "400" in op["responses"], name  # the Host check answers every request
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (name, status)
    assert "HTTPValidationError" not in schema["components"]["schemas"]


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_serve_command_passes_allowed_hosts_and_origins(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrlabel.labelling.service
    from cxrlabel.cli import main

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(cxrlabel.labelling.service, "serve", lambda _, **kw: calls.append(kw))
    argv = ["serve", "--model", str(checkpoint), "--device", "cpu"]
    assert main([*argv, "--allowed-hosts", "a.example", "b.example"]) == 0
    assert main([*argv, "--allowed-origins", "https://viewer.example.org"]) == 0
    assert main(argv) == 0
    assert [c["allowed_hosts"] for c in calls] == [["a.example", "b.example"], [], []]
    assert [c["allowed_origins"] for c in calls] == [[], ["https://viewer.example.org"], []]


def test_serve_answers_to_its_bound_address(
    ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    from cxrlabel.labelling.service import serve

    apps: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: apps.append(app))
    serve(ensemble, host="10.1.2.3", allowed_hosts=["cxr.example.org"])
    client = local_client(apps[0])
    for host in ("10.1.2.3:8000", "cxr.example.org", "localhost"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    assert client.get("/health", headers={"host": "10.1.2.4"}).status_code == 400
