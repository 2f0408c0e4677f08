"""A study's findings as a DICOM Structured Report (highdicom), joined to the original study.

The SR is a **Comprehensive SR** whose content follows **TID 1500 "Measurement Report"**:

- observer context: the algorithm as a device observer (TID 1004): name "cxrlabel <model>",
  manufacturer "cxrlabel", model name = the model id `/model` shows, serial number = the
  members' weight sha256s; its Device Observer UID is derived from the model id, so every SR
  of one model names the same device;
- procedure reported: chest imaging (SNOMED CT 413815006);
- an image library (TID 1600) of every source DICOM film;
- one measurement group (TID 1501) per observation: tracking id = the observation, finding =
  its code (`codes.OBSERVATION_CODES`), the algorithm (TID 4019: name, cxrlabel version,
  model id, weights), a qualitative evaluation (present / absent / indeterminate, from
  `Finding.value`) and a measurement "Probability" (DCM 122157, unit UCUM "1"), with the
  source films referenced.

Why Comprehensive SR: TID 1500 may be carried by Enhanced, Comprehensive or Comprehensive 3D
SR; nothing here has spatial coordinates (no 3D SCOORD3D, no 2D SCOORD), so the 3D class would
only narrow which archives and viewers take it, and Comprehensive SR is the class highdicom's
`MeasurementReport` examples and most PACS viewers handle. The report is marked
ContentQualification RESEARCH (cxrlabel is not a cleared device), PRELIMINARY and UNVERIFIED:
no person has signed it.

The SR joins the original study: Study Instance UID, the patient and study modules are copied
from the first source film by highdicom (so the SR is patient data, like the films); its
Series and SOP Instance UIDs are new.

Films that were not DICOM (the documented rule): such a study gets an SR only when its study
id is known (patient/study path layout or CSV id columns; a film without one is in no study
at all). Its Study Instance UID is then derived from the patient and study ids
(`derived_study_uid`: the same ids give the same UID on every run), the patient module holds
only Patient ID = the run's patient id (no name, birth date or sex), and, since such films
cannot be referenced as DICOM instances, the SR names them in a TEXT "Comment" of TID 1500's
"Qualitative Evaluations" container. A mixed study references its DICOM films and names the
others.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import highdicom as hd
import pydicom
import pydicom.sr.codedict
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import validate_value

from cxrlabel.hospital import codes
from cxrlabel.hospital.findings import Algorithm, Finding, StudyFindings, derived_study_uid

log = logging.getLogger(__name__)

MANUFACTURER = "cxrlabel"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "cxrlabel findings"
# DICOM LO values (Series Description, Manufacturer's Model Name) hold at most 64 characters.
_LO_MAX = 64
# The module attributes a derived (non-DICOM) study header carries: Type 2, so present and empty.
_EMPTY_TYPE2 = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def coded(concept: codes.Concept) -> hd.sr.CodedConcept:
    """A codes.Concept as highdicom's CodedConcept (the private scheme with its version)."""
    version = codes.PRIVATE_SCHEME_VERSION if concept.scheme == codes.PRIVATE_SCHEME else None
    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning, version)


def device_uid(algorithm: Algorithm) -> UID:
    """The algorithm's Device Observer UID: one per model (its weights), stable across runs."""
    return generate_uid(entropy_srcs=["cxrlabel device", algorithm.model_id])


def study_header(study: StudyFindings, sources: Sequence[Dataset] | None) -> Dataset:
    """The dataset new objects copy patient and study from: the first source film's header,
    else (no DICOM film) one made from the study's ids by the non-DICOM rule."""
    if sources:
        # highdicom reads these from its first evidence; a film may lack some (all Type 2).
        header = Dataset()
        header.update(sources[0])
        for keyword in _EMPTY_TYPE2:
            if keyword not in header:
                setattr(header, keyword, "")
        return header
    header = Dataset()
    header.StudyInstanceUID = derived_study_uid(study.patient_id, study.study_id)
    header.PatientID = study.patient_id
    for keyword in _EMPTY_TYPE2:
        setattr(header, keyword, "")
    return header


