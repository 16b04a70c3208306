"""The source radiograph (checked, read) and the UIDs of the results written about it.

Every result belongs to the SAME study as the radiograph it describes (highdicom copies the patient and study
modules from the source) and to a NEW series, with UIDs derived from the source (``result_uids``), so a PACS
files it next to the image it reports on and a re-run adds nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from custom.transforms.grey_image import GreyImage, ImageLoadError, read_grey_image, read_image_size

BUNDLE_NAME = "chestxray14_rpsal_detection"
MANUFACTURER = "chestxray14_rpsal_detection (research use only)"
# Series descriptions say what the objects are: unverified AI output.
UNVERIFIED = "AI output, unverified"


class DicomSourceError(ImageLoadError):
    """A DICOM input that cannot be reported on; the message names the file and the reason."""


def check_source(path: str | os.PathLike) -> Dataset:
    """What ``read_source`` refuses that the header shows, without decoding the pixels; returns the header.

    Raises:
        DicomSourceError: not a DICOM file, or no Study, Series or SOP Instance UID.
        ImageLoadError: not a single-frame grey projection radiograph (CT, MR, SR, multi-frame ...).
    """
    path = Path(path)
    read_image_size(path)  # refuses by header what read_grey_image would refuse after decoding
    try:  # without force: a PNG or .npy is refused here, a DICOM without preamble still read
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as error:  # pydicom raises several kinds on non-DICOM bytes
        raise DicomSourceError(path, "not a DICOM file; DICOM output needs a DICOM input to take the study "
                                     f"from ({type(error).__name__})") from error
    _check_uids(path, header)
    return header


def _check_uids(path: Path, header: Dataset) -> None:
    for keyword, why in (("StudyInstanceUID", "the report cannot join its study"),
                         ("SeriesInstanceUID", "the report cannot reference the image's series"),
                         ("SOPInstanceUID", "the report cannot reference the image")):
        if not str(header.get(keyword, "")).strip():
            raise DicomSourceError(path, f"DICOM has no {keyword}; {why}")


def read_source(path: str | os.PathLike) -> tuple[Dataset, GreyImage]:
    """Read a radiograph DICOM: its header and its pixels as the model's loader decodes them.

    Args:
        path: a single-frame CR, DX or Secondary Capture DICOM file (MONOCHROME1/2, any Bits Stored 1-16).

    Returns:
        (header, grey): ``header`` is the pydicom Dataset without pixel data; ``grey`` is the
        :class:`custom.transforms.grey_image.GreyImage` (float32 (H, W) in [0, 1], bone bright).

    Raises:
        DicomSourceError: the file is not DICOM (e.g. a PNG), or lacks its Study, Series or SOP Instance UID.
        ImageLoadError: the object is not a single-frame projection radiograph (CT, MR, SR, multi-frame ...),
            naming what it is; or its pixels cannot be decoded.
    """
    path = Path(path)
    grey = read_grey_image(path)  # refuses CT/MR/SR/multi-frame by name, decodes MONOCHROME1/2 at any depth
    if grey.source_format != "dicom":
        raise DicomSourceError(path, f"not a DICOM file (read as {grey.source_format.upper()}); "
                                     "DICOM output needs a DICOM input to take the study from")
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    _check_uids(path, header)
    return header, grey


RESULT_KINDS = ("sr", "gsps", "sc")
MAX_UID_ROOT = 40  # characters: 24 digits of hash are left, about 80 bits


def result_uids(source_sop_instance_uid: str, version: str, kind: str,
                uid_prefix: str | None = None) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of one result object, the same on every run.

    Derived from (source SOP Instance UID, bundle version, object kind) under ``uid_prefix`` (a site's
    registered root ending in "."; pydicom's root when None), so a re-run, a restarted node or a second node
    writes the same UIDs and a PACS keeps one copy; a new bundle version writes new objects beside the old.

    Args:
        kind: one of ``RESULT_KINDS`` ("sr", "gsps", "sc").
    """
    if kind not in RESULT_KINDS:
        raise ValueError(f"kind must be one of {RESULT_KINDS}, got {kind!r}")
    if not str(source_sop_instance_uid).strip():
        raise ValueError("the source has no SOP Instance UID to derive result UIDs from")
    root = uid_prefix or PYDICOM_ROOT_UID
    if len(root) > MAX_UID_ROOT:
        raise ValueError(f"uid_prefix {root!r} is {len(root)} characters; at most {MAX_UID_ROOT} leave the hash "
                         "enough digits (a UID has 64) to keep results apart")
    # generate_uid hashes the concatenated sources: a separator keeps ("1.2.3", "10.3") apart from ("1.2.31", "0.3").
    source = "\x1f".join([BUNDLE_NAME, str(source_sop_instance_uid), str(version), kind])
    return (generate_uid(prefix=root, entropy_srcs=[source, "\x1fseries"]),
            generate_uid(prefix=root, entropy_srcs=[source, "\x1finstance"]))


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble, file meta) to ``path``; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
