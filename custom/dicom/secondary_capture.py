"""A DICOM Secondary Capture of the radiograph with the findings drawn on it, in the radiograph's study.

The picture keeps the source's pixel grid (same rows and columns), so a box drawn at xyxy original pixels
lands where the SR's SCOORD says. Boxes, class names and probabilities are burned in (Burned In Annotation
YES).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import highdicom as hd
from pydicom.dataset import Dataset

from custom.dicom.sr import Finding
from custom.dicom.study import BUNDLE_NAME, MANUFACTURER, UNVERIFIED, result_uids
from custom.labels import CLASS_INDEX

SC_SERIES_NUMBER = 9003

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


def build_overlay_sc(source: Dataset, rgb: np.ndarray, algorithm_version: str = "unknown",
                     uid_prefix: str | None = None) -> hd.sc.SCImage:
    """A Secondary Capture Image (RGB, 8 bits) of ``rgb`` in the source's study, in a new series (highdicom).

    Args:
        source: the radiograph's header (patient and study modules, UIDs, PixelSpacing when stated).
        rgb: (H, W, 3) uint8, normally :func:`render_overlay` on the source's pixel grid.
        algorithm_version: the bundle version (Software Versions; part of the UIDs).
        uid_prefix: the site's UID root (pydicom's when None).

    Returns:
        A highdicom SCImage (Burned In Annotation YES), for ``custom.dicom.study.save``.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    series_uid, instance_uid = result_uids(source.SOPInstanceUID, algorithm_version, "sc", uid_prefix)
    picture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT, series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER, sop_instance_uid=instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, pixel_spacing=_pixel_spacing(source),
        patient_orientation=_patient_orientation(source),
        series_description=f"RpSal overlay ({UNVERIFIED})", manufacturer_model_name=BUNDLE_NAME,
        software_versions=str(algorithm_version))
    # The one attribute highdicom's SCImage takes no argument for: the labels are burnt into the pixels, which
    # de-identification and display software must know (General Image module, type 3).
    picture.BurnedInAnnotation = "YES"
    return picture


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    """The source's stated spacing (PixelSpacing, else ImagerPixelSpacing), None when absent or 0\\0."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = source.get(keyword)
        if spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing):
            return (float(spacing[0]), float(spacing[1]))
    return None


def _patient_orientation(source: Dataset) -> tuple[str, str]:
    """The source's Patient Orientation (two directions), else that of a PA chest film (left, foot)."""
    orientation = source.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2 and all(str(v) for v in orientation):
        return (str(orientation[0]), str(orientation[1]))
    return ("L", "F")
