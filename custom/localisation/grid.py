"""The grid convention every map, box and mask of the bundle follows; the one place it is written down.

A map of h x w pixels covers an image of H x W pixels (the model input for the Det painting, the original
image for ground truths and predicted boxes). Map pixel (i, j) spans [j W/w, (j + 1) W/w) x [i H/h, (i + 1) H/h)
of that image and its centre is ((j + 0.5) W/w, (i + 0.5) H/h). Boxes are float xyxy [x0, y0, x1, y1] in
pixels of a named image, origin at its top-left corner, x1 = x0 + width; a box covers map pixel (i, j) when
that centre lies in [x0, x1) x [y0, y1). Sizes are always given as (H, W), rows first.

This assumes the model input is the whole original image resized (stretched, no padding or crop) to the
input size, so that one map pixel spans the same fraction of both images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _as_tensor(values, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values if dtype is None else values.to(dtype)
    try:
        return torch.as_tensor(np.asarray(values), dtype=dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a tensor or an array, got {type(values).__name__}") from error


def _grid_size(grid_size: int | Sequence[int]) -> tuple[int, int]:
    size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(int(s) for s in grid_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"grid_size must be an int or (h, w) with positive sides, got {grid_size!r}")
    return size


def box_grid_ranges(
    boxes, image_sizes, grid_size: int | Sequence[int], min_one_pixel: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the map pixels each box covers, as half-open row and column ranges.

    Args:
        boxes: (..., 4) float xyxy in pixels of an image of size ``image_sizes``.
        image_sizes: (H, W) of that image, shape (2,) or broadcastable to (..., 2).
        grid_size: (h, w) of the map grid (an int for a square grid).
        min_one_pixel: a box that overlaps the image but, being thinner than a map pixel, contains no pixel
            centre along an axis gets the one pixel holding its centre on that axis (so that every ground
            truth has a non-empty mask); off by default, where the pure centre rule holds.

    Returns:
        (r0, r1, c0, c1), each int64 (...): the box covers rows r0 <= i < r1 and columns c0 <= j < c1
        (empty when r1 == r0 or c1 == c0); 0 <= r0 <= r1 <= h and 0 <= c0 <= c1 <= w.
    """
    boxes = _as_tensor(boxes, "boxes", torch.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4) xyxy, got {tuple(boxes.shape)}")
    tracing = torch.compiler.is_compiling()  # no data to check in a torch.export / ONNX trace
    if not tracing and not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    sizes = _as_tensor(image_sizes, "image_sizes", torch.float64).to(boxes.device)
    if sizes.shape[-1:] != (2,) or (not tracing and (sizes <= 0).any()):
        raise ValueError(f"image_sizes must be positive (H, W) pairs, got shape {tuple(sizes.shape)}")
    grid_h, grid_w = _grid_size(grid_size)
    ranges = []
    # Column j's centre (j + 0.5) W/w is >= x0 iff j >= x0 w/W - 0.5, and < x1 iff j < x1 w/W - 0.5.
    for low, high, length, cells in ((boxes[..., 1], boxes[..., 3], sizes[..., 0], grid_h),
                                     (boxes[..., 0], boxes[..., 2], sizes[..., 1], grid_w)):
        scale = cells / length
        start = torch.ceil(low * scale - 0.5).clamp(0, cells)
        stop = torch.ceil(high * scale - 0.5).clamp(0, cells)
        stop = torch.maximum(stop, start)
        if min_one_pixel:
            thin = (stop == start) & (high > low) & (high > 0) & (low < length)
            centre_cell = torch.floor((low + high) / 2 * scale).clamp(0, cells - 1)
            start = torch.where(thin, centre_cell, start)
            stop = torch.where(thin, centre_cell + 1, stop)
        ranges += [start.long(), stop.long()]
    r0, r1, c0, c1 = ranges
    return r0, r1, c0, c1


def box_masks(
    boxes, image_sizes, grid_size: int | Sequence[int], min_one_pixel: bool = True
) -> torch.Tensor:
    """Paint each box as a binary mask on the map grid (the ground truth g of cDice).

    Args:
        boxes: (..., 4) float xyxy in pixels of the image of size ``image_sizes`` (H, W), broadcastable.
        grid_size: (h, w) of the map grid.
        min_one_pixel: see ``box_grid_ranges``; on by default so no box that overlaps the image is empty.

    Returns:
        (..., h, w) float32 mask, 1 on the map pixels whose centre lies in the box (module docstring).
    """
    r0, r1, c0, c1 = box_grid_ranges(boxes, image_sizes, grid_size, min_one_pixel)
    grid_h, grid_w = _grid_size(grid_size)
    rows = torch.arange(grid_h, device=r0.device)
    cols = torch.arange(grid_w, device=r0.device)
    in_rows = (rows >= r0[..., None]) & (rows < r1[..., None])
    in_cols = (cols >= c0[..., None]) & (cols < c1[..., None])
    return (in_rows[..., :, None] & in_cols[..., None, :]).float()


def grid_boxes_to_image(boxes, grid_size: int | Sequence[int], image_sizes) -> torch.Tensor:
    """Convert xyxy boxes from map pixels to pixels of an image of size ``image_sizes`` (H, W).

    Args:
        boxes: (..., 4) float xyxy in map pixels (``mask_boxes``); NaN rows stay NaN.
        grid_size: (h, w) of the map.
        image_sizes: (H, W), shape (2,) or broadcastable to (..., 2), e.g. (B, 1, 2) for (B, K, 4) boxes.

    Returns:
        (..., 4) float32 xyxy in image pixels: map column j spans [j W/w, (j + 1) W/w).
    """
    boxes = _as_tensor(boxes, "boxes", torch.float64)
    sizes = _as_tensor(image_sizes, "image_sizes", torch.float64).to(boxes.device)
    if sizes.shape[-1:] != (2,) or (sizes <= 0).any():
        raise ValueError(f"image_sizes must be positive (H, W) pairs, got shape {tuple(sizes.shape)}")
    grid_h, grid_w = _grid_size(grid_size)
    scale = torch.stack([sizes[..., 1] / grid_w, sizes[..., 0] / grid_h] * 2, dim=-1)
    return (boxes * scale).float()
