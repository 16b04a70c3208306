"""A DICOM Secondary Capture of the radiograph with the findings drawn on it, in the radiograph's study.

The picture keeps the source's pixel grid (same rows and columns), so a box drawn at xyxy original pixels
lands where the SR's SCOORD says. Boxes, class names and probabilities are burned in (Burned In Annotation
YES).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import SecondaryCaptureImageStorage

from custom.dicom.sr import Finding
from custom.dicom.study import new_instance, new_uid, source_reference
from custom.labels import CLASS_INDEX

# One colour per class (RGB), distinct on a grey radiograph; indexed by the class index.
CLASS_COLOURS = (
    (255, 214, 0), (255, 64, 64), (0, 200, 255), (120, 255, 80), (255, 128, 0), (255, 0, 200),
    (160, 120, 255), (0, 255, 180), (255, 160, 160), (80, 160, 255), (200, 255, 0), (255, 255, 160),
    (0, 128, 255), (255, 96, 160),
)


def render_overlay(grey: np.ndarray, findings: Sequence[Finding]) -> np.ndarray:
    """Draw each finding's box and label on the radiograph.

    Args:
        grey: (H, W) float in [0, 1], bone bright (``GreyImage.array`` at full resolution), the pixel grid the
            boxes are in.
        findings: boxes xyxy in those pixels (findings without a box get a label line only).

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if grey.ndim != 2:
        raise ValueError(f"grey must be (H, W), got shape {grey.shape}")
    height, width = grey.shape
    rgb = np.repeat((np.clip(grey, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    # Line width and text size follow the image size so labels stay legible on a 3000-px film.
    line = max(2, round(min(height, width) / 300))
    text_size = max(12, round(min(height, width) / 45))
    font = _font(text_size)
    text = {"font": font, "stroke_width": max(1, text_size // 12)}  # black outline: legible on bone
    for finding in findings:
        if finding.box is not None:
            x0, y0, x1, y1 = (float(v) for v in finding.box)
            # xyxy continuous coordinates: the last covered pixel column is ceil(x1) - 1.
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=_colour(finding), width=line)
    taken: list[tuple[float, float, float, float]] = []
    for finding in findings:
        label = f"{finding.class_name} {finding.probability:.2f}" + ("" if finding.box else " (no box)")
        x, y = (float(finding.box[0]) + line, float(finding.box[1]) + line) if finding.box else (line, line)
        # Labels of boxes sharing a corner would overprint: move down until clear (bounded).
        for _ in range(len(taken) + 1):
            rect = draw.textbbox((x, y), label, **text)
            if not any(_overlap(rect, other) for other in taken):
                break
            y = rect[3] + line
        taken.append(draw.textbbox((x, y), label, **text))
        draw.text((x, y), label, fill=_colour(finding), stroke_fill=(0, 0, 0), **text)
    draw.text((line, height - line), "AI output, unverified - not for diagnosis", fill=(255, 255, 255),
              stroke_fill=(0, 0, 0), anchor="ld", **text)
    return np.asarray(image)


def _colour(finding: Finding) -> tuple[int, int, int]:
    return CLASS_COLOURS[CLASS_INDEX[finding.class_name] % len(CLASS_COLOURS)]


def _overlap(a, b) -> bool:
    """Whether two (x0, y0, x1, y1) rectangles intersect."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _font(size: int):
    """Pillow's built-in scalable font at ``size`` px (Pillow >= 10.1), else its bitmap default."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def build_overlay_sc(
    source: Dataset,
    rgb: np.ndarray,
    series_uid: str | None = None,
    series_number: int = 9002,
    uid_prefix: str | None = None,
) -> Dataset:
    """A Secondary Capture Image (RGB, 8 bits) of ``rgb`` in the source's study, in a new series.

    Args:
        source: the radiograph's header (StudyInstanceUID, SOPClassUID, SOPInstanceUID).
        rgb: (H, W, 3) uint8, normally :func:`render_overlay` on the source's pixel grid.
        series_uid / series_number: the new series (UID generated when None).
        uid_prefix: root for generated UIDs (pydicom's when None).

    Returns:
        The Dataset (SOP Class Secondary Capture Image Storage, Modality OT), with Source Image Sequence
        pointing at the radiograph; ready for ``custom.dicom.study.save``.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    series_uid = series_uid or new_uid(uid_prefix)
    ds = new_instance(source, SecondaryCaptureImageStorage, "OT", series_uid, series_number,
                      "RpSal overlay (AI, unverified)", uid_prefix)
    ds.ConversionType = "WSD"  # workstation: a derived picture made by software
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = source.get("PatientOrientation", "")
    # Laterality is type 2C (paired body parts only): copied with the body part when the source has them.
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    ds.BurnedInAnnotation = "YES"
    ds.DerivationDescription = "Radiograph with AI findings (boxes, class, probability) burned in"
    ds.SourceImageSequence = DicomSequence([source_reference(source)])
    # Same pixel grid as the source; spacing only when the source states a real one (some write 0\\0).
    spacings = (("PixelSpacing", "PixelSpacing"), ("ImagerPixelSpacing", "NominalScannedPixelSpacing"))
    for source_key, key in spacings:
        spacing = source.get(source_key)
        if spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing):
            setattr(ds, key, spacing)
            break
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    return ds
