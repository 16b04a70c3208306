"""IoU of each ground-truth box with the predicted box of its image and class (Tables 2 and 3)."""

from __future__ import annotations

import torch

from custom.localisation.iou import box_iou


def gt_box_iou(pred_boxes, gt_image, gt_class, gt_boxes) -> torch.Tensor:
    """IoU of each ground-truth box with the prediction for its image and class.

    Args:
        pred_boxes: (B, K, 4) predicted xyxy boxes (``BoxRule.boxes``; NaN rows: no prediction).
        gt_image: (M,) int index of each ground truth's image in B.
        gt_class: (M,) int index of its class in K.
        gt_boxes: (M, 4) ground-truth xyxy boxes, in the same pixels as ``pred_boxes``.

    Returns:
        (M,) float64 IoU (0 where the prediction is missing).
    """
    pred_boxes = torch.as_tensor(pred_boxes)
    gt_image = torch.as_tensor(gt_image, dtype=torch.long, device=pred_boxes.device)
    gt_class = torch.as_tensor(gt_class, dtype=torch.long, device=pred_boxes.device)
    return box_iou(pred_boxes[gt_image, gt_class], gt_boxes)
