"""The evaluation run of ``bundle/configs/evaluate.yaml``: network outputs -> scores -> calibration file and
report folder (``RpSalEvaluation``); ``evaluate_and_report`` does the second half from saved outputs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from custom.inference.arguments import require_booleans
from custom.inference.calibration_file import (
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_DECISION_THRESHOLD,
    save_calibration,
)
from custom.inference.evaluation import EvaluationOutputs, collect_outputs
from custom.inference.pipeline import file_digest, load_checkpoint
from custom.inference.report import PROTOCOL_SHORT, held_out_check, write_report
from custom.inference.scoring import PROTOCOLS, build_calibration, evaluate_outputs
from custom.metrics import DEFAULT_KAPPAS

logger = logging.getLogger(__name__)
OUTPUTS_FILE = "evaluation_outputs.pt"


def evaluate_and_report(
    outputs: EvaluationOutputs,
    report_dir: str | os.PathLike,
    calibration_file: str | os.PathLike | None,
    candidates: Sequence[float] | None = None,
    mode: str = "percentile",
    component: str = "largest",
    connectivity: int = 8,
    seed: int = 0,
    kappas: Sequence[float] = DEFAULT_KAPPAS,
    num_overlays: int = 8,
    overlay_map: str = "mix",
    default_box_threshold: float = DEFAULT_BOX_THRESHOLD,
    default_decision_threshold: float = DEFAULT_DECISION_THRESHOLD,
    provenance: dict | None = None,
    workers: int | None = None,
) -> dict:
    """Score ``outputs``, write the calibration file (unless None) and the report folder.

    Args:
        outputs: ``EvaluationOutputs`` (collected by the network, or loaded from a saved file).
        report_dir: the report folder (``custom.inference.report``).
        calibration_file: where inference will read the calibration (``models/calibration.json``); None
            writes none.
        candidates, mode, component, connectivity, seed, kappas, workers: as ``evaluate_outputs``.
        num_overlays, overlay_map: Fig. 3-style pictures.
        default_box_threshold, default_decision_threshold: stored for classes without calibration.
        provenance: recorded in the calibration and at the top of the report.

    Returns:
        {"result": EvaluationResult, "calibration": Calibration, "calibration_file", "report": paths,
         "seconds": {"scoring", "report"}}.
    """
    start = time.perf_counter()
    result = evaluate_outputs(outputs, candidates, mode, component, connectivity, seed, kappas, workers)
    scored = time.perf_counter()
    calibration = build_calibration(
        outputs, result, default_box_threshold, default_decision_threshold, provenance
    )
    saved = str(save_calibration(calibration, calibration_file)) if calibration_file else None
    paths = write_report(outputs, result, report_dir, num_overlays, overlay_map, provenance)
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
        f"report in {report_dir}; calibration {saved}; scoring {seconds['scoring']} s, report "
        f"{seconds['report']} s"
    )
    return {
        "result": result,
        "calibration": calibration,
        "calibration_file": saved,
        "report": paths,
        "seconds": seconds,
    }


class RpSalEvaluation:
    """The whole evaluation: load the weights, run the test and validation splits, score, write.

    Args:
        network: RpSalNet as configured for training (its weights are replaced by ``checkpoint``).
        checkpoint: the trained weights (``<ckpt_dir>/model.pt``).
        test_loader, validation_loader: DataLoaders over ``custom.inference.evaluation.loader_items``.
        test_items: the test split's datalist items (boxes, patients, sizes), indexed by ``index``.
        report_dir: the report folder; calibration_file: written for inference (None: not written).
        device, amp, inferer: how the network runs (amp: bf16 autocast on CUDA).
        weighting, normalize, sharpness: Det map painting (``custom.inference.maps.detection_map``).
        save_outputs: also write ``<report_dir>/evaluation_outputs.pt``
            (the maps and logits, for ``scripts/evaluate_report.py``).
        Other arguments: as ``evaluate_and_report``.
    """

    def __init__(
        self,
        network,
        checkpoint: str,
        test_loader,
        validation_loader,
        test_items: Sequence[dict],
        report_dir: str,
        calibration_file: str | None,
        device=None,
        amp: bool = False,
        inferer: Callable | None = None,
        weighting: str = "sigmoid",
        normalize: bool = True,
        sharpness: float = 1.0,
        candidates: Sequence[float] | None = None,
        mode: str = "percentile",
        component: str = "largest",
        connectivity: int = 8,
        seed: int = 0,
        kappas: Sequence[float] = DEFAULT_KAPPAS,
        num_overlays: int = 8,
        overlay_map: str = "mix",
        save_outputs: bool = True,
        default_box_threshold: float = DEFAULT_BOX_THRESHOLD,
        default_decision_threshold: float = DEFAULT_DECISION_THRESHOLD,
    ):
        self.network = network
        self.checkpoint = checkpoint
        self.test_loader, self.validation_loader = test_loader, validation_loader
        self.test_items = test_items
        self.report_dir = Path(report_dir)
        self.calibration_file = calibration_file
        require_booleans(amp=amp, normalize=normalize, save_outputs=save_outputs)
        self.device, self.amp, self.inferer = device, amp, inferer
        self.weighting, self.normalize, self.sharpness = weighting, normalize, float(sharpness)
        self.save_outputs = save_outputs
        self.scoring = dict(
            candidates=candidates,
            mode=mode,
            component=component,
            connectivity=connectivity,
            seed=seed,
            kappas=kappas,
            num_overlays=num_overlays,
            overlay_map=overlay_map,
            default_box_threshold=default_box_threshold,
            default_decision_threshold=default_decision_threshold,
        )

    def run(self) -> dict:
        """Evaluate; returns ``evaluate_and_report``'s dict plus "outputs_file" (or None)."""
        load_checkpoint(self.network, self.checkpoint, self.device)
        start = time.perf_counter()
        outputs = collect_outputs(
            self.network,
            self.test_loader,
            self.validation_loader,
            self.test_items,
            self.device,
            self.amp,
            self.weighting,
            self.normalize,
            self.inferer,
            sharpness=self.sharpness,
        )
        logger.info(
            f"network outputs: {len(outputs.test_labels)} test, {len(outputs.validation_labels)} "
            f"validation images, {len(outputs.box_images)} box images, "
            f"{time.perf_counter() - start:.1f} s"
        )
        outputs_file = outputs.save(self.report_dir / OUTPUTS_FILE) if self.save_outputs else None
        provenance = {
            "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": file_digest(self.checkpoint),
            "evaluated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        done = evaluate_and_report(
            outputs, self.report_dir, self.calibration_file, provenance=provenance, **self.scoring
        )
        done["outputs_file"] = str(outputs_file) if outputs_file else None
        return done
