"""Choosing thresholds: per-class box thresholds (max mean IoU) and per-class decision thresholds (Youden).

Box thresholds, two protocols side by side (see the method notes, "Evaluation"):
- "all images" (the paper's): choose each class's threshold on every box image, report on the same images;
  optimistic, since the test boxes choose their own threshold.
- "two-fold": split the box images into two patient-disjoint halves (seeded), choose on one half and
  report on the other, then swap; every box is scored with thresholds it did not help choose.
Both score the same per-box IoU table, computed once for every candidate threshold (``sweep_box_thresholds``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from custom.localisation.box_rule import BoxRule
from custom.metrics.iou import box_iou
from custom.metrics.iou_accuracy import DEFAULT_KAPPAS, localisation_summary, per_class_mean

# Maps per sweep chunk: bounds the gathered maps and their masks (512 maps of 128 x 128: 32 MiB float32).
_SWEEP_CHUNK = 512


def percentile_grid(start: float = 0.6, stop: float = 1.0, steps: int = 41) -> np.ndarray:
    """Evenly spaced percentile thresholds; the default is the authors' grid 0.60, 0.61, ..., 1.00.

    Returns:
        (steps,) float64 quantiles in [0, 1] (0.9 = 90th percentile).
    """
    if not (0 <= start <= stop <= 1) or steps < 1:
        raise ValueError(f"need 0 <= start <= stop <= 1 and steps >= 1, got {start}, {stop}, {steps}")
    return np.linspace(start, stop, steps)


def patient_folds(patient_ids, seed: int = 0) -> np.ndarray:
    """Split images into two patient-disjoint folds of about equal image counts.

    Patients are shuffled with ``seed`` and each in turn joins the fold with fewer images so far (fold 0 on
    ties), so the split is deterministic given the seed and the set of patients.

    Args:
        patient_ids: (B,) patient identifier of each image (any hashable values, e.g. NIH "Patient ID").

    Returns:
        (B,) int64 fold of each image, 0 or 1.
    """
    patient_ids = np.asarray(patient_ids)
    if patient_ids.ndim != 1:
        raise ValueError(f"patient_ids must have shape (B,), got {patient_ids.shape}")
    patients, image_patient, per_patient = np.unique(patient_ids, return_inverse=True, return_counts=True)
    if len(patients) < 2:
        raise ValueError(f"two patient-disjoint folds need at least 2 patients, got {len(patients)}")
    order = np.random.default_rng(seed).permutation(len(patients))
    patient_fold = np.zeros(len(patients), dtype=np.int64)
    sizes = [0, 0]
    for patient in order:
        fold = int(sizes[1] < sizes[0])
        patient_fold[patient] = fold
        sizes[fold] += per_patient[patient]
    return patient_fold[image_patient]


def _check_ground_truth(maps: torch.Tensor, gt_image, gt_class, gt_boxes, original_sizes):
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (B, K, h, w), got {tuple(maps.shape)}")
    batch, classes = maps.shape[:2]
    gt_image = np.asarray(gt_image, dtype=np.int64)
    gt_class = np.asarray(gt_class, dtype=np.int64)
    gt_boxes = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float64))
    sizes = np.asarray(original_sizes, dtype=np.float64)
    if gt_image.ndim != 1 or gt_class.shape != gt_image.shape or tuple(gt_boxes.shape) != (len(gt_image), 4):
        raise ValueError(f"need gt_image (M,), gt_class (M,), gt_boxes (M, 4); got {gt_image.shape}, "
                         f"{gt_class.shape}, {tuple(gt_boxes.shape)}")
    if gt_image.size and (gt_image.min() < 0 or gt_image.max() >= batch):
        raise ValueError(f"gt_image must index the {batch} images of maps")
    if gt_class.size and (gt_class.min() < 0 or gt_class.max() >= classes):
        raise ValueError(f"gt_class must index the {classes} classes of maps")
    if sizes.shape != (batch, 2):
        raise ValueError(f"original_sizes must be (B={batch}, 2) (H, W), got {sizes.shape}")
    return gt_image, gt_class, gt_boxes, sizes


def sweep_box_thresholds(
    maps,
    gt_image,
    gt_class,
    gt_boxes,
    original_sizes,
    candidates,
    mode: str = "percentile",
    component: str = "largest",
    connectivity: int = 8,
    workers: int | None = None,
) -> np.ndarray:
    """IoU of every ground-truth box at every candidate threshold.

    Only the maps of (image, class) pairs that have a ground truth are thresholded; each is sorted once for
    all percentile candidates.

    Args:
        maps: (B, K, h, w) maps of the box images (tensor or ndarray).
        gt_image: (M,) int index of each ground truth's image in B.
        gt_class: (M,) int index of its class in K.
        gt_boxes: (M, 4) float xyxy in ORIGINAL image pixels.
        original_sizes: (B, 2) (H, W) of each original image.
        candidates: (Q,) thresholds, quantiles in [0, 1] for ``mode="percentile"`` or map values.
        mode, component, connectivity: the ``custom.localisation.BoxRule``.
        workers: threads (``BoxRule.boxes_per_threshold``); None: one per core.

    Returns:
        (Q, M) float64 IoU (0 where no box was found).
    """
    maps = torch.as_tensor(maps if isinstance(maps, torch.Tensor) else np.asarray(maps))
    gt_image, gt_class, gt_boxes, sizes = _check_ground_truth(maps, gt_image, gt_class, gt_boxes,
                                                              original_sizes)
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1)
    rule = BoxRule(mode, component, connectivity)
    classes = maps.shape[1]
    pairs, box_pair = np.unique(gt_image * classes + gt_class, return_inverse=True)
    pair_boxes = []
    flat_maps = maps.flatten(0, 1)
    for start in range(0, len(pairs), _SWEEP_CHUNK):
        chunk = pairs[start:start + _SWEEP_CHUNK]
        chunk_maps = flat_maps[torch.as_tensor(chunk, device=maps.device)]
        # (Q, chunk, 4) xyxy in original pixels
        pair_boxes.append(rule.boxes_per_threshold(chunk_maps, candidates, sizes[chunk // classes], workers).boxes)
    pair_boxes = torch.cat(pair_boxes, dim=1) if pair_boxes else torch.zeros(len(candidates), 0, 4)
    return box_iou(pair_boxes[:, torch.as_tensor(box_pair)], gt_boxes).numpy()


def choose_thresholds(ious: np.ndarray, gt_class, num_classes: int, use=None) -> np.ndarray:
    """Per class, the candidate maximising the mean IoU of that class's boxes.

    Args:
        ious: (Q, M) IoU per candidate and box (``sweep_box_thresholds``).
        gt_class: (M,) int class of each box.
        num_classes: K.
        use: optional (M,) bool, the boxes allowed to choose (the other fold's are ignored).

    Returns:
        (K,) int64 candidate index per class; the first candidate wins ties. A class without usable boxes
        gets the candidate with the best mean IoU over all usable boxes (with a warning), or -1 if none.
    """
    ious = np.asarray(ious, dtype=np.float64)
    gt_class = np.asarray(gt_class, dtype=np.int64)
    use = np.ones(len(gt_class), dtype=bool) if use is None else np.asarray(use, dtype=bool)
    means = np.stack([per_class_mean(row[use], gt_class[use], num_classes) for row in ious])  # (Q, K)
    chosen = np.full(num_classes, -1, dtype=np.int64)
    defined = ~np.isnan(means).all(axis=0)
    chosen[defined] = np.nanargmax(means[:, defined], axis=0)
    present = np.bincount(gt_class, minlength=num_classes) > 0
    orphans = present & ~defined
    if orphans.any() and use.any():
        warnings.warn(f"classes {np.flatnonzero(orphans).tolist()} have no boxes to choose a threshold on: "
                      "using the candidate best over all classes' boxes", RuntimeWarning, stacklevel=2)
        chosen[orphans] = int(np.argmax(ious[:, use].mean(axis=1)))
    return chosen


@dataclass
class ProtocolResult:
    """One protocol's outcome.

    thresholds: (F, K) float64 threshold chosen per fold and class (F = 1 for all images; F = 2 for two-fold,
        row f chosen on fold f and applied to the other fold); NaN for classes without boxes.
    box_iou: (M,) float64 IoU of each ground-truth box under the thresholds applied to it.
    summary: ``localisation_summary`` of those IoUs (per class and mean IoU, T(IoU)).
    """

    thresholds: np.ndarray
    box_iou: np.ndarray
    summary: dict = field(default_factory=dict)


@dataclass
class BoxThresholdChoice:
    """Box-threshold calibration under both protocols.

    class_names: (K,) names of the maps' classes.
    candidates: (Q,) the thresholds tried; mode, component: how they were applied.
    folds: (B,) int fold of each image in the two-fold protocol.
    all_images, two_fold: ``ProtocolResult`` of each protocol.
    """

    class_names: tuple[str, ...]
    candidates: np.ndarray
    mode: str
    component: str
    folds: np.ndarray
    all_images: ProtocolResult
    two_fold: ProtocolResult

    def as_dict(self) -> dict:
        """JSON-ready view: thresholds by class name (classes with boxes only) and the summaries."""
        names = list(self.all_images.summary["boxes"])

        def by_name(row: np.ndarray) -> dict:
            return {name: float(row[self.class_names.index(name)]) for name in names}

        return {
            "mode": self.mode,
            "component": self.component,
            "candidates": self.candidates.tolist(),
            "all_images": {"thresholds": by_name(self.all_images.thresholds[0]), **self.all_images.summary},
            "two_fold": {"thresholds_by_fold": [by_name(row) for row in self.two_fold.thresholds],
                         **self.two_fold.summary},
        }


def choose_box_thresholds(
    maps,
    gt_image,
    gt_class,
    gt_boxes,
    original_sizes,
    patient_ids,
    class_names: Sequence[str],
    candidates,
    mode: str = "percentile",
    component: str = "largest",
    connectivity: int = 8,
    kappas: Sequence[float] = DEFAULT_KAPPAS,
    seed: int = 0,
    dice=None,
    workers: int | None = None,
) -> BoxThresholdChoice:
    """Choose per-class box thresholds maximising mean IoU, under the paper's and the two-fold protocol.

    Args:
        maps: (B, K, h, w) maps of the box images; K matches ``class_names``.
        gt_image, gt_class, gt_boxes, original_sizes: as ``sweep_box_thresholds`` (boxes in original pixels).
        patient_ids: (B,) patient of each image, for the patient-disjoint folds.
        class_names: K names.
        candidates: (Q,) thresholds to try (e.g. ``percentile_grid()``).
        mode, component, connectivity: the ``custom.localisation.BoxRule``.
        kappas: IoU levels of T(IoU).
        seed: seed of the fold split.
        dice: optional (M,) cDice per box (threshold-free), added to both summaries.
        workers: threads for the sweep (``sweep_box_thresholds``).

    Returns:
        ``BoxThresholdChoice``.
    """
    num_classes = len(class_names)
    maps = torch.as_tensor(maps if isinstance(maps, torch.Tensor) else np.asarray(maps))
    if maps.ndim != 4 or maps.shape[1] != num_classes:
        raise ValueError(f"maps must be (B, K={num_classes}, h, w), got {tuple(maps.shape)}")
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1)
    gt_image = np.asarray(gt_image, dtype=np.int64)
    gt_class = np.asarray(gt_class, dtype=np.int64)
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (maps.shape[0],):
        raise ValueError(f"patient_ids must be (B={maps.shape[0]},), got {patient_ids.shape}")
    ious = sweep_box_thresholds(maps, gt_image, gt_class, gt_boxes, original_sizes, candidates, mode,
                                component, connectivity, workers)
    boxes = np.arange(len(gt_class))

    def thresholds_of(chosen: np.ndarray) -> np.ndarray:
        return np.where(chosen >= 0, candidates[np.maximum(chosen, 0)], np.nan)

    chosen_all = choose_thresholds(ious, gt_class, num_classes)
    iou_all = ious[chosen_all[gt_class], boxes]
    all_images = ProtocolResult(thresholds_of(chosen_all)[None], iou_all,
                                localisation_summary(iou_all, gt_class, class_names, dice, kappas))

    folds = patient_folds(patient_ids, seed)
    box_fold = folds[gt_image]
    chosen_folds = np.stack([choose_thresholds(ious, gt_class, num_classes, use=box_fold == fold)
                             for fold in (0, 1)])
    # Each box is scored with the thresholds chosen on the other fold.
    applied = chosen_folds[1 - box_fold, gt_class]
    if (applied < 0).any():
        raise ValueError("a fold holds no ground-truth box: two-fold calibration needs boxes in both folds")
    iou_cross = ious[applied, boxes]
    two_fold = ProtocolResult(thresholds_of(chosen_folds), iou_cross,
                              localisation_summary(iou_cross, gt_class, class_names, dice, kappas))
    return BoxThresholdChoice(tuple(class_names), candidates, mode, component, folds, all_images, two_fold)


def youden_thresholds(probabilities, labels, class_names=None) -> np.ndarray:
    """Per-class decision thresholds maximising Youden's J = TPR - FPR on validation data.

    A class is called positive when its probability is >= the threshold; the threshold returned is the
    lowest validation score called positive at the best J (ties in J: the highest such threshold).

    Args:
        probabilities: (N, K) scores (probabilities or logits; thresholds come in the same units).
        labels: (N, K) 0/1 ground truth.
        class_names: optional K names for the warning.

    Returns:
        (K,) float64 thresholds; NaN (with a warning) for a class whose labels are all 0 or all 1.
    """
    scores = np.asarray(probabilities.detach().cpu() if hasattr(probabilities, "detach") else probabilities,
                        dtype=np.float64)
    labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"probabilities and labels must both be (N, K), got {scores.shape}, {labels.shape}")
    if not np.isfinite(scores).all() or not np.isin(labels, (0, 1)).all():
        raise ValueError("probabilities must be finite and labels 0 or 1")
    thresholds = np.full(scores.shape[1], np.nan)
    undefined = []
    for k in range(scores.shape[1]):  # K = 14 columns: the per-class work below is vectorised
        positives = labels[:, k].sum()
        negatives = len(labels) - positives
        if positives == 0 or negatives == 0:
            undefined.append(class_names[k] if class_names is not None else k)
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        ranked, hits = scores[order, k], labels[order, k]
        # Thresholds sit at each distinct score: the last index of a run of equal scores.
        last = np.r_[ranked[1:] != ranked[:-1], True]
        tpr = np.cumsum(hits)[last] / positives
        fpr = np.cumsum(1 - hits)[last] / negatives
        thresholds[k] = ranked[last][np.argmax(tpr - fpr)]
    if undefined:
        warnings.warn(f"Youden threshold undefined (a single label value) for classes {undefined}: NaN",
                      RuntimeWarning, stacklevel=2)
    return thresholds
