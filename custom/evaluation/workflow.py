"""The evaluation run of ``bundle/configs/evaluate.yaml``: network outputs -> scores -> thresholds file and
report folder (``RpSalEvaluation``); ``evaluate_and_report`` does the second half from saved outputs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from custom.evaluation.outputs import EvaluationOutputs, collect_outputs
from custom.evaluation.report import PROTOCOL_SHORT, held_out_check, write_report
from custom.evaluation.scoring import PROTOCOLS, build_thresholds, evaluate_outputs
from custom.evaluation.settings import EvaluationSettings
from custom.inference.findings import file_digest
from custom.weights_file import load_checkpoint
from custom.thresholds_file import save_thresholds

logger = logging.getLogger(__name__)
OUTPUTS_FILE = "evaluation_outputs.pt"


def evaluate_and_report(
    outputs: EvaluationOutputs,
    report_dir: str | os.PathLike,
    thresholds_file: str | os.PathLike | None,
    settings: EvaluationSettings | None = None,
    provenance: dict | None = None,
) -> dict:
    """Score ``outputs``, write the thresholds file (unless None) and the report folder.

    Args:
        outputs: ``EvaluationOutputs`` (collected by the network, or loaded from a saved file).
        report_dir: the report folder (``custom.evaluation.report``).
        thresholds_file: where inference will read the box and decision thresholds
            (``models/thresholds.json``); None writes none.
        settings: ``EvaluationSettings`` (scoring, pictures, defaults).
        provenance: recorded in the thresholds file and at the top of the report.

    Returns:
        {"result": EvaluationResult, "thresholds": Thresholds, "thresholds_file", "report": paths,
         "seconds": {"scoring", "report"}}.
    """
    settings = settings or EvaluationSettings()
    start = time.perf_counter()
    result = evaluate_outputs(outputs, settings)
    scored = time.perf_counter()
    thresholds = build_thresholds(
        outputs, result, settings.default_box_threshold, settings.default_decision_threshold, provenance
    )
    saved = str(save_thresholds(thresholds, thresholds_file)) if thresholds_file else None
    paths = write_report(outputs, result, report_dir, settings.num_overlays, settings.overlay_map, provenance)
    seconds = {"scoring": round(scored - start, 3), "report": round(time.perf_counter() - scored, 3)}
    logger.info(
        f"test AUC (image logits) {result.auc['image']['mean']:.4f}, combined "
        f"{result.auc['combined']['mean']:.4f}"
    )
    for protocol in PROTOCOLS:
        ious = ", ".join(
            f"{method} {result.localisation(protocol, method)['iou']['mean']:.3f}"
            for method in ("sal", "det", "mix", "prior")
        )
        logger.info(f"mean IoU, {PROTOCOL_SHORT[protocol]}: {ious}")
    logger.info(held_out_check(outputs, result))
    logger.info(
        f"report in {report_dir}; thresholds file {saved}; scoring {seconds['scoring']} s, report "
        f"{seconds['report']} s"
    )
    return {
        "result": result,
        "thresholds": thresholds,
        "thresholds_file": saved,
        "report": paths,
        "seconds": seconds,
    }


class RpSalEvaluation:
    """The whole evaluation: load the weights, run the test and validation splits, score, write.

    Args:
        network: RpSalNet as configured for training (its weights are replaced by ``checkpoint``).
        checkpoint: the trained weights (``<ckpt_dir>/model.pt``).
        test_loader, validation_loader: DataLoaders over ``custom.evaluation.outputs.loader_items``.
        test_items: the test split's datalist items (boxes, patients, sizes), indexed by ``index``.
        report_dir: the report folder; thresholds_file: written for inference (None: not written).
        settings: ``EvaluationSettings``.
        device: the network's device; inferer: the bundle's ``RpSalInferer`` (inference.yaml's; its ``amp``
            is the bf16 autocast on CUDA).
    """

    def __init__(self, network, checkpoint: str, test_loader, validation_loader, test_items: Sequence[dict],
                 report_dir: str, thresholds_file: str | None, settings: EvaluationSettings | None = None,
                 device=None, inferer: Callable | None = None):
        self.network = network
        self.checkpoint = checkpoint
        self.test_loader, self.validation_loader = test_loader, validation_loader
        self.test_items = test_items
        self.report_dir = Path(report_dir)
        self.thresholds_file = thresholds_file
        self.settings = settings or EvaluationSettings()
        self.device, self.inferer = device, inferer

    def run(self) -> dict:
        """Evaluate; returns ``evaluate_and_report``'s dict plus "outputs_file" (or None)."""
        load_checkpoint(self.network, self.checkpoint, self.device)
        start = time.perf_counter()
        settings = self.settings
        outputs = collect_outputs(
            self.network, self.test_loader, self.validation_loader, self.test_items, self.device,
            weighting=settings.weighting, normalize=settings.normalize, inferer=self.inferer,
            sharpness=settings.sharpness,
        )
        logger.info(
            f"network outputs: {len(outputs.test_labels)} test, {len(outputs.validation_labels)} "
            f"validation images, {len(outputs.box_images)} box images, "
            f"{time.perf_counter() - start:.1f} s"
        )
        outputs_file = outputs.save(self.report_dir / OUTPUTS_FILE) if settings.save_outputs else None
        provenance = {
            "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": file_digest(self.checkpoint),
            "evaluated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        done = evaluate_and_report(outputs, self.report_dir, self.thresholds_file, settings, provenance)
        done["outputs_file"] = str(outputs_file) if outputs_file else None
        return done
