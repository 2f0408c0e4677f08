"""The PACS of the hospital tests (tests/orthanc.py) works with the libraries cxrlabel uses:
Orthanc's REST API, DIMSE both ways with pynetdicom, STOW-RS and QIDO-RS with dicomweb-client.

These prove the harness, so that the round trips through `cxrlabel listen` stay short."""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage

from cxrlabel.hospital.codes import OBSERVATION_CODES, PRESENT, Concept
from tests.helpers import SHARED_DATA, write_dicom
from tests.orthanc import MODALITY_AET, ORTHANC_AET, Orthanc, configuration, dicomweb_plugin

DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"
README = Path(__file__).resolve().parents[2] / "README.md"
needs_fixtures = pytest.mark.skipif(
    not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}"
)
CHEST_STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)


def fixture(prefix: str) -> Path:
    return next(DICOM_FIXTURES.glob(f"{prefix}*.dcm"))


def synthetic_film(path: Path, study: Dataset) -> Path:
    """A small secondary-capture film in `study` (its patient and study UIDs), new series."""
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    return write_dicom(
        path,
        pixels,
        bits_stored=12,
        PatientID=study.PatientID,
        PatientName=study.PatientName,
        StudyInstanceUID=study.StudyInstanceUID,
        SeriesInstanceUID=generate_uid(),
        Modality="CR",
    )


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


@needs_fixtures
def test_rest_upload_puts_the_films_in_their_study(orthanc: Orthanc, tmp_path: Path) -> None:
    siim = pydicom.dcmread(fixture("siim_"), stop_before_pixels=True)
    synthetic = synthetic_film(tmp_path / "synthetic.dcm", siim)
    stored = {p.name: orthanc.upload(p) for p in sorted(DICOM_FIXTURES.glob("*.dcm"))}
    stored[synthetic.name] = orthanc.upload(synthetic)

    study_id = orthanc.study_id(str(siim.StudyInstanceUID))
    assert study_id is not None
    study = orthanc.study(study_id)
    assert study["MainDicomTags"]["StudyInstanceUID"] == siim.StudyInstanceUID
    uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.study_instances(study_id)}
    assert uids == {siim.SOPInstanceUID, pydicom.dcmread(synthetic).SOPInstanceUID}
    # The MONOCHROME1 twin repeats the SIIM film's SOP Instance UID: Orthanc keeps the first
    # (OverwriteInstances false), so a PACS holds one film where the folder has two.
    assert stored["txv_fake_MONOCHROME1_same_pixels.dcm"]["Status"] == "AlreadyStored"
    assert stored["txv_fake_MONOCHROME1_same_pixels.dcm"]["ParentStudy"] == study_id
    j2k = pydicom.dcmread(fixture("pydicom_RG1_J2KI"), stop_before_pixels=True)
    j2k_study = orthanc.study_id(str(j2k.StudyInstanceUID))
    assert j2k_study not in (None, study_id)
    assert stored[fixture("pydicom_RG1_J2KI").name]["ParentStudy"] == j2k_study


class StorageSCP:
    """A pynetdicom C-STORE SCP (the part `cxrlabel listen` plays) keeping what it receives."""

    def __init__(self, port: int, ae_title: str = MODALITY_AET) -> None:
        self.received: list[Dataset] = []
        self.calling: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for sop_class in CHEST_STORAGE:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, self._store)]
        self._server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def _store(self, event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        with self._lock:
            self.received.append(dataset)
            self.calling.append(event.assoc.requestor.ae_title)
        return 0x0000

    def shutdown(self) -> None:
        self._server.shutdown()


@pytest.fixture
def scp(orthanc: Orthanc) -> Iterator[StorageSCP]:
    server = StorageSCP(orthanc.modality_port)
    yield server
    server.shutdown()


@needs_fixtures
def test_orthanc_sends_every_film_of_a_study_to_the_node(
    orthanc: Orthanc, scp: StorageSCP, tmp_path: Path
) -> None:
    siim = pydicom.dcmread(fixture("siim_"))
    j2k = pydicom.dcmread(fixture("pydicom_RG1_J2KI"))
    synthetic = pydicom.dcmread(synthetic_film(tmp_path / "synthetic.dcm", siim))
    for path in (fixture("siim_"), fixture("pydicom_RG1_J2KI"), tmp_path / "synthetic.dcm"):
        orthanc.upload(path)

    for study in (siim, j2k):
        job = orthanc.send_study(orthanc.study_id(str(study.StudyInstanceUID)))
        assert job["FailedInstancesCount"] == 0, job
    assert job["RemoteAet"] == MODALITY_AET

    received = {str(d.SOPInstanceUID): d for d in scp.received}
    sent = {str(d.SOPInstanceUID): d for d in (siim, j2k, synthetic)}
    assert sorted(received) == sorted(sent)
    assert set(scp.calling) == {ORTHANC_AET}
    for uid, original in sent.items():
        # The node accepts every transfer syntax, so Orthanc sends the film as stored:
        # the same compressed (JPEG, JPEG 2000) or native bytes.
        assert received[uid].file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert received[uid].PixelData == original.PixelData
        assert received[uid].StudyInstanceUID == original.StudyInstanceUID


def coded(concept: Concept) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)


