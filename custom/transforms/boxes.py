"""Exact box mapping between an original image's pixels and the model input's pixels, and clipping.

Convention (the whole bundle): a box is float xyxy ``[x0, y0, x1, y1]`` in continuous pixel coordinates of a
named image, origin at the image's top-left CORNER (x0 = left edge of the box, x1 = x0 + w); x runs along
columns (width W), y along rows (height H). An image resized from (H, W) to (h, w) over its full extent (what
MONAI's Resized does, align_corners=False) maps x -> x * w / W and y -> y * h / H, and nothing else.
Sizes are [H, W] (rows, columns), as in the datalists' ``original_size``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BoxArray = torch.Tensor | np.ndarray


def scale_boxes(boxes, from_size: Sequence[float], to_size: Sequence[float]) -> BoxArray:
    """Map float xyxy boxes from the pixels of an image of size ``from_size`` to one of size ``to_size``.

    Args:
        boxes: (..., 4) xyxy in ``from_size`` pixels: torch.Tensor, np.ndarray or nested sequence.
        from_size: [H, W] of the image the boxes are in; to_size: [H, W] of the target image.

    Returns:
        (..., 4) xyxy in ``to_size`` pixels, same type as ``boxes`` (a sequence gives a float64 ndarray);
        a floating input keeps its dtype, an integer one becomes float32 (torch) / float64 (numpy).
        The arithmetic is float64, so mapping there and back is exact to ~1e-12 px for float64 boxes; float32
        boxes are rounded to float32 once per mapping (relative 6e-8).
    """
    from_h, from_w = _size(from_size, "from_size")
    to_h, to_w = _size(to_size, "to_size")
    scale = [to_w / from_w, to_h / from_h, to_w / from_w, to_h / from_h]
    if isinstance(boxes, torch.Tensor):
        _check_shape(tuple(boxes.shape))
        out_dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
        factor = torch.tensor(scale, dtype=torch.float64, device=boxes.device)
        return (boxes.to(torch.float64) * factor).to(out_dtype)
    array = np.asarray(boxes)
    if array.size == 0 and array.ndim == 1:
        array = array.reshape(0, 4)
    _check_shape(array.shape)
    out_dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64
    return (array.astype(np.float64) * np.asarray(scale)).astype(out_dtype)


def boxes_to_model(boxes, original_size: Sequence[float], model_size: Sequence[float]) -> BoxArray:
    """Boxes (..., 4) xyxy in ORIGINAL image pixels -> model-input pixels (sizes [H, W]); see scale_boxes."""
    return scale_boxes(boxes, original_size, model_size)


def boxes_to_original(boxes, model_size: Sequence[float], original_size: Sequence[float]) -> BoxArray:
    """Boxes (..., 4) xyxy in MODEL-input pixels -> original image pixels (sizes [H, W]); see scale_boxes."""
    return scale_boxes(boxes, model_size, original_size)


def clip_boxes(boxes, size: Sequence[float]) -> BoxArray:
    """Clip float xyxy boxes (..., 4) to an image of size [H, W]: x to [0, W], y to [0, H].

    Returns the same type as ``boxes`` (a sequence gives a float64 ndarray). A box wholly outside the image
    becomes degenerate (zero width or height) rather than being dropped, so indices stay aligned.
    """
    height, width = _size(size, "size")
    if isinstance(boxes, torch.Tensor):
        _check_shape(tuple(boxes.shape))
        out = boxes.clone() if boxes.is_floating_point() else boxes.to(torch.float32)
        out[..., 0::2] = out[..., 0::2].clamp(0, width)
        out[..., 1::2] = out[..., 1::2].clamp(0, height)
        return out
    array = np.asarray(boxes)
    _check_shape(array.shape)
    out = array.astype(array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64, copy=True)
    out[..., 0::2] = np.clip(out[..., 0::2], 0, width)
    out[..., 1::2] = np.clip(out[..., 1::2], 0, height)
    return out


def _size(size: Sequence[float], name: str) -> tuple[float, float]:
    """Validate an [H, W] pair of positive numbers; returned as floats."""
    if isinstance(size, torch.Tensor | np.ndarray):
        size = size.tolist()
    if len(size) != 2 or not all(float(v) > 0 for v in size):
        raise ValueError(f"{name} must be [H, W] with two positive numbers, got {size!r}")
    return float(size[0]), float(size[1])


def _check_shape(shape: tuple[int, ...]) -> None:
    """Boxes must have a last dimension of 4 (x0, y0, x1, y1)."""
    if len(shape) == 0 or shape[-1] != 4:
        raise ValueError(f"boxes must have shape (..., 4) as xyxy, got shape {shape}")
