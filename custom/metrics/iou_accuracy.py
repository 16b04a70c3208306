"""Per-class localisation summaries: mean IoU, mean cDice and T(IoU >= kappa) (the paper's Tables 2, 3)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# The paper's Table 3 shows kappa = 0.3, 0.5, 0.6; the authors' code reports 0.1 ... 0.7.
DEFAULT_KAPPAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def _as_numpy(values, dtype=np.float64) -> np.ndarray:
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=dtype)


def per_class_mean(values, class_ids, num_classes: int) -> np.ndarray:
    """Mean of per-box values within each class.

    Args:
        values: (M,) one value per ground-truth box (IoU, cDice, or 0/1 hits); NaN values are skipped.
        class_ids: (M,) int class of each box, in [0, num_classes).
        num_classes: K.

    Returns:
        (K,) float64 means; NaN for a class without a (non-NaN) box.
    """
    values, class_ids = _as_numpy(values), _as_numpy(class_ids, np.int64)
    if values.shape != class_ids.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and class_ids {class_ids.shape} must be matching (M,)")
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= num_classes):
        raise ValueError(f"class_ids must lie in [0, {num_classes}), "
                         f"got {class_ids.min()} to {class_ids.max()}")
    defined = ~np.isnan(values)
    totals = np.bincount(class_ids[defined], weights=values[defined], minlength=num_classes)
    counts = np.bincount(class_ids[defined], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan)


def iou_accuracy(ious, class_ids, num_classes: int, kappas: Sequence[float] = DEFAULT_KAPPAS) -> np.ndarray:
    """T(IoU >= kappa): per class, the fraction of ground-truth boxes whose prediction reaches IoU kappa.

    Args:
        ious: (M,) IoU of each ground-truth box with its image's prediction for that class (0 if none).
        class_ids: (M,) int class of each box.
        num_classes: K.
        kappas: (Q,) IoU levels.

    Returns:
        (Q, K) float64 fractions; NaN for classes without boxes.
    """
    ious = _as_numpy(ious)
    if np.isnan(ious).any():
        raise ValueError("ious contain NaN: a missing prediction must count as IoU 0")
    return np.stack([per_class_mean((ious >= kappa).astype(np.float64), class_ids, num_classes)
                     for kappa in kappas]).reshape(len(kappas), num_classes)


def localisation_summary(
    ious,
    class_ids,
    class_names: Sequence[str],
    dice=None,
    kappas: Sequence[float] = DEFAULT_KAPPAS,
) -> dict:
    """A JSON-ready table of localisation results per class, with the mean over classes.

    Means are over the classes that have boxes, each class weighing the same (as the paper's "Mean"
    column), not over boxes.

    Args:
        ious: (M,) IoU per ground-truth box (0 for a missing prediction).
        class_ids: (M,) int index of each box's class in ``class_names``.
        class_names: K names.
        dice: optional (M,) cDice per box.
        kappas: IoU levels of T(IoU).

    Returns:
        {"boxes": {name: count}, "iou": {name: v, ..., "mean": v}, "cdice": {...} (if dice given),
         "t_iou": {"0.1": {name: v, ..., "mean": v}, ...}}; classes without boxes are left out.
    """
    num_classes = len(class_names)
    class_ids = _as_numpy(class_ids, np.int64)
    counts = np.bincount(class_ids, minlength=num_classes)
    present = [k for k in range(num_classes) if counts[k] > 0]

    def table(values: np.ndarray) -> dict:
        row = {class_names[k]: float(values[k]) for k in present}
        row["mean"] = float(np.nanmean(values[present])) if present else float("nan")
        return row

    summary = {"boxes": {class_names[k]: int(counts[k]) for k in present},
               "iou": table(per_class_mean(ious, class_ids, num_classes))}
    if dice is not None:
        summary["cdice"] = table(per_class_mean(dice, class_ids, num_classes))
    accuracy = iou_accuracy(ious, class_ids, num_classes, kappas)
    summary["t_iou"] = {f"{kappa:g}": table(row) for kappa, row in zip(kappas, accuracy)}
    return summary
