"""The findings as a Grayscale Softcopy Presentation State over the original radiograph (highdicom).

A viewer that opens the GSPS shows the ORIGINAL pixels with, on one graphic layer, each positive class's box
(a closed POLYLINE in the image's pixels) and a text label "<class> <probability>" at its top-left corner; a
positive class without a box gets its label in the top-left corner of the image. The radiograph itself is not
copied or changed (unlike the burnt-in Secondary Capture, which ``inference_dicom.yaml`` keeps as an option).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from custom.dicom.sr import Finding, box_polyline
from custom.dicom.study import BUNDLE_NAME, MANUFACTURER, UNVERIFIED, result_uids
from custom.labels import CLASS_INDEX

GSPS_SERIES_NUMBER = 9002
LAYER = "RPSAL_FINDINGS"
# The layer's colour, CIELab: a saturated yellow, visible on grey film whatever the window.
LAYER_COLOUR = hd.color.CIELabColor(97.0, -21.0, 94.0)


def build_findings_gsps(source: Dataset, findings: Sequence[Finding], algorithm_version: str = "unknown",
                        uid_prefix: str | None = None) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS drawing ``findings`` over ``source``, in its study, in a new series.

    Args:
        source: the radiograph's header (Rows, Columns, photometric interpretation, patient/study modules).
        findings: boxes xyxy in the source's pixels (or None).
        algorithm_version: the bundle version (Software Versions; part of the UIDs).
        uid_prefix: the site's UID root (pydicom's when None).
    """
    series_uid, instance_uid = result_uids(source.SOPInstanceUID, algorithm_version, "gsps", uid_prefix)
    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1, description=f"RpSal findings, {UNVERIFIED}",
                               display_color=LAYER_COLOUR)
    graphics, texts = [], []
    unboxed_row = 0.0
    for finding in sorted(findings, key=lambda f: CLASS_INDEX[f.class_name]):
        label = f"{finding.class_name} {finding.probability:.2f}"
        if finding.box is not None:
            graphics.append(hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                                                graphic_data=box_polyline(finding.box),
                                                units=hd.pr.AnnotationUnitsValues.PIXEL))
            anchor = (float(finding.box[0]), float(finding.box[1]))
        else:  # no box: the label alone, stacked in the image's top-left corner
            label += " (no box)"
            unboxed_row += max(16.0, float(source.Rows) / 40.0)
            anchor = (8.0, unboxed_row)
        texts.append(hd.pr.TextObject(text_value=label, units=hd.pr.AnnotationUnitsValues.PIXEL,
                                      anchor_point=anchor, anchor_point_visible=False,
                                      text_justification=hd.pr.TextJustificationValues.LEFT))
    annotations = []
    if graphics or texts:
        annotations.append(hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                                   graphic_objects=graphics or None, text_objects=texts or None))
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source], series_instance_uid=series_uid, series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=instance_uid, instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=BUNDLE_NAME, software_versions=str(algorithm_version),
        device_serial_number=str(algorithm_version), content_label="RPSAL_AI",
        content_description=f"RpSal findings ({UNVERIFIED})", graphic_annotations=annotations or None,
        graphic_layers=[layer], series_description=f"RpSal findings on the image ({UNVERIFIED})",
        # MONOCHROME1 stores bone dark: INVERSE shows it bone bright, as the modality meant it to be seen.
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
            if source.get("PhotometricInterpretation") == "MONOCHROME1" else hd.PresentationLUTShapeValues.IDENTITY))
