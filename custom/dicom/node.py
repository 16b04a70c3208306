"""A DICOM node: radiographs in from a PACS, the bundle's declared inference path, SR + GSPS back into the study.

Two ways in, one way through:

- listen mode (:class:`StorageServer`): a Storage SCP (C-ECHO, C-STORE, every storage SOP class and the
  transfer syntaxes PACS hold: uncompressed, JPEG lossless, JPEG 2000, JPEG-LS, RLE ...) that admits each
  received object (:meth:`DicomNode.admit`) and answers only once it is safely queued on disk;
- pull mode (:meth:`DicomNode.pull`): QIDO-RS for the CR/DX instances of studies since a date or with an
  accession number, WADO-RS for those not yet processed under this bundle version, the same admission.

Then the worker (:meth:`DicomNode.run`) infers each queued radiograph with the bundle's ``FindingsService``
(preprocessing, network, inferer and postprocessing built once), builds its results
(``custom.dicom.writers.results_for_document``: SR, GSPS and optionally the Secondary Capture, with
deterministic UIDs), and sends them to the destination, retrying with exponential back-off while it is
unreachable; the queue and ledger (``custom.dicom.node_queue``) make a SIGKILL at any point cost nothing.

Admission refuses, logs (with the SOP Instance UID and the reason) and records in the ledger: a non-image SOP
class, another modality (CT, MR ...), a multi-frame object, a missing Study / Series / SOP Instance UID, pixel
data that does not decode (corrupt, truncated, an unsupported transfer syntax). Over DICOM the sender gets
status 0xC000 with the reason in Error Comment. Refused and processed objects sent again are not processed
again.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from custom.dicom.node_queue import QUEUED, REFUSED, NodeQueue
from custom.dicom.study import read_source, result_uids
from custom.dicom.transport import SendError
from custom.dicom.writers import results_for_document
from custom.transforms.grey_image import ImageLoadError

LOGGER = logging.getLogger("custom.dicom.node")
STATUS_SUCCESS = 0x0000
STATUS_REFUSED = 0xC000  # "Error: cannot understand": the object is not one this node reports on
STATUS_OUT_OF_RESOURCES = 0xA700  # the node could not store it (disk): the sender should retry
MAX_INFERENCE_ATTEMPTS = 5  # tries of an image whose inference fails for a reason other than the image


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off between sending attempts: ``first`` seconds, doubling up to ``longest``; never gives up (an
    item waits in the outbox until the PACS takes it)."""

    first: float = 5.0
    longest: float = 600.0

    def delay(self, attempts: int) -> float:
        return min(self.longest, self.first * 2 ** max(0, attempts - 1))


