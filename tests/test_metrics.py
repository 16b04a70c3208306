"""Tests of custom.metrics against slow, straightforward reference implementations."""

import itertools
import warnings

import numpy as np
import pytest
import torch

from custom.localisation import BoxRule
from custom.localisation.grid import box_masks
from custom.metrics import (
    auc_per_class,
    box_iou,
    choose_box_thresholds,
    choose_thresholds,
    continuous_dice,
    gt_box_dice,
    gt_box_iou,
    iou_accuracy,
    localisation_summary,
    patient_folds,
    per_class_mean,
    percentile_grid,
    sweep_box_thresholds,
    youden_thresholds,
)


# ---- AUC ---------------------------------------------------------------------------------------------------

def reference_auc(scores, labels):
    """Fraction of (positive, negative) pairs ordered correctly, ties counting 1/2."""
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_auc_equals_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(60, 4)), 1)  # rounding makes ties
    labels = (rng.random((60, 4)) < 0.3).astype(int)
    labels[:, 3] = (scores[:, 3] + rng.normal(scale=0.5, size=60) > 0).astype(int)
    per_class, mean = auc_per_class(scores, labels)
    expected = [reference_auc(scores[:, k], labels[:, k]) for k in range(4)]
    np.testing.assert_allclose(per_class, expected, rtol=1e-12)
    assert mean == pytest.approx(np.mean(expected))
    assert per_class[3] > 0.7  # the informative column


def test_auc_of_a_single_valued_class_is_nan_and_left_out_of_the_mean():
    scores = np.array([[0.1, 0.9], [0.4, 0.2], [0.8, 0.3]])
    labels = np.array([[0, 1], [1, 1], [1, 1]])
    with pytest.warns(RuntimeWarning, match="Effusion"):
        per_class, mean = auc_per_class(scores, labels, class_names=["Atelectasis", "Effusion"])
    assert per_class[0] == 1.0 and np.isnan(per_class[1]) and mean == 1.0
    with pytest.raises(ValueError, match="0 or 1"):
        auc_per_class(scores, labels * 2)


# ---- IoU ---------------------------------------------------------------------------------------------------

def rasterised_iou(a, b, size=40):
    """IoU of integer boxes counted on a pixel grid."""
    grid_a, grid_b = np.zeros((size, size), bool), np.zeros((size, size), bool)
    grid_a[a[1]:a[3], a[0]:a[2]] = True
    grid_b[b[1]:b[3], b[0]:b[2]] = True
    union = (grid_a | grid_b).sum()
    return (grid_a & grid_b).sum() / union if union else 0.0


def test_iou_equals_rasterised_overlap():
    rng = np.random.default_rng(1)
    corners = rng.integers(0, 16, size=(200, 2, 2))
    sizes = rng.integers(0, 20, size=(200, 2, 2))  # zero sizes: degenerate boxes
    boxes = np.concatenate([corners, corners + sizes], axis=-1)  # (200, 2, 4) xyxy
    iou = box_iou(boxes[:, 0], boxes[:, 1])
    expected = [rasterised_iou(a, b) for a, b in boxes]
    np.testing.assert_allclose(iou.numpy(), expected, rtol=1e-12)
    assert (iou > 0).sum() > 50 and (iou == 0).sum() > 50  # overlapping and disjoint pairs


def test_missing_prediction_counts_as_zero_and_gathering_follows_image_and_class():
    pred = torch.full((2, 3, 4), float("nan"))
    pred[1, 2] = torch.tensor([10.0, 10.0, 30.0, 30.0])
    gt = torch.tensor([[10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 5.0, 5.0]])
    iou = gt_box_iou(pred, [1, 0], [2, 2], gt)
    assert iou.tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="NaN"):
        box_iou(gt, torch.full((2, 4), float("nan")))


# ---- cDice -------------------------------------------------------------------------------------------------

def reference_dice(values, mask):
    """cDice with explicit loops over pixels, p = (x - min) / (max - min)."""
    low, high = min(min(row) for row in values), max(max(row) for row in values)
    overlap = energy_p = energy_g = 0.0
    for row_values, row_mask in zip(values, mask):
        for x, g in zip(row_values, row_mask):
            p = (x - low) / (high - low) if high > low else 0.0
            overlap += p * g
            energy_p += p * p
            energy_g += g * g
    return 2 * overlap / (energy_p + energy_g)


