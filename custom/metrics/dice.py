"""Continuous Dice (cDice) between a map and a ground-truth box (the paper's Table 2)."""

from __future__ import annotations

import numpy as np
import torch

from custom.localisation.grid import box_masks
from custom.localisation.maps import minmax_scale

_CHUNK = 1024


def continuous_dice(maps, gt_masks) -> torch.Tensor:
    """cDice = 2 sum(p g) / (sum p^2 + sum g^2), per map, over its pixels.

    p is the map min-max scaled to [0, 1] per map, (x - min) / (max - min) (the authors' code computes
    (x + min) / (max - min), a sign bug); a constant map gives p = 0, hence cDice 0.

    Args:
        maps: (..., h, w) float maps (Sal, Det or Mix of one image and class each).
        gt_masks: (..., h, w) ground-truth masks g on the same grid (``box_masks``), broadcastable.

    Returns:
        (...) float64 cDice in [0, 1]; NaN where both p and g are all zeros.
    """
    maps = torch.as_tensor(maps if isinstance(maps, torch.Tensor) else np.asarray(maps))
    # Sums need at least float32: half-precision maps (autocast) are widened.
    maps = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    gt_masks = torch.as_tensor(gt_masks if isinstance(gt_masks, torch.Tensor) else np.asarray(gt_masks))
    gt_masks = gt_masks.to(maps.device, maps.dtype)
    if maps.ndim < 2 or maps.shape[-2:] != gt_masks.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(gt_masks.shape)} must share (h, w)")
    if maps.numel() and not torch.isfinite(torch.stack(torch.aminmax(maps))).all():  # NaN propagates
        raise ValueError("maps contain NaN or infinite values")
    p = minmax_scale(maps).flatten(-2)
    gt_masks = gt_masks.flatten(-2)
    # Sums in the maps' dtype (float32 sums are pairwise: ~1e-7 relative), the ratio in float64.
    overlap = (p * gt_masks).sum(dim=-1).double()
    energy = (p * p).sum(dim=-1).double() + (gt_masks * gt_masks).sum(dim=-1).double()
    overlap, energy = torch.broadcast_tensors(overlap, energy)
    return torch.where(energy > 0, 2 * overlap / torch.where(energy > 0, energy, 1), torch.nan)


def gt_box_dice(maps, gt_image, gt_class, gt_boxes, original_sizes) -> torch.Tensor:
    """cDice of each ground-truth box against the map of its image and class.

    Args:
        maps: (B, K, h, w) maps.
        gt_image: (M,) int index of each ground truth's image in B.
        gt_class: (M,) int index of its class in K.
        gt_boxes: (M, 4) float xyxy in ORIGINAL image pixels.
        original_sizes: (B, 2) (H, W) of each original image.

    Returns:
        (M,) float64 cDice, g being the box painted on the map grid by the pixel-centre rule
        (``custom.localisation.grid.box_masks``).
    """
    maps = torch.as_tensor(maps if isinstance(maps, torch.Tensor) else np.asarray(maps))
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (B, K, h, w), got {tuple(maps.shape)}")
    gt_image = torch.as_tensor(gt_image, dtype=torch.long, device=maps.device)
    gt_class = torch.as_tensor(gt_class, dtype=torch.long, device=maps.device)
    gt_boxes = torch.as_tensor(np.asarray(gt_boxes) if not isinstance(gt_boxes, torch.Tensor) else gt_boxes)
    sizes = torch.as_tensor(np.asarray(original_sizes), dtype=torch.float64)[gt_image.cpu()]
    if gt_boxes.shape != (len(gt_image), 4) or len(gt_class) != len(gt_image):
        raise ValueError(f"need gt_image (M,), gt_class (M,), gt_boxes (M, 4); got {len(gt_image)}, "
                         f"{len(gt_class)}, {tuple(gt_boxes.shape)}")
    dice = []
    # Chunks bound the memory of the gathered maps and masks (M x h x w each).
    for start in range(0, len(gt_image), _CHUNK):
        part = slice(start, start + _CHUNK)
        masks = box_masks(gt_boxes[part], sizes[part], maps.shape[-2:])
        dice.append(continuous_dice(maps[gt_image[part], gt_class[part]], masks).cpu())
    return torch.cat(dice) if dice else torch.zeros(0, dtype=torch.float64)