class DicomNode:
    """The node's work: admission, inference, sending.

    Args:
        queue: the on-disk queue and ledger (its version is the bundle version).
        findings: a callable from a radiograph file path to its findings document (``FindingsService``).
        destination: ``custom.dicom.transport`` destination (``send(datasets)`` raising ``SendError``).
        uid_prefix: the site's UID root for the results (pydicom's when None).
        secondary_capture: also send the burnt-in Secondary Capture.
        retry: back-off of the sending attempts.
    """

    def __init__(self, queue: NodeQueue, findings: Callable[[str], dict], destination, uid_prefix: str | None = None,
                 secondary_capture: bool = False, retry: RetryPolicy = RetryPolicy()) -> None:
        result_uids("1.2.3", queue.version, "sr", uid_prefix)  # a bad UID root fails here, not on every image
        self.queue = queue
        self.findings = findings
        self.destination = destination
        self.uid_prefix = uid_prefix
        self.secondary_capture = secondary_capture
        self.retry = retry
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.retrieve_failures = 0

    @property
    def version(self) -> str:
        return self.queue.version

    # --- admission ---------------------------------------------------------------------------------------

    def admit(self, dataset: Dataset) -> tuple[int, str]:
        """Check one received object and queue it; returns (DICOM status, reason or "").

        A refused object is recorded in the ledger with its reason and logged; an object already known under
        this version is acknowledged without new work (a re-sent study adds nothing).
        """
        uid = str(dataset.get("SOPInstanceUID", "")).strip()
        if not uid:
            reason = "no SOP Instance UID"
            LOGGER.warning("refused an object of SOP class %s: %s", dataset.get("SOPClassUID", "?"), reason)
            return STATUS_REFUSED, reason
        known = self.queue.item(uid)
        if known is not None and known.state == REFUSED:
            LOGGER.info("refused %s again: %s", uid, known.reason)
            return STATUS_REFUSED, known.reason
        if known is not None:
            LOGGER.info("%s already %s under version %s: nothing to do", uid, known.state, self.version)
            return STATUS_SUCCESS, ""
        try:
            path = self.queue.stage(dataset)
        except OSError as error:
            LOGGER.error("could not store %s: %s", uid, error)
            return STATUS_OUT_OF_RESOURCES, f"cannot store: {error}"
        except Exception as error:  # pydicom cannot encode what arrived: malformed elements
            return self._refuse(uid, f"malformed dataset ({type(error).__name__}: {error})", dataset)
        try:
            read_source(path)  # the whole check: DICOM radiograph, single frame, UIDs, pixels decode
        except Exception as error:  # ImageLoadError for what it refuses by name; anything else is a bad file
            path.unlink(missing_ok=True)
            reason = str(error).replace(str(path), "").strip(" :") or type(error).__name__
            return self._refuse(uid, reason, dataset)
        try:
            self.queue.put_file(path, uid, str(dataset.get("StudyInstanceUID", "")))
        except (OSError, sqlite3.Error) as error:
            path.unlink(missing_ok=True)
            LOGGER.error("could not queue %s: %s", uid, error)
            return STATUS_OUT_OF_RESOURCES, f"cannot store: {error}"
        LOGGER.info("queued %s (study %s)", uid, dataset.get("StudyInstanceUID", "?"))
        self.wake.set()
        return STATUS_SUCCESS, ""

    def _refuse(self, uid: str, reason: str, dataset: Dataset) -> tuple[int, str]:
        if not self.queue.refuse(uid, reason, str(dataset.get("StudyInstanceUID", "")), new=True):
            # Another association queued this instance meanwhile: that copy stands.
            LOGGER.warning("a copy of %s was refused (%s); the copy already queued stands", uid, reason)
            return STATUS_SUCCESS, ""
        LOGGER.warning("refused %s: %s", uid, reason)
        return STATUS_REFUSED, reason

    def pull(self, source, since: str | None = None, accession_number: str | None = None) -> int:
        """One QIDO-RS query; retrieve (WADO-RS) and admit what is new under this version. Returns how many
        were queued. An instance that cannot be retrieved now is tried again at the next pull (counted in
        ``retrieve_failures``)."""
        queued = 0
        self.retrieve_failures = 0
        for study, series, sop in source.find(since, accession_number):
            if self.stop_event.is_set():
                break
            if self.queue.item(sop) is not None:
                continue
            try:
                dataset = source.retrieve(study, series, sop)
            except Exception as error:  # network, HTTP: leave it for the next pull
                LOGGER.warning("could not retrieve %s from %s: %s", sop, source.url, error)
                self.retrieve_failures += 1
                continue
            status, _ = self.admit(dataset)
            queued += status == STATUS_SUCCESS
        return queued

    # --- work --------------------------------------------------------------------------------------------

    def process_pending(self) -> int:
        """Infer every due queued radiograph and put its results in the outbox; returns how many were done.

        An error of the image itself (it does not decode, its findings are not valid) refuses it; any other
        (memory, disk, a bug) may pass: the image stays queued and is tried again after the back-off, and is
        refused only after ``MAX_INFERENCE_ATTEMPTS`` tries.
        """
        done = 0
        for item in self.queue.due(QUEUED):
            if self.stop_event.is_set():
                break
            uid = item.sop_instance_uid
            try:
                document = self.findings(str(self.queue.incoming_path(uid)))
                results = results_for_document(document, self.version, self.uid_prefix, self.secondary_capture)
                self.queue.set_results(uid, results)
            except (ImageLoadError, ValueError) as error:  # the image's own fault: no retry can help
                self.queue.refuse(uid, f"inference failed: {type(error).__name__}: {error}", item.study_instance_uid)
                LOGGER.error("refused %s: inference failed: %s", uid, error)
                continue
            except Exception as error:  # one failure must not stop the node; it may pass
                attempts = item.attempts + 1
                reason = f"inference failed ({attempts} of {MAX_INFERENCE_ATTEMPTS}): {type(error).__name__}: {error}"
                if attempts >= MAX_INFERENCE_ATTEMPTS:
                    self.queue.refuse(uid, reason, item.study_instance_uid)
                    LOGGER.error("refused %s: %s", uid, reason)
                else:
                    wait = self.retry.delay(attempts)
                    self.queue.attempt_failed(uid, reason, time.time() + wait)
                    LOGGER.error("%s: %s; next try in %.0f s", uid, reason, wait)
                continue
            positives = [f["class"] for f in document.get("findings", [])] + document.get("positive_without_box", [])
            LOGGER.info("inferred %s: %s", uid, ", ".join(positives) or "no class above its threshold")
            done += 1
        return done

    def send_pending(self) -> int:
        """Send every due outbox item; a failure schedules the next attempt (back-off). Returns how many sent."""
        sent = 0
        for item in self.queue.due():
            if self.stop_event.is_set():
                break
            try:
                self.destination.send(self.queue.results(item.sop_instance_uid))
            except Exception as error:  # SendError, or anything else on the way: the item waits, the node serves
                wait = self.retry.delay(item.attempts + 1)
                if not isinstance(error, SendError):
                    error = f"{type(error).__name__}: {error}"
                self.queue.attempt_failed(item.sop_instance_uid, str(error), time.time() + wait)
                LOGGER.warning("could not send the results of %s (attempt %d), next in %.0f s: %s",
                               item.sop_instance_uid, item.attempts + 1, wait, error)
                continue
            self.queue.sent(item.sop_instance_uid)
            LOGGER.info("sent the results of %s to %s", item.sop_instance_uid, self.destination)
            sent += 1
        return sent

    def recover(self) -> None:
        """At start, before anything is received: finish what a killed process left (``NodeQueue.recover``)."""
        recovered = self.queue.recover()
        if recovered:
            LOGGER.info("recovered %d received file(s) into the queue", recovered)
        LOGGER.info("node working in %s for version %s; queue %s", self.queue.folder, self.version,
                    self.queue.counts())

    def run(self, pull: Callable[[], int] | None = None, pull_interval: float = 30.0, idle: float = 0.5) -> None:
        """Work until :meth:`stop`: infer, send and (with ``pull``) poll the source. Call :meth:`recover`
        first, before a Storage SCP starts receiving."""
        next_pull = 0.0
        while not self.stop_event.is_set():
            if pull is not None and time.monotonic() >= next_pull:
                try:
                    pull()
                except Exception as error:  # the source down: try again at the next interval
                    LOGGER.warning("pull failed: %s", error)
                next_pull = time.monotonic() + pull_interval
            worked = self.process_pending() + self.send_pending()
            if not worked:
                self.wake.wait(idle)
                self.wake.clear()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()