def test_continuous_dice_equals_loops():
    rng = np.random.default_rng(2)
    maps = rng.normal(loc=3.0, size=(5, 6, 7))  # positive offset: the (x + min) sign bug would show
    corners = np.sort(rng.uniform(0, 24, size=(5, 2, 2)), axis=1)  # (box, [low, high], [x, y])
    boxes = np.concatenate([corners[:, 0], corners[:, 1]], axis=1)  # xyxy in a 24 x 28 image
    masks = box_masks(torch.from_numpy(boxes), (24, 28), (6, 7)).numpy()
    masks[0] = 0
    masks[0, 2:4, 1:5] = 1
    dice = continuous_dice(torch.from_numpy(maps).float(), torch.from_numpy(masks))
    expected = [reference_dice(maps[i].tolist(), masks[i].tolist()) for i in range(5)]
    np.testing.assert_allclose(dice.numpy(), expected, rtol=1e-5)


def test_continuous_dice_of_a_box_shaped_map_is_one():
    maps = torch.zeros(2, 3, 8, 8)
    gt_boxes = torch.tensor([[16.0, 8.0, 48.0, 40.0], [0.0, 0.0, 64.0, 32.0]])  # 64 px originals
    maps[0, 1] = box_masks(gt_boxes[0], (64, 64), 8)
    maps[1, 2] = 5 + 2 * box_masks(gt_boxes[1], (64, 64), 8)  # offset and scale do not matter
    dice = gt_box_dice(maps, [0, 1], [1, 2], gt_boxes, [[64, 64], [64, 64]])
    assert torch.allclose(dice, torch.ones(2, dtype=torch.float64))
    assert continuous_dice(torch.ones(4, 4), torch.zeros(4, 4)).isnan()  # nothing on either side


# ---- per-class summaries and T(IoU) ------------------------------------------------------------------------

def test_iou_accuracy_and_per_class_means():
    ious = np.array([0.05, 0.3, 0.55, 0.7, 0.1, 0.65])
    classes = np.array([0, 0, 0, 2, 2, 2])
    np.testing.assert_allclose(per_class_mean(ious, classes, 3), [0.3, np.nan, 0.4833333333333333])
    accuracy = iou_accuracy(ious, classes, 3, kappas=(0.1, 0.5, 0.7))
    np.testing.assert_allclose(accuracy, [[2 / 3, np.nan, 1.0], [1 / 3, np.nan, 2 / 3],
                                          [0.0, np.nan, 1 / 3]])
    summary = localisation_summary(ious, classes, ["a", "b", "c"], dice=ious / 2, kappas=(0.5,))
    assert summary["boxes"] == {"a": 3, "c": 3}
    assert summary["iou"]["mean"] == pytest.approx((0.3 + 0.4833333333333333) / 2)  # classes weigh the same
    assert summary["cdice"]["a"] == pytest.approx(0.15)
    assert summary["t_iou"]["0.5"] == pytest.approx({"a": 1 / 3, "c": 2 / 3, "mean": 0.5})
    with pytest.raises(ValueError, match="NaN"):
        iou_accuracy([np.nan], [0], 1)


# ---- threshold choice ---------------------------------------------------------------------------------------

def calibration_set(seed=0, images=24, classes=3, size=16, side_of=None):
    """Maps with one bright square per (image, class) and noise; the ground truth is the square itself.

    side_of(image) gives the square's side in map pixels (default: random 3..7)."""
    rng = np.random.default_rng(seed)
    maps = rng.random((images, classes, size, size)).astype(np.float32) * 0.5
    gt_image, gt_class, gt_boxes = [], [], []
    originals = np.tile([[128.0, 96.0]], (images, 1))  # (H, W) originals: 8 x 6 px per map pixel
    for b, k in itertools.product(range(images), range(classes)):
        if rng.random() < 0.4:
            continue
        side = rng.integers(3, 8) if side_of is None else side_of(b)
        r, c = rng.integers(0, size - side, size=2)
        maps[b, k, r:r + side, c:c + side] += 0.5
        gt_image.append(b)
        gt_class.append(k)
        gt_boxes.append([c * 6.0, r * 8.0, (c + side) * 6.0, (r + side) * 8.0])
    return maps, np.array(gt_image), np.array(gt_class), np.array(gt_boxes), originals


def test_sweep_equals_the_box_rule_at_each_candidate():
    maps, gt_image, gt_class, gt_boxes, originals = calibration_set()
    candidates = [0.5, 0.8, 0.95]
    for mode, values in (("percentile", candidates), ("absolute", [0.3, 0.6, 0.9])):
        ious = sweep_box_thresholds(maps, gt_image, gt_class, gt_boxes, originals, values, mode, "max")
        serial = sweep_box_thresholds(maps, gt_image, gt_class, gt_boxes, originals, values, mode, "max",
                                      workers=1)
        assert np.array_equal(ious, serial)  # threads change nothing
        for q, value in enumerate(values):
            boxes = BoxRule(mode, "max").boxes(maps, [value] * 3, originals).boxes
            np.testing.assert_allclose(ious[q], gt_box_iou(boxes, gt_image, gt_class, gt_boxes).numpy())


