"""DICOM in, DICOM out, as parts of the declared inference workflow (``bundle/configs/inference_dicom.yaml``).

- ``RequireDicomSourced``: a preprocessing step put before the bundle's own, refusing an input that is not a
  DICOM projection radiograph with its study UIDs (CT, MR, SR, multi-frame, a PNG ...) before the model runs;
  the evaluator lists it in errors.txt and goes on.
- ``DicomResultsWriter``: a writer (Ignite handler, as ``custom.inference.writers``) that turns each image's
  findings document into ``<name>_sr.dcm`` (TID 1500 Comprehensive SR, ``custom.dicom.sr``),
  ``<name>_gsps.dcm`` (the boxes over the original image, ``custom.dicom.presentation_state``) and, as an
  option, ``<name>_overlay.dcm`` (Secondary Capture with the boxes burnt in), all in the radiograph's study in
  new series with UIDs derived from the source (a re-run writes the same UIDs). ``<name>`` comes from the
  input FILE name (``custom.inference.inputs.safe_stem``), never from DICOM tag values.
- ``results_for_document``: the same objects in memory, for the DICOM node.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

from ignite.engine import Engine
from monai.config import KeysCollection
from monai.transforms import MapTransform
from pydicom.dataset import Dataset

from custom.arguments import require_booleans
from custom.dicom.presentation_state import build_findings_gsps
from custom.dicom.secondary_capture import build_overlay_sc, render_overlay
from custom.dicom.sr import Finding, build_findings_sr
from custom.dicom.study import check_source, read_source, save
from custom.inference.writers import ItemWriter, output_path
from custom.labels import CLASS_INDEX, CLASS_NAMES


def findings_from_document(document: Mapping) -> list[Finding]:
    """The SR's findings from one findings document: one Finding per positive class in CLASS_NAMES order (box
    None for a positive class whose map gave no box). ValueError when a class's probability is missing."""
    probabilities = document["probabilities"]
    missing = [name for name in CLASS_NAMES if name not in probabilities]
    if missing:
        raise ValueError(f"the findings lack the probabilities of {missing}")
    findings = [Finding(f["class"], float(f["probability"]), tuple(float(v) for v in f["box"]))
                for f in document.get("findings", [])]
    findings += [Finding(name, float(probabilities[name]), None) for name in document.get("positive_without_box", [])]
    findings.sort(key=lambda finding: CLASS_INDEX[finding.class_name])
    return findings


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


def results_for_document(document: Mapping, version: str, uid_prefix: str | None = None,
                         secondary_capture: bool = False) -> dict[str, Dataset]:
    """The DICOM results of one findings document: {"sr": SR, "gsps": GSPS[, "sc": Secondary Capture]}.

    Args:
        document: the findings document of a DICOM radiograph (its ``image`` is the DICOM file).
        version: the bundle version (Algorithm Version; part of the deterministic UIDs).
        uid_prefix: the site's UID root (pydicom's when None).
        secondary_capture: also the picture with the boxes burnt in.
    """
    # The SR and the GSPS need the header only; the pixels are decoded again only for the burnt-in picture.
    if secondary_capture:
        header, grey = read_source(document["image"])
        size = list(grey.original_size)
    else:
        header = check_source(document["image"])
        size = [int(header.Rows), int(header.Columns)]
    if size != list(document["original_size"]):
        raise RuntimeError(f"{document['image']}: preprocessing read {document['original_size']}, "
                           f"the DICOM is {size}")
    findings = findings_from_document(document)
    results = {"sr": build_findings_sr(header, findings, version, uid_prefix),
               "gsps": build_findings_gsps(header, findings, version, uid_prefix)}
    if secondary_capture:
        results["sc"] = build_overlay_sc(header, render_overlay(grey.array, findings), version, uid_prefix)
    return results


class DicomResultsWriter(ItemWriter):
    """``<name>_sr.dcm`` and ``<name>_gsps.dcm`` (and ``<name>_overlay.dcm``) per image, into its study.

    Args:
        output_dir: the run's folder.
        version: the bundle version, written as the SR's Algorithm Version; part of the result UIDs.
        uid_prefix: UID root of the results (pydicom's when None); a site sets its own registered root.
        secondary_capture: also write the burnt-in Secondary Capture.
    """

    SUFFIXES = {"sr": "_sr.dcm", "gsps": "_gsps.dcm", "sc": "_overlay.dcm"}
    FILE_KEYS = {"sr": "sr", "gsps": "presentation_state", "sc": "overlay_dicom"}

    def __init__(self, output_dir: str | os.PathLike, version: str = "unknown", uid_prefix: str | None = None,
                 secondary_capture: bool = False, findings_key: str = "findings") -> None:
        require_booleans(secondary_capture=secondary_capture)
        super().__init__(output_dir, findings_key)
        self.version = str(version)
        self.uid_prefix = uid_prefix
        self.secondary_capture = secondary_capture

    def write(self, item: dict, output: dict, engine: Engine) -> None:
        document = output[self.findings_key]
        results = results_for_document(document, self.version, self.uid_prefix, self.secondary_capture)
        for kind, dataset in results.items():
            path = save(dataset, output_path(self.output_dir, item["output_name"], self.SUFFIXES[kind]))
            document["files"][self.FILE_KEYS[kind]] = path.name
