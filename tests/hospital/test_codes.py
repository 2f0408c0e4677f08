"""The coded concepts: one per observation, standard codes checked against DICOM's tables."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from cxrlabel.data.labels import OBSERVATIONS
from cxrlabel.hospital.codes import (
    DIAGNOSTIC_IMAGING_REPORT,
    OBSERVATION_CODES,
    PRIVATE_SCHEME,
    THRESHOLD,
    VALUE_CONCEPTS,
    observation_code,
)


def test_one_code_per_observation_in_chexpert_order() -> None:
    assert tuple(OBSERVATION_CODES) == OBSERVATIONS
    assert len({(c.scheme, c.value) for c in OBSERVATION_CODES.values()}) == len(OBSERVATIONS)


def test_codes_said_to_come_from_dicom_match_pydicoms_tables() -> None:
    concepts = [*OBSERVATION_CODES.values(), *VALUE_CONCEPTS.values()]
    checked = 0
    for concept in concepts:
        if concept.source != "DICOM PS3.16":
            continue
        scheme = getattr(codes, concept.scheme)
        found = [c for c in scheme.dir(concept.meaning.split()[-1]) if True]
        assert found, concept
        assert any(getattr(scheme, n).value == concept.value for n in found), concept
        checked += 1
    assert checked >= 8


def test_private_codes_name_the_observation() -> None:
    private = {n: c for n, c in OBSERVATION_CODES.items() if c.scheme == PRIVATE_SCHEME}
    assert set(private) == {
        "No Finding",
        "Enlarged Cardiomediastinum",
        "Lung Lesion",
        "Pleural Other",
        "Support Devices",
    }
    assert all(c.meaning == n and " " not in c.value for n, c in private.items())


def test_unknown_observation_is_named() -> None:
    with pytest.raises(KeyError, match="Nodule"):
        observation_code("Nodule")


def test_report_and_threshold_concepts_match_pydicoms_tables() -> None:
    assert codes.LN.DiagnosticImagingReport.value == DIAGNOSTIC_IMAGING_REPORT.value
    assert codes.DCM.ThresholdValue.value == THRESHOLD.value
    assert DIAGNOSTIC_IMAGING_REPORT.fhir_system == "http://loinc.org"
