"""DICOM in, DICOM out, as parts of the declared inference workflow (``bundle/configs/inference_dicom.yaml``).

- ``RequireDicomSourced``: a preprocessing step put before the bundle's own, refusing an input that is not a
  DICOM projection radiograph with its study UIDs (CT, MR, SR, multi-frame, a PNG ...) before the model runs;
  the evaluator lists it in errors.txt and goes on.
- ``DicomResultsWriter``: a writer (Ignite handler, as ``custom.inference.writers``) that turns each image's
  findings document into ``<name>_sr.dcm`` (Comprehensive SR, ``custom.dicom.sr``) and ``<name>_overlay.dcm``
  (Secondary Capture with the boxes burnt in, ``custom.dicom.secondary_capture``), both in the radiograph's
  study (same Study Instance UID, Patient ID, Accession Number) in two new series with new UIDs. ``<name>``
  comes from the input FILE name (``custom.inference.inputs.safe_stem``), never from DICOM tag values.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

from ignite.engine import Engine
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.dicom.secondary_capture import build_overlay_sc, render_overlay
from custom.dicom.sr import Finding, build_findings_sr
from custom.dicom.study import check_source, new_uid, read_source, save
from custom.inference.writers import ItemWriter, output_path
from custom.labels import CLASS_INDEX, CLASS_NAMES


def findings_from_document(document: Mapping) -> tuple[list[Finding], list[float]]:
    """The SR's findings and the 14 probabilities from one findings document.

    Returns:
        (findings, probabilities): one Finding per positive class in CLASS_NAMES order (box None for a positive
        class whose map gave no box); probabilities (14,) in CLASS_NAMES order.
    """
    probabilities = document["probabilities"]
    missing = [name for name in CLASS_NAMES if name not in probabilities]
    if missing:
        raise ValueError(f"the findings lack the probabilities of {missing}")
    findings = [Finding(f["class"], float(f["probability"]), tuple(float(v) for v in f["box"]))
                for f in document.get("findings", [])]
    findings += [Finding(name, float(probabilities[name]), None) for name in document.get("positive_without_box", [])]
    findings.sort(key=lambda finding: CLASS_INDEX[finding.class_name])
    return findings, [float(probabilities[name]) for name in CLASS_NAMES]


class RequireDicomSourced(MapTransform):
    """Refuse, naming the file and the reason, an input that DICOM output cannot be made for.

    Raises ``DicomSourceError`` / ``ImageLoadError`` (ValueErrors) from ``custom.dicom.study.check_source``
    (the header only; the bundle's loader decodes the pixels next): not DICOM, not a single-frame CR / DX /
    Secondary Capture, or without its study, series or instance UID. The data dict passes unchanged otherwise.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        for key in self.key_iterator(data):
            check_source(data[key])
        return data


class DicomResultsWriter(ItemWriter):
    """``<name>_sr.dcm`` and ``<name>_overlay.dcm`` per image, into the radiograph's study.

    Args:
        output_dir: the run's folder.
        version: the bundle version, written as the SR's Algorithm Version.
        uid_prefix: UID root of the new series and instances (pydicom's when None); a site sets its own.
    """

    def __init__(self, output_dir: str | os.PathLike, version: str = "unknown", uid_prefix: str | None = None,
                 findings_key: str = "findings") -> None:
        super().__init__(output_dir, findings_key)
        self.version = str(version)
        self.uid_prefix = uid_prefix

    def write(self, item: dict, output: dict, engine: Engine) -> None:
        document = output[self.findings_key]
        header, grey = read_source(document["image"])
        if list(grey.original_size) != document["original_size"]:
            raise RuntimeError(f"{document['image']}: preprocessing read {document['original_size']}, "
                               f"the DICOM is {list(grey.original_size)}")
        findings, probabilities = findings_from_document(document)
        sr = build_findings_sr(header, findings, probabilities, self.version,
                               series_uid=new_uid(self.uid_prefix), uid_prefix=self.uid_prefix)
        overlay = build_overlay_sc(header, render_overlay(grey.array, findings),
                                   series_uid=new_uid(self.uid_prefix), uid_prefix=self.uid_prefix)
        sr_path = save(sr, output_path(self.output_dir, item["output_name"], "_sr.dcm"))
        overlay_path = save(overlay, output_path(self.output_dir, item["output_name"], "_overlay.dcm"))
        document["files"]["sr"] = sr_path.name
        document["files"]["overlay_dicom"] = overlay_path.name
