"""One study's results as a FHIR R4 transaction Bundle: a DiagnosticReport, one Observation per
observation and a Device for the algorithm.

FHIR version: `fhir.resources` 8 has no plain R4 package (its default models are R5), so the
models are `fhir.resources.R4B` (FHIR 4.3.0). R4B changed nothing in the elements used here
(Bundle, DiagnosticReport, Observation, Device), so the JSON is valid R4 as well.

Why a Bundle, and a transaction: Observations are resources with their own identity, which FHIR
says must not be `contained` in the report; a transaction Bundle can be POSTed as it is to a
FHIR server's base URL, which creates every resource and rewrites the `urn:uuid:` references
between them. The Device is created only if no Device with the same model id exists yet
(conditional create, `ifNoneExist`), so many reports share one Device per model. A "collection"
Bundle (the same resources, no request elements) is available for stores that take documents.

References out of the Bundle are logical (by identifier, never by a server id cxrlabel cannot
know): the ImagingStudy by its Study Instance UID (system `urn:dicom:uid`, value
`urn:oid:<uid>`), the Patient by its patient id when one is known. No name, birth date or other
DICOM patient attribute is copied; the patient id is, and makes the file patient data.

Codes: observations, values, probability, threshold and the report's code are
`cxrlabel.hospital.codes` concepts; the FHIR-only vocabulary (observation category "imaging",
report category v2-0074 "RAD", HL7 v3 ObservationInterpretation POS / NEG / IND, UCUM "1") is
below. Each Observation carries the qualitative finding twice, as FHIR clients look for it in
either place: `valueCodeableConcept` (SNOMED CT present / absent / indeterminate, the SR's codes)
and `interpretation` (HL7 v3 POS / NEG / IND).
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from cxrlabel.data.images import ImageError, read_dicom_metadata
from cxrlabel.fileio import atomic_write_text
from cxrlabel.hospital.codes import (
    DIAGNOSTIC_IMAGING_REPORT,
    PROBABILITY,
    THRESHOLD,
    VALUE_CONCEPTS,
    Concept,
    observation_code,
)
from cxrlabel.hospital.findings import Algorithm, Finding, StudyFindings, derived_study_uid

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/fhir+json"
BundleType = Literal["transaction", "collection"]

# FHIR terminology (HL7 code systems) that DICOM's tables do not carry.
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
REPORT_CATEGORY = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "RAD",
    "display": "Radiology",
}
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
# Label value (1 / 0 / -1) -> HL7 v3 ObservationInterpretation (code, display).
INTERPRETATIONS = {1: ("POS", "Positive"), 0: ("NEG", "Negative"), -1: ("IND", "Indeterminate")}

# Identifier systems: DICOM UIDs as FHIR writes them, and cxrlabel's own ids.
DICOM_UID_SYSTEM = "urn:dicom:uid"
MODEL_ID_SYSTEM = "urn:cxrlabel:model-id"
WEIGHTS_SYSTEM = "urn:cxrlabel:weights-sha256"
STUDY_ID_SYSTEM = "urn:cxrlabel:study-id"
# The namespace of the Bundle's urn:uuid fullUrls: derived from the study and model, so the
# same results give the same file.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxrlabel:fhir")


def _coding(concept: Concept) -> dict[str, str]:
    return {"system": concept.fhir_system, "code": concept.value, "display": concept.meaning}


def _concept(concept: Concept) -> dict[str, Any]:
    return {"coding": [_coding(concept)], "text": concept.meaning}


def _ratio(value: float) -> dict[str, Any]:
    return {"value": float(value), "unit": "1", "system": UCUM, "code": "1"}


def _full_url(study: StudyFindings, part: str) -> str:
    if not study.study_id:  # nothing names the study (an uploaded PNG): a fresh uuid each time
        return f"urn:uuid:{uuid.uuid4()}"
    key = f"{study.algorithm.model_id}|{study.study_id}|{part}"
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, key)}"


def _device_url(algorithm: Algorithm) -> str:
    return f"urn:uuid:{uuid.uuid5(_UUID_NAMESPACE, f'device|{algorithm.model_id}')}"


def device(algorithm: Algorithm) -> Device:
    """The algorithm as a Device: its name, cxrlabel's version, the model id and each member's
    weights sha256 as identifiers."""
    return Device(
        identifier=[
            {"system": MODEL_ID_SYSTEM, "value": algorithm.model_id},
            *({"system": WEIGHTS_SYSTEM, "value": sha} for sha in algorithm.weights_sha256),
        ],
        status="active",
        deviceName=[{"name": algorithm.name or algorithm.model_id, "type": "model-name"}],
        modelNumber=algorithm.model_id,
        type={"text": f"chest radiograph labelling algorithm ({algorithm.kind})"},
        version=[{"type": {"text": "cxrlabel"}, "value": algorithm.version}],
    )


def _study_reference(study_uid: str) -> dict[str, Any]:
    return {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"},
    }


def _patient_reference(patient_id: str) -> dict[str, Any] | None:
    # By identifier only: cxrlabel knows the id the films carry, not the record system's
    # Patient; the identifier has no system since the films do not say who issued it.
    return {"type": "Patient", "identifier": {"value": patient_id}} if patient_id else None


def observation(
    finding: Finding,
    *,
    device_url: str,
    subject: dict[str, Any] | None,
    study: dict[str, Any] | None,
    issued: datetime,
) -> Observation:
    """One finding: the observation's code, its qualitative value and interpretation, the
    probability (and threshold, when known) as components, and the algorithm as device."""
    value = VALUE_CONCEPTS[finding.value]
    interpretation, display = INTERPRETATIONS[finding.value]
    components = [{"code": _concept(PROBABILITY), "valueQuantity": _ratio(finding.probability)}]
    if finding.threshold is not None:
        components.append({"code": _concept(THRESHOLD), "valueQuantity": _ratio(finding.threshold)})
    return Observation(
        status="final",
        category=[{"coding": [OBSERVATION_CATEGORY]}],
        # The text keeps CheXpert's name, which the CSVs use, beside the coded meaning.
        code={**_concept(observation_code(finding.observation)), "text": finding.observation},
        subject=subject,
        issued=issued,
        valueCodeableConcept=_concept(value),
        interpretation=[
            {
                "coding": [
                    {"system": INTERPRETATION_SYSTEM, "code": interpretation, "display": display}
                ]
            }
        ],
        component=components,
        device={"reference": device_url, "type": "Device"},
        derivedFrom=[study] if study else None,
    )


def _conclusion(findings: Sequence[Finding]) -> str:
    present = [f.observation for f in findings if f.value == 1]
    uncertain = [f.observation for f in findings if f.value == -1]
    parts = [f"present: {', '.join(present) or 'none'}"]
    if uncertain:
        parts.append(f"uncertain: {', '.join(uncertain)}")
    return "Algorithm findings; " + "; ".join(parts) + "."


def diagnostic_report(
    study: StudyFindings,
    *,
    study_uid: str | None,
    issued: datetime | None = None,
    bundle_type: BundleType = "transaction",
) -> Bundle:
    """The study's results as a validated FHIR R4 (R4B models) Bundle: DiagnosticReport first,
    then one Observation per finding (in the study's order), then the Device.

    `study_uid`: the Study Instance UID the report points at (`imagingStudy`, each
    Observation's `derivedFrom`); None for none. A study id that is not the UID is the
    report's `identifier` (system STUDY_ID_SYSTEM). `issued`: timezone-aware; now when None.
    """
    issued = datetime.now(UTC) if issued is None else issued
    if issued.tzinfo is None:
        raise ValueError(f"issued must say its timezone (FHIR instants do): {issued!r}")
    subject = _patient_reference(study.patient_id)
    reference = _study_reference(study_uid) if study_uid else None
    device_url = _device_url(study.algorithm)
    observations = [
        (
            _full_url(study, f"observation|{f.observation}"),
            observation(f, device_url=device_url, subject=subject, study=reference, issued=issued),
        )
        for f in study.findings
    ]
    # The study id the CSVs use, unless it is the UID already (a DICOM study).
    named = study.study_id and study.study_id != study_uid
    report = DiagnosticReport(
        identifier=[{"system": STUDY_ID_SYSTEM, "value": study.study_id}] if named else None,
        status="final",
        category=[{"coding": [REPORT_CATEGORY]}],
        code=_concept(DIAGNOSTIC_IMAGING_REPORT),
        subject=subject,
        issued=issued,
        imagingStudy=[reference] if reference else None,
        result=[{"reference": url, "type": "Observation"} for url, _ in observations],
        conclusion=_conclusion(study.findings),
    )
    algorithm = study.algorithm
    entries = [
        _entry(_full_url(study, "report"), report, bundle_type),
        *(_entry(url, obs, bundle_type) for url, obs in observations),
        _entry(
            device_url,
            device(algorithm),
            bundle_type,
            if_none_exist=f"identifier={MODEL_ID_SYSTEM}|{algorithm.model_id}",
        ),
    ]
    return Bundle(type=bundle_type, timestamp=issued, entry=entries)


def _entry(
    url: str, resource: Any, bundle_type: BundleType, if_none_exist: str | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"fullUrl": url, "resource": resource}
    if bundle_type == "transaction":
        request = {"method": "POST", "url": resource.get_resource_type()}
        if if_none_exist:
            request["ifNoneExist"] = if_none_exist
        entry["request"] = request
    return entry


def _study_instance_uid(study: StudyFindings) -> str | None:
    """The Study Instance UID of a labelled study: read from its DICOM films (labelling takes
    the study id from there, unless a CSV gave another); for a study of other films, the UID
    derived from its ids as the DICOM SR output derives it (`derived_study_uid`), so both
    outputs name the same study; None without a study id."""
    for film in study.dicom_films:
        try:
            uid = read_dicom_metadata(film.path).get("study_instance_uid")
        except ImageError:
            log.warning("a DICOM film of a study cannot be read again; its UID is not used")
            continue
        if uid:
            return str(uid)
    return str(derived_study_uid(study.patient_id, study.study_id)) if study.study_id else None


def report_name(study_id: str) -> str:
    """A file name for the study's report: the study id with unsafe characters replaced and,
    when any was, a hash of the id, so two ids never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", study_id).strip("._")[:100]
    if safe != study_id or not safe:
        safe = f"{safe or 'study'}-{hashlib.sha256(study_id.encode()).hexdigest()[:8]}"
    return f"{safe}.json"


def write_reports(
    studies: Sequence[StudyFindings], out_dir: Path, *, issued: datetime | None = None
) -> list[Path]:
    """One Bundle per study as `<out_dir>/<report_name(study id)>`, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    issued = datetime.now(UTC) if issued is None else issued
    written = []
    for study in studies:
        bundle = diagnostic_report(study, study_uid=_study_instance_uid(study), issued=issued)
        path = out_dir / report_name(study.study_id)
        atomic_write_text(path, bundle.model_dump_json(indent=2) + "\n")
        written.append(path)
    log.info("FHIR: %d reports written to %s", len(written), out_dir)
    return written


__all__ = [
    "MEDIA_TYPE",
    "device",
    "diagnostic_report",
    "observation",
    "report_name",
    "write_reports",
]
