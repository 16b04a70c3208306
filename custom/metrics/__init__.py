"""Evaluation metrics: AUC, IoU, continuous Dice and T(IoU >= kappa), and threshold calibration."""

from custom.metrics.auc import auc_per_class
from custom.metrics.threshold_choice import (
    BoxThresholdChoice,
    ProtocolResult,
    choose_box_thresholds,
    choose_thresholds,
    patient_folds,
    percentile_grid,
    sweep_box_thresholds,
    youden_thresholds,
)
from custom.metrics.dice import continuous_dice, gt_box_dice
from custom.metrics.iou import box_iou, gt_box_iou
from custom.metrics.iou_accuracy import DEFAULT_KAPPAS, iou_accuracy, localisation_summary, per_class_mean

__all__ = [
    "BoxThresholdChoice",
    "DEFAULT_KAPPAS",
    "ProtocolResult",
    "auc_per_class",
    "box_iou",
    "choose_box_thresholds",
    "choose_thresholds",
    "continuous_dice",
    "gt_box_dice",
    "gt_box_iou",
    "iou_accuracy",
    "localisation_summary",
    "patient_folds",
    "per_class_mean",
    "percentile_grid",
    "sweep_box_thresholds",
    "youden_thresholds",
]
