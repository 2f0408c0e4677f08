"""The DICOM node: films in over C-STORE, labelled per study, an SR sent to a (test) PACS;
refusals, errors.csv, allow-lists and restart safety."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from cxrlabel.hospital.transfer import send_cstore
from cxrlabel.labelling.node import (
    CANNOT_UNDERSTAND,
    ERRORS_FILE,
    FILM_SOP_CLASSES,
    RECEIVED_DIR,
    STATE_FILE,
    STUDIES_DIR,
    SUMMARY_FILE,
    Node,
)
from cxrlabel.models.predictor import load_model
from tests.helpers import SHARED_DATA, write_dicom
from tests.hospital.test_transfer import CT_IMAGE, Pacs, run_pacs, write_text_sr
from tests.labelling.test_batch import make_checkpoint, read_rows

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
DICOM_FIXTURES = SHARED_DATA / "fixtures" / "dicom"
PATIENT_NAME, PATIENT_ID = "Testperson^Jane", "PID-93417"
WAIT = 20.0  # seconds a test waits for the node at most


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("node") / "tiny-run"
    return load_model(
        [make_checkpoint(run / "checkpoints" / "best.safetensors")], backend="torch", device="cpu"
    )


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    yield from run_pacs()


def text_sr_results(run_dir: Path, films_dir: Path) -> list[Path]:
    """Stands in for the SR builder: a Basic Text SR of the study's labels, in its study."""
    row = read_rows(run_dir / "study_labels.csv")[0]
    lines = [f"{k}={v}" for k, v in row.items() if k != "Path" and v]
    return [write_text_sr(run_dir / "dicom" / f"sr-{uuid.uuid4().hex}.dcm", row["Path"], lines)]


def make_node(model, out: Path, pacs: Pacs | None, **options) -> Node:
    send = None
    if pacs is not None:
        send = partial(send_cstore, host="127.0.0.1", port=pacs.port, ae_title=pacs.ae_title)
    options = {"quiet_seconds": 0.5, "read_timeout": None, **options}
    return Node(model, out, port=0, make_results=text_sr_results, send=send, **options)


def film(path: Path, study: str, sop_class: str = CR, seed: int = 0, **elements) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8)
    tags = {"PatientName": PATIENT_NAME, "PatientID": PATIENT_ID, "Modality": "CR"}
    tags |= {"ViewPosition": "PA", **elements}
    return write_dicom(path, pixels, SOPClassUID=sop_class, StudyInstanceUID=study, **tags)


def associate(port: int, contexts: Sequence[tuple[str, str]], calling: str = "TESTSCU"):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for sop_class, syntax in dict.fromkeys(contexts):
        ae.add_requested_context(sop_class, [syntax])
    return ae.associate("127.0.0.1", port, ae_title="CXRLABEL")


