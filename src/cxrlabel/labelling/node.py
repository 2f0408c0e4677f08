"""A DICOM node (`cxrlabel listen`): a storage SCP that labels each study it receives and sends
the results back to a PACS.

The node accepts chest films (CR, DX for presentation and for processing, Secondary Capture) in
the transfer syntaxes the reader decodes (`data.images.decodable_transfer_syntaxes`); other SOP
classes or syntaxes are refused per presentation context when the association is negotiated
(and logged). On each C-STORE the data set is written, atomically and with its file meta, to
``<out>/received/<Study Instance UID>/<SOP Instance UID>.dcm`` *before* the success status is
returned; a data set that cannot be decoded, lacks (valid) Study / SOP Instance UIDs, has no
pixel data or pixels the reader cannot decode (checked in the handler, with the reader's frame
size limits, so a decompression bomb is refused before it is decoded) gets a 0xC000 "cannot
understand" status and a row in ``<out>/errors.csv``, and is not stored.

A study is labelled once no new film of it has arrived for `quiet_seconds`, and (by default) as
soon as the association that brought it is released. A worker thread, never the network
handler, runs the batch labeller on the study's received folder into
``<out>/studies/<uid>/`` (labels.csv, study_labels.csv... as `cxrlabel label` writes them), makes
the result objects with `make_results(run_dir, films_dir)` (default: the DICOM SR / secondary
captures of `labelling.studies.write_dicom_outputs`, in ``<run_dir>/dicom``) and hands them to
`send` (C-STORE or STOW-RS; none: they are only written). ``<out>/studies.csv``,
``study_labels.csv`` and ``study_probabilities.csv`` sum up every study.

Restart safety: the received folder is the record of what arrived (a film is on disk before the
sender hears "success"); ``<out>/state.json``, rewritten atomically, records per study the SOP
Instance UIDs that were labelled and those whose results were delivered. A node started on the
same `out_dir` queues every study whose received films differ from its delivered set, and
never labels or sends a study again for the same set of films. A film arriving for a study
already delivered makes the node label the whole study again and send new result objects (new
SOP Instance UIDs; what the PACS holds already is not withdrawn). Delivery is at least once: a
node stopped between a PACS's "stored" and the state write sends that study's results again.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import logging
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from cxrlabel.csvcells import neutralise_row
from cxrlabel.data.images import ImageError, decodable_transfer_syntaxes, read_image_with_info
from cxrlabel.fileio import atomic_write_bytes, atomic_write_text
from cxrlabel.hospital.transfer import check_ae_title
from cxrlabel.labelling.batch import STUDY_FILES, label_inputs
from cxrlabel.labelling.journal import PARTIAL_DIR
from cxrlabel.labelling.reader import DEFAULT_READ_TIMEOUT
from cxrlabel.models.predictor import Predictor

log = logging.getLogger(__name__)

RECEIVED_DIR = "received"
STUDIES_DIR = "studies"
STATE_FILE = "state.json"
ERRORS_FILE = "errors.csv"
SUMMARY_FILE = "studies.csv"
STATE_FORMAT = 1
ERROR_COLUMNS = (
    "time",
    "calling_ae",
    "peer",
    "study_instance_uid",
    "sop_instance_uid",
    "error",
    "reason",
)
SUMMARY_COLUMNS = (
    "study_instance_uid",
    "films",
    "labelled_films",
    "delivered_films",
    "destination",
    "results",
)

# The chest films the node stores (PS3.4 B.5): CR, DX for presentation / for processing, SC.
FILM_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)
VERIFICATION = "1.2.840.10008.1.1"
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3: failure, "cannot understand" (0xCxxx)
OUT_OF_RESOURCES = 0xA700  # the film could not be written to disk

MakeResults = Callable[[Path, Path], list[Path]]
Send = Callable[[list[Path]], object]


def dicom_results(*, heatmaps: bool) -> MakeResults:
    """The default `make_results`: the study's DICOM SR (and, with heatmaps, secondary
    captures) in ``<run_dir>/dicom``, by `labelling.studies.write_dicom_outputs`."""

    def make(run_dir: Path, films_dir: Path) -> list[Path]:
        # Imported when a study is done, not with the node (the SR builder pulls in highdicom).
        from cxrlabel.labelling.studies import write_dicom_outputs

        outputs = write_dicom_outputs(run_dir, [films_dir], run_dir / "dicom", heatmaps=heatmaps)
        for note in outputs.notes:
            log.info("%s", note)
        return list(outputs.written)

    return make


def _valid_uid(value: str) -> bool:
    # A UID is digits and dots, at most 64 characters: it is also safe as a file name.
    return bool(value) and UID(value).is_valid


def _peer_networks(
    specs: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec, strict=False))
        except ValueError:
            raise ValueError(f"--allow-peer {spec!r} is not an IP address or network") from None
    return tuple(networks)


def refused_contexts_message(
    rejected: Sequence[Any], accepted: Sequence[Any]
) -> tuple[str, bool] | None:
    """One log line for an association's refused presentation contexts (None: none refused),
    and whether no chest film context was accepted at all. Each SOP class is named once."""
    if not rejected:
        return None
    classes = dict.fromkeys(
        f"{cx.abstract_syntax} ({getattr(cx.abstract_syntax, 'name', '')})" for cx in rejected
    )
    no_film = not any(str(cx.abstract_syntax) in FILM_SOP_CLASSES for cx in accepted)
    text = (
        f"refused {len(rejected)} presentation context(s) ({len(classes)} SOP class(es)): not a "
        f"chest film SOP class or transfer syntax this node reads: {', '.join(classes)}"
    )
    return text, no_film


class NodeState:
    """``state.json``: per study, the SOP Instance UIDs labelled and delivered, and the result
    files (relative to the node's folder). Every change is written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._studies: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the node state {self.path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.path} is not a format-{STATE_FORMAT} cxrlabel node state")
        return dict(data["studies"])

    def study(self, uid: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._studies.get(uid, {}))

    def studies(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._studies.items()}

    def update(self, uid: str, **fields: Any) -> None:
        with self._lock:
            self._studies[uid] = {**self._studies.get(uid, {}), **fields}
            text = json.dumps({"format": STATE_FORMAT, "studies": self._studies}, indent=1)
            atomic_write_text(self.path, text + "\n")


class ErrorLog:
    """``errors.csv``: what the node refused or failed at; never patient data (the reason is
    the node's own words, not a value from the data set)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def add(self, **fields: str) -> None:
        row = [time.strftime("%Y-%m-%dT%H:%M:%S")] + [fields.get(c, "") for c in ERROR_COLUMNS[1:]]
        with self._lock:
            old = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
            buf = io.StringIO()
            writer = csv.writer(buf)
            if not old:
                writer.writerow(ERROR_COLUMNS)
            writer.writerow(neutralise_row(row))
            atomic_write_text(self.path, old + buf.getvalue())


class StudyQueue:
    """Studies waiting to be labelled, each due at a time; one is handed out at a time."""

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._busy: str | None = None
        self._stopping = False
        self._cond = threading.Condition()

    def touch(self, study: str, delay: float) -> None:
        """A film of `study` arrived: due `delay` seconds from now (later films postpone it)."""
        with self._cond:
            self._due[study] = time.monotonic() + delay
            self._cond.notify_all()

    def due_now(self, study: str) -> None:
        with self._cond:
            if study in self._due:
                self._due[study] = time.monotonic()
                self._cond.notify_all()

    def next(self) -> str | None:
        """Block until a study is due (it is then busy until `done`); None once stopping."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                ready = [s for s, t in self._due.items() if t <= now]
                if ready:
                    study = min(ready, key=self._due.__getitem__)
                    del self._due[study]
                    self._busy = study
                    return study
                wait = min(self._due.values()) - now if self._due else None
                self._cond.wait(wait)
            return None

    def done(self) -> None:
        with self._cond:
            self._busy = None
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is waiting or being labelled (False: `timeout` passed first)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._due and self._busy is None, timeout)


