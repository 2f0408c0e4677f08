"""The HTTP service: good and bad uploads, limits, auth, heatmaps, concurrency, the command."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

import cxrlabel
from cxrlabel.data.images import read_image, sniff_format
from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.data.transforms import Preprocessing, preprocess
from cxrlabel.labelling.service import (
    TOKEN_ENV,
    UploadLimit,
    create_app,
    decode_upload,
    serve_in_thread,
    token_from_env,
)
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.ensemble import Ensemble, load_ensemble
from cxrlabel.models.factory import create_model
from cxrlabel.models.predictor import load_model
from tests.helpers import (
    SHARED_DATA,
    banded_checkpoint,
    copy_checkpoint,
    count_calls,
    local_client,
)

LIMIT = 200_000  # bytes: small, so the too-large tests stay fast


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny 14-label checkpoint whose stored thresholds give all three label values
# --------------------------------------------------------------------------------------------


def _films(tiny_dataset: Path, n: int) -> list[Path]:
    films = sorted(tiny_dataset.glob("train/patient*/study*/view1_frontal.jpg"))
    assert len(films) >= n
    return films[:n]


@pytest.fixture(scope="module")
def film(tiny_dataset: Path) -> Path:
    return _films(tiny_dataset, 1)[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, film: Path) -> Path:
    """Thresholds around this model's own scores on `film`: positive, negative, uncertain."""
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    return banded_checkpoint(path, film, "serve-test")


@pytest.fixture(scope="module")
def ensemble(checkpoint: Path) -> Ensemble:
    return load_ensemble([checkpoint], device="cpu")


@pytest.fixture(scope="module")
def client(ensemble: Ensemble) -> TestClient:
    return local_client(create_app(ensemble, max_upload_bytes=LIMIT, heatmap_cache=2))


def _post(client: TestClient, data: bytes, name: str = "film.jpg", **params: Any) -> Any:
    return client.post(
        "/predict", params=params, files={"file": (name, data, "application/octet-stream")}
    )


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Good input
# --------------------------------------------------------------------------------------------


def test_predict_returns_probabilities_labels_thresholds_and_model(
    client: TestClient, ensemble: Ensemble, film: Path
) -> None:
    response = _post(client, film.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    expected = ensemble.predict_images([read_image(film)])[0]
    assert list(body["probabilities"]) == list(OBSERVATIONS)
    assert [body["probabilities"][k] for k in OBSERVATIONS] == [float(p) for p in expected]
    values = ensemble.thresholds.apply(expected[None].astype(np.float64))[0]
    assert body["labels"] == {k: int(v) for k, v in zip(OBSERVATIONS, values, strict=True)}
    first, second, third = (body["results"][i] for i in range(3))
    assert (first["value"], first["text"]) == (1, "positive")
    assert (second["value"], second["text"]) == (0, "negative")
    assert (third["value"], third["text"]) == (-1, "uncertain")
    assert third["band"] == list(ensemble.thresholds.band[2])
    assert body["thresholds"] == ensemble.thresholds.to_dict()
    assert body["model"] == {
        "id": body["model"]["id"],
        "name": ensemble.name,
        "kind": "single model",
        "tta": 1,
        "version": cxrlabel.__version__,
    }
    assert len(body["model"]["id"]) == 16
    assert body["file"] == {
        "name": "film.jpg",
        "format": "jpeg",
        "bytes": film.stat().st_size,
        "width": 64,
        "height": 64,
    }
    assert body["heatmaps"]["requested"] is False and body["heatmaps"]["links"] == {}


def test_raw_body_upload_equals_multipart(client: TestClient, film: Path) -> None:
    multipart = _post(client, film.read_bytes()).json()
    raw = client.post(
        "/predict", content=film.read_bytes(), headers={"content-type": "image/jpeg"}
    ).json()
    assert raw["probabilities"] == multipart["probabilities"]
    assert raw["labels"] == multipart["labels"]


def test_format_comes_from_content_not_name(client: TestClient, ensemble: Ensemble) -> None:
    pixels = (np.arange(64 * 80) % 251).astype(np.uint8).reshape(80, 64)
    body = _post(client, _png(pixels), name="really_a_png.jpg").json()
    assert body["file"]["format"] == "png" and body["file"]["name"] == "really_a_png.jpg"
    expected = ensemble.predict_images([pixels.astype(np.float32) / 255])[0]
    assert body["probabilities"]["Edema"] == float(expected[OBSERVATIONS.index("Edema")])


def _dicom_bytes(*, preamble: bool) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    pixels = (np.arange(48 * 64) % 4096).astype(np.uint16).reshape(48, 64)
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=preamble)
    return buffer.getvalue()


