"""Input sanity flags in the service's JSON (labelled all the same, never refused)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.labelling.service import create_app
from cxrlabel.models.checkpoint import save_checkpoint
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.factory import create_model
from cxrlabel.synth import generate_image
from tests.helpers import local_client


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    torch.manual_seed(0)
    net = create_model("tiny", "linear", OBSERVATIONS, weights="none", size=64)
    path = tmp_path_factory.mktemp("serve-flags") / "tiny.safetensors"
    save_checkpoint(path, net, config={"name": "flags"}, epoch=0, step=0)
    return local_client(create_app(load_ensemble([path], device="cpu")))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, **elements: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def _predict(client: TestClient, data: bytes, name: str) -> dict:
    response = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    return response.json()


FILM = generate_image({}, np.random.default_rng(5), size=320)


@pytest.mark.parametrize(
    ("name", "data", "flags"),
    [
        ("chest.png", _png(FILM), []),
        ("one_pixel.png", _png(np.full((1, 1), 255, np.uint8)), ["small", "constant"]),
        ("strip.png", _png(np.hstack([FILM, FILM, FILM])), ["aspect"]),
        ("photo.png", _png(np.stack([FILM, FILM // 2, FILM // 4], axis=-1)), ["colour"]),
        ("chest.dcm", _dicom(FILM, Modality="DX", BodyPartExamined="CHEST"), []),
        (
            "knee.dcm",
            _dicom(FILM, Modality="MR", BodyPartExamined="KNEE"),
            ["modality:MR", "body_part:KNEE"],
        ),
    ],
)
def test_predict_returns_the_input_checks_flags(
    client: TestClient, name: str, data: bytes, flags: list[str]
) -> None:
    body = _predict(client, data, name)
    assert body["flags"] == flags
    assert len(body["results"]) == len(OBSERVATIONS)  # labelled all the same


def test_the_schema_documents_flags(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictBody"]
    assert "flags" in schema["required"] or "flags" in schema["properties"]
    assert schema["properties"]["flags"]["type"] == "array"
    assert "small" in schema["properties"]["flags"]["description"]


def test_a_raw_upload_gets_flags_too(client: TestClient) -> None:
    response = client.post(
        "/predict",
        content=_png(np.full((40, 40), 7, np.uint8)),
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["flags"] == ["small", "constant"]


def test_model_info_lists_the_input_check_limits(client: TestClient, tmp_path: Path) -> None:
    checks = client.get("/model").json()["input_checks"]
    assert checks["min_side"] == 128 and checks["max_aspect"] == 2.0
    assert set(checks["modalities"]) == {"CR", "DX", "RG"}
