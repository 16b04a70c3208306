"""A DICOM Comprehensive SR of the model's findings on one radiograph, in the radiograph's study.

Content tree (codes from DCM/LOINC/SNOMED via ``pydicom.sr.codedict``; the 14 disease classes in a private
scheme ``99CXR14`` declared in the Coding Scheme Identification Sequence, code value = class index 00-13,
meaning = the class name of ``custom.labels.CLASS_NAMES``):

    CONTAINER (LN 18748-4 "Diagnostic imaging report"), SEPARATE
      HAS OBS CONTEXT  CODE    (DCM 121005 "Observer Type") = (DCM 121007 "Device")
      HAS OBS CONTEXT  UIDREF  (DCM 121012 "Device Observer UID")
      HAS OBS CONTEXT  TEXT    (DCM 121013 "Device Observer Name") = chestxray14_rpsal_detection
      CONTAINS         TEXT    (DCM 111001 "Algorithm Name"), TEXT (DCM 111003 "Algorithm Version")
      CONTAINS         IMAGE   (SCT 260753009 "Source") -> the radiograph
      CONTAINS         CONTAINER (DCM 125007 "Measurement Group"), one per positive class:
          CONTAINS  CODE   (DCM 121071 "Finding") = (NN, 99CXR14, class name)
          CONTAINS  NUM    (DCM 122157 "Probability"), unit (UCUM "1" "no units"), value in [0, 1]
          CONTAINS  SCOORD (DCM 111030 "Image Region"), POLYLINE, the box as a closed 5-point rectangle
              SELECTED FROM  IMAGE -> the radiograph
      CONTAINS         TEXT    (DCM 121111 "Summary"): every class's probability, in words

SCOORD coordinates are DICOM image coordinates of the SOURCE radiograph: (column, row) pairs, (0, 0) the
top-left corner of the top-left pixel — the same convention as this project's xyxy boxes in original pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from custom.dicom.study import BUNDLE_NAME, new_instance, new_uid, source_reference
from custom.labels import CLASS_INDEX, CLASS_NAMES

CLASS_SCHEME = "99CXR14"
CLASS_SCHEME_NAME = "NIH ChestX-ray14 labels (chestxray14_rpsal_detection)"
# A fixed UID for this algorithm as an observer device: the same on every run and every machine.
DEVICE_OBSERVER_UID = generate_uid(entropy_srcs=[BUNDLE_NAME, "device-observer"])


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


def class_code(class_name: str) -> Dataset:
    """The coded concept of a disease class in the private scheme (value = 2-digit index)."""
    return _code(f"{CLASS_INDEX[class_name]:02d}", CLASS_SCHEME, class_name)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _concept(code) -> DicomSequence:
    """ConceptNameCodeSequence / ConceptCodeSequence of one pydicom ``Code``."""
    return DicomSequence([_code(code.value, code.scheme_designator, code.meaning)])


def _item(relationship: str | None, value_type: str, concept=None) -> Dataset:
    item = Dataset()
    if relationship is not None:
        item.RelationshipType = relationship
    item.ValueType = value_type
    if concept is not None:
        item.ConceptNameCodeSequence = _concept(concept)
    return item


def _text(relationship: str, concept, text: str) -> Dataset:
    item = _item(relationship, "TEXT", concept)
    item.TextValue = text
    return item


def _image(relationship: str, concept, source: Dataset) -> Dataset:
    item = _item(relationship, "IMAGE", concept)
    item.ReferencedSOPSequence = DicomSequence([source_reference(source)])
    return item


def _number(value: float) -> str:
    """A DS string (at most 16 characters) of ``value``."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def _finding_group(finding: Finding, source: Dataset) -> Dataset:
    group = _item("CONTAINS", "CONTAINER", codes.DCM.MeasurementGroup)
    group.ContinuityOfContent = "SEPARATE"
    children = []
    code = _item("CONTAINS", "CODE", codes.DCM.Finding)
    code.ConceptCodeSequence = DicomSequence([class_code(finding.class_name)])
    children.append(code)
    num = _item("CONTAINS", "NUM", codes.DCM.Probability)
    measured = Dataset()
    measured.NumericValue = _number(float(finding.probability))
    measured.FloatingPointValue = float(finding.probability)
    measured.MeasurementUnitsCodeSequence = _concept(codes.UCUM.NoUnits)
    num.MeasuredValueSequence = DicomSequence([measured])
    children.append(num)
    if finding.box is not None:
        x0, y0, x1, y1 = (float(v) for v in finding.box)
        region = _item("CONTAINS", "SCOORD", codes.DCM.ImageRegion)
        region.GraphicType = "POLYLINE"
        # A closed polyline: first point repeated last. SCOORD pairs are (column, row) = (x, y).
        region.GraphicData = [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0]
        region.ContentSequence = DicomSequence([_image("SELECTED FROM", None, source)])
        children.append(region)
    group.ContentSequence = DicomSequence(children)
    return group


