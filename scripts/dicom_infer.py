"""DICOM in, DICOM out: run the bundle on CR/DX radiographs and write an SR and a presentation state into each study.

Usage::

    python scripts/dicom_infer.py INPUT --out_dir OUT [--config_file bundle/configs/inference.yaml]
        [--ckpt_path bundle/models/model.pt] [--thresholds_file bundle/models/thresholds.json]
        [--overrides overrides.yaml] [--uid_prefix 1.2.826.0.1.3680043.10.999.]

INPUT is a DICOM file or a folder of them. For each radiograph, OUT receives ``<name>_sr.dcm``
(TID 1500 Comprehensive SR), ``<name>_gsps.dcm`` (Presentation State) and ``<name>_findings.json``; see
docs/dicom.md. It runs the bundle's declared workflow, ``configs/inference.yaml`` with
``configs/inference_dicom.yaml`` merged on it (``custom.dicom.writers``); the network sizes, checkpoint and
thresholds come from those configs (``--overrides``: a YAML/JSON file or dict of config id -> value, e.g. the
demo network's sizes).

Exit status: 0 all written; 1 some inputs refused or failed (listed in OUT/errors.txt, the rest written);
2 nothing could run (bad config, checkpoint or input path).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def dicom_infer(input: str, out_dir: str, config_file: str = str(REPO_ROOT / "bundle/configs/inference.yaml"),
                ckpt_path: str | None = None, thresholds_file: str | None = None, overrides=None,
                uid_prefix: str | None = None) -> int:
    """Report on one DICOM file or every file of a folder; returns the exit status (0 ok, 1 some failed).

    Args:
        input: a DICOM radiograph, or a folder (its DICOM files, by content or extension).
        out_dir: output folder.
        config_file: the bundle's inference config (its ``bundle_root`` must point at the bundle folder);
            ``inference_dicom.yaml`` beside it is merged on it.
        ckpt_path / thresholds_file: override the config's ``ckpt_path`` / ``thresholds_file``.
        overrides: further config id -> value pairs (dict or YAML/JSON file).
        uid_prefix: UID root for the results (the config's, else pydicom's, when None).
    """
    from monai.bundle import ConfigWorkflow

    from custom.arguments import overrides_mapping
    from custom.inference.inputs import resolve_inputs

    settings = overrides_mapping(overrides)
    if config_file == str(REPO_ROOT / "bundle/configs/inference.yaml"):
        settings.setdefault("bundle_root", str(REPO_ROOT / "bundle"))
    if ckpt_path is not None:
        settings["ckpt_path"] = str(ckpt_path)
    if thresholds_file is not None:
        settings["thresholds_file"] = str(thresholds_file)
    resolve_inputs(input)  # raises naming the path when it does not exist or holds no image
    settings.update({"input": str(input), "output_dir": str(out_dir)})
    if uid_prefix is not None:
        settings["uid_prefix"] = str(uid_prefix)
    dicom_config = str(Path(config_file).with_name("inference_dicom.yaml"))
    workflow = ConfigWorkflow(config_file=[config_file, dicom_config], workflow_type="infer", **settings)
    workflow.initialize()
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    for name in evaluator.written:
        print(Path(out_dir) / f"{name}_sr.dcm")
    try:
        workflow.finalize()
    except RuntimeError as error:
        print(f"dicom_infer: {error}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        status = fire.Fire(dicom_infer, serialize=lambda _: None)  # the status is the exit code, not output
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as error:
        print(f"dicom_infer: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
