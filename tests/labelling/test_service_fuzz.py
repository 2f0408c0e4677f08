"""Schemathesis fuzz of the service's published OpenAPI schema (issue 11, section 3).

Every operation gets generated requests, valid and invalid by the schema, in-process over ASGI
(no server, no network): none may get a 5xx, and every answer must match the schema (status
declared, content type, body and headers). Without a token and with one. Bounded: a few
examples per operation and a fixed seed (derandomized), so the run is fast and repeatable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from cxrlabel.labelling.service import create_app
from cxrlabel.models.ensemble import Ensemble, load_ensemble
from tests.helpers import banded_checkpoint

TOKEN = "fuzz-token"
LIMIT = 100_000  # bytes: small, so oversized bodies are cheap to generate
# Loopback, which the service answers to by default (Schemathesis would say "testserver").
BASE_URL = "http://localhost"
EXAMPLES = 25  # per operation and test: the whole file stays well under a minute on 2 cores
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,  # a loaded test machine; time bounds belong to the load tests
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Ensemble:
    film = sorted(tiny_dataset.glob("train/patient*/study*/view1_frontal.jpg"))[0]
    path = tmp_path_factory.mktemp("fuzz") / "tiny.safetensors"
    return load_ensemble([banded_checkpoint(path, film, "fuzz-test")], device="cpu")


# Schema-valid requests may still be refused for their content, which no schema can say:
# random bytes are rarely an image (415, 422) or are too large (413). 400 is a missing part.
ACCEPTED_POSITIVE = ["2xx", "400", "401", "403", "404", "413", "415", "422"]


def _schema(ensemble: Ensemble, token: str | None = None) -> Any:
    app = create_app(ensemble, max_upload_bytes=LIMIT, heatmap_cache=4, token=token)
    config: dict[str, Any] = {
        "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED_POSITIVE}}
    }
    if token is not None:  # given as the schema's own scheme, so `ignored_auth` can drop it
        config["auth"] = {"openapi": {"HTTPBearer": {"bearer": token}}}
    return schemathesis.openapi.from_asgi(
        "/openapi.json",
        app,
        config=schemathesis.config.SchemathesisConfig.from_dict(config),
        headers={"host": "localhost"},
    )


def _fuzz(schema: Any, mode: GenerationMode) -> dict[str, bool]:
    """Run every operation of `schema` on generated cases of `mode`: operation -> whether
    any case could be generated (an operation without inputs has no invalid request).

    Schemathesis's pytest plugin (`schemathesis.pytest.from_fixture`) fails under this
    pytest (it reads a private node attribute), so its Python API drives Hypothesis here."""
    ran = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            case.call_and_validate(base_url=BASE_URL)

        try:
            run()
            ran[operation.label] = True
        except Unsatisfiable:
            if mode is not GenerationMode.NEGATIVE:
                raise
            ran[operation.label] = False
    return ran


OPERATIONS = {
    "GET /health",
    "GET /model",
    "POST /predict",
    "GET /results/{result_id}/film.png",
    "GET /heatmaps/{result_id}/{filename}",
}


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no token", "token"])
def test_service_keeps_to_its_schema_for_valid_requests(
    ensemble: Ensemble, token: str | None
) -> None:
    ran = _fuzz(_schema(ensemble, token), GenerationMode.POSITIVE)
    assert set(ran) == OPERATIONS and all(ran.values())


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no token", "token"])
def test_service_keeps_to_its_schema_for_invalid_requests(
    ensemble: Ensemble, token: str | None
) -> None:
    ran = _fuzz(_schema(ensemble, token), GenerationMode.NEGATIVE)
    assert set(ran) == OPERATIONS and ran["POST /predict"]
    if token is not None:  # a wrong or missing token is an invalid request to each of them
        assert {op for op, done in ran.items() if done} == OPERATIONS - {"GET /health"}