def test_choose_thresholds_maximises_each_class_mean_iou():
    ious = np.array([[0.9, 0.1, 0.4, 0.2],
                     [0.2, 0.3, 0.4, 0.6],
                     [0.1, 0.3, 0.4, 0.1]])  # (Q, M)
    classes = np.array([0, 0, 1, 2])
    assert choose_thresholds(ious, classes, 4).tolist() == [0, 0, 1, -1]  # ties: the first candidate
    with pytest.warns(RuntimeWarning, match="no boxes"):
        chosen = choose_thresholds(ious, classes, 4, use=np.array([True, True, False, True]))
    assert chosen.tolist() == [0, 0, 1, -1]  # class 1 falls back to the best candidate over all used boxes


def test_threshold_choice_protocols():
    patients = np.arange(24) // 2  # two images per patient
    folds = patient_folds(patients, seed=0)
    # Large squares in fold 0, small ones in fold 1: the folds want different percentiles.
    maps, gt_image, gt_class, gt_boxes, originals = calibration_set(
        seed=1, side_of=lambda b: 10 if folds[b] == 0 else 3)
    candidates = percentile_grid(0.5, 0.98, 17)
    result = choose_box_thresholds(maps, gt_image, gt_class, gt_boxes, originals, patients,
                                      ["a", "b", "c"], candidates, component="largest")
    ious = sweep_box_thresholds(maps, gt_image, gt_class, gt_boxes, originals, candidates)
    # Paper protocol: per class, the best mean IoU over the grid.
    for k in range(3):
        best = ious[:, gt_class == k].mean(axis=1).max()
        assert result.all_images.summary["iou"]["abc"[k]] == pytest.approx(best)
    # Two-fold: each box scored with the threshold its class got on the OTHER fold.
    assert np.array_equal(result.folds, folds)
    assert (result.two_fold.thresholds[0] < result.two_fold.thresholds[1]).all()
    box_fold = result.folds[gt_image]
    for m in range(len(gt_class)):
        other = 1 - box_fold[m]
        chosen = np.flatnonzero(candidates == result.two_fold.thresholds[other, gt_class[m]])[0]
        assert result.two_fold.box_iou[m] == ious[chosen, m]
    assert result.two_fold.summary["iou"]["mean"] < result.all_images.summary["iou"]["mean"] - 0.1
    assert result.all_images.summary["iou"]["mean"] > 0.5  # the bright squares are found
    report = result.as_dict()
    assert set(report["all_images"]["thresholds"]) == {"a", "b", "c"}
    assert len(report["two_fold"]["thresholds_by_fold"]) == 2


def test_patient_folds_are_disjoint_balanced_and_seeded():
    patients = np.array([5, 5, 5, 1, 2, 2, 3, 4, 4, 6, 7, 8])
    folds = patient_folds(patients, seed=3)
    for patient in np.unique(patients):
        assert len(set(folds[patients == patient])) == 1
    assert abs(int((folds == 0).sum()) - int((folds == 1).sum())) <= 3  # the largest patient has 3 images
    assert np.array_equal(folds, patient_folds(patients, seed=3))
    with pytest.raises(ValueError, match="2 patients"):
        patient_folds([1, 1, 1])


def reference_youden(scores, labels):
    """Best TPR - FPR over every observed score used as a '>=' threshold (highest threshold on ties)."""
    best, best_threshold = -np.inf, None
    for threshold in sorted(set(scores), reverse=True):
        called = scores >= threshold
        j = called[labels == 1].mean() - called[labels == 0].mean()
        if j > best:
            best, best_threshold = j, threshold
    return best_threshold


def test_youden_thresholds_equal_brute_force():
    rng = np.random.default_rng(4)
    labels = (rng.random((80, 3)) < 0.3).astype(int)
    scores = np.round(labels * 0.3 + rng.random((80, 3)), 2)
    thresholds = youden_thresholds(scores, labels)
    expected = [reference_youden(scores[:, k], labels[:, k]) for k in range(3)]
    np.testing.assert_allclose(thresholds, expected)
    labels[:, 1] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert np.isnan(youden_thresholds(scores, labels)[1])
    assert any("undefined" in str(w.message) for w in caught)
