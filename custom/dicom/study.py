"""Header plumbing shared by the DICOM objects this bundle writes: the source radiograph's patient and study
modules, new series and instance UIDs, and safe output file names.

Every object written here belongs to the SAME study as the radiograph it describes (same Study Instance UID,
Patient ID, Accession Number; the patient and study attributes are copied verbatim) and to a NEW series with
new Series and SOP Instance UIDs, so PACS files it next to the image it reports on.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from custom.transforms.grey_image import GreyImage, ImageLoadError, read_grey_image, read_image_size

BUNDLE_NAME = "chestxray14_rpsal_detection"
MANUFACTURER = "chestxray14_rpsal_detection (research use only)"

# Patient and General Study attributes copied from the source (type 2 ones are written empty when absent).
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
PATIENT_STUDY_OPTIONAL = (
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "StudyDescription",
    "IssuerOfAccessionNumberSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
)


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


def new_instance(source: Dataset, sop_class_uid: str, modality: str, series_uid: str, series_number: int,
                 series_description: str, uid_prefix: str | None = None) -> Dataset:
    """A new dataset in the source's study: patient/study modules copied, new series, new SOP instance.

    Args:
        source: the radiograph's header (pydicom Dataset).
        sop_class_uid: SOP Class of the new object (e.g. Comprehensive SR, Secondary Capture).
        modality: the new series' Modality ('SR', 'OT').
        series_uid / series_number / series_description: the new series.
        uid_prefix: root for the new SOP Instance UID (pydicom's when None).

    Returns:
        A Dataset with file meta (Explicit VR Little Endian), SOP Common, Patient, General Study, series and
        General Equipment attributes, and the content date and time (now, local).
    """
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = new_uid(uid_prefix)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "SpecificCharacterSet" in source:  # copied names must keep their encoding
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in PATIENT_STUDY_TYPE2:
        setattr(ds, keyword, source.get(keyword, ""))
    for keyword in PATIENT_STUDY_OPTIONAL:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    ds.StudyInstanceUID = source.StudyInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = BUNDLE_NAME
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.InstanceNumber = 1
    return ds


def new_uid(uid_prefix: str | None = None) -> str:
    """A fresh UID under ``uid_prefix`` (a registered root ending in "."), else under pydicom's root."""
    return generate_uid(prefix=uid_prefix) if uid_prefix else generate_uid()


def source_reference(source: Dataset) -> Dataset:
    """(ReferencedSOPClassUID, ReferencedSOPInstanceUID) item pointing at the source image."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble, file meta) to ``path``; return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
