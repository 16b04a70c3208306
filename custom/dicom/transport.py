"""Where the DICOM node sends results and finds work: a PACS by DICOM (C-STORE, pynetdicom) or by DICOMweb
(STOW-RS, QIDO-RS, WADO-RS, dicomweb-client).

A destination is named by one string (``destination_from_url``):

- ``http://host:port/dicom-web`` (or https): STOW-RS to that DICOMweb root;
- ``dicom://AE_TITLE@host:port``: C-STORE to that AE (the node calls as ``calling_ae``).

Both raise :class:`SendError` (with the reason) on any failure, so the node can keep the item and retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlparse

from pydicom.dataset import Dataset

CR_DX_MODALITIES = ("CR", "DX")


class SendError(RuntimeError):
    """A destination did not take a result: unreachable, refused, or an error status; the message says which."""


class StowDestination:
    """STOW-RS to a DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web`` (Orthanc)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def __str__(self) -> str:
        return f"STOW-RS {self.url}"

    def send(self, datasets: Sequence[Dataset]) -> None:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.url, timeout=self.timeout)
        # The node retries with its own back-off, item by item; the client's would block it for 30 s per try.
        client.set_http_retry_params(retry=False)
        try:
            answer = client.store_instances(list(datasets))
        except Exception as error:  # requests' connection errors, HTTP errors: all mean "not stored"
            raise SendError(f"{self}: {type(error).__name__}: {error}") from error
        failed = answer.get("FailedSOPSequence", [])
        if failed:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')} (status {item.get('FailureReason')})"
                                for item in failed)
            raise SendError(f"{self}: the PACS refused {reasons}")


class CStoreDestination:
    """C-STORE to ``ae_title@host:port``, calling as ``calling_ae``."""

    def __init__(self, host: str, port: int, ae_title: str, calling_ae: str = "RPSAL", timeout: float = 30.0):
        self.host, self.port, self.ae_title, self.calling_ae = host, int(port), ae_title, calling_ae
        self.timeout = timeout

    def __str__(self) -> str:
        return f"C-STORE {self.ae_title}@{self.host}:{self.port}"

    def send(self, datasets: Sequence[Dataset]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for dataset in datasets:
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        association = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not association.is_established:
            raise SendError(f"{self}: no association (unreachable, or the AE refused {self.calling_ae})")
        try:
            for dataset in datasets:
                status = association.send_c_store(dataset)
                code = int(status.Status) if status else None
                if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success, or stored with a warning
                    raise SendError(f"{self}: {dataset.SOPInstanceUID} not stored (status "
                                    f"{'none' if code is None else hex(code)})")
        except SendError:
            raise
        except Exception as error:  # no accepted context for a class (ValueError), the association dropped
            raise SendError(f"{self}: {type(error).__name__}: {error}") from error
        finally:
            association.release()


def destination_from_url(url: str, calling_ae: str = "RPSAL") -> StowDestination | CStoreDestination:
    """A destination from ``http(s)://...`` (STOW-RS) or ``dicom://AE@host:port`` (C-STORE)."""
    parsed = urlparse(str(url))
    if parsed.scheme in ("http", "https"):
        return StowDestination(url)
    if parsed.scheme == "dicom" and parsed.username and parsed.hostname and parsed.port:
        return CStoreDestination(parsed.hostname, parsed.port, parsed.username, calling_ae)
    raise ValueError(f"destination {url!r}: expected http(s)://host:port/dicom-web (STOW-RS) or "
                     "dicom://AE_TITLE@host:port (C-STORE)")


class DicomwebSource:
    """Finds and retrieves CR/DX instances from a DICOMweb root (QIDO-RS, WADO-RS)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.url = url.rstrip("/")
        self.client = DICOMwebClient(self.url, timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # a failed pull is tried again at the next interval

    def find(self, since: str | None = None, accession_number: str | None = None) -> list[tuple[str, str, str]]:
        """(Study, Series, SOP Instance UID) of the CR and DX instances of studies since ``since`` and/or with
        ``accession_number``; all CR/DX instances when neither is given.

        Args:
            since: YYYYMMDD (studies of that day or later, by Study Date) or YYYYMMDDHHMMSS (and, on that day,
                from that Study Time on; a study without a time counts as that day's).
        """
        filters = {}
        start_time = None
        check_since(since)
        if since:
            since = str(since)
            filters["StudyDate"] = f"{since[:8]}-"
            start_time = since[8:] or None
        if accession_number:
            filters["AccessionNumber"] = str(accession_number)
        found = []
        for modality in CR_DX_MODALITIES:
            answers = self.client.search_for_instances(
                search_filters={**filters, "Modality": modality}, fields=["StudyDate", "StudyTime"],
                get_remaining=True)
            for answer in answers:
                if start_time and _value(answer, "00080020") == since[:8]:
                    study_time = _value(answer, "00080030").replace(":", "")[:6]
                    if study_time and study_time.ljust(6, "0") < start_time:
                        continue
                uids = tuple(_value(answer, tag) for tag in ("0020000D", "0020000E", "00080018"))
                if all(uids):
                    found.append(uids)
        return found

    def retrieve(self, study: str, series: str, sop: str) -> Dataset:
        return self.client.retrieve_instance(study, series, sop)


def check_since(since: str | None) -> None:
    """ValueError unless ``since`` is None, YYYYMMDD or YYYYMMDDHHMMSS."""
    if since and (len(str(since)) not in (8, 14) or not str(since).isdigit()):
        raise ValueError(f"since must be YYYYMMDD or YYYYMMDDHHMMSS, got {since!r}")


def _value(answer: dict, tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON answer, "" when absent or empty."""
    values = answer.get(tag, {}).get("Value") or [""]
    return str(values[0])
