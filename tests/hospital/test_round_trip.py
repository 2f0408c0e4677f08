"""The real PACS round trip: Orthanc sends the DICOM fixtures to a `cxrlabel listen` node, the
node labels each study and sends its DICOM SR back (C-STORE, or STOW-RS to Orthanc's DICOMweb
endpoint); the SR that Orthanc then holds is checked value by value against `cxrlabel label`
run directly on the same films.

"The same films" are the ones Orthanc holds, downloaded from it: the fixture folder's
MONOCHROME1 twin repeats the SIIM film's SOP Instance UID, so Orthanc keeps one of the two.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes

from cxrlabel import cli
from cxrlabel.hospital import codes
from cxrlabel.hospital.transfer import send_cstore, send_stow
from cxrlabel.labelling.node import Node
from cxrlabel.models.predictor import Predictor, load_model, model_id
from cxrlabel.models.thresholds import Thresholds
from tests.helpers import SHARED_DATA
from tests.hospital.test_sr import assert_valid_dicom
from tests.labelling.test_batch import LABELS, make_checkpoint
from tests.orthanc import MODALITY, MODALITY_AET, ORTHANC_AET, Orthanc

DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"
pytestmark = pytest.mark.skipif(
    not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}"
)
SR_TIMEOUT = 90.0  # seconds a study's SR may take to reach Orthanc (it takes ~1 s)
SR_MODALITY = "SR"
# The SIIM film's Patient's Name is one component, which highdicom's reader warns about.
quiet_names = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent:UserWarning"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, with thresholds that give all three values: Cardiomegaly's band covers
    [0, 1] (always uncertain), Edema's threshold is 0 (always present) and Pleural Effusion's
    1 (absent for any unsaturated probability)."""
    thresholds = Thresholds(LABELS, (0.5, 0.0, 1.0), "fixed", ((0.0, 1.0), (0.0, 0.0), (1.0, 1.0)))
    run = tmp_path_factory.mktemp("round-trip") / "tiny-run"
    return make_checkpoint(run / "checkpoints" / "best.safetensors", thresholds=thresholds)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Predictor:
    return load_model([checkpoint], backend="torch", device="cpu")


def films_in_orthanc(orthanc: Orthanc) -> dict[str, list[Dataset]]:
    """Upload every fixture over REST; then, per Study Instance UID, the films Orthanc holds."""
    for path in sorted(DICOM_FIXTURES.glob("*.dcm")):
        orthanc.upload(path)
    studies: dict[str, list[Dataset]] = {}
    for study_id in orthanc.studies():
        for instance in orthanc.study_instances(study_id):
            ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
            studies.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return studies


def label_directly(films: list[Dataset], checkpoint: Path, folder: Path) -> Path:
    """`cxrlabel label` on the films (written as Orthanc gave them): its output folder."""
    inputs, out = folder / "films", folder / "labels"
    inputs.mkdir(parents=True)
    for ds in films:
        ds.save_as(inputs / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    argv = ["label", str(inputs), "--model", str(checkpoint), "--out", str(out)]
    argv += ["--backend", "torch", "--device", "cpu", "--no-progress", "--read-timeout", "0"]
    assert cli.main(argv) == 0
    return out


def read_row(path: Path, study_uid: str) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["Path"] == study_uid]
    assert len(rows) == 1, f"{path}: {len(rows)} rows for study {study_uid}"
    return rows[0]


def sr_series(orthanc: Orthanc, study_uid: str) -> list[dict]:
    """The study's SR series in Orthanc (REST)."""
    study_id = orthanc.study_id(study_uid)
    series = orthanc.study_series(study_id) if study_id else []
    return [s for s in series if s["MainDicomTags"].get("Modality") == SR_MODALITY]