def small_sr(evidence: Dataset) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR in the evidence's study: one coded finding and one text item."""
    finding = hd.sr.CodeContentItem(
        name=codes.DCM.Finding,
        value=coded(OBSERVATION_CODES["Cardiomegaly"]),
        relationship_type="CONTAINS",
    )
    presence = hd.sr.CodeContentItem(
        name=coded(OBSERVATION_CODES["Cardiomegaly"]),
        value=coded(PRESENT),
        relationship_type="CONTAINS",
    )
    comment = hd.sr.TextContentItem(
        name=codes.DCM.Comment, value="harness test", relationship_type="CONTAINS"
    )
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = [finding, presence, comment]
    return hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cxrlabel tests",
    )


# The SIIM film's PatientName is one component (an anonymised id), which highdicom warns about.
@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")
@needs_fixtures
def test_an_sr_stored_by_c_store_joins_the_study(orthanc: Orthanc) -> None:
    siim = pydicom.dcmread(fixture("siim_"), stop_before_pixels=True)
    orthanc.upload(fixture("siim_"))
    sr = small_sr(siim)

    ae = AE(ae_title=MODALITY_AET)
    ae.add_requested_context(Comprehensive3DSRStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=ORTHANC_AET)
    assert assoc.is_established, "Orthanc refused the association"
    try:
        status = assoc.send_c_store(sr)
    finally:
        assoc.release()
    assert status.Status == 0x0000

    instance = orthanc.wait_for_instance(str(sr.SOPInstanceUID))
    study_id = orthanc.study_id(str(siim.StudyInstanceUID))
    uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.study_instances(study_id)}
    assert uids == {siim.SOPInstanceUID, sr.SOPInstanceUID}
    stored = read(orthanc.instance_file(instance))
    assert stored.SOPClassUID == Comprehensive3DSRStorage
    assert stored.SOPInstanceUID == sr.SOPInstanceUID
    # The whole dataset comes back as sent (file meta aside).
    assert stored.to_json_dict() == read(_encoded(sr)).to_json_dict()
    items = stored.ContentSequence
    assert [i.ConceptNameCodeSequence[0].CodeMeaning for i in items] == [
        "Finding",
        "Cardiomegaly",
        "Comment",
    ]
    present = hd.sr.CodeContentItem.from_dataset(items[1]).value
    assert (present.value, present.scheme_designator) == (PRESENT.value, PRESENT.scheme)
    assert items[2].TextValue == "harness test"
    evidence = stored.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == siim.StudyInstanceUID


def _encoded(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_stow_rs_stores_and_qido_rs_finds(orthanc: Orthanc, tmp_path: Path) -> None:
    study = Dataset()
    study.PatientID, study.PatientName = "HARNESS-1", "Harness^Test"
    study.StudyInstanceUID = generate_uid()
    film = pydicom.dcmread(synthetic_film(tmp_path / "stow.dcm", study))

    client = DICOMwebClient(url=orthanc.dicomweb_url)
    response = client.store_instances([film])
    # DICOMweb 1.7 answers with an empty FailedSOPSequence (and Retrieve URLs without the port).
    assert len(response.get("FailedSOPSequence", [])) == 0
    assert response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID

    uid = str(study.StudyInstanceUID)
    instances = client.search_for_instances(study_instance_uid=uid)
    assert [i["00080018"]["Value"] for i in instances] == [[film.SOPInstanceUID]]
    series = client.search_for_series(search_filters={"StudyInstanceUID": uid})
    assert [s["0020000E"]["Value"] for s in series] == [[film.SeriesInstanceUID]]
    assert client.search_for_instances(study_instance_uid=generate_uid()) == []
    # WADO-RS gives the same pixels back; the REST API sees the same study.
    back = client.retrieve_instance(uid, str(film.SeriesInstanceUID), str(film.SOPInstanceUID))
    assert back.PixelData == film.PixelData
    assert orthanc.study_id(uid) is not None


def test_the_readme_shows_the_configuration_the_tests_use() -> None:
    section = README.read_text(encoding="utf-8").split("### The PACS in the tests: Orthanc")[1]
    shown = json.loads(re.search(r"```json\n(.*?)```", section, re.DOTALL).group(1))
    folder = Path(shown["StorageDirectory"]).parent
    plugin = Path(shown["Plugins"][0])
    expected = configuration(
        folder, http_port=8042, dicom_port=4242, modality_port=11112, plugin=plugin
    )
    assert shown == expected


def test_the_plugin_is_found_in_the_first_folder_that_has_it(tmp_path: Path) -> None:
    empty, debian, other = tmp_path / "empty", tmp_path / "debian", tmp_path / "other"
    for folder in (empty, debian, other):
        folder.mkdir()
    (debian / "libOrthancDicomWeb.so").touch()
    (other / "libOrthancDicomWeb.so.1.7").touch()
    assert dicomweb_plugin((empty, debian, other)) == debian / "libOrthancDicomWeb.so"
    assert dicomweb_plugin((empty, other)) == other / "libOrthancDicomWeb.so.1.7"
    assert dicomweb_plugin((empty, tmp_path / "absent")) is None