def send_films(port: int, paths: Sequence[Path], calling: str = "TESTSCU") -> list[int]:
    """C-STORE the files as they are (raw), over one association; the statuses."""
    metas = [pydicom.dcmread(p, stop_before_pixels=True).file_meta for p in paths]
    contexts = [(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas]
    assoc = associate(port, contexts, calling)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


def sr_lines(ds: pydicom.Dataset) -> dict[str, str]:
    return dict(item.TextValue.split("=", 1) for item in ds.ContentSequence)


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The node's log records about refused presentation contexts."""
    return [
        r
        for r in caplog.records
        if r.name == "cxrlabel.labelling.node" and "presentation context" in r.getMessage()
    ]


def wait_for(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_studies_are_labelled_at_release_and_their_srs_sent(
    model, pacs: Pacs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    one, two = generate_uid(), generate_uid()
    films = [
        film(tmp_path / "a.dcm", one, CR, 0),
        film(tmp_path / "b.dcm", one, DX, 1, Modality="DX", ViewPosition="LL"),
        film(tmp_path / "c.dcm", two, CR, 2),
    ]
    out = tmp_path / "node"
    # A long quiet time: only the association's release can start the labelling.
    with make_node(model, out, pacs, quiet_seconds=60) as node:
        assert send_films(node.port, films) == [0, 0, 0]
        assert node.wait_idle(WAIT)
    srs = {str(ds.StudyInstanceUID): ds for ds in pacs.datasets()}
    assert len(pacs.datasets()) == 2 and set(srs) == {one, two}
    for study, n in ((one, 2), (two, 1)):
        received = sorted((out / RECEIVED_DIR / study).glob("*.dcm"))
        assert len(received) == n
        stored = pydicom.dcmread(received[0])  # with its file meta, as sent
        assert stored.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        labels = read_rows(out / STUDIES_DIR / study / "study_labels.csv")
        assert [r["Path"] for r in labels] == [study]
        expected = {k: v for k, v in labels[0].items() if k != "Path" and v}
        assert sr_lines(srs[study]) == expected
    summary = {r["study_instance_uid"]: r for r in read_rows(out / SUMMARY_FILE)}
    assert summary[one]["films"] == summary[one]["delivered_films"] == "2"
    assert sorted(r["Path"] for r in read_rows(out / "study_labels.csv")) == sorted([one, two])
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


@pytest.mark.skipif(not DICOM_FIXTURES.is_dir(), reason=f"shared data not found: {DICOM_FIXTURES}")
def test_real_fixtures_jpeg_and_jpeg2000_films_get_one_sr_per_study(
    model, pacs: Pacs, tmp_path: Path
) -> None:
    paths = sorted(DICOM_FIXTURES.glob("*.dcm"))
    studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths}
    out = tmp_path / "node"
    with make_node(model, out, pacs) as node:
        assert send_films(node.port, paths) == [0] * len(paths)
        assert node.wait_idle(WAIT)
    assert sorted(str(ds.StudyInstanceUID) for ds in pacs.datasets()) == sorted(studies)
    for study in studies:  # every film was labelled, none went to errors
        images = read_rows(out / STUDIES_DIR / study / "images.csv")
        assert images and all(r["labelled_by"] for r in images)
    assert not (out / ERRORS_FILE).exists()


def test_a_restart_finishes_received_studies_once_and_a_later_film_relabels(
    model, pacs: Pacs, tmp_path: Path
) -> None:
    study = generate_uid()
    out = tmp_path / "node"
    first = [film(tmp_path / f"{k}.dcm", study, CR, k) for k in range(2)]
    node = make_node(model, out, pacs, quiet_seconds=30, label_at_release=False).start()
    assert send_films(node.port, first) == [0, 0]
    node.stop()  # long before the quiet time: nothing labelled, the films are on disk
    assert len(list((out / RECEIVED_DIR / study).glob("*.dcm"))) == 2
    assert not (out / STUDIES_DIR).exists() and pacs.datasets() == []

    with make_node(model, out, pacs) as node:  # picks the study up and finishes it
        assert wait_for(lambda: len(pacs.datasets()) == 1)
        assert node.wait_idle(WAIT)
    with make_node(model, out, pacs, quiet_seconds=0.1) as node:  # nothing new: nothing sent
        time.sleep(0.5)
        assert node.wait_idle(WAIT)
        assert len(pacs.datasets()) == 1
        # A later film of the delivered study: the study is labelled again, a new SR sent.
        later = film(tmp_path / "later.dcm", study, DX, 9, Modality="DX")
        assert send_films(node.port, [later]) == [0]
        assert wait_for(lambda: len(pacs.datasets()) == 2)
        assert node.wait_idle(WAIT)
    first_sr, second_sr = pacs.datasets()
    assert first_sr.StudyInstanceUID == second_sr.StudyInstanceUID == study
    assert first_sr.SOPInstanceUID != second_sr.SOPInstanceUID
    assert len(read_rows(out / STUDIES_DIR / study / "images.csv")) == 3
    summary = read_rows(out / SUMMARY_FILE)
    assert [(r["films"], r["delivered_films"]) for r in summary] == [("3", "3")]
    assert (out / STATE_FILE).is_file()


def _malformed(path: Path, good: Path) -> Path:
    """`good`'s file meta followed by a data set whose first element has no valid VR."""
    meta_end = _meta_length(good)
    path.write_bytes(good.read_bytes()[:meta_end] + b"\x08\x00\x16\x00ZZ\x04\x001.2.")
    return path


def _meta_length(path: Path) -> int:
    with open(path, "rb") as f:
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        return f.tell()


def test_refused_sop_class_malformed_and_uid_less_data_sets_and_the_node_keeps_serving(
    model, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynetdicom

    # Files go as their bytes (the SCU does not parse them), so a broken one reaches the node.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    caplog.set_level(logging.INFO)
    study = generate_uid()
    good = film(tmp_path / "good.dcm", study, CR, 0)
    no_study = film(tmp_path / "nostudy.dcm", study, CR, 1)
    ds = pydicom.dcmread(no_study)
    del ds.StudyInstanceUID
    ds.save_as(no_study, enforce_file_format=True)
    broken = _malformed(tmp_path / "broken.dcm", good)
    ct = film(tmp_path / "ct.dcm", study, CT_IMAGE, 2, Modality="CT")
    out = tmp_path / "node"
    with make_node(model, out, None, quiet_seconds=60, label_at_release=False) as node:
        syntax = str(pydicom.uid.ExplicitVRLittleEndian)
        assoc = associate(node.port, [(CT_IMAGE, syntax), (CR, syntax)])
        assert assoc.is_established
        try:
            assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CR]
            with pytest.raises(ValueError):  # no accepted context for a CT image
                assoc.send_c_store(pydicom.dcmread(ct))
            assert int(assoc.send_c_store(broken).Status) == CANNOT_UNDERSTAND
            assert int(assoc.send_c_store(no_study).Status) == CANNOT_UNDERSTAND
            assert int(assoc.send_c_store(good).Status) == 0  # still serving
        finally:
            assoc.release()
        assert send_films(node.port, [good]) == [0]  # and a new association too
    (refusal,) = refusal_lines(caplog)
    assert refusal.levelno == logging.INFO  # a CR context was accepted beside it
    assert "refused 1 presentation context(s) (1 SOP class(es))" in refusal.getMessage()
    assert f"{CT_IMAGE} (CT Image Storage)" in refusal.getMessage()
    rows = read_rows(out / ERRORS_FILE)
    assert [r["error"] for r in rows] == ["MalformedDataset", "NoStudyInstanceUID"]
    assert all(r["calling_ae"] == "TESTSCU" and r["peer"] == "127.0.0.1" for r in rows)
    text = (out / ERRORS_FILE).read_text() + caplog.text
    assert PATIENT_NAME not in text and PATIENT_ID not in text
    assert [p.name for p in (out / RECEIVED_DIR).rglob("*.dcm")] == [
        f"{pydicom.dcmread(good).SOPInstanceUID}.dcm"
    ]


def test_refused_contexts_are_one_log_line_per_association_a_warning_without_films(
    model, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pynetdicom import StoragePresentationContexts

    caplog.set_level(logging.INFO)
    syntaxes = (str(pydicom.uid.ExplicitVRLittleEndian), str(pydicom.uid.ImplicitVRLittleEndian))
    # Like Orthanc: many storage SOP classes, in two transfer syntaxes each (pynetdicom lets an
    # association propose at most 128 contexts).
    others = [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
    classes = [*FILM_SOP_CLASSES, *(c for c in others if c not in FILM_SOP_CLASSES)][:60]
    proposed = [(c, ts) for c in classes for ts in syntaxes]
    with make_node(model, tmp_path / "node", None) as node:
        many = associate(node.port, proposed, calling="PACSSCU")
        assert many.is_established
        accepted = {str(cx.abstract_syntax) for cx in many.accepted_contexts}
        assert accepted == set(FILM_SOP_CLASSES)
        many.release()
        # The node accepts the association and refuses its one context; pynetdicom's requestor
        # then aborts it (nothing to send over).
        only_ct = associate(node.port, [(CT_IMAGE, syntaxes[0])], calling="CTSCU")
        assert not only_ct.is_established and not only_ct.is_rejected
    lines = refusal_lines(caplog)
    assert [(r.levelno, "PACSSCU" in r.getMessage()) for r in lines] == [
        (logging.INFO, True),
        (logging.WARNING, False),
    ]
    refused = len(proposed) - len(many.accepted_contexts)
    assert f"refused {refused} presentation context(s)" in lines[0].getMessage()
    assert "CTSCU" in lines[1].getMessage() and CT_IMAGE in lines[1].getMessage()


def test_allow_lists_refuse_other_calling_aes_and_peers(model, tmp_path: Path) -> None:
    syntax = str(pydicom.uid.ExplicitVRLittleEndian)
    with make_node(model, tmp_path / "a", None, allow_ae=["GOODSCU"]) as node:
        refused = associate(node.port, [(CR, syntax)], calling="BADSCU")
        assert refused.is_rejected and not refused.is_established
        allowed = associate(node.port, [(CR, syntax)], calling="GOODSCU")
        assert allowed.is_established
        allowed.release()
    with make_node(model, tmp_path / "b", None, allow_peer=["10.20.0.0/16"]) as node:
        assert associate(node.port, [(CR, syntax)]).is_rejected
    with make_node(model, tmp_path / "c", None, allow_peer=["127.0.0.1"]) as node:
        allowed = associate(node.port, [(CR, syntax)])
        assert allowed.is_established
        allowed.release()
    with pytest.raises(ValueError, match="not-an-ip"):
        make_node(model, tmp_path / "d", None, allow_peer=["not-an-ip"])


def test_an_undecodable_film_is_refused_and_the_rest_of_its_study_labelled(
    model, tmp_path: Path
) -> None:
    # The handler decodes each film before answering: an undecodable one gets a failure
    # status, an errors.csv row, and is not stored; its study is labelled from the others.
    study = generate_uid()
    good = film(tmp_path / "good.dcm", study, CR, 0)
    bad = film(tmp_path / "bad.dcm", study, CR, 1)
    ds = pydicom.dcmread(bad)
    ds.Rows = 4096  # the header promises far more pixels than the data holds
    ds.save_as(bad, enforce_file_format=True)
    out = tmp_path / "node"
    with make_node(model, out, None) as node:
        assert send_films(node.port, [good, bad]) == [0, 0xC000]
        assert node.wait_idle(WAIT)
    rows = read_rows(out / ERRORS_FILE)
    assert [r["sop_instance_uid"] for r in rows] == [str(ds.SOPInstanceUID)]
    assert rows[0]["study_instance_uid"] == study
    assert rows[0]["error"] == "TruncatedImageError"
    assert rows[0]["reason"].startswith("file is truncated")
    assert not (out / RECEIVED_DIR / study / f"{ds.SOPInstanceUID}.dcm").exists()
    images = read_rows(out / STUDIES_DIR / study / "images.csv")
    assert len(images) == 1 and images[0]["labelled_by"]
