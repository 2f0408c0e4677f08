"""The web page in headless Chromium: upload a film, read the labels off the page.

Drives Debian's chromium (/usr/bin/chromium) with Playwright; no browser is downloaded.
`make test` installs chromium when it is missing. The screenshot goes to test-artifacts/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.fileio import atomic_write_bytes
from cxrlabel.labelling.service import create_app, serve_in_thread
from cxrlabel.models.ensemble import load_ensemble
from tests.helpers import SHARED_DATA, banded_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # generous: the test machine's two cores are shared


@pytest.fixture(scope="module")
def film(tiny_dataset: Path) -> Path:
    """A real NIH fixture film when the shared data is there, else a synthetic one."""
    fixtures = sorted((SHARED_DATA / "fixtures" / "nih_320").glob("*.jpg"))
    if fixtures:
        return fixtures[0]
    return sorted(tiny_dataset.glob("train/patient*/study*/view1_frontal.jpg"))[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, film: Path) -> Path:
    """Thresholds around this model's own scores on `film`: positive, negative, uncertain."""
    path = tmp_path_factory.mktemp("browser") / "tiny.safetensors"
    return banded_checkpoint(path, film, "browser-test")


@pytest.fixture(scope="module")
def base_url(checkpoint: Path) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port."""
    with serve_in_thread(create_app(load_ensemble([checkpoint], device="cpu"))) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian chromium; the tests ask for it first, so a missing one fails fast."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser test needs Debian's chromium package; "
            "`make test` installs it (apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def _read_findings(page: Any) -> list[dict[str, Any]]:
    rows = []
    for li in page.locator("#findings li.finding").all():
        rows.append(
            {
                "label": li.locator(".finding-name").inner_text(),
                "shown": li.locator(".finding-prob").inner_text(),
                "text": li.locator(".chip").inner_text(),
                "data_probability": li.get_attribute("data-probability"),
                "data_value": li.get_attribute("data-value"),
            }
        )
    return rows


def test_page_shows_the_apis_labels_and_a_heatmap(browser: Any, base_url: str, film: Path) -> None:
    api = httpx.post(
        f"{base_url}/predict", files={"file": (film.name, film.read_bytes())}, timeout=60
    ).json()
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The Content-Security-Policy must allow what the page does (blob: films, its favicon):
    # Chromium reports what it blocks on the console.
    page.on(
        "console",
        lambda msg: msg.type == "error" and "Content Security Policy" in msg.text
        and errors.append(msg.text),
    )  # fmt: skip
    response = page.goto(base_url)
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.wait_for_selector("body[data-state=ready]")
    assert page.locator("#model-name").inner_text() == api["model"]["name"]
    assert page.locator("#model-kind").inner_text() == "single model"

    page.set_input_files("#file-input", str(film))
    page.wait_for_selector("body[data-state=done]")
    rows = _read_findings(page)
    assert [r["label"] for r in rows] == list(OBSERVATIONS)
    for row, expected in zip(rows, api["results"], strict=True):
        assert row["label"] == expected["label"]
        assert row["text"] == expected["text"]
        assert int(row["data_value"]) == expected["value"]
        assert float(row["data_probability"]) == expected["probability"]
        shown = float(re.fullmatch(r"(\d+\.\d)%", row["shown"]).group(1))
        assert abs(shown - 100 * expected["probability"]) <= 0.05 + 1e-9, row
    assert {r["text"] for r in rows[:3]} == {"positive", "negative", "uncertain"}

    # The heatmap of the most probable finding (not No Finding) is shown by default.
    top = max(
        (r for r in api["results"] if r["label"] != "No Finding"), key=lambda r: r["probability"]
    )
    page.wait_for_selector(f'body[data-heatmap="{top["label"]}"]')
    assert page.locator("#heatmap").evaluate("img => img.naturalWidth") > 0
    # Choosing another label in the selector loads its heatmap.
    page.select_option("#heatmap-label", "Edema")
    page.wait_for_selector('body[data-heatmap="Edema"]')
    assert page.locator(".finding.selected").get_attribute("data-label") == "Edema"

    ARTIFACTS.mkdir(exist_ok=True)
    atomic_write_bytes(ARTIFACTS / "serve_page.png", page.screenshot(full_page=True))
    assert not errors, errors
    page.close()


def test_page_shows_errors_and_dicom_films(browser: Any, base_url: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(base_url)
    page.wait_for_selector("body[data-state=ready]")

    text = tmp_path / "notes.png"
    text.write_text("not a radiograph\n" * 10)
    page.set_input_files("#file-input", str(text))
    page.wait_for_selector("body[data-state=error]")
    message = page.locator("#error").inner_text()
    assert "notes.png" in message and "not a PNG, JPEG or DICOM image" in message
    assert "415" in message

    dicoms = sorted((SHARED_DATA / "fixtures" / "dicom").glob("siim_*.dcm"))
    if not dicoms:
        pytest.skip(f"no DICOM fixture under {SHARED_DATA / 'fixtures' / 'dicom'}")
    page.set_input_files("#file-input", str(dicoms[0]))
    page.wait_for_selector("body[data-state=done]")
    assert page.locator("#error").is_hidden()
    assert len(_read_findings(page)) == len(OBSERVATIONS)
    # Chromium cannot show DICOM; the page falls back to the server's decoding of it.
    page.wait_for_function("document.getElementById('film').naturalWidth > 0")
    assert "DICOM" in page.locator("#file-meta").inner_text()
    page.close()


def test_page_asks_for_the_token(browser: Any, checkpoint: Path, film: Path) -> None:
    app = create_app(load_ensemble([checkpoint], device="cpu"), token="page-token")
    with serve_in_thread(app) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#token-form:not([hidden])")
        assert page.locator("#model-name").inner_text() == "model unavailable"
        page.fill("#token", "page-token")
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("body[data-state=ready]")
        assert page.locator("#token-form").is_hidden()
        page.set_input_files("#file-input", str(film))
        page.wait_for_selector("body[data-state=done]")
        assert len(_read_findings(page)) == len(OBSERVATIONS)
        # Heatmaps are fetched with the token too (an <img src> could not send it).
        page.wait_for_selector("body[data-heatmap]")
        assert page.locator("#heatmap").evaluate("img => img.naturalWidth") > 0
        page.close()


def test_page_warns_about_flagged_films(browser: Any, base_url: str, tmp_path: Path) -> None:
    """The input checks' flags are shown as a visible warning, and cleared for a good film."""
    import numpy as np
    from PIL import Image

    from cxrlabel.synth import generate_image

    tiny = tmp_path / "one_pixel.png"
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(tiny)
    good = tmp_path / "chest.png"
    Image.fromarray(generate_image({}, np.random.default_rng(5), size=320)).save(good)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(base_url)
    page.wait_for_selector("body[data-state=ready]")

    page.set_input_files("#file-input", str(tiny))
    page.wait_for_selector("body[data-state=done]")
    warning = page.locator("#flags")
    assert warning.is_visible()
    assert [li.get_attribute("data-flag") for li in warning.locator("li").all()] == [
        "small",
        "constant",
    ]
    assert "smallest side under 128 px" in warning.inner_text()
    assert len(_read_findings(page)) == len(OBSERVATIONS)  # labelled all the same

    page.set_input_files("#file-input", str(good))
    page.wait_for_selector("body[data-state=done][data-flags='']")
    assert warning.is_hidden()
    page.close()