class StorageServer:
    """The listen mode's Storage SCP: C-ECHO, and C-STORE of any storage SOP class in any transfer syntax
    pynetdicom knows, each object handed to :meth:`DicomNode.admit` (answering only once it is on disk)."""

    def __init__(self, node: DicomNode, port: int, host: str = "127.0.0.1", ae_title: str = "RPSAL") -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.node = node
        self.address = (host, int(port))
        self.ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: STATUS_SUCCESS)]
        self.server = None

    def _on_store(self, event) -> Dataset:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        status, reason = self.node.admit(dataset)
        answer = Dataset()
        answer.Status = status
        if reason:  # LO: 64 characters at most; the full reason is in the log and the ledger
            answer.ErrorComment = re.sub(r"\s*\([0-9.]+\)", "", reason)[:64]
        return answer

    def start(self) -> "StorageServer":
        self.server = self.ae.start_server(self.address, block=False, evt_handlers=self.handlers)
        LOGGER.info("Storage SCP %s listening on %s:%d", self.ae.ae_title, *self.address)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def log_to(folder: str | os.PathLike, level: int = logging.INFO) -> None:
    """Log the node to ``<folder>/node.log`` and stderr."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in (logging.FileHandler(Path(folder) / "node.log", encoding="utf-8"), logging.StreamHandler()):
        handler.setFormatter(formatter)
        LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
