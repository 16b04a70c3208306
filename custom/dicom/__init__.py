"""DICOM output for hospitals: the model's findings on a CR/DX radiograph, written back into its study through
highdicom, and a DICOM node that exchanges them with a PACS.

- ``study.py``: reading and checking the source radiograph (reusing ``custom.transforms.read_grey_image``:
  MONOCHROME1/2 at any bit depth, the compressed transfer syntaxes through pydicom's decoder plugins; CT, MR,
  SR and multi-frame objects refused by name), and the results' deterministic UIDs (``result_uids``).
- ``codes.py``: the finding codes (SNOMED CT where the DICOM standard's tables hold the class, else private).
- ``sr.py``: ``Finding``; the TID 1500 Comprehensive SR (``build_findings_sr``; ``read_findings_sr``).
- ``presentation_state.py``: the boxes and labels as a GSPS over the original image (``build_findings_gsps``).
- ``secondary_capture.py``: the burnt-in overlay picture (``render_overlay``) as a Secondary Capture.
- ``writers.py``: the DICOM run as parts of the declared inference workflow (``RequireDicomSourced``,
  ``DicomResultsWriter``, ``results_for_document``); the bundle config is ``configs/inference_dicom.yaml``.
- ``node_queue.py``, ``transport.py``, ``node.py``: the DICOM node (``scripts/dicom_node.py``).

Nothing here imports MONAI Label.
"""

from custom.dicom.presentation_state import build_findings_gsps
from custom.dicom.secondary_capture import build_overlay_sc, render_overlay
from custom.dicom.sr import Finding, build_findings_sr, read_findings_sr
from custom.dicom.study import DicomSourceError, check_source, read_source, result_uids

__all__ = [
    "DicomSourceError",
    "Finding",
    "build_findings_gsps",
    "build_findings_sr",
    "build_overlay_sc",
    "check_source",
    "read_findings_sr",
    "read_source",
    "render_overlay",
    "result_uids",
]