class Node:
    """The storage SCP and its labelling worker. `start()` returns once it listens (`port` is
    then the bound port, useful with port 0); `stop()` stops listening, lets the study being
    labelled finish and keeps the rest for the next start."""

    def __init__(
        self,
        model: Predictor,
        out_dir: Path,
        *,
        ae_title: str = "CXRLABEL",
        host: str = "127.0.0.1",
        port: int = 11112,
        quiet_seconds: float = 10.0,
        label_at_release: bool = True,
        allow_ae: Sequence[str] = (),
        allow_peer: Sequence[str] = (),
        make_results: MakeResults | None = None,
        send: Send | None = None,
        destination: str = "",
        heatmaps: bool = False,
        batch_size: int = 16,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        retry_seconds: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if quiet_seconds < 0:
            raise ValueError(f"quiet_seconds must be 0 or more, got {quiet_seconds}")
        self.model = model
        self.out_dir = Path(out_dir).resolve()
        self.ae_title = check_ae_title(ae_title)
        self.host, self._port = host, port
        self.quiet_seconds = quiet_seconds
        self.label_at_release = label_at_release
        self.allow_ae = tuple(check_ae_title(a, "--allow-ae") for a in allow_ae)
        self.allow_peer = _peer_networks(allow_peer)
        self.make_results = make_results or dicom_results(heatmaps=heatmaps)
        self.send = send
        self.destination = destination
        self.heatmaps = heatmaps
        self.batch_size = batch_size
        self.read_timeout = read_timeout
        self.retry_seconds = retry_seconds
        self.max_attempts = max_attempts
        self.state = NodeState(self.out_dir / STATE_FILE)
        self.errors = ErrorLog(self.out_dir / ERRORS_FILE)
        self.queue = StudyQueue()
        self._attempts: dict[str, int] = {}
        # Studies each open association brought; weak keys: an association that ends without
        # a release (dropped, aborted) leaves nothing behind.
        self._assoc_studies: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._assoc_lock = threading.Lock()
        self._server: Any = None
        self._worker: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self._port

    def start(self) -> Node:
        from pynetdicom import AE, evt

        (self.out_dir / RECEIVED_DIR).mkdir(parents=True, exist_ok=True)
        self._queue_unfinished()
        ae = AE(ae_title=self.ae_title)
        syntaxes = list(decodable_transfer_syntaxes())
        for sop_class in FILM_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION)  # C-ECHO, how a PACS tests a modality entry
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
        ]
        self._worker = threading.Thread(target=self._work, name="cxrlabel-node-worker", daemon=True)
        self._worker.start()
        self._server = ae.start_server((self.host, self._port), block=False, evt_handlers=handlers)
        where = self.destination or f"written under {self.out_dir}"
        log.info(
            "DICOM node %s listening on %s:%d; results: %s",
            self.ae_title,
            self.host,
            self.port,
            where,
        )
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop listening (open associations are aborted), finish the study being labelled."""
        if self._server is not None:
            self._server.shutdown()
        self.queue.stop()
        if self._worker is not None:
            self._worker.join(timeout)
        log.info("DICOM node %s stopped", self.ae_title)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_idle(self, timeout: float) -> bool:
        """True once no study is waiting or being labelled (for tests and scripts)."""
        return self.queue.wait_idle(timeout)

    # ---- network handlers (answer fast: no labelling here) ---------------------------------

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        if self.allow_ae and calling not in self.allow_ae:
            log.warning(
                "refused association from %s: calling AE %r is not allowed", address, calling
            )
            self._reject(assoc, 0x03)  # calling AE title not recognised
        elif self.allow_peer and not self._peer_allowed(address):
            log.warning(
                "refused association from %s (AE %r): peer is not allowed", address, calling
            )
            self._reject(assoc, 0x01)  # no reason given

    @staticmethod
    def _reject(assoc: Any, diagnostic: int) -> None:
        """A-ASSOCIATE-RJ (permanent, by the service user), then wait for the peer to close, as
        pynetdicom does for its own rejections (closing at once could drop the RJ unsent)."""
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _peer_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.allow_peer)

    def _on_accepted(self, event: Any) -> None:
        refused = refused_contexts_message(
            event.assoc.rejected_contexts, event.assoc.accepted_contexts
        )
        if refused is None:
            return
        text, no_film = refused
        calling = str(event.assoc.requestor.ae_title).strip()
        # A PACS such as Orthanc proposes every storage SOP class it knows on each association:
        # one line per association, a warning only when no film can be sent over it at all.
        log.log(
            logging.WARNING if no_film else logging.INFO, "association from %s: %s", calling, text
        )

    def _on_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        peer = str(event.assoc.requestor.address)
        where = {"calling_ae": calling, "peer": peer}
        try:
            ds = event.dataset
            for _ in ds:  # every top-level element converted: a malformed one raises here
                pass
            study = str(ds.get("StudyInstanceUID", "") or "")
            sop = str(ds.get("SOPInstanceUID", "") or "")
            has_pixels = "PixelData" in ds
        except Exception as exc:  # pydicom raises many kinds on a broken data set
            return self._refuse(
                where, "MalformedDataset", f"the data set cannot be decoded ({type(exc).__name__})"
            )
        if not _valid_uid(sop):
            return self._refuse(where, "NoSOPInstanceUID", "no valid SOP Instance UID")
        where["sop_instance_uid"] = sop
        if not _valid_uid(study):
            return self._refuse(where, "NoStudyInstanceUID", "no valid Study Instance UID")
        where["study_instance_uid"] = study
        if not has_pixels:
            return self._refuse(where, "NoPixelData", "the data set has no pixel data")
        data = event.encoded_dataset(include_meta=True)
        try:
            # Decoded here, not only later by the labeller, so the sender hears that a film
            # cannot be read (issue 13: a failure status) instead of a success it cannot undo.
            read_image_with_info(data, name=f"{sop}.dcm")
        except ImageError as exc:
            return self._refuse(where, type(exc).__name__, exc.reason)
        except Exception as exc:  # a decoder bug: refused and reported, the node serves on
            return self._refuse(where, type(exc).__name__, f"{sop}.dcm: {exc}")
        path = self.out_dir / RECEIVED_DIR / study / f"{sop}.dcm"
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            log.error("could not store a received film: %s", exc)
            self.errors.add(
                **where, error="StoreFailed", reason=f"writing {path.name} failed: {exc.strerror}"
            )
            return OUT_OF_RESOURCES
        with self._assoc_lock:
            self._assoc_studies.setdefault(event.assoc, set()).add(study)
        self.queue.touch(study, self.quiet_seconds)
        return SUCCESS

    def _refuse(self, where: dict[str, str], error: str, reason: str) -> int:
        log.warning(
            "refused a data set from %s (%s): %s", where["peer"], where["calling_ae"], reason
        )
        self.errors.add(**where, error=error, reason=reason)
        return CANNOT_UNDERSTAND

    def _on_released(self, event: Any) -> None:
        with self._assoc_lock:
            studies = self._assoc_studies.pop(event.assoc, set())
        if self.label_at_release:
            for study in studies:
                self.queue.due_now(study)

    # ---- the worker ------------------------------------------------------------------------

    def _received(self, study: str) -> list[str]:
        folder = self.out_dir / RECEIVED_DIR / study
        return sorted(p.stem for p in folder.glob("*.dcm")) if folder.is_dir() else []

    def _queue_unfinished(self) -> None:
        """At start: every study whose received films are not all delivered."""
        for folder in sorted((self.out_dir / RECEIVED_DIR).iterdir()):
            study = folder.name
            if folder.is_dir() and self._received(study) != self.state.study(study).get(
                "delivered"
            ):
                log.info("study %s: received but not yet labelled and delivered; queued", study)
                self.queue.touch(study, self.quiet_seconds)

    def _work(self) -> None:
        while (study := self.queue.next()) is not None:
            try:
                self._process(study)
                self._attempts.pop(study, None)
            except Exception as exc:  # one failing study must not stop the node
                attempts = self._attempts.get(study, 0) + 1
                self._attempts[study] = attempts
                log.exception(
                    "study %s: labelling or delivery failed (attempt %d)", study, attempts
                )
                self.errors.add(study_instance_uid=study, error=type(exc).__name__, reason=str(exc))
                if attempts < self.max_attempts:
                    self.queue.touch(study, self.retry_seconds)
            finally:
                self.queue.done()

    def _process(self, study: str) -> None:
        films = self._received(study)
        entry = self.state.study(study)
        if not films or entry.get("delivered") == films:
            return  # nothing new since the last delivery
        films_dir = self.out_dir / RECEIVED_DIR / study
        results = [self.out_dir / p for p in entry.get("results", [])]
        if entry.get("labelled") != films or not all(p.is_file() for p in results):
            results = self._label(study, films_dir)
            self.state.update(
                study, labelled=films, delivered=None,
                results=[str(p.relative_to(self.out_dir)) for p in results],
            )  # fmt: skip
        if self.send is not None and results:
            self.send(results)
        self.state.update(study, delivered=films, destination=self.destination)
        self._write_summary()
        how = f"sent to {self.destination}" if self.send else "written"
        log.info(
            "study %s: %d films labelled, %d result files %s", study, len(films), len(results), how
        )

    def _label(self, study: str, films_dir: Path) -> list[Path]:
        run_dir = self.out_dir / STUDIES_DIR / study
        # Always a fresh run: an interrupted one may have seen a different set of films.
        shutil.rmtree(run_dir / PARTIAL_DIR, ignore_errors=True)
        label_inputs(
            [films_dir], self.model, run_dir, batch_size=self.batch_size, heatmaps=self.heatmaps,
            progress=False, read_timeout=self.read_timeout,
        )  # fmt: skip
        self._film_errors(study, run_dir)
        results = [Path(p).resolve() for p in self.make_results(run_dir, films_dir)]
        outside = [str(p) for p in results if not p.is_relative_to(self.out_dir)]
        if outside:  # the state names results relative to the node's folder
            raise ValueError(f"make_results returned files outside {self.out_dir}: {outside}")
        return results

    def _film_errors(self, study: str, run_dir: Path) -> None:
        """Films the labeller could not read (undecodable pixels...) go to the node's errors."""
        errors = run_dir / "errors.csv"
        if not errors.is_file():
            return
        with open(errors, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                self.errors.add(
                    study_instance_uid=study, sop_instance_uid=Path(row["Path"]).stem,
                    error=row["error"], reason=row["reason"],
                )  # fmt: skip

    def _write_summary(self) -> None:
        """studies.csv (each study's state) and every study's study-level CSV rows in one."""
        rows = []
        for study, entry in sorted(self.state.studies().items()):
            rows.append(
                [
                    study,
                    len(self._received(study)),
                    len(entry.get("labelled") or []),
                    len(entry.get("delivered") or []),
                    entry.get("destination", ""),
                    " ".join(entry.get("results", [])),
                ]
            )
        buf = io.StringIO()
        csv.writer(buf).writerows([list(SUMMARY_COLUMNS), *(neutralise_row(r) for r in rows)])
        atomic_write_text(self.out_dir / SUMMARY_FILE, buf.getvalue())
        for name in STUDY_FILES:
            self._concatenate(name, sorted(self.state.studies()))

    def _concatenate(self, name: str, studies: Sequence[str]) -> None:
        # The per-study files are already spreadsheet-safe: copied as they are.
        header: list[str] | None = None
        body: list[list[str]] = []
        for study in studies:
            path = self.out_dir / STUDIES_DIR / study / name
            if not path.is_file():
                continue
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
            if rows and (header is None or rows[0] == header):
                header = header or rows[0]
                body += rows[1:]
        if header is not None:
            buf = io.StringIO()
            csv.writer(buf).writerows([header, *body])
            atomic_write_text(self.out_dir / name, buf.getvalue())


__all__ = [
    "CANNOT_UNDERSTAND",
    "FILM_SOP_CLASSES",
    "ErrorLog",
    "Node",
    "NodeState",
    "StudyQueue",
    "dicom_results",
    "refused_contexts_message",
]
