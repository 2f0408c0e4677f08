"""POST /predict?format=fhir: the same results as the JSON, as a FHIR R4 Bundle."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from PIL import Image
from pydicom.uid import generate_uid

from cxrlabel.labelling.service import create_app
from cxrlabel.models.ensemble import load_ensemble
from tests.helpers import SHARED_DATA, banded_checkpoint, local_client, write_dicom

DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"
FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def film(tiny_dataset: Path) -> Path:
    return sorted(tiny_dataset.glob("train/patient*/study*/view1_frontal.jpg"))[0]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, film: Path) -> TestClient:
    path = tmp_path_factory.mktemp("serve-fhir") / "tiny.safetensors"
    model = load_ensemble([banded_checkpoint(path, film, "fhir-test")], device="cpu")
    return local_client(create_app(model))


def _post(client: TestClient, data: bytes, name: str, query: str = "?format=fhir") -> Any:
    return client.post(f"/predict{query}", files={"file": (name, data, "application/octet-stream")})


def _report(bundle: Bundle) -> Any:
    return bundle.entry[0].resource


def _observations(bundle: Bundle) -> list[Any]:
    return [e.resource for e in bundle.entry if e.resource.get_resource_type() == "Observation"]


def _check_same_results(client: TestClient, data: bytes, name: str) -> Bundle:
    """The Bundle for `data` says what the JSON answer says, label for label."""
    response = _post(client, data, name)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    bundle = Bundle.model_validate_json(response.content)
    plain = _post(client, data, name, query="").json()
    observations = _observations(bundle)
    assert [o.code.text for o in observations] == [r["label"] for r in plain["results"]]
    interpretation = {1: "POS", 0: "NEG", -1: "IND"}
    for obs, result in zip(observations, plain["results"], strict=True):
        probability, threshold = (float(c.valueQuantity.value) for c in obs.component)
        assert probability == result["probability"] and threshold == result["threshold"]
        assert obs.interpretation[0].coding[0].code == interpretation[result["value"]]
    device = next(e.resource for e in bundle.entry if e.resource.get_resource_type() == "Device")
    assert device.modelNumber == plain["model"]["id"]
    return bundle


def test_a_jpeg_gives_a_report_without_study_or_patient(client: TestClient, film: Path) -> None:
    bundle = _check_same_results(client, film.read_bytes(), "film.jpg")
    report = _report(bundle)
    assert report.imagingStudy is None and report.subject is None and report.identifier is None
    assert {-1, 0, 1} <= {  # the banded checkpoint gives every value on this film
        {"POS": 1, "NEG": 0, "IND": -1}[o.interpretation[0].coding[0].code]
        for o in _observations(bundle)
    }


def test_a_dicom_upload_names_its_study_and_patient_id_never_the_name(
    client: TestClient, film: Path, tmp_path: Path
) -> None:
    uid = generate_uid()
    pixels = np.asarray(Image.open(film).convert("L"))
    path = write_dicom(
        tmp_path / "f.dcm",
        pixels,
        StudyInstanceUID=uid,
        PatientID="MRN-5521",
        PatientName="Roe^Richard",
        PatientBirthDate="19411213",
        Modality="DX",
    )
    response = _post(client, path.read_bytes(), "f.dcm")
    assert response.status_code == 200, response.text
    for secret in (b"Roe", b"Richard", b"19411213"):
        assert secret not in response.content
    bundle = _check_same_results(client, path.read_bytes(), "f.dcm")
    report = _report(bundle)
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{uid}"
    assert report.subject.identifier.value == "MRN-5521"


@pytest.mark.skipif(not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}")
def test_real_dicom_fixtures_give_their_study_uid(client: TestClient) -> None:
    for path in sorted(DICOM_FIXTURES.glob("*.dcm")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        bundle = _check_same_results(client, path.read_bytes(), path.name)
        value = _report(bundle).imagingStudy[0].identifier.value
        assert value == f"urn:oid:{header.StudyInstanceUID}", path.name
        # The name's parts, less what the patient id (which the report carries) holds too:
        # SIIM's films use one pseudonym for both.
        patient_id = str(header.get("PatientID", ""))
        names = str(header.get("PatientName", "")).replace("^", " ").split()
        secrets = [n for n in names if n not in patient_id]
        secrets += [str(header.get("PatientBirthDate", "")) or "never-there"]
        text = bundle.model_dump_json()
        assert not [n for n in secrets if n in text], path.name
        assert _report(bundle).subject.identifier.value == patient_id


def test_unknown_format_is_422_and_default_stays_json(client: TestClient, film: Path) -> None:
    response = _post(client, film.read_bytes(), "film.jpg", query="?format=xml")
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"
    assert "format" in response.json()["detail"]
    plain = _post(client, film.read_bytes(), "film.jpg", query="")
    assert plain.headers["content-type"] == "application/json" and "results" in plain.json()
    # A bad image is still refused as an image, whichever format is asked for.
    assert _post(client, b"not an image", "x.png").status_code == 415


def test_openapi_declares_the_fhir_answer(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/predict"]["post"]
    content = operation["responses"]["200"]["content"]
    assert set(content) == {"application/json", FHIR_JSON}
    assert content[FHIR_JSON]["schema"]["properties"]["resourceType"]["enum"] == ["Bundle"]
    (param,) = [p for p in operation["parameters"] if p["name"] == "format"]
    assert param["schema"]["enum"] == ["json", "fhir"]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_heatmaps_are_not_kept_for_a_fhir_answer(client: TestClient, film: Path) -> None:
    data = _png(np.asarray(Image.open(film).convert("L")))
    cache = client.app.state.service.cache
    before = len(cache)
    response = _post(client, data, "f.png", query="?format=fhir&heatmaps=true")
    assert response.status_code == 200 and len(cache) == before  # no film kept for links
    assert _post(client, data, "f.png", query="?heatmaps=true").status_code == 200
    assert len(cache) == before + 1
