"""A real PACS for development, tests and the demo: Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``)
on loopback, configured by ``pacs/orthanc.json``, on free ports with a storage folder of its own.

Usage::

    python scripts/pacs.py start --folder runs/pacs      # prints the DICOMweb URL and the DICOM port; runs
                                                         # until Ctrl-C
    python scripts/pacs.py start --folder runs/pacs --http_port 8042 --dicom_port 4242 --node_port 11112

From Python (tests): ``with Orthanc(folder) as pacs: pacs.dicomweb_url, pacs.dicom_port``. HTTP answers only
127.0.0.1 (``RemoteAccessAllowed: false``); C-STORE is accepted only from the modalities the config lists
(``DicomAlwaysAllowStore: false``; the node is ``RPSAL`` at 127.0.0.1). Install on Debian:
``apt-get install orthanc orthanc-dicomweb``.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "pacs" / "orthanc.json"
BINARY_NAMES = ("Orthanc", "orthanc")


class PacsUnavailable(RuntimeError):
    """Orthanc is not installed or did not start; the message says why and how to install it."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def orthanc_binary() -> str:
    for name in BINARY_NAMES:
        found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").is_file() else None)
        if found:
            return found
    raise PacsUnavailable("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (Debian)")


class Orthanc:
    """An Orthanc process with its own storage under ``folder``, on free loopback ports.

    Attributes once started: ``http_url`` (REST API), ``dicomweb_url`` (QIDO/WADO/STOW root), ``dicom_port``,
    ``aet`` (its AE title), ``node_port`` (the port the config lists for the ``RPSAL`` node).
    """

    def __init__(self, folder: str | Path, node_port: int | None = None, timeout: float = 60.0,
                 http_port: int | None = None, dicom_port: int | None = None) -> None:
        self.folder = Path(folder)
        self.http_port, self.dicom_port = http_port or free_port(), dicom_port or free_port()
        self.node_port = node_port or free_port()
        self.timeout = timeout
        self.process: subprocess.Popen | None = None
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.http_url}/dicom-web"
        self.log_path = self.folder / "orthanc.log"

    def config(self) -> dict:
        content = json.loads(CONFIG.read_text(encoding="utf-8"))
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        content.update({"StorageDirectory": str(storage), "IndexDirectory": str(storage),
                        "HttpPort": self.http_port, "DicomPort": self.dicom_port})
        content["DicomModalities"]["rpsal"][2] = self.node_port
        self.aet = content["DicomAet"]
        return content

    def start(self) -> "Orthanc":
        binary = orthanc_binary()
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PacsUnavailable(f"Orthanc exited with {self.process.returncode}: "
                                      f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/system", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise PacsUnavailable(f"Orthanc did not answer on {self.http_url} within {self.timeout} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start(folder: str = "runs/pacs", http_port: int | None = None, dicom_port: int | None = None,
          node_port: int | None = None) -> None:
    """Run Orthanc until Ctrl-C or SIGTERM; prints where it listens (free ports unless given, e.g. 8042, 4242,
    11112)."""
    # Orthanc runs in its own session (so that Ctrl-C reaches it once, through us): SIGTERM must stop it too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with Orthanc(folder, node_port=node_port, http_port=http_port, dicom_port=dicom_port) as pacs:
        print(f"Orthanc: REST {pacs.http_url}, DICOMweb {pacs.dicomweb_url}, DICOM {pacs.aet}@127.0.0.1:"
              f"{pacs.dicom_port}; node RPSAL expected at 127.0.0.1:{pacs.node_port}; storage {pacs.folder}",
              flush=True)
        try:
            while pacs.process.poll() is None:
                time.sleep(1)
        except (KeyboardInterrupt, SystemExit):
            pass


if __name__ == "__main__":
    import fire

    try:
        fire.Fire({"start": start})
    except PacsUnavailable as error:
        print(f"pacs: {error}", file=sys.stderr)
        sys.exit(2)