@pytest.mark.parametrize("preamble", [True, False])
def test_dicom_with_and_without_preamble(client: TestClient, preamble: bool) -> None:
    data = _dicom_bytes(preamble=preamble)
    assert (data[128:132] == b"DICM") is preamble
    assert sniff_format(data) == "dicom"
    response = _post(client, data, name="film.bin")
    assert response.status_code == 200, response.text
    assert response.json()["file"]["format"] == "dicom"
    assert response.json()["file"]["width"] == 64


def test_real_dicom_fixture(client: TestClient) -> None:
    folder = SHARED_DATA / "fixtures" / "dicom"
    if not folder.is_dir():
        pytest.skip(f"shared data folder {folder} is absent")
    response = _post(client, next(folder.glob("siim_*.dcm")).read_bytes(), name="siim.dcm")
    assert response.status_code == 200, response.text
    assert response.json()["file"]["width"] == 1024


def test_health_model_and_openapi(client: TestClient, ensemble: Ensemble) -> None:
    health = client.get("/health").json()
    info = client.get("/model").json()
    assert health == {"status": "ok", "model_id": info["id"], "version": cxrlabel.__version__}
    assert info["labels"] == list(OBSERVATIONS) and info["kind"] == "single model"
    assert info["members"][0]["backbone"] == "tiny"
    assert info["max_upload_bytes"] == LIMIT and info["auth"] is False
    assert info["heatmaps"]["available"] is True and info["heatmaps"]["reason"] is None
    assert "Grad-CAM from" in info["heatmaps"]["note"] and "TTA" not in info["heatmaps"]["note"]
    assert info["tta"] == 1
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"200", "413", "415", "422"} <= set(predict["responses"])  # 401: with a token
    assert "PredictBody" in schema["components"]["schemas"]
    assert "securitySchemes" not in schema["components"]  # no token: no auth declared


def test_service_with_tta_reports_it_and_scores_with_it(ensemble: Ensemble, film: Path) -> None:
    from cxrlabel.models.tta import TTAPredictor

    tta = TTAPredictor(ensemble, 3)
    client = local_client(create_app(tta, max_upload_bytes=LIMIT))
    info = client.get("/model").json()
    assert info["tta"] == 3 and info["kind"] == "single model, TTA x3"
    assert info["tta_transforms"][0] == "identity" and len(info["tta_transforms"]) == 3
    assert info["heatmaps"]["available"] is True
    assert "without the labels' 3-transform TTA" in info["heatmaps"]["note"]
    body = _post(client, film.read_bytes()).json()
    assert body["model"]["tta"] == 3 and body["model"]["kind"] == "single model, TTA x3"
    expected = tta.predict_images([read_image(film)])[0]
    got = np.array([body["probabilities"][k] for k in OBSERVATIONS])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    plain = ensemble.predict_images([read_image(film)])[0]
    assert not np.allclose(got, plain, atol=1e-6)
    # The heatmap is drawn without TTA, from the inner model.
    heat = _post(client, film.read_bytes(), heatmaps="true").json()
    link = heat["heatmaps"]["links"]["Edema"]
    assert client.get(link).status_code == 200


def test_page_and_static_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert "http" not in page.text.replace('href="/openapi.json"', "").split("<body")[0]


# --------------------------------------------------------------------------------------------
# Bad input: a clear 4xx JSON error, never a 500
# --------------------------------------------------------------------------------------------


def _truncated_jpeg(film: Path) -> bytes:
    data = film.read_bytes()
    return data[: len(data) // 2]


def _huge_png_header() -> bytes:
    # A valid PNG whose header (correct CRC) claims 100000 x 100000 pixels: refused before
    # any pixel is decoded.
    data = bytearray(_png(np.zeros((8, 8), np.uint8)))
    ihdr = bytearray(data[16:29])  # after signature (8), length (4) and b"IHDR" (4)
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _bmp() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="BMP")
    return buffer.getvalue()


