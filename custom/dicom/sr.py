"""The model's findings on one radiograph as a TID 1500 Measurement Report in a Comprehensive SR (highdicom).

Content tree (``docs/dicom.md`` has it in full):

    CONTAINER (DCM 126000 "Imaging Measurement Report"), TID 1500
      HAS CONCEPT MOD  Language; HAS OBS CONTEXT  Observer Type = Device, Device Observer UID / Name ...
      HAS CONCEPT MOD  Procedure Reported = (SCT 413815006 "Chest imaging")
      CONTAINS  Image Library -> the radiograph
      CONTAINS  Imaging Measurements, per positive class one Measurement Group:
          with a box:    TID 1410 Planar ROI: Tracking Identifier + UID, Finding = the class's code,
                         Algorithm Name / Version, Image Region = SCOORD POLYLINE (closed rectangle, the box
                         in the SOURCE image's pixels) SELECTED FROM the radiograph,
                         NUM Probability (DCM 122157, UCUM "1")
          without a box: TID 1501 (no region), the same items otherwise
          no positive class: one TID 1501 group, Finding = (DCM 111286 "No abnormality"), no measurement

Coordinates: DICOM image coordinates of the source, (column, row), (0, 0) the top-left corner of the top-left
pixel: the project's xyxy boxes in original pixels, unchanged. Codes: ``custom.dicom.codes``. UIDs:
``custom.dicom.study.result_uids`` (deterministic). VerificationFlag UNVERIFIED, CompletionFlag COMPLETE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from custom.dicom.codes import class_of_code, finding_code, private_scheme_item
from custom.dicom.study import BUNDLE_NAME, MANUFACTURER, UNVERIFIED, result_uids
from custom.labels import CLASS_INDEX, CLASS_NAMES

ALGORITHM_NAME = "RpSal (Hermoza et al., MICCAI 2020)"
# This algorithm as an observer device: the same UID on every run and machine.
DEVICE_OBSERVER_UID = hd.UID.from_uuid("6a0f3c1e-2b7d-4c59-9e41-8d2f5a7b3c10")
SR_SERIES_NUMBER = 9001
# The one group of a report with no positive class (TID 1500 needs one): DCM 111286 "No abnormality".
NO_FINDING = codes.DCM.NoAbnormality


@dataclass(frozen=True)
class Finding:
    """One positive class on one radiograph.

    ``class_name``: one of ``custom.labels.CLASS_NAMES``. ``probability``: in [0, 1].
    ``box``: (x0, y0, x1, y1) float xyxy in the SOURCE image's pixels (origin top-left, x1 = x0 + w), or
    None when the class is positive but its map gave no box.
    """

    class_name: str
    probability: float
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self):
        if self.class_name not in CLASS_INDEX:
            raise ValueError(f"unknown class {self.class_name!r}; expected one of {CLASS_NAMES}")
        if not (0.0 <= float(self.probability) <= 1.0):
            raise ValueError(f"probability of {self.class_name} must be in [0, 1], got {self.probability}")
        if self.box is not None:
            if len(self.box) != 4 or not all(math.isfinite(float(v)) for v in self.box):
                raise ValueError(f"box of {self.class_name} must be 4 finite numbers xyxy, got {self.box}")
            x0, y0, x1, y1 = (float(v) for v in self.box)
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"box of {self.class_name} must have x1 > x0 and y1 > y0, got {self.box}")


def box_polyline(box: Sequence[float]) -> np.ndarray:
    """(5, 2) closed rectangle (x, y) of an xyxy box: first point repeated last."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def _measurement_group(finding: Finding, source: Dataset, algorithm: hd.sr.AlgorithmIdentification,
                       tracking_uid: str):
    probability = hd.sr.Measurement(name=codes.DCM.Probability, value=float(finding.probability),
                                    unit=codes.UCUM.NoUnits, algorithm_id=algorithm)
    common = {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"{finding.class_name} finding"),
        "finding_type": finding_code(finding.class_name),
        "algorithm_id": algorithm,
        "measurements": [probability],
    }
    if finding.box is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=box_polyline(finding.box),
        source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def build_findings_sr(source: Dataset, findings: Sequence[Finding], algorithm_version: str = "unknown",
                      uid_prefix: str | None = None) -> hd.sr.ComprehensiveSR:
    """The TID 1500 Comprehensive SR of ``findings`` on the radiograph ``source``, in its study, in a new series.

    Args:
        source: the radiograph's header (patient and study modules, Study/Series/SOP Instance UIDs, SOP Class).
        findings: one :class:`Finding` per positive class (each class at most once); may be empty (the report
            then holds one "No abnormality" group).
        algorithm_version: the bundle version (metadata.json), written as Algorithm Version; part of the UIDs.
        uid_prefix: the site's UID root (pydicom's when None).

    Returns:
        A highdicom ComprehensiveSR (a pydicom Dataset), for ``custom.dicom.study.save``.
    """
    names = [f.class_name for f in findings]
    if len(set(names)) != len(names):
        raise ValueError(f"each class may be reported once, got {names}")
    version = str(algorithm_version)
    series_uid, instance_uid = result_uids(source.SOPInstanceUID, version, "sr", uid_prefix)
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=version)
    groups = [
        _measurement_group(f, source, algorithm, tracking_uid=result_uids(
            source.SOPInstanceUID, f"{version}/{f.class_name}", "sr", uid_prefix)[1])
        for f in sorted(findings, key=lambda f: CLASS_INDEX[f.class_name])
    ]
    if not groups:  # TID 1500 needs one group: a negative image reports "No abnormality" among its classes
        groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=result_uids(source.SOPInstanceUID, f"{version}/none", "sr", uid_prefix)[1],
                identifier="no class above its threshold"),
            finding_type=NO_FINDING, algorithm_id=algorithm)]
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID, name=BUNDLE_NAME, manufacturer_name=MANUFACTURER, model_name=BUNDLE_NAME))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ChestImaging, imaging_measurements=groups,
        # The Image Library entry describes the image by its orientation and imager spacing; highdicom needs
        # both, and a film digitised without them is left out of the library (the regions still reference it).
        referenced_images=[source] if _library_describable(source) else None)
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        series_description=f"RpSal findings ({UNVERIFIED})", coding_schemes=[private_scheme_item()],
        manufacturer_model_name=BUNDLE_NAME, software_versions=version)


