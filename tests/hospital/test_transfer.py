"""Sending results to a PACS: C-STORE to an in-test storage SCP, the --send-to spec, failures."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrlabel.hospital.transfer import Peer, SendError, parse_send_to, send_cstore
from tests.helpers import write_dicom

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Pacs:
    """A storage SCP playing the PACS: what it stored, by arrival."""

    port: int
    ae_title: str
    received: list[Dataset] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def datasets(self) -> list[Dataset]:
        with self.lock:
            return list(self.received)


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    yield from run_pacs()


def run_pacs(
    sop_classes: Sequence[str] = (BASIC_TEXT_SR, COMPREHENSIVE_SR, SECONDARY_CAPTURE),
    status: int = 0x0000,
) -> Iterator[Pacs]:
    """A storage SCP on a free loopback port answering `status` to every C-STORE."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="TESTPACS")
    for sop in sop_classes:
        ae.add_supported_context(sop)
    ae.add_supported_context(Verification)
    state = Pacs(0, "TESTPACS")

    def on_store(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with state.lock:
            state.received.append(ds)
        return status

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    state.port = server.server_address[1]
    try:
        yield state
    finally:
        server.shutdown()


def write_text_sr(path: Path, study_uid: str, lines: Sequence[str]) -> Path:
    """A small Basic Text SR in `study_uid` whose container holds one TEXT item per line."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    items = []
    for line in lines:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.TextValue = line
        items.append(item)
    ds.ContentSequence = items
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _capture(path: Path) -> Path:
    pixels = np.zeros((8, 8), np.uint8)
    return write_dicom(path, pixels, StudyInstanceUID=generate_uid(), Modality="OT")


def test_parse_send_to() -> None:
    assert parse_send_to("127.0.0.1:4242:ORTHANC") == Peer("127.0.0.1", 4242, "ORTHANC")
    assert parse_send_to("[::1]:104:PACS") == Peer("::1", 104, "PACS")
    for bad, words in (
        ("pacs:104", "HOST:PORT:AET"),
        ("pacs:x:AE", "not a number"),
        ("pacs:70000:AE", "not in 1..65535"),
        ("pacs:104:" + "A" * 17, "1 to 16"),
        ("pacs:104:A\\B", "printable"),
    ):
        with pytest.raises(ValueError, match=words) as err:
            parse_send_to(bad)
        assert repr(bad) in str(err.value)


def test_send_cstore_stores_an_sr_and_a_capture(pacs: Pacs, tmp_path: Path) -> None:
    sr = write_text_sr(tmp_path / "sr.dcm", generate_uid(), ["Edema: present"])
    sc = _capture(tmp_path / "sc.dcm")
    statuses = send_cstore([sr, sc], "127.0.0.1", pacs.port, pacs.ae_title)
    assert statuses == [0, 0]
    got = {str(ds.SOPInstanceUID): ds for ds in pacs.datasets()}
    for path in (sr, sc):
        assert str(pydicom.dcmread(path).SOPInstanceUID) in got
    sent_sr = got[str(pydicom.dcmread(sr).SOPInstanceUID)]
    assert sent_sr.ContentSequence[0].TextValue == "Edema: present"


def test_send_cstore_names_the_peer_when_nobody_listens(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sr = write_text_sr(tmp_path / "sr.dcm", generate_uid(), ["x"])
    with pytest.raises(SendError, match=f"NOBODY@127.0.0.1:{port}"):
        send_cstore([sr], "127.0.0.1", port, "NOBODY", timeout=5)


def test_send_cstore_names_each_file_the_peer_refused(tmp_path: Path) -> None:
    sr = write_text_sr(tmp_path / "sr.dcm", generate_uid(), ["x"])
    sc = _capture(tmp_path / "sc.dcm")
    # A PACS out of resources for everything, then one that does not take secondary captures.
    for pacs, failed, why in (
        (run_pacs(status=0xA700), [sr, sc], "0xA700"),
        (run_pacs(sop_classes=(BASIC_TEXT_SR,)), [sc], "no presentation context"),
    ):
        peer = next(pacs)
        try:
            with pytest.raises(SendError) as err:
                send_cstore([sr, sc], "127.0.0.1", peer.port, peer.ae_title)
            message = str(err.value)
            assert f"TESTPACS@127.0.0.1:{peer.port}" in message and why in message
            assert all(str(p) in message for p in failed)
            assert (str(sr) in message) == (sr in failed)
        finally:
            pacs.close()


def test_send_cstore_refuses_an_unreadable_result(pacs: Pacs, tmp_path: Path) -> None:
    bad = tmp_path / "not-dicom.dcm"
    bad.write_text("hello")
    with pytest.raises(SendError, match=r"not-dicom\.dcm"):
        send_cstore([bad], "127.0.0.1", pacs.port, pacs.ae_title)
    assert pacs.datasets() == []


@pytest.fixture
def stow_server() -> Iterator[tuple[str, list[bytes], list[int]]]:
    """A tiny HTTP server answering POST .../studies with the status in `codes[0]`."""
    import http.server
    import json

    bodies: list[bytes] = []
    codes = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({}).encode()
            self.send_response(codes[0])
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", bodies, codes
    finally:
        server.shutdown()
        server.server_close()


def test_send_stow_posts_the_files_and_names_the_url_on_failure(stow_server, tmp_path) -> None:
    from cxrlabel.hospital.transfer import send_stow

    url, bodies, codes = stow_server
    sr = write_text_sr(tmp_path / "sr.dcm", generate_uid(), ["Edema: present"])
    send_stow([sr], url)
    uid = str(pydicom.dcmread(sr).SOPInstanceUID).encode()
    assert len(bodies) == 1 and uid in bodies[0]
    codes[0] = 500
    with pytest.raises(SendError, match=re.escape(url)):
        send_stow([sr], url)