def _dicom_without_pixels() -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


BAD_INPUTS = {
    "empty": (lambda film: b"", 422, "empty_image"),
    "garbage": (lambda film: os.urandom(5000), 415, "not_an_image"),
    "text named .png": (lambda film: b"hello, I am not a radiograph\n" * 20, 415, "not_an_image"),
    "bmp": (lambda film: _bmp(), 415, "not_an_image"),
    "truncated jpeg": (_truncated_jpeg, 422, "truncated_image"),
    "decompression bomb": (lambda film: _huge_png_header(), 422, "image_too_large"),
    "dicom without pixels": (lambda film: _dicom_without_pixels(), 422, "no_pixel_data"),
    "jpeg signature only": (lambda film: b"\xff\xd8\xff\xe0" + b"\0" * 100, 422, "truncated_image"),
}


def test_uploads_are_decoded_in_memory(
    film: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No temporary file: decoding an upload creates nothing on disk, and gives exactly the
    file's array."""
    import tempfile

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decode_upload wrote a temporary file")

    for name in ("TemporaryDirectory", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # anything else would land here
    for data, fmt in ((film.read_bytes(), "jpeg"), (_dicom_bytes(preamble=False), "dicom")):
        image, got = decode_upload(data, "upload.bin")
        assert got.format == fmt
        np.testing.assert_array_equal(image, read_image(data))
    np.testing.assert_array_equal(decode_upload(film.read_bytes(), "x")[0], read_image(film))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_upload_is_a_clear_4xx(client: TestClient, film: Path, case: str) -> None:
    make, status, code = BAD_INPUTS[case]
    response = _post(client, make(film), name="upload.png")
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert body["detail"].startswith("upload.png: ")  # names the upload, not a temp file
    assert "/tmp" not in body["detail"]


def test_missing_file_and_bad_query(client: TestClient, film: Path) -> None:
    wrong_field = client.post("/predict", files={"image": ("a.jpg", film.read_bytes())})
    assert wrong_field.status_code == 400 and wrong_field.json()["error"] == "missing_file"
    no_body = client.post("/predict")  # an empty raw upload, like an empty file part
    assert no_body.status_code == 422 and no_body.json()["error"] == "empty_image"
    bad = client.post("/predict?heatmaps=perhaps", files={"file": ("a.jpg", film.read_bytes())})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
    assert client.get("/nowhere").json() == {"error": "http_404", "detail": "Not Found"}


def test_upload_over_the_limit_is_413(client: TestClient) -> None:
    too_big = _png(np.random.default_rng(0).integers(0, 255, (600, 600), dtype=np.uint8))
    assert len(too_big) > LIMIT
    for response in (
        _post(client, too_big),
        client.post("/predict", content=too_big, headers={"content-type": "image/png"}),
    ):
        assert response.status_code == 413
        assert response.json()["error"] == "too_large"
        assert f"{LIMIT:,} bytes" in response.json()["detail"]


def test_size_limit_stops_reading_the_body() -> None:
    """Without Content-Length, reading stops at the first chunk over the limit."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"\0" * 1000, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:  # an app that reads forever, as a parser of a huge body would
            await receive()

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
    asyncio.run(UploadLimit(app, max_bytes=10_000, file_limit=9_000)(scope, receive, send))
    assert pulled == 11
    assert sent[0]["status"] == 413 and b"too_large" in sent[1]["body"]


def test_streamed_upload_over_the_limit_over_a_real_socket(ensemble: Ensemble) -> None:
    app = create_app(ensemble, max_upload_bytes=LIMIT)
    total = 64 * 2**20
    produced = 0

    def chunks():
        nonlocal produced
        while produced < total:
            produced += 2**16
            yield b"\0" * 2**16

    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/predict", content=chunks())  # chunked: no Content-Length
        assert response.status_code == 413
        assert response.json()["error"] == "too_large"
        assert produced < total / 2  # the server closed the connection instead of reading on
        assert http.get("/health").status_code == 200


# --------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------


def test_bearer_token(ensemble: Ensemble, film: Path) -> None:
    client = local_client(create_app(ensemble, token="s3cret-token"))
    files = {"file": ("film.jpg", film.read_bytes())}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
        response = client.post("/predict", files=files, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/model").status_code == 401
    assert client.get("/health").status_code == 200  # liveness needs no token
    assert client.get("/").status_code == 200  # the page asks for the token itself
    good = {"Authorization": "Bearer s3cret-token"}
    assert client.post("/predict", files=files, headers=good).status_code == 200
    assert client.get("/model", headers=good).json()["auth"] is True


def test_token_from_env() -> None:
    assert token_from_env(None, {}) is None
    assert token_from_env(None, {TOKEN_ENV: "abc"}) == "abc"
    assert token_from_env("MY_TOKEN", {"MY_TOKEN": " xyz "}) == "xyz"
    with pytest.raises(ValueError, match="MY_TOKEN is not set"):
        token_from_env("MY_TOKEN", {TOKEN_ENV: "abc"})
    with pytest.raises(ValueError, match="must not be empty"):
        create_app(object(), token="  ")  # type: ignore[arg-type]  # refused before the model


# --------------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------------


def test_heatmap_links_film_and_cache(client: TestClient, film: Path) -> None:
    body = _post(client, film.read_bytes(), heatmaps="true").json()
    info = body["heatmaps"]
    assert info["requested"] and info["available"]
    assert set(info["links"]) == set(OBSERVATIONS)
    assert info["links"]["Pleural Effusion"] == (
        f"/heatmaps/{body['result_id']}/Pleural%20Effusion.png"
    )
    png = client.get(info["links"]["Pleural Effusion"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    heat = Image.open(io.BytesIO(png.content))
    assert heat.size == (64, 64) and heat.mode == "RGB"
    assert client.get(info["links"]["Pleural Effusion"]).content == png.content  # cached
    film_png = Image.open(io.BytesIO(client.get(info["film"]).content))
    assert film_png.size == (64, 64) and film_png.mode == "L"
    unknown = client.get(f"/heatmaps/{body['result_id']}/Headache.png")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_label"
    # The cache keeps two results: a third POST evicts the first.
    for _ in range(2):
        _post(client, film.read_bytes(), heatmaps="true")
    gone = client.get(info["links"]["Edema"])
    assert gone.status_code == 404 and gone.json()["error"] == "unknown_result"


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_stored_film_gives_the_scored_model_input(ensemble: Ensemble, mode: str) -> None:
    """Results keep a model-sized film; preprocessing it must give the very input scored."""
    service = create_app(ensemble).state.service
    prep = Preprocessing(48, (0.5,) * 3, (0.25,) * 3, mode, "bicubic")
    service.film_geometry = prep.geometry
    image = np.random.default_rng(1).random((150, 97), dtype=np.float32)
    kept = service.film_view(image)
    assert max(kept.shape) == 48 if mode == "pad" else min(kept.shape) == 48
    assert torch.equal(preprocess(kept, prep), preprocess(image, prep))


def test_heatmaps_find_the_target_layer_once(
    ensemble: Ensemble, film: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each heatmap request reuses the layer found at startup: finding it hooks every module
    and runs an extra forward pass, under the model lock."""
    import cxrlabel.labelling.heatmaps

    client = local_client(create_app(ensemble))
    searches: list[object] = []
    real = cxrlabel.labelling.heatmaps.find_target_layer
    monkeypatch.setattr(
        cxrlabel.labelling.heatmaps, "find_target_layer", lambda m: searches.append(m) or real(m)
    )
    links = _post(client, film.read_bytes(), heatmaps="true").json()["heatmaps"]["links"]
    for label in ("Edema", "Cardiomegaly", "Pleural Effusion"):
        assert client.get(links[label]).status_code == 200
    assert searches == []


def test_onnx_model_has_heatmaps_from_its_checkpoint(
    checkpoint: Path, ensemble: Ensemble, film: Path
) -> None:
    from cxrlabel.models.onnx import OnnxModel

    onnx_model = OnnxModel.from_checkpoints([checkpoint], device="cpu")
    client = local_client(create_app(onnx_model))
    body = _post(client, film.read_bytes(), heatmaps="true").json()
    expected = ensemble.predict_images([read_image(film)])[0]
    assert np.allclose([body["probabilities"][k] for k in OBSERVATIONS], expected, atol=1e-5)
    assert body["heatmaps"]["available"] is True and set(body["heatmaps"]["links"]) == set(
        OBSERVATIONS
    )
    png = client.get(body["heatmaps"]["links"]["Edema"])
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
    heatmaps = client.get("/model").json()["heatmaps"]
    assert heatmaps["available"] is True and heatmaps["reason"] is None


def test_onnx_model_without_its_checkpoint_serves_without_heatmaps(
    checkpoint: Path, ensemble: Ensemble, film: Path, tmp_path: Path
) -> None:
    from cxrlabel.models.checkpoint import checkpoint_paths
    from cxrlabel.models.onnx import export_onnx

    copy = copy_checkpoint(checkpoint, tmp_path / "gone")
    onnx_path = export_onnx([copy], tmp_path / "model.onnx")
    for path in checkpoint_paths(copy):
        path.unlink(missing_ok=True)
    client = local_client(create_app(load_model([onnx_path], backend="native", device="cpu")))
    body = _post(client, film.read_bytes(), heatmaps="true").json()
    expected = ensemble.predict_images([read_image(film)])[0]
    assert np.allclose([body["probabilities"][k] for k in OBSERVATIONS], expected, atol=1e-5)
    assert body["heatmaps"]["available"] is False and body["heatmaps"]["links"] == {}
    assert "PyTorch checkpoint" in body["heatmaps"]["reason"]
    assert "was not found" in body["heatmaps"]["reason"]
    assert Image.open(io.BytesIO(client.get(body["heatmaps"]["film"]).content)).size == (64, 64)
    missing = client.get(f"/heatmaps/{body['result_id']}/Edema.png")
    assert missing.status_code == 404 and missing.json()["error"] == "heatmaps_unavailable"
    assert client.get("/model").json()["heatmaps"]["available"] is False


# --------------------------------------------------------------------------------------------
# Concurrency and the command
# --------------------------------------------------------------------------------------------


def test_concurrent_requests_get_their_own_results(ensemble: Ensemble, tiny_dataset: Path) -> None:
    films = _films(tiny_dataset, 8)
    expected = {
        str(f): [float(p) for p in ensemble.predict_images([read_image(f)])[0]] for f in films
    }
    # 8 clients from one address: above the default per-client upload limit (4), which
    # would answer 429 whenever more than 4 uploads overlap; that limit has its own tests.
    app = create_app(ensemble, max_upload_bytes=LIMIT, max_uploads_per_client=8)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:

        def one(job: int) -> tuple[str, list[float], int]:
            path = films[job % len(films)]
            params = {"heatmaps": "true"} if job % 2 else {}
            r = http.post("/predict", params=params, files={"file": (path.name, path.read_bytes())})
            if job % 2:  # Grad-CAM under the same lock as other requests' forward passes
                link = r.json()["heatmaps"]["links"]["Cardiomegaly"]
                assert http.get(link).status_code == 200
            return str(path), [r.json()["probabilities"][k] for k in OBSERVATIONS], r.status_code

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(32)))
    assert [status for *_, status in results] == [200] * 32
    for path, probs, _ in results:
        assert probs == expected[path]