def summary_text(findings: Sequence[Finding], probabilities: Sequence[float] | None) -> str:
    """Plain-language summary: positive classes with probability and box, then all 14 probabilities."""
    if findings:
        lines = ["Positive findings (model output, unverified):"]
        for f in findings:
            where = "no box"
            if f.box:
                where = "box x0 y0 x1 y1 = " + " ".join(f"{v:.1f}" for v in f.box) + " px"
            lines.append(f"- {f.class_name}: probability {f.probability:.3f}, {where}")
    else:
        lines = ["No class above its decision threshold (model output, unverified)."]
    if probabilities is not None:
        pairs = (f"{name} {p:.3f}" for name, p in zip(CLASS_NAMES, probabilities))
        lines.append("Probabilities: " + ", ".join(pairs))
    return "\n".join(lines)


def build_findings_sr(
    source: Dataset,
    findings: Sequence[Finding],
    probabilities: Sequence[float] | None = None,
    algorithm_version: str = "unknown",
    series_uid: str | None = None,
    series_number: int = 9001,
    uid_prefix: str | None = None,
) -> Dataset:
    """A Comprehensive SR of ``findings`` on the radiograph ``source``, in its study, in a new series.

    Args:
        source: the radiograph's header (needs Study/Series/SOP Instance UIDs and SOPClassUID).
        findings: one :class:`Finding` per positive class (each class at most once); may be empty.
        probabilities: optional (14,) probabilities of all classes, in CLASS_NAMES order, for the summary.
        algorithm_version: the bundle version (from metadata.json), written as Algorithm Version.
        series_uid: the new series' UID (generated when None); series_number: its number.
        uid_prefix: root for generated UIDs (pydicom's when None).

    Returns:
        The SR Dataset (SOP Class Comprehensive SR Storage, Modality SR), for ``custom.dicom.study.save``.
    """
    names = [f.class_name for f in findings]
    if len(set(names)) != len(names):
        raise ValueError(f"each class may be reported once, got {names}")
    if probabilities is not None and len(probabilities) != len(CLASS_NAMES):
        raise ValueError(f"probabilities must have {len(CLASS_NAMES)} values, got {len(probabilities)}")
    series_uid = series_uid or new_uid(uid_prefix)
    ds = new_instance(source, ComprehensiveSRStorage, "SR", series_uid, series_number,
                      "RpSal findings (AI, unverified)", uid_prefix)
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.PerformedProcedureCodeSequence = DicomSequence()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([_evidence(source)])
    scheme = Dataset()
    scheme.CodingSchemeDesignator = CLASS_SCHEME
    scheme.CodingSchemeName = CLASS_SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = BUNDLE_NAME
    ds.CodingSchemeIdentificationSequence = DicomSequence([scheme])

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = _concept(codes.LN.DiagnosticImagingReport)
    ds.ContinuityOfContent = "SEPARATE"
    observer = _item("HAS OBS CONTEXT", "CODE", codes.DCM.ObserverType)
    observer.ConceptCodeSequence = _concept(codes.DCM.Device)
    device_uid = _item("HAS OBS CONTEXT", "UIDREF", codes.DCM.DeviceObserverUID)
    device_uid.UID = DEVICE_OBSERVER_UID
    content = [
        observer,
        device_uid,
        _text("HAS OBS CONTEXT", codes.DCM.DeviceObserverName, BUNDLE_NAME),
        _text("CONTAINS", codes.DCM.AlgorithmName, "RpSal (Hermoza et al., MICCAI 2020)"),
        _text("CONTAINS", codes.DCM.AlgorithmVersion, str(algorithm_version)),
        _image("CONTAINS", codes.SCT.Source, source),
        *(_finding_group(f, source) for f in findings),
        _text("CONTAINS", codes.DCM.Summary, summary_text(findings, probabilities)),
    ]
    ds.ContentSequence = DicomSequence(content)
    return ds


def _evidence(source: Dataset) -> Dataset:
    """One study's item of the Current Requested Procedure Evidence Sequence: the source image."""
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence = DicomSequence([source_reference(source)])
    study = Dataset()
    study.StudyInstanceUID = source.StudyInstanceUID
    study.ReferencedSeriesSequence = DicomSequence([series])
    return study


def read_findings_sr(ds: Dataset) -> list[Finding]:
    """The findings of an SR written by :func:`build_findings_sr` (class, probability, box), in order.

    Raises ValueError when the dataset is not such an SR (wrong SOP class, unknown class code).
    """
    if str(ds.SOPClassUID) != ComprehensiveSRStorage:
        raise ValueError(f"not a Comprehensive SR (SOP Class {ds.SOPClassUID})")
    findings = []
    for group in ds.ContentSequence:
        if group.ValueType != "CONTAINER":
            continue
        name, probability, box = None, None, None
        for child in group.ContentSequence:
            concept = child.ConceptNameCodeSequence[0].CodeValue
            if child.ValueType == "CODE" and concept == codes.DCM.Finding.value:
                code = child.ConceptCodeSequence[0]
                if code.CodingSchemeDesignator != CLASS_SCHEME:
                    raise ValueError(f"finding coded in {code.CodingSchemeDesignator}, not {CLASS_SCHEME}")
                name = CLASS_NAMES[int(code.CodeValue)]
            elif child.ValueType == "NUM" and concept == codes.DCM.Probability.value:
                probability = float(child.MeasuredValueSequence[0].NumericValue)
            elif child.ValueType == "SCOORD" and concept == codes.DCM.ImageRegion.value:
                points = [float(v) for v in child.GraphicData]
                xs, ys = points[0::2], points[1::2]
                box = (min(xs), min(ys), max(xs), max(ys))
        findings.append(Finding(name, probability, box))
    return findings
