"""The coded concepts cxrlabel reports with: one per CheXpert observation, and the qualitative
values present / absent / uncertain.

Where a standard code exists it is used, with where it comes from:

- "DICOM PS3.16": the concept as the DICOM standard's code tables have it (read from
  `pydicom.sr.codedict`, which is generated from PS3.16), so a DICOM viewer knows it;
- "SNOMED CT": an International Edition concept the DICOM tables do not carry (its concept id
  and fully specified name are listed here as published by SNOMED International).

The observations with no matching standard concept (CheXpert's own groupings: "No Finding",
"Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Other", "Support Devices") are coded in
cxrlabel's private scheme, designator `99CXRLABEL` (DICOM reserves designators starting "99"
for private schemes, PS3.3 8.2), code value = the observation's name with spaces removed,
meaning = the CheXpert name. Its FHIR system is PRIVATE_SYSTEM.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrlabel.data.labels import OBSERVATIONS

PRIVATE_SCHEME = "99CXRLABEL"
PRIVATE_SCHEME_VERSION = "1"
PRIVATE_SYSTEM = "urn:cxrlabel:observation"
# The FHIR `system` of each DICOM coding scheme designator used here.
FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "UCUM": "http://unitsofmeasure.org",
    "UMLS": "http://www.nlm.nih.gov/research/umls",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    PRIVATE_SCHEME: PRIVATE_SYSTEM,
}


@dataclass(frozen=True)
class Concept:
    """A coded concept: DICOM (scheme designator, code value, code meaning) plus its source."""

    scheme: str
    value: str
    meaning: str
    source: str

    @property
    def fhir_system(self) -> str:
        return FHIR_SYSTEMS[self.scheme]


def _private(name: str) -> Concept:
    return Concept(PRIVATE_SCHEME, name.replace(" ", ""), name, "cxrlabel private scheme")


_DICOM, _SNOMED = "DICOM PS3.16", "SNOMED CT"

OBSERVATION_CODES: dict[str, Concept] = {
    "No Finding": _private("No Finding"),
    "Enlarged Cardiomediastinum": _private("Enlarged Cardiomediastinum"),
    "Cardiomegaly": Concept("SCT", "287272002", "Cardiomegaly", _DICOM),
    "Lung Opacity": Concept("DCM", "112001", "Opacity", _DICOM),
    "Lung Lesion": _private("Lung Lesion"),
    "Edema": Concept("SCT", "19242006", "Pulmonary edema", _DICOM),
    "Consolidation": Concept("SCT", "95436008", "Lung consolidation", _SNOMED),
    "Pneumonia": Concept("SCT", "233604007", "Pneumonia", _SNOMED),
    "Atelectasis": Concept("SCT", "46621007", "Atelectasis", _SNOMED),
    "Pneumothorax": Concept("SCT", "36118008", "Pneumothorax", _DICOM),
    "Pleural Effusion": Concept("SCT", "60046008", "Pleural effusion", _DICOM),
    "Pleural Other": _private("Pleural Other"),
    "Fracture": Concept("SCT", "125605004", "Fracture of bone", _SNOMED),
    "Support Devices": _private("Support Devices"),
}

# Label value (1 / 0 / -1) -> the qualitative finding (DICOM PS3.16 / SNOMED CT qualifiers).
PRESENT = Concept("SCT", "52101004", "Present", _DICOM)
ABSENT = Concept("SCT", "272519000", "Absent", _DICOM)
INDETERMINATE = Concept("SCT", "82334004", "Indeterminate", _DICOM)
VALUE_CONCEPTS: dict[int, Concept] = {1: PRESENT, 0: ABSENT, -1: INDETERMINATE}
# The probability of each finding, as a numeric value (DICOM PS3.16, unit "1" = ratio).
PROBABILITY = Concept("DCM", "122157", "Probability", _DICOM)
# The decision threshold a qualitative finding was read from the probability with.
THRESHOLD = Concept("DCM", "122411", "Threshold Value", _DICOM)
# What a report is (the FHIR DiagnosticReport's code): LOINC's generic imaging report, as
# DICOM PS3.16 lists it; a study may be one frontal film, so not a "2 views" code.
DIAGNOSTIC_IMAGING_REPORT = Concept("LN", "18748-4", "Diagnostic Imaging Report", _DICOM)
# The probability's unit: UCUM "1" (a ratio, no units), as DICOM's unit tables spell it.
UNIT_RATIO = Concept("UCUM", "1", "no units", _DICOM)
# The SR's "Procedure Reported" (TID 1500 row 4): chest imaging.
CHEST_IMAGING = Concept("SCT", "413815006", "Chest imaging", _DICOM)
# Why a heatmap capture references its film (Source Image Sequence, CID 7202).
SOURCE_FOR_PROCESSING = Concept(
    "DCM", "121322", "Source image for image processing operation", _DICOM
)
# TID 1500 row 12's container of free qualitative evaluations, and its text items' concept:
# where an SR names the films that were not DICOM (nothing else can reference them).
QUALITATIVE_EVALUATIONS = Concept(
    "UMLS", "C0034375", "Qualitative Evaluations", "DICOM PS3.16 TID 1500"
)
COMMENT = Concept("DCM", "121106", "Comment", _DICOM)


def observation_code(name: str) -> Concept:
    """The concept of a CheXpert observation; KeyError names the unknown observation."""
    try:
        return OBSERVATION_CODES[name]
    except KeyError:
        raise KeyError(f"no code for observation {name!r}; known: {list(OBSERVATIONS)}") from None


__all__ = [
    "ABSENT",
    "CHEST_IMAGING",
    "COMMENT",
    "DIAGNOSTIC_IMAGING_REPORT",
    "FHIR_SYSTEMS",
    "INDETERMINATE",
    "OBSERVATION_CODES",
    "PRESENT",
    "PRIVATE_SCHEME",
    "PRIVATE_SCHEME_VERSION",
    "PRIVATE_SYSTEM",
    "PROBABILITY",
    "QUALITATIVE_EVALUATIONS",
    "SOURCE_FOR_PROCESSING",
    "THRESHOLD",
    "UNIT_RATIO",
    "VALUE_CONCEPTS",
    "Concept",
    "observation_code",
]
