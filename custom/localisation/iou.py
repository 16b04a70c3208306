"""Intersection over union of matched xyxy boxes: the one IoU of the bundle (the paper's localisation
measure, Tables 2 and 3; the box prior's leave-one-out score; the threshold sweep)."""

from __future__ import annotations

import numpy as np
import torch


def box_iou(pred, target) -> torch.Tensor:
    """IoU of matched pairs of boxes, element-wise (not the all-pairs matrix of torchvision's box_iou).

    Boxes are float xyxy in the same image's continuous pixel coordinates; area = (x1 - x0) * (y1 - y0).

    Args:
        pred: (..., 4) predicted boxes; a row with a NaN (no prediction) has IoU 0.
        target: (..., 4) ground-truth boxes, broadcastable with ``pred``.

    Returns:
        (...) float64 IoU in [0, 1]; 0 where the union is empty (both boxes degenerate).
    """
    pred = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).double()
    target = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target).double()
    target = target.to(pred.device)
    if pred.shape[-1:] != (4,) or target.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4), got {tuple(pred.shape)} and {tuple(target.shape)}")
    if torch.isnan(target).any():
        raise ValueError("ground-truth boxes contain NaN")
    missing = torch.isnan(pred).any(dim=-1)
    pred = torch.nan_to_num(pred)
    width = (torch.minimum(pred[..., 2], target[..., 2]) - torch.maximum(pred[..., 0], target[..., 0]))
    height = (torch.minimum(pred[..., 3], target[..., 3]) - torch.maximum(pred[..., 1], target[..., 1]))
    intersection = width.clamp(min=0) * height.clamp(min=0)

    def area(boxes: torch.Tensor) -> torch.Tensor:
        return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)

    union = area(pred) + area(target) - intersection
    iou = torch.where(union > 0, intersection / torch.where(union > 0, union, 1), 0)
    return torch.where(missing, 0, iou)
