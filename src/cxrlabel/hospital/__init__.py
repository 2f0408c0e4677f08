"""Results in the hospital's standards: DICOM Structured Reports and Secondary Captures, FHIR R4
DiagnosticReports, and sending them to a PACS.

Everything here starts from `findings.StudyFindings` (one study's labels, probabilities, source
films and the algorithm's identity), which the labelling layer builds from a finished run; the
coded concepts for the 14 observations live in `codes`.
"""
