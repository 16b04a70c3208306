"""Hospital inference, DICOM in and DICOM out: a CR/DX radiograph -> the model -> an SR and an overlay.

For each input radiograph, :class:`DicomReporter` writes into ``out_dir``:

- ``<name>_sr.dcm``: Comprehensive SR of the findings (``custom.dicom.sr``), one per positive class with its
  probability and box in the radiograph's pixel coordinates;
- ``<name>_overlay.dcm``: Secondary Capture of the radiograph with the boxes burned in
  (``custom.dicom.secondary_capture``);
- ``<name>_findings.json``: the same findings as the bundle's inference JSON.

Both DICOM objects join the radiograph's study (same Study Instance UID, Patient ID, Accession Number) in two
new series (SR and OT), with new UIDs. ``<name>`` comes from the input FILE name reduced to safe characters
(``custom.inference.inputs.safe_stem``), never from DICOM tag values. Inputs that are not single-frame
projection radiographs (CT, MR, SR, multi-frame, a PNG ...) are refused with the reason; in a batch the rest
still run and the failures are listed in ``errors.txt``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from custom.dicom.secondary_capture import build_overlay_sc, render_overlay
from custom.dicom.sr import Finding, build_findings_sr
from custom.dicom.study import new_uid, read_source, safe_output_path, save
from custom.labels import CLASS_INDEX, CLASS_NAMES
from custom.transforms.grey_image import ImageLoadError

logger = logging.getLogger(__name__)


def findings_from_result(result: Mapping) -> tuple[list[Finding], list[float]]:
    """The SR's findings and the 14 probabilities from one inference JSON (``predict_findings``' format).

    Args:
        result: {"probabilities": {class: p}, "findings": [{"class", "probability", "box" xyxy}],
            "positive_without_box": [class, ...]} (other keys ignored).

    Returns:
        (findings, probabilities): one Finding per positive class in CLASS_NAMES order (box None for a
        positive class whose map gave no box); probabilities (14,) in CLASS_NAMES order.
    """
    probabilities = result["probabilities"]
    missing = [name for name in CLASS_NAMES if name not in probabilities]
    if missing:
        raise ValueError(f"inference result lacks the probabilities of {missing}")
    findings = [Finding(f["class"], float(f["probability"]), tuple(float(v) for v in f["box"]))
                for f in result.get("findings", [])]
    findings += [Finding(name, float(probabilities[name]), None)
                 for name in result.get("positive_without_box", [])]
    findings.sort(key=lambda finding: CLASS_INDEX[finding.class_name])
    return findings, [float(probabilities[name]) for name in CLASS_NAMES]


class DicomReporter:
    """Runs the bundle's model on DICOM radiographs and writes the SR, the overlay and the JSON.

    Args:
        network: RpSalProbabilities/RpSalNet with its weights loaded, in eval mode.
        preprocessing: the inference config's ``preprocessing`` (a callable on {"image": path} giving
            "image" (3, S, S) and "original_size" [H, W]).
        calibration: ``custom.inference.calibration_file.Calibration`` (thresholds).
        map_name: the map boxes come from ("sal", "det", "mix").
        device: torch device of the network (None: the network's own).
        metadata_file: the bundle's ``metadata.json``; its ``version`` is written as the Algorithm Version.
        uid_prefix: UID root of the new series/instances (pydicom's when None).
    """

    def __init__(self, network: torch.nn.Module, preprocessing: Callable, calibration, map_name: str = "mix",
                 device=None, metadata_file: str | os.PathLike | None = None, uid_prefix: str | None = None):
        self.network = network.eval()
        self.preprocessing = preprocessing
        self.calibration = calibration
        self.map_name = map_name
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.uid_prefix = uid_prefix
        self.version = "unknown"
        if metadata_file is not None and Path(metadata_file).is_file():
            metadata = json.loads(Path(metadata_file).read_text(encoding="utf-8"))
            self.version = str(metadata.get("version", "unknown"))

    def predict(self, path: str | os.PathLike) -> dict:
        """The inference JSON of one image (``custom.inference.pipeline.findings_json`` + ``image_size``)."""
        from custom.inference.pipeline import predict_findings

        data = self.preprocessing({"image": str(path)})
        image = torch.as_tensor(data["image"]).float()
        original_size = [int(v) for v in data["original_size"]]
        with torch.no_grad():
            result = predict_findings(self.network, image[None].to(self.device), [original_size],
                                      self.calibration, self.map_name)[0]
        result["image_size"] = original_size
        return result

    def report(self, path: str | os.PathLike, out_dir: str | os.PathLike, name: str | None = None) -> dict:
        """Infer on one DICOM radiograph; write ``<name>_sr.dcm``, ``_overlay.dcm`` and ``_findings.json``.

        Args:
            path: the radiograph (single-frame CR/DX/Secondary Capture, MONOCHROME1/2).
            out_dir: output folder (created).
            name: output stem; default the input file's safe stem.

        Returns:
            {"sr": path, "overlay": path, "json": path, "result": inference JSON}.

        Raises:
            ImageLoadError (a ValueError) naming the file: not DICOM, not a projection radiograph, or
            undecodable.
        """
        from custom.inference.inputs import safe_stem

        header, grey = read_source(path)  # refuse before running the model
        result = self.predict(path)
        if result["image_size"] != list(grey.original_size):
            raise RuntimeError(f"{path}: preprocessing read {result['image_size']}, "
                               f"the DICOM is {list(grey.original_size)}")
        findings, probabilities = findings_from_result(result)
        stem = name or safe_stem(path)
        sr = build_findings_sr(header, findings, probabilities, self.version,
                               series_uid=new_uid(self.uid_prefix), uid_prefix=self.uid_prefix)
        overlay = build_overlay_sc(header, render_overlay(grey.array, findings),
                                   series_uid=new_uid(self.uid_prefix), uid_prefix=self.uid_prefix)
        sr_path = save(sr, safe_output_path(out_dir, stem, "sr"))
        overlay_path = save(overlay, safe_output_path(out_dir, stem, "overlay"))
        json_path = safe_output_path(out_dir, stem, "findings").with_suffix(".json")
        json_path.write_text(json.dumps({"source": str(path), **result, "sr": sr_path.name,
                                         "overlay": overlay_path.name}, indent=2) + "\n", encoding="utf-8")
        return {"sr": str(sr_path), "overlay": str(overlay_path), "json": str(json_path), "result": result}

    def run(self, inputs: Sequence, out_dir: str | os.PathLike) -> list[dict]:
        """Report on every input; a refused or unreadable file is logged, listed in ``errors.txt``, skipped.

        Args:
            inputs: paths, or dicts with "image" (and optional "output_name"), e.g. the inference config's
                ``inputs``.
            out_dir: output folder.

        Returns:
            The ``report`` dicts of the files that succeeded.

        Raises:
            RuntimeError after all inputs ran, when any failed (its message counts them and names errors.txt).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        done, errors = [], []
        for item in inputs:
            if isinstance(item, Mapping):
                path, name = item["image"], item.get("output_name")
            else:
                path, name = item, None
            try:
                done.append(self.report(path, out_dir, name))
                logger.info(f"{path}: wrote {done[-1]['sr']} and {done[-1]['overlay']}")
            except (ImageLoadError, OSError) as error:  # bad input; a model or code error propagates
                logger.error(f"{path}: skipped: {error}")
                errors.append(f"{path}\t{error}".replace("\n", " "))
        (out_dir / "errors.txt").write_text("".join(line + "\n" for line in errors), encoding="utf-8")
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(inputs)} input(s) failed; "
                               f"see {out_dir / 'errors.txt'}")
        return done


