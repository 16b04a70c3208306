"""DICOM output for hospitals: the model's findings on a CR/DX radiograph, written back into its study.

- ``study.py``: reading the source radiograph (reusing ``custom.transforms.read_grey_image``, which decodes
  MONOCHROME1/2 at any bit depth and refuses CT, MR, SR and multi-frame objects by name), copying its patient
  and study attributes, new series/instance UIDs.
- ``sr.py``: ``Finding`` (class, probability, box xyxy in source pixels) and the Comprehensive SR
  (``build_findings_sr``; ``read_findings_sr`` reads it back).
- ``secondary_capture.py``: the overlay picture (``render_overlay``) as a Secondary Capture
  (``build_overlay_sc``).
- ``writers.py``: the DICOM run as parts of the declared inference workflow: ``RequireDicomSourced`` (a
  preprocessing check) and ``DicomResultsWriter`` (SR + overlay per image, a writer handler); the bundle
  config is ``configs/inference_dicom.yaml``, the CLI ``scripts/dicom_infer.py``.

Nothing here imports MONAI Label.
"""

from custom.dicom.secondary_capture import build_overlay_sc, render_overlay
from custom.dicom.sr import Finding, build_findings_sr, read_findings_sr
from custom.dicom.study import DicomSourceError, check_source, read_source

__all__ = [
    "DicomSourceError",
    "check_source",
    "Finding",
    "build_findings_sr",
    "build_overlay_sc",
    "read_findings_sr",
    "read_source",
    "render_overlay",
]
