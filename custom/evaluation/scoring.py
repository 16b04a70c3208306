"""Scoring saved evaluation outputs: AUC, box-threshold calibration under both protocols, cDice, the no-image
prior, decision thresholds; and the calibration file inference reads.

Protocols (every localisation number says which produced it):
- ``all_images`` (the paper's): each class's box threshold is chosen on all test box images and scored on
  them; optimistic.
- ``two_fold`` (held out): the box images are split into two patient-disjoint halves; thresholds chosen on one
  half score the other, and the other way round.
The no-image prior predicts, for each box, the mean box of its class: over the other boxes of the class
(leave-one-out, threshold-free, beside both protocols), and over the other fold's boxes (beside two-fold).
Boxes are averaged in coordinates relative to their image (x / W, y / H), so images of different sizes mix
correctly; on NIH (all 1024 px) this equals averaging pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from custom.thresholds_file import (
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_DECISION_THRESHOLD,
    INFERENCE_PROTOCOL,
    Thresholds,
    as_plain,
    fold_mean_thresholds,
)
from custom.evaluation.outputs import MAP_NAMES, EvaluationOutputs
from custom.evaluation.settings import EvaluationSettings
from custom.localisation.iou import box_iou
from custom.metrics import (
    BoxThresholdChoice,
    auc_per_class,
    choose_box_thresholds,
    gt_box_dice,
    localisation_summary,
    patient_folds,
    youden_thresholds,
)

PROTOCOLS = ("all_images", "two_fold")
PROTOCOL_TITLES = {
    "all_images": "paper protocol (thresholds chosen on all test box images, scored on the same images)",
    "two_fold": "held-out protocol (2-fold, patient-disjoint: thresholds chosen on one half, scored on the "
    "other)",
}


@dataclass
class EvaluationResult:
    """Scores of one model.

    auc: {"image" | "combined": {"per_class": (K,), "mean": float}} on the test split.
    calibration: {map name: BoxThresholdChoice} (both protocols' thresholds and localisation summaries).
    dice: {map name: (M,) cDice per box} (threshold-free).
    prior: {"leave_one_out" | "other_fold": {"box_iou": (M,), "summary": localisation_summary}}.
    decision_thresholds: {"image" | "combined": (K,) Youden thresholds on validation probabilities (NaN when
        undefined)}.
    settings: candidates, mode, component, connectivity, seed, kappas.
    """

    auc: dict
    calibration: dict[str, BoxThresholdChoice]
    dice: dict[str, np.ndarray]
    prior: dict
    decision_thresholds: dict[str, np.ndarray]
    settings: dict = field(default_factory=dict)

    def localisation(self, protocol: str, method: str) -> dict:
        """The localisation summary of ``method`` ("sal", "det", "mix", "prior", "prior_other_fold")."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if method == "prior":
            return self.prior["leave_one_out"]["summary"]
        if method == "prior_other_fold":
            return self.prior["other_fold"]["summary"]
        return getattr(self.calibration[method], protocol).summary


def relative_boxes(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """xyxy boxes (M, 4) in pixels of images of size (M, 2) (H, W) -> fractions of each image's width and
    height."""
    return np.asarray(boxes, np.float64) / np.concatenate([sizes[:, ::-1]] * 2, axis=1)


def prior_ious(outputs: EvaluationOutputs, folds: np.ndarray | None = None) -> np.ndarray:
    """IoU of each box with the mean box of the other boxes of its class (``folds`` None: leave-one-out) or of
    its class's boxes in the other fold (``folds``: (B,) 0/1 fold of each box image). NaN where no other box.

    Returns:
        (M,) float64.
    """
    boxes = relative_boxes(outputs.gt_boxes, outputs.original_sizes[outputs.gt_image])
    ious = np.full(len(boxes), np.nan)
    box_fold = folds[outputs.gt_image] if folds is not None else None
    for c in range(len(outputs.box_class_names)):
        members = np.flatnonzero(outputs.gt_class == c)
        if folds is None:
            if len(members) < 2:
                continue
            total = boxes[members].sum(axis=0)
            means = (total - boxes[members]) / (len(members) - 1)
            ious[members] = box_iou(boxes[members], means).numpy()
            continue
        for fold in (0, 1):
            own, other = members[box_fold[members] == fold], members[box_fold[members] != fold]
            if len(own) and len(other):
                ious[own] = box_iou(boxes[own], boxes[other].mean(axis=0, keepdims=True)).numpy()
    return ious


def evaluate_outputs(outputs: EvaluationOutputs, settings: EvaluationSettings | None = None) -> EvaluationResult:
    """Score evaluation outputs (Tables 1-3 and the threshold choice).

    Args:
        outputs: ``EvaluationOutputs`` (network outputs on the test and validation splits).
        settings: candidates, box rule, two-fold seed, kappas, sweep threads (``EvaluationSettings``).

    Returns:
        ``EvaluationResult``.
    """
    settings = settings or EvaluationSettings()
    candidates = settings.candidate_thresholds()
    mode, component, connectivity = settings.mode, settings.component, settings.connectivity
    seed, kappas, workers = settings.seed, settings.kappas, settings.workers
    names = tuple(outputs.class_names)
    auc = {}
    for logits in ("image", "combined"):
        per_class, mean = auc_per_class(getattr(outputs, f"test_{logits}_logits"), outputs.test_labels, names)
        auc[logits] = {"per_class": per_class, "mean": mean}
    calibration, dice = {}, {}
    for name in MAP_NAMES:
        maps = outputs.box_maps[name]
        dice[name] = gt_box_dice(
            maps, outputs.gt_image, outputs.gt_class, outputs.gt_boxes, outputs.original_sizes
        ).numpy()
        calibration[name] = choose_box_thresholds(
            maps,
            outputs.gt_image,
            outputs.gt_class,
            outputs.gt_boxes,
            outputs.original_sizes,
            np.asarray(outputs.patient_ids),
            outputs.box_class_names,
            candidates,
            mode,
            component,
            connectivity,
            kappas,
            seed,
            dice=dice[name],
            workers=workers,
        )
    folds = patient_folds(np.asarray(outputs.patient_ids), seed)
    prior = {}
    for key, fold_split in (("leave_one_out", None), ("other_fold", folds)):
        ious = prior_ious(outputs, fold_split)
        # A box with no other box of its class to average gets no prior prediction: IoU 0, as a missed box.
        scored = np.nan_to_num(ious, nan=0.0)
        prior[key] = {
            "box_iou": ious,
            "summary": localisation_summary(scored, outputs.gt_class, outputs.box_class_names, kappas=kappas),
        }
    decisions = {}
    for logits in ("image", "combined"):
        probabilities = 1 / (1 + np.exp(-getattr(outputs, f"validation_{logits}_logits").astype(np.float64)))
        decisions[logits] = youden_thresholds(probabilities, outputs.validation_labels, names)
    settings = {
        "candidates": candidates.tolist(),
        "mode": mode,
        "component": component,
        "connectivity": connectivity,
        "seed": seed,
        "kappas": [float(k) for k in kappas],
    }
    return EvaluationResult(auc, calibration, dice, prior, decisions, settings)


def build_thresholds(
    outputs: EvaluationOutputs,
    result: EvaluationResult,
    default_box_threshold: float = DEFAULT_BOX_THRESHOLD,
    default_decision_threshold: float = DEFAULT_DECISION_THRESHOLD,
    provenance: dict | None = None,
) -> Thresholds:
    """The calibration inference reads (``custom.thresholds_file``).

    Inference box thresholds: the held-out two-fold protocol's, per class the mean of its two folds'
    thresholds. Decision thresholds: Youden's J on validation, as probabilities. Both protocols' thresholds
    and localisation summaries are kept under ``box_thresholds`` for the record.
    """
    settings = result.settings
    per_map, inference = {}, {}
    for name, calibrated in result.calibration.items():
        record = calibrated.as_dict()
        per_map[name] = record
        inference[name] = fold_mean_thresholds(record["two_fold"]["thresholds_by_fold"])
    decisions = {
        logits: {cls: float(t) for cls, t in zip(outputs.class_names, values) if math.isfinite(t)}
        for logits, values in result.decision_thresholds.items()
    }
    details = {
        "provenance": as_plain(provenance or {}),
        "box_thresholds": {
            "inference_protocol": INFERENCE_PROTOCOL,
            "inference_rule": "per class, the mean of the thresholds chosen on each fold of the held-out "
            "two-fold protocol (patient-disjoint halves of the test box images)",
            "per_map": as_plain(per_map),
        },
        "decision_rule": "Youden's J (TPR - FPR) on the validation split; a class is positive when its "
        "probability >= the threshold",
        "auc_test": as_plain(
            {
                logits: {
                    "mean": values["mean"],
                    "per_class": dict(zip(outputs.class_names, values["per_class"])),
                }
                for logits, values in result.auc.items()
            }
        ),
    }
    return Thresholds(
        class_names=tuple(outputs.class_names),
        box_thresholds=inference,
        decision_thresholds=decisions,
        mode=settings["mode"],
        component=settings["component"],
        connectivity=int(settings["connectivity"]),
        weighting=outputs.weighting,
        normalize=bool(outputs.normalize),
        sharpness=float(outputs.sharpness),
        default_box_threshold=float(default_box_threshold),
        default_decision_threshold=float(default_decision_threshold),
        details=details,
    )
