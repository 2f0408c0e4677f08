"""The hospital tests' PACS: one Debian Orthanc per session, emptied before each test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.orthanc import PACKAGES, Orthanc, installable, missing_packages


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    reason = missing_packages()
    if reason is not None:
        # Skipped only where it cannot be installed (no apt-get, or no root nor sudo): elsewhere
        # `make test` installs it, so a missing Orthanc (on CI too) is a broken set-up.
        message = f"{reason}: the PACS tests need Debian's {PACKAGES}"
        if installable():
            pytest.fail(f"{message}; `make test-deps` installs them")
        pytest.skip(
            f"{message}, and this machine cannot install them (no apt-get, or no root nor sudo)"
        )
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(orthanc_server: Orthanc) -> Orthanc:
    """The session's Orthanc, empty: each test sees only what it stores."""
    orthanc_server.clear()
    return orthanc_server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """A failing test that used Orthanc shows the server's log under its report."""
    outcome = yield
    report = outcome.get_result()
    server = getattr(item, "funcargs", {}).get("orthanc_server")
    if report.failed and isinstance(server, Orthanc):
        report.sections.append((f"Orthanc log ({server.log_path})", server.log_tail()))