class _LiveFilms:
    """Counts the decoded full-size films alive at once: serve's decode_upload, wrapped."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pause: float = 0.0) -> None:
        import cxrlabel.labelling.service

        self.live = self.peak = 0
        self.shapes: list[tuple[int, ...]] = []
        self._lock = threading.Lock()
        real = cxrlabel.labelling.service.decode_upload

        def decode(data: bytes, filename: str) -> tuple[np.ndarray, Any]:
            image, fmt = real(data, filename)
            with self._lock:
                self.live += 1
                self.peak = max(self.peak, self.live)
                self.shapes.append(image.shape)
            weakref.finalize(image, self._release)
            time.sleep(pause)  # so that decodes overlap whenever they are allowed to
            return image, fmt

        monkeypatch.setattr(cxrlabel.labelling.service, "decode_upload", decode)

    def _release(self) -> None:
        with self._lock:
            self.live -= 1


def _large_film() -> bytes:
    """A 1200 x 900 film (a few KB of PNG): far larger decoded than the 64 px model input."""
    yy, xx = np.mgrid[0:1200, 0:900]
    return _png(((xx + yy) % 256).astype(np.uint8))


def test_decoded_films_held_at_once_never_exceed_the_bound(
    ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    films = _LiveFilms(monkeypatch, pause=0.05)
    data = _large_film()
    # All 12 clients share one address: the per-client upload limit (tested on its own in
    # test_service_limits) would answer 429 whenever more than 4 uploads overlap.
    app = create_app(ensemble, max_concurrent=2, max_queue=16, max_uploads_per_client=12)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:

        def one(job: int) -> int:
            params = {"heatmaps": "true"} if job % 2 else {}
            return http.post(
                "/predict", params=params, files={"file": ("big.png", data)}
            ).status_code

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(one, range(12)))
    assert statuses == [200] * 12
    assert films.shapes == [(1200, 900)] * 12
    assert 1 <= films.peak <= 2 and films.live == 0
    assert app.state.service.admitted == 0


def test_full_size_film_is_dropped_before_the_model_runs(
    ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model (and the wait for its lock) sees only the model-sized film, and gives the
    same probabilities as from the full-size one."""
    films = _LiveFilms(monkeypatch)
    seen: list[tuple[int, tuple[int, ...]]] = []
    real_predict = ensemble.predict_images

    def predict_images(images: list[np.ndarray]) -> np.ndarray:
        seen.append((films.live, images[0].shape))
        return real_predict(images)

    monkeypatch.setattr(ensemble, "predict_images", predict_images)
    client = local_client(create_app(ensemble, max_concurrent=1))
    data = _large_film()
    body = _post(client, data, name="big.png", heatmaps="true").json()
    assert seen == [(0, (64, 48))]  # no full-size film alive while predicting
    assert (body["file"]["width"], body["file"]["height"]) == (900, 1200)
    expected = real_predict([decode_upload(data, "big.png")[0]])[0]
    assert [body["probabilities"][k] for k in OBSERVATIONS] == [float(p) for p in expected]
    film_png = Image.open(io.BytesIO(client.get(body["heatmaps"]["film"]).content))
    assert film_png.size == (48, 64)


