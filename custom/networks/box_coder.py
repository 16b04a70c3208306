"""Standard R-CNN box coder: boxes <-> (dx, dy, dw, dh) deltas relative to reference boxes."""

from __future__ import annotations

import math

import torch


class BoxCoder:
    """Encodes and decodes xyxy boxes as deltas relative to reference boxes (weights 1, 1, 1, 1 by default).

    Any leading shape is broadcast: ``decode(deltas (..., 4), reference (..., 4)) -> boxes (..., 4)``.
    Width/height deltas are clamped at log(1000 / 16), as torchvision does, so exp() cannot overflow.
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)):
        self.weights = weights
        self.max_log_scale = math.log(1000.0 / 16)

    @staticmethod
    def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights

    def encode(self, boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Deltas (..., 4) that turn ``reference`` (..., 4) into ``boxes`` (..., 4), both xyxy."""
        wx, wy, ww, wh = self.weights
        rx, ry, rw, rh = self._centre_size(reference)
        bx, by, bw, bh = self._centre_size(boxes)
        return torch.stack(
            [wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * torch.log(bw / rw), wh * torch.log(bh / rh)], dim=-1
        )

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Boxes (..., 4) xyxy from ``deltas`` (..., 4) applied to ``reference`` (..., 4) xyxy."""
        wx, wy, ww, wh = self.weights
        rx, ry, rw, rh = self._centre_size(reference.to(deltas.dtype))
        cx = rx + deltas[..., 0] / wx * rw
        cy = ry + deltas[..., 1] / wy * rh
        w = rw * torch.exp((deltas[..., 2] / ww).clamp(max=self.max_log_scale))
        h = rh * torch.exp((deltas[..., 3] / wh).clamp(max=self.max_log_scale))
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Clip xyxy boxes (..., 4) to an image of ``image_size = (H, W)`` pixels (differentiable inside)."""
    height, width = image_size
    x = boxes[..., 0::2].clamp(0, width)
    y = boxes[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)