def reporter_from_config(config_files: str | Sequence[str], overrides: Mapping | None = None,
                         uid_prefix: str | None = None) -> tuple[DicomReporter, dict]:
    """A DicomReporter built from the bundle's inference config (network sizes, checkpoint, calibration).

    Args:
        config_files: ``configs/inference.yaml`` (and any files merged on it), as ``monai.bundle`` takes them.
        overrides: config id -> value applied after the files (e.g. {"ckpt_path": "runs/x/model.pt"}).
        uid_prefix: UID root for the new objects.

    Returns:
        (reporter, parsed settings {"output_dir", "input"}) of the config.
    """
    from monai.bundle import ConfigParser

    from custom.inference.pipeline import load_checkpoint

    parser = ConfigParser()
    parser.read_config(config_files)
    for key, value in (overrides or {}).items():
        parser[key] = value
    device = parser.get_parsed_content("device")
    network = parser.get_parsed_content("network")
    load_checkpoint(network, parser.get_parsed_content("checkpoint"), device)
    bundle_root = parser.get_parsed_content("bundle_root")
    reporter = DicomReporter(
        network,
        parser.get_parsed_content("preprocessing"),
        parser.get_parsed_content("calibration"),
        map_name=parser.get("postprocessing", {}).get("map", "mix"),
        device=device,
        metadata_file=os.path.join(bundle_root, "configs", "metadata.json"),
        uid_prefix=uid_prefix,
    )
    return reporter, {"output_dir": parser.get_parsed_content("output_dir")}