def test_members_that_resize_differently_get_the_full_film(
    checkpoint: Path, tmp_path: Path
) -> None:
    """No one smaller film is exact for members of different input sizes: scores must still
    equal the ensemble's own on the full film."""
    torch.manual_seed(1)
    other = create_model("tiny", "linear", OBSERVATIONS, weights="none", size=48)
    other_path = save_checkpoint(tmp_path / "tiny48.safetensors", other, config={}, epoch=0, step=0)
    mixed = load_ensemble([checkpoint, other_path], device="cpu")
    client = local_client(create_app(mixed))
    data = _large_film()
    body = _post(client, data, name="big.png").json()
    expected = mixed.predict_images([decode_upload(data, "big.png")[0]])[0]
    assert [body["probabilities"][k] for k in OBSERVATIONS] == [float(p) for p in expected]


def test_overload_gets_503_busy_not_500(
    ensemble: Ensemble, film: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cxrlabel.labelling.service

    entered, release = threading.Event(), threading.Event()
    real = cxrlabel.labelling.service.decode_upload

    def blocking_decode(data: bytes, filename: str) -> tuple[np.ndarray, str]:
        entered.set()
        assert release.wait(60)
        return real(data, filename)

    monkeypatch.setattr(cxrlabel.labelling.service, "decode_upload", blocking_decode)
    app = create_app(ensemble, max_concurrent=1, max_queue=1)
    service = app.state.service
    data = film.read_bytes()
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:

        def post() -> httpx.Response:
            return http.post("/predict", files={"file": ("film.jpg", data)})

        with ThreadPoolExecutor(2) as pool:
            try:
                working = pool.submit(post)
                assert entered.wait(30)
                waiting = pool.submit(post)
                deadline = time.monotonic() + 30
                while service.admitted < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                busy = post()
            finally:
                release.set()
            assert working.result().status_code == 200
            assert waiting.result().status_code == 200
        assert busy.status_code == 503, busy.text
        assert busy.json()["error"] == "busy" and "try again" in busy.json()["detail"]
        assert busy.headers["retry-after"] == "1"
        assert post().status_code == 200  # room again once the others are done
    assert service.admitted == 0
    info = local_client(app).get("/model").json()
    assert (info["max_concurrent"], info["max_queue"]) == (1, 1)


def test_concurrency_settings_are_checked(ensemble: Ensemble) -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        create_app(ensemble, max_concurrent=0)
    with pytest.raises(ValueError, match="max_queue"):
        create_app(ensemble, max_queue=-1)


def test_serve_command_reads_token_from_env(
    checkpoint: Path, film: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command wiring (uvicorn itself runs in the serve_in_thread tests above)."""
    import cxrlabel.labelling.service
    from cxrlabel.cli import main

    calls: list[dict[str, Any]] = []

    def fake_serve(model: Any, **kwargs: Any) -> None:
        calls.append({"model": model, **kwargs})

    monkeypatch.setattr(cxrlabel.labelling.service, "serve", fake_serve)
    monkeypatch.setenv("SERVE_TEST_TOKEN", "from-env")
    argv = ["serve", "--model", str(checkpoint), "--device", "cpu", "--port", "8123"]
    assert main([*argv, "--token-env", "SERVE_TEST_TOKEN", "--max-upload-mb", "0.5"]) == 0
    (call,) = calls
    assert call["token"] == "from-env" and call["port"] == 8123 and call["host"] == "127.0.0.1"
    assert call["max_upload_bytes"] == 2**19 and call["model"].name == "Tiny_1 (serve-test)"
    kwargs = {k: v for k, v in call.items() if k in ("token", "max_upload_bytes", "heatmap_cache")}
    client = local_client(create_app(call["model"], **kwargs))
    files = {"file": ("film.jpg", film.read_bytes())}
    assert client.post("/predict", files=files).status_code == 401
    ok = client.post("/predict", files=files, headers={"Authorization": "Bearer from-env"})
    assert ok.status_code == 200
    monkeypatch.setenv(TOKEN_ENV, "default-variable")
    assert main(argv) == 0 and calls[-1]["token"] == "default-variable"


def test_serve_command_tta(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import cxrlabel.labelling.service
    from cxrlabel.cli import main

    calls: list[Any] = []
    monkeypatch.setattr(cxrlabel.labelling.service, "serve", lambda model, **_: calls.append(model))
    argv = ["serve", "--model", str(checkpoint), "--device", "cpu"]
    assert main([*argv, "--tta", "2"]) == 0
    info = local_client(create_app(calls[0])).get("/model").json()
    assert info["tta"] == 2 and info["kind"] == "single model, TTA x2"
    assert main(argv) == 0 and calls[1].model_info().get("tta", 1) == 1  # off by default
    assert main([*argv, "--tta", "99"]) == 2 and len(calls) == 2
    assert "--tta must be between 1 (off) and" in caplog.text


def test_serve_command_refuses_unset_token_env(checkpoint: Path) -> None:
    from cxrlabel.cli import main

    os.environ.pop("SERVE_TEST_UNSET", None)
    assert main(["serve", "--model", str(checkpoint), "--token-env", "SERVE_TEST_UNSET"]) == 2


def test_an_upload_is_decoded_once_and_resampled_once_for_the_model(
    ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One decode and one resampling to the model's size, whose result is also the film kept
    for heatmaps when both resize alike; a preview of another size costs one more."""
    import cxrlabel.labelling.service as service_module
    from cxrlabel.data.transforms import ResizeGeometry

    service = create_app(ensemble).state.service
    upload = _png(np.random.default_rng(3).integers(0, 256, (150, 120), dtype=np.uint8))
    expected = ensemble.predict_images([decode_upload(upload, "film.png")[0]])[0]
    decodes = count_calls(monkeypatch, service_module, "read_image_with_info")
    resamples = count_calls(monkeypatch, Image.Image, "resize")
    done = service.label(upload, "film.png", keep_film=True)
    assert (decodes.n, resamples.n) == (1, 1)
    assert done.film is not None and max(done.film.shape) == service.input_geometry.size
    np.testing.assert_allclose(done.probs, expected, atol=1e-6)

    service.film_geometry = ResizeGeometry(32, "pad", "bilinear")  # a heatmap model's own size
    done = service.label(upload, "film.png", keep_film=True)
    assert (decodes.n, resamples.n) == (2, 3) and max(done.film.shape) == 32
    np.testing.assert_allclose(done.probs, expected, atol=1e-6)
