"""Sending result objects (SRs, secondary captures) to a PACS: DICOM C-STORE or DICOMweb STOW-RS.

`send_cstore` opens one association to the peer with a presentation context for each (SOP
class, transfer syntax) of the files, sends every file and raises `SendError` naming the peer
and each file that failed; `send_stow` posts the files with dicomweb-client. `parse_send_to`
reads the command line's ``HOST:PORT:AET``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors

log = logging.getLogger(__name__)

# C-STORE statuses that mean "stored": success and the three warnings (coercion, elements
# discarded, data set does not match the SOP class), as PS3.4 B.2.3 lists them.
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
MAX_AE_TITLE = 16  # PS3.5 6.2: AE is at most 16 characters


class SendError(RuntimeError):
    """Results could not be delivered; the message names the peer and the failed files."""


@dataclass(frozen=True)
class Peer:
    """A DICOM peer: where it listens and the AE title it answers to."""

    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(title: str, what: str = "AE title") -> str:
    """`title` if it is a valid DICOM AE title (1-16 characters, no backslash or control
    characters, not only spaces), else ValueError naming it."""
    if not title.strip() or len(title) > MAX_AE_TITLE:
        raise ValueError(f"{what} {title!r} must be 1 to {MAX_AE_TITLE} characters, not blank")
    if "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ValueError(f"{what} {title!r} may hold printable ASCII characters only, no '\\'")
    return title


def parse_send_to(spec: str) -> Peer:
    """``HOST:PORT:AET`` -> Peer (the host may itself hold colons: an IPv6 address)."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"--send-to {spec!r}: expected HOST:PORT:AET, e.g. 127.0.0.1:4242:ORTHANC")
    host, port_text, ae_title = parts
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--send-to {spec!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"--send-to {spec!r}: port {port} is not in 1..65535")
    check_ae_title(ae_title, f"--send-to {spec!r}: AE title")
    return Peer(host.strip("[]"), port, ae_title)


def _read(paths: Sequence[Path]) -> list[tuple[Path, pydicom.Dataset]]:
    out = []
    for path in paths:
        try:
            out.append((Path(path), pydicom.dcmread(path)))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise SendError(f"cannot read result file {str(path)!r}: {exc}") from exc
    return out


def _context_key(ds: pydicom.Dataset) -> tuple[str, str]:
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def send_cstore(
    paths: Sequence[Path],
    host: str,
    port: int,
    ae_title: str,
    *,
    calling_ae: str = "CXRLABEL",
    timeout: float = 30.0,
) -> list[int]:
    """C-STORE every file to the peer over one association; the peer's status per file.

    Each file goes as stored (no transcoding), in a presentation context of its own SOP class
    and transfer syntax. Every file is tried; then SendError names those the peer refused or
    that were lost (and the peer), or says the association itself failed.
    """
    from pynetdicom import AE

    peer = Peer(host, port, ae_title)
    files = _read(paths)
    if not files:
        return []
    ae = AE(ae_title=check_ae_title(calling_ae, "calling AE title"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in dict.fromkeys(_context_key(ds) for _, ds in files):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise SendError(f"association with {peer} {how} (sending {len(files)} result files)")
    statuses: list[int] = []
    failed: list[str] = []
    try:
        for path, ds in files:
            status = _store_one(assoc, ds)
            statuses.append(status)
            if status not in STORED_STATUSES:
                failed.append(f"{path} ({_status_text(status)})")
    finally:
        if assoc.is_established:
            assoc.release()
    if failed:
        raise SendError(f"{peer} did not store {len(failed)} of {len(files)}: {'; '.join(failed)}")
    log.info("sent %d result files to %s", len(files), peer)
    return statuses


def _store_one(assoc: Any, ds: pydicom.Dataset) -> int:
    """The peer's status, or -1 (no context accepted for the file) / -2 (no answer)."""
    if not assoc.is_established:
        return -2
    try:
        answer = assoc.send_c_store(ds)
    except ValueError:  # pynetdicom: no accepted presentation context for this SOP class
        return -1
    return int(answer.Status) if "Status" in answer else -2


def _status_text(status: int) -> str:
    if status == -1:
        return "the peer accepted no presentation context for its SOP class / transfer syntax"
    if status == -2:
        return "no answer: the association was lost or timed out"
    return f"status 0x{status:04X}"


def send_stow(paths: Sequence[Path], url: str) -> pydicom.Dataset:
    """STOW-RS every file to the DICOMweb service at `url` (its base, e.g.
    http://host:8042/dicom-web); the service's response data set. SendError names the URL and
    the files it reports as failed, or the HTTP error."""
    from dicomweb_client import DICOMwebClient

    files = _read(paths)
    if not files:
        return pydicom.Dataset()
    try:
        answer = DICOMwebClient(url).store_instances([ds for _, ds in files])
    except Exception as exc:  # requests' HTTPError / ConnectionError, dicomweb-client's own
        raise SendError(f"STOW-RS to {url} failed ({len(files)} result files): {exc}") from exc
    failed_uids = {
        str(item.ReferencedSOPInstanceUID) for item in answer.get("FailedSOPSequence", [])
    }
    if failed_uids:
        names = [str(p) for p, ds in files if str(ds.SOPInstanceUID) in failed_uids]
        raise SendError(f"STOW-RS to {url}: the service refused {', '.join(names)}")
    log.info("stored %d result files at %s", len(files), url)
    return answer


__all__ = [
    "STORED_STATUSES",
    "Peer",
    "SendError",
    "check_ae_title",
    "parse_send_to",
    "send_cstore",
    "send_stow",
]
