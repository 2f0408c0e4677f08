"""Debian's Orthanc as the real PACS of the hospital tests: a temporary server and REST helpers.

`Orthanc` writes a throw-away configuration (storage and index in a temporary folder, free
loopback ports, the DICOMweb plugin on, one modality "cxrlabel" for the node under test),
starts `/usr/sbin/Orthanc` as a subprocess and stops it again; its log goes to a file that
tests/hospital/conftest.py prints under a failing test. `make test-deps` installs the packages.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
# Debian's orthanc-dicomweb puts the plugin in /usr/share/orthanc/plugins (a link to the real
# /usr/lib/orthanc/libOrthancDicomWeb.so.<version>).
PLUGIN_FOLDERS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
PLUGIN_GLOB = "libOrthancDicomWeb.so*"
PACKAGES = "orthanc orthanc-dicomweb"
MODALITY = "cxrlabel"
MODALITY_AET = "CXRLABEL"
ORTHANC_AET = "ORTHANC"
START_TIMEOUT_S = 30.0


def dicomweb_plugin(folders: tuple[Path, ...] = PLUGIN_FOLDERS) -> Path | None:
    """The DICOMweb plugin's shared library, or None where orthanc-dicomweb is not installed."""
    for folder in folders:
        found = sorted(folder.glob(PLUGIN_GLOB)) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def missing_packages() -> str | None:
    """Why Orthanc cannot run here (what is missing and how to install it), or None."""
    if not ORTHANC_BINARY.is_file():
        return f"{ORTHANC_BINARY} is missing"
    if dicomweb_plugin() is None:
        where = ", ".join(str(f / PLUGIN_GLOB) for f in PLUGIN_FOLDERS)
        return f"the DICOMweb plugin is missing (looked for {where})"
    return None


def installable() -> bool:
    """Whether this machine could install the Debian packages (`make test-deps` would: apt-get,
    as root or through sudo)."""
    root = hasattr(os, "getuid") and os.getuid() == 0
    return shutil.which("apt-get") is not None and (root or shutil.which("sudo") is not None)


def free_port() -> int:
    """A loopback TCP port free right now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def configuration(
    folder: Path, *, http_port: int, dicom_port: int, modality_port: int, plugin: Path
) -> dict[str, Any]:
    """The Orthanc configuration of the tests (the README shows it as the PACS example)."""
    return {
        "Name": "cxrlabel-tests",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "DicomCheckCalledAet": False,
        # REST only from this machine, and without a password there.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        # Store whatever arrives (any storage SOP class, every transfer syntax Orthanc knows),
        # from any calling AE title.
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
        "DicomModalities": {MODALITY: [MODALITY_AET, "127.0.0.1", modality_port]},
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        # A small, forgetful server: the machines running the tests have two cores, and a
        # test's jobs must not be resumed by another test's server.
        "HttpThreadsCount": 8,
        "DicomThreadsCount": 2,
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "StableAge": 1,
    }


class Orthanc:
    """One Orthanc server in `folder`, on free loopback ports; `start()` it, `stop()` it."""

    def __init__(self, folder: Path, *, modality_port: int | None = None) -> None:
        reason = missing_packages()
        if reason is not None:
            raise FileNotFoundError(f"{reason}; install with `apt-get install {PACKAGES}`")
        self.folder = folder
        self.plugin = dicomweb_plugin()
        self.modality_port = modality_port or free_port()
        self.log_path = folder / "orthanc.log"
        self.config_path = folder / "orthanc.json"
        self.http_port = 0
        self.dicom_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise RuntimeError("Orthanc is not started")
        return self._client

    def start(self, attempts: int = 3) -> Orthanc:
        """Start on fresh free ports; another attempt (new ports) where a port was taken
        between choosing it and Orthanc binding it."""
        for _ in range(attempts):
            self.http_port, self.dicom_port = free_port(), free_port()
            config = configuration(
                self.folder,
                http_port=self.http_port,
                dicom_port=self.dicom_port,
                modality_port=self.modality_port,
                plugin=self.plugin,  # type: ignore[arg-type]
            )
            self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
            if self._launch():
                return self
        raise RuntimeError(f"Orthanc did not start ({attempts} attempts):\n{self.log_tail()}")

    def _launch(self) -> bool:
        """Run the binary and wait for /system; False where it exited first."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(ORTHANC_BINARY), "--verbose-dicom", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        # A new connection per request: Orthanc's web server (CivetWeb) closes an idle
        # keep-alive connection after a short timeout, and a request sent on it just then gets
        # "Server disconnected without sending a response" (seen about once in ten round trips).
        self._client = httpx.Client(
            base_url=self.url, timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0)
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._client.close()
                self._client = None
                return False
            try:
                if self._client.get("/system").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system in {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Terminate, then kill if it has not exited after 10 s."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None

    def log_tail(self, chars: int = 20_000) -> str:
        if not self.log_path.is_file():
            return "(no Orthanc log)"
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    # REST helpers -------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(
                f"Orthanc {method} {path}: HTTP {response.status_code}: {response.text[:2000]}"
            )
        return response.json() if response.content else None

    def system(self) -> dict[str, Any]:
        return self._json("GET", "/system")

    def upload(self, path: Path) -> dict[str, Any]:
        """POST one DICOM file to /instances: {"ID", "ParentStudy", "Status", ...}."""
        return self._json("POST", "/instances", content=path.read_bytes())

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, or None."""
        found = self._json("POST", "/tools/lookup", content=study_uid)
        ids = [f["ID"] for f in found if f["Type"] == "Study"]
        return ids[0] if ids else None

    def studies(self) -> list[str]:
        """Orthanc's ids of every study it holds."""
        return self._json("GET", "/studies")

    def study(self, study_id: str) -> dict[str, Any]:
        return self._json("GET", f"/studies/{study_id}")

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """Every series of the study, each with its MainDicomTags (Modality, ...) and the ids
        of its Instances."""
        return self._json("GET", f"/studies/{study_id}/series")

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """Every instance of the study, each with its MainDicomTags (SOPInstanceUID, ...)."""
        return self._json("GET", f"/studies/{study_id}/instances")

    def instance_file(self, instance_id: str) -> bytes:
        """The instance's DICOM file, as Orthanc stored it."""
        response = self.client.get(f"/instances/{instance_id}/file")
        response.raise_for_status()
        return response.content

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's tags as keyword -> value (/simplified-tags)."""
        return self._json("GET", f"/instances/{instance_id}/simplified-tags")

    def send_study(self, study_id: str, modality: str = MODALITY) -> dict[str, Any]:
        """C-STORE the study to a configured modality, synchronously (Orthanc acts as SCU)."""
        body = {"Resources": [study_id], "Synchronous": True}
        return self._json("POST", f"/modalities/{modality}/store", json=body)

    def set_modality(self, name: str, aet: str, port: int, host: str = "127.0.0.1") -> None:
        """Add or change a modality at run time (PUT /modalities/{name})."""
        self._json("PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port})

    def clear(self) -> None:
        """Delete every patient (and so every study and instance)."""
        for patient in self._json("GET", "/patients"):
            self._json("DELETE", f"/patients/{patient}")

    def wait_for_instance(self, sop_uid: str, timeout: float = 30.0) -> str:
        """Orthanc's id of the instance with this SOPInstanceUID, once it has arrived."""
        deadline = time.monotonic() + timeout
        while True:
            found = self._json("POST", "/tools/lookup", content=sop_uid)
            ids = [f["ID"] for f in found if f["Type"] == "Instance"]
            if ids:
                return ids[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no instance {sop_uid} in Orthanc after {timeout} s")
            time.sleep(0.2)