def wait_for_sr_instance(orthanc: Orthanc, study_uid: str) -> str:
    """Orthanc's id of the study's one SR instance, once it has arrived (REST polling)."""
    deadline = time.monotonic() + SR_TIMEOUT
    while not (found := sr_series(orthanc, study_uid)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SR in study {study_uid} after {SR_TIMEOUT} s")
        time.sleep(0.2)
    assert len(found) == 1 and len(found[0]["Instances"]) == 1, found
    return found[0]["Instances"][0]


def wait_for_qido_sr(client: DICOMwebClient, study_uid: str) -> list[dict]:
    """QIDO-RS: the study's SR instances, once there is one."""
    deadline = time.monotonic() + SR_TIMEOUT
    filters = {"StudyInstanceUID": study_uid, "Modality": SR_MODALITY}
    while not (found := client.search_for_instances(search_filters=filters)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"QIDO-RS found no SR in study {study_uid} after {SR_TIMEOUT} s")
        time.sleep(0.2)
    return found


def check_sr_against_label(sr_dataset: Dataset, films: list[Dataset], labels: Path) -> None:
    """Every value of the SR a PACS holds against `cxrlabel label`'s outputs in `labels` for
    the same films: study and patient, references, algorithm, and per observation the code,
    the qualitative value and the probability (to the CSV's 6 decimals)."""
    sr = hd.sr.ComprehensiveSR.from_dataset(sr_dataset)
    study_uid = str(films[0].StudyInstanceUID)
    assert sr.StudyInstanceUID == study_uid
    assert sr.PatientID == films[0].PatientID
    assert str(sr.PatientName) == str(films[0].PatientName)
    film_uids = {str(f.SOPInstanceUID) for f in films}
    assert sr.SOPInstanceUID not in film_uids
    assert sr.SeriesInstanceUID not in {str(f.SeriesInstanceUID) for f in films}
    evidence = {
        str(r.ReferencedSOPInstanceUID)
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }
    assert evidence == film_uids

    run_model = json.loads((labels / "run.json").read_text(encoding="utf-8"))["model"]
    report = sr.content
    device = report.get_observer_contexts()[0].observer_identifying_attributes
    assert device.model_name == model_id(run_model)
    assert device.name == f"cxrlabel {run_model['name']}"
    label_row = read_row(labels / "study_labels.csv", study_uid)
    probability_row = read_row(labels / "study_probabilities.csv", study_uid)
    expected = [name for name in LABELS if label_row.get(name)]
    groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == expected
    for group in groups:
        name = group.tracking_identifier
        code = codes.OBSERVATION_CODES[name]
        assert (group.finding_type.scheme_designator, group.finding_type.value) == (
            code.scheme,
            code.value,
        )
        (evaluation,) = group.get_qualitative_evaluations()
        value = codes.VALUE_CONCEPTS[int(float(label_row[name]))]
        assert (evaluation.value.scheme_designator, evaluation.value.value) == (
            value.scheme,
            value.value,
        ), name
        (measurement,) = group.get_measurements()
        assert (measurement.name.scheme_designator, measurement.name.value) == (
            codes.PROBABILITY.scheme,
            codes.PROBABILITY.value,
        )
        assert f"{measurement.value:.6f}" == probability_row[name], name
        parameters = [
            i.value
            for i in find_content_items(
                group[0], name=dicom_codes.DCM.AlgorithmParameters, recursive=True
            )
        ]
        assert f"model id {model_id(run_model)}" in parameters
        assert {str(s.referenced_sop_instance_uid) for s in group.source_images} == film_uids
    # The tiny model's thresholds give each of the three values once.
    assert sorted(int(float(label_row[n])) for n in expected) == [-1, 0, 1]


@contextmanager
def running_node(
    model: Predictor, out: Path, orthanc: Orthanc, send: Callable[[list[Path]], object]
) -> Iterator[Node]:
    """A node on a free port that Orthanc's `cxrlabel` modality points at."""
    node = Node(
        model, out, ae_title=MODALITY_AET, port=0, quiet_seconds=0.5, read_timeout=None, send=send
    ).start()
    try:
        orthanc.set_modality(MODALITY, MODALITY_AET, node.port)
        yield node
    finally:
        node.stop()


@quiet_names
def test_dimse_round_trip_puts_the_sr_of_cxrlabel_label_into_each_study(
    orthanc: Orthanc, model: Predictor, checkpoint: Path, tmp_path: Path
) -> None:
    studies = films_in_orthanc(orthanc)
    assert len(studies) == 2  # the SIIM study (one film: the twin is a duplicate) and the J2K one
    send = partial(send_cstore, host="127.0.0.1", port=orthanc.dicom_port, ae_title=ORTHANC_AET)
    with running_node(model, tmp_path / "node", orthanc, send) as node:
        for study_uid in studies:
            job = orthanc.send_study(orthanc.study_id(study_uid))
            assert job["FailedInstancesCount"] == 0, job
        srs = {uid: wait_for_sr_instance(orthanc, uid) for uid in studies}
        assert node.wait_idle(SR_TIMEOUT)
    for n, (study_uid, films) in enumerate(sorted(studies.items())):
        labels = label_directly(films, checkpoint, tmp_path / f"direct{n}")
        path = tmp_path / f"sr{n}.dcm"
        path.write_bytes(orthanc.instance_file(srs[study_uid]))
        stored = pydicom.dcmread(path)
        assert stored.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
        assert_valid_dicom(path)  # dciodvfy, where dicom3tools is installed
        check_sr_against_label(stored, films, labels)
    assert not (tmp_path / "node" / "errors.csv").exists()


@quiet_names
def test_dicomweb_round_trip_stows_the_sr_and_qido_finds_it(
    orthanc: Orthanc, model: Predictor, checkpoint: Path, tmp_path: Path
) -> None:
    studies = films_in_orthanc(orthanc)
    siim_film = next(DICOM_FIXTURES.glob("siim_*.dcm"))
    siim = str(pydicom.dcmread(siim_film, stop_before_pixels=True).StudyInstanceUID)
    films = studies[siim]
    send = partial(send_stow, url=orthanc.dicomweb_url)
    with running_node(model, tmp_path / "node", orthanc, send) as node:
        job = orthanc.send_study(orthanc.study_id(siim))
        assert job["FailedInstancesCount"] == 0, job
        found = wait_for_qido_sr(DICOMwebClient(url=orthanc.dicomweb_url), siim)
        assert node.wait_idle(SR_TIMEOUT)
    assert len(found) == 1, found
    series_uid, sop_uid = (found[0][tag]["Value"][0] for tag in ("0020000E", "00080018"))
    # A new client (connection): Orthanc may have closed the idle one meanwhile.
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    retrieved = client.retrieve_instance(siim, series_uid, sop_uid)
    labels = label_directly(films, checkpoint, tmp_path / "direct")
    check_sr_against_label(retrieved, films, labels)
    # Only the study that was sent has an SR.
    other = next(uid for uid in studies if uid != siim)
    assert sr_series(orthanc, other) == []