@contextmanager
def quiet_patient_data() -> Iterator[None]:
    """Silence the library warnings that quote copied header values: highdicom warns about a
    one-component Patient's Name by quoting it, and warnings end up in logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*intended person name", category=UserWarning)
        warnings.filterwarnings(
            "ignore", message=r".*[Ii]nvalid value for VR", category=UserWarning
        )
        yield


def blank_invalid_values(ds: Dataset) -> list[str]:
    """Empty the top-level values that are not valid for their VR and return their keywords.

    Copied patient and study modules can carry such values (the SIIM films' Patient's Age
    "62" is not an AS, which needs "062Y"); copied as they are, the new object would not be
    valid DICOM. Emptied rather than guessed at; what was emptied is logged by keyword only
    (the value may identify the patient).
    """
    emptied = []
    for elem in ds:
        values = elem.value if elem.VM > 1 else [elem.value]
        # Only text values: numbers, sequences and bytes were not copied from the films.
        if elem.VR == "SQ" or not all(isinstance(v, str) for v in values):
            continue
        try:
            for value in values:
                validate_value(elem.VR, value, pydicom.config.RAISE)
        except (ValueError, TypeError):
            elem.value = ""
            emptied.append(elem.keyword or str(elem.tag))
    if emptied:
        log.info("values not valid DICOM left empty in the new object: %s", ", ".join(emptied))
    return emptied


def unique_sources(sources: Sequence[Dataset] | None) -> list[Dataset]:
    """The source headers, one per SOP Instance UID (a film given twice is one instance)."""
    seen: dict[str, Dataset] = {}
    for ds in sources or ():
        seen.setdefault(str(ds.SOPInstanceUID), ds)
    return list(seen.values())


def _device_observer(algorithm: Algorithm) -> hd.sr.ObserverContext:
    serial = ",".join(algorithm.weights_sha256) or algorithm.model_id
    return hd.sr.ObserverContext(
        observer_type=pydicom.sr.codedict.codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(algorithm),
            name=f"cxrlabel {algorithm.name}",
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.model_id,
            serial_number=serial,
        ),
    )


def _algorithm_id(algorithm: Algorithm) -> hd.sr.AlgorithmIdentification:
    parameters = [f"model id {algorithm.model_id}", f"kind {algorithm.kind}"]
    parameters += [f"weights sha256 {h}" for h in algorithm.weights_sha256]
    return hd.sr.AlgorithmIdentification(
        name=f"cxrlabel {algorithm.name}", version=algorithm.version, parameters=parameters
    )


def _group(
    finding: Finding, algorithm: Algorithm, sources: Sequence[Dataset]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = coded(codes.observation_code(finding.observation))
    try:
        value = codes.VALUE_CONCEPTS[finding.value]
    except KeyError:
        raise ValueError(
            f"finding {finding.observation!r}: value {finding.value!r} is not 1, 0 or -1"
        ) from None
    if not 0.0 <= finding.probability <= 1.0:
        raise ValueError(
            f"finding {finding.observation!r}: probability {finding.probability} not in [0, 1]"
        )
    # The tracking UID is derived, so one study's groups keep their UIDs across re-runs.
    tracking = hd.sr.TrackingIdentifier(
        identifier=finding.observation,
        uid=generate_uid(entropy_srcs=["cxrlabel finding", finding.observation]),
    )
    probability = hd.sr.Measurement(
        name=coded(codes.PROBABILITY),
        value=float(finding.probability),
        unit=coded(codes.UNIT_RATIO),
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=_algorithm_id(algorithm),
        measurements=[probability],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(concept, coded(value))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources]
        or None,
    )


def _library(sources: Sequence[Dataset]) -> list[Dataset] | None:
    """The films for TID 1500's (optional) image library, or None: highdicom's library entry of
    a CR/DX film needs Patient Orientation and Imager Pixel Spacing, which many films lack;
    the films stay referenced by every measurement group and the evidence sequence."""
    if not sources:
        return None
    try:
        hd.sr.ImageLibrary(sources)
    except AttributeError as e:
        log.debug("SR without an image library: a source film lacks %s", e.name)
        return None
    return list(sources)


def _name_films(report: hd.sr.MeasurementReport, names: Sequence[str]) -> None:
    """Name the films that are not DICOM in TID 1500 row 12's Qualitative Evaluations."""
    container = hd.sr.ContainerContentItem(
        name=coded(codes.QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=coded(codes.COMMENT),
                value=f"source film (not DICOM): {name}",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for name in names
        ]
    )
    report[0].ContentSequence.append(container)


def study_sr(study: StudyFindings, *, sources: Sequence[Dataset] | None = None) -> Dataset:
    """The Comprehensive SR (TID 1500) of `study`; `sources` are its DICOM films' headers
    (`pydicom.dcmread(..., stop_before_pixels=True)` is enough). See the module doc for what
    it holds and the rule for films that were not DICOM."""
    if not study.findings:
        raise ValueError(f"study {study.study_id!r}: no findings to report")
    with quiet_patient_data():
        return _study_sr(study, unique_sources(sources))


def _study_sr(study: StudyFindings, sources: list[Dataset]) -> Dataset:
    header = study_header(study, sources)
    if len({str(s.StudyInstanceUID) for s in sources}) > 1:
        # Studies grouped by CSV ids can span DICOM studies: the SR joins the first one and
        # highdicom lists the others as pertinent other evidence.
        log.warning("a study's DICOM films belong to several DICOM studies; the SR joins the first")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None, observer_device_context=_device_observer(study.algorithm)
        ),
        procedure_reported=coded(codes.CHEST_IMAGING),
        imaging_measurements=[_group(f, study.algorithm, sources) for f in study.findings],
        referenced_images=_library(sources),
    )
    not_dicom = [f.display for f in study.films if not f.is_dicom]
    if not_dicom:
        _name_films(report, not_dicom)
    sr = hd.sr.ComprehensiveSR(
        evidence=[header, *sources[1:]] if sources else [_placeholder_evidence(header)],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=study.algorithm.name[:_LO_MAX] or None,
        software_versions=study.algorithm.version,
        device_serial_number=study.algorithm.model_id,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        coding_schemes=[_private_scheme()],
    )
    if not sources:
        # The placeholder only carried patient and study: it is no instance to reference
        # (the evidence sequence is required only when the SR references instances).
        del sr.CurrentRequestedProcedureEvidenceSequence
    blank_invalid_values(sr)
    return sr


def _placeholder_evidence(header: Dataset) -> Dataset:
    """highdicom takes patient and study from its first evidence and lists every evidence
    instance; with no DICOM film, this stands in (its listing is removed after)."""
    placeholder = Dataset()
    placeholder.update(header)
    placeholder.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    placeholder.SOPInstanceUID = generate_uid()
    placeholder.SeriesInstanceUID = generate_uid()
    return placeholder


def _private_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification of cxrlabel's private observation codes."""
    return CodingSchemeIdentificationItem(
        designator=codes.PRIVATE_SCHEME,
        name="cxrlabel observations (CheXpert names)",
        version=codes.PRIVATE_SCHEME_VERSION,
        responsible_organization="cxrlabel",
    )


__all__ = [
    "blank_invalid_values",
    "coded",
    "device_uid",
    "quiet_patient_data",
    "study_header",
    "study_sr",
    "unique_sources",
]
