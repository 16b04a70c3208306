"""Wrap ChestX-ray14 PNGs as DICOM CR images, to feed a PACS and the DICOM node in a demo or a test.

Usage::

    python scripts/png_to_dicom.py tests/data/nih_sample/images/00000147_001.png ... --out_dir runs/wrapped \\
        [--labels tests/data/nih_sample/Data_Entry_2017_v2020.csv]

Each PNG becomes ``<stem>.dcm``: Computed Radiography Image Storage, MONOCHROME2, 8 bits (the PNG's grey
levels unchanged; an RGBA or 16-bit PNG goes through the bundle's own loader first), Explicit VR Little Endian.
The NIH file name ``<patient>_<follow-up>.png`` gives Patient ID and Accession Number; with ``--labels`` the
patient's age, sex and the view position come from the NIH label file. Study, series and instance UIDs are
derived from the file name, so wrapping twice gives the same objects (a PACS keeps one copy). These are INPUTS
made for testing (a PACS normally receives images from a modality); the bundle's results are made with
highdicom (``custom.dicom``).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

WRAPPER = "chestxray14_rpsal_detection png_to_dicom"


def _nih_row(labels: str | Path | None, name: str) -> dict:
    if labels is None:
        return {}
    with open(labels, newline="", encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            if row.get("Image Index") == name:
                return row
    return {}


def wrap_png(png: str | Path, labels: str | Path | None = None) -> Dataset:
    """One PNG as a CR Dataset (with file meta), UIDs derived from the file name."""
    from custom.transforms.grey_image import read_grey_image

    png = Path(png)
    grey = read_grey_image(png)  # refuses what is not a radiograph PNG, naming the file
    pixels = np.clip(np.rint(grey.array * 255.0), 0, 255).astype(np.uint8)
    patient, _, follow_up = png.stem.partition("_")
    row = _nih_row(labels, png.name)
    uid = lambda part: generate_uid(entropy_srcs=[WRAPPER, png.name, part])  # noqa: E731

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid("instance")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.PatientName = f"NIH^{patient}"
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = {"M": "M", "F": "F"}.get(row.get("Patient Gender", ""), "")
    if row.get("Patient Age", "").isdigit():
        ds.PatientAge = f"{int(row['Patient Age']):03d}Y"
    ds.AccessionNumber = png.stem[:16]
    ds.StudyID = follow_up[:16]
    ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Chest radiograph (NIH ChestX-ray14, wrapped PNG)"
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = row.get("View Position", "")
    ds.PatientOrientation = ["L", "F"] if ds.ViewPosition == "PA" else ["R", "F"] if ds.ViewPosition == "AP" else ""
    ds.Manufacturer = WRAPPER
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def main(*pngs: str, out_dir: str = "runs/wrapped", labels: str | None = None) -> None:
    """Write ``<out_dir>/<stem>.dcm`` for each PNG; prints the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not pngs:
        raise ValueError("give one or more PNG files")
    for png in pngs:
        path = out / f"{Path(png).stem}.dcm"
        wrap_png(png, labels).save_as(path, enforce_file_format=True)
        print(path)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