def _library_describable(source: Dataset) -> bool:
    orientation, spacing = source.get("PatientOrientation"), source.get("ImagerPixelSpacing")
    return (orientation is not None and len(orientation) == 2 and all(str(v) for v in orientation)
            and spacing is not None and len(spacing) == 2)


def read_findings_sr(sr: Dataset) -> list[Finding]:
    """The findings of an SR written by :func:`build_findings_sr`, parsed by highdicom, in class order.

    Raises ValueError when the dataset is not such an SR (not TID 1500, a group without probability, an
    unknown finding code).
    """
    if not (isinstance(sr, hd.sr.ComprehensiveSR) and isinstance(sr.content, hd.sr.MeasurementReport)):
        sr = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True)  # parses the content tree as a template
    if sr.ContentTemplateSequence[0].TemplateIdentifier != "1500":
        raise ValueError("not a TID 1500 Measurement Report")
    report = sr.content
    groups = [*report.get_planar_roi_measurement_groups(), *report.get_image_measurement_groups()]
    findings = []
    for group in groups:
        finding_type = group.finding_type
        if (finding_type.value, finding_type.scheme_designator) == (NO_FINDING.value, NO_FINDING.scheme_designator):
            continue
        class_name = class_of_code(finding_type.value, finding_type.scheme_designator)
        probabilities = group.get_measurements(name=codes.DCM.Probability)
        if len(probabilities) != 1:
            raise ValueError(f"the {class_name} group has {len(probabilities)} probabilities, expected 1")
        box = None
        roi = getattr(group, "roi", None)
        if roi is not None:
            points = np.asarray(roi.value, dtype=np.float64).reshape(-1, 2)
            box = (float(points[:, 0].min()), float(points[:, 1].min()),
                   float(points[:, 0].max()), float(points[:, 1].max()))
        findings.append(Finding(class_name, float(probabilities[0].value), box))
    return sorted(findings, key=lambda f: CLASS_INDEX[f.class_name])
