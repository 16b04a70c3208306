"""Differentiable crop of the input image at each class's selected box (paper Sec. 3.2, x~_k)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def box_sampling_grid(boxes: torch.Tensor, image_size: tuple[int, int], crop_size: tuple[int, int]) -> torch.Tensor:
    """Sampling grid of bilinear crops: boxes (B, K, 4) xyxy input pixels -> grid (B, K, ch, cw, 2).

    Grid values are ``grid_sample``'s normalised (x, y) with ``align_corners=False``: -1 is the left edge of
    the image, +1 the right edge. Crop pixel centres are spread evenly over the box. Linear in the box
    coordinates, so the crop is differentiable with respect to them.
    """
    height, width = image_size
    ch, cw = crop_size
    # Centres of the crop's pixels as fractions of the box, (ch,) and (cw,).
    fy = (torch.arange(ch, device=boxes.device, dtype=boxes.dtype) + 0.5) / ch
    fx = (torch.arange(cw, device=boxes.device, dtype=boxes.dtype) + 0.5) / cw
    x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
    xs = (x0 + (x1 - x0) * fx) * (2.0 / width) - 1.0  # (B, K, cw)
    ys = (y0 + (y1 - y0) * fy) * (2.0 / height) - 1.0  # (B, K, ch)
    grid_x = xs[:, :, None, :].expand(-1, -1, ch, -1)
    grid_y = ys[:, :, :, None].expand(-1, -1, -1, cw)
    return torch.stack([grid_x, grid_y], dim=-1)


class BoxCrop(nn.Module):
    """Bilinear crops of size ``crop_size`` of each image at its K boxes, in one ``grid_sample`` call.

    The K crops of an image are sampled together by stacking their grids along the height, so the image is
    never copied K times.

    ``forward(images (B, C, H, W), boxes (B, K, 4) xyxy input pixels)`` -> crops (B, K, C, ch, cw).
    """

    def __init__(self, crop_size: int | tuple[int, int] = 64):
        super().__init__()
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)

    # The detection module runs eagerly (or exported by torch.export), not in a scripted model: TorchScript
    # compiles the image-logit path of RpSalProbabilities and leaves this forward out.
    @torch.jit.unused
    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        b, c, height, width = images.shape
        k = boxes.shape[1]
        ch, cw = self.crop_size
        grid = box_sampling_grid(boxes.float(), (height, width), self.crop_size).view(b, k * ch, cw, 2)
        crops = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", align_corners=False)
        return crops.view(b, c, k, ch, cw).transpose(1, 2)
