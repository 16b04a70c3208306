"""The fixed grid of region proposals (paper Sec. 4.2: sizes 64/128/256, ratio 1, N = 395 at 512 px).

At a 512-px input the proposals are squares of 64, 128 and 256 px centred on grids of 17 x 17, 9 x 9 and
5 x 5 points spaced 32, 64 and 128 px apart, the grid points including the image border; each square is then
clipped to the image, so border proposals are not square. Sizes and spacings are fractions of the input
side (1/8, 1/4, 1/2 and 1/16, 1/8, 1/4), so N = 395 at every input size (the authors' code kept pixel sizes
fixed, which changes N with the input size).
"""

from __future__ import annotations

import torch
from torch import nn

# (box size, centre spacing) as fractions of the image side, one row per pyramid of proposals.
PAPER_PROPOSAL_LEVELS: tuple[tuple[float, float], ...] = ((1 / 8, 1 / 16), (1 / 4, 1 / 8), (1 / 2, 1 / 4))


def make_proposals(
    image_size: tuple[int, int], levels: tuple[tuple[float, float], ...] = PAPER_PROPOSAL_LEVELS
) -> torch.Tensor:
    """Return the proposals of an image of ``image_size = (H, W)`` pixels.

    Output (N, 4) float32 xyxy in input-image pixels, clipped to [0, W] x [0, H]; ordered by level
    (smallest boxes first), then row-major over centres (y, then x). Each level has
    (1 / spacing + 1)^2 centres; sizes and spacings are fractions of each axis' length, so for a square
    input the boxes are squares before clipping.
    """
    height, width = image_size
    boxes = []
    for size_fraction, spacing_fraction in levels:
        steps = round(1 / spacing_fraction)
        fractions = torch.arange(steps + 1, dtype=torch.float64) / steps
        cy, cx = torch.meshgrid(fractions * height, fractions * width, indexing="ij")
        half_h, half_w = size_fraction * height / 2, size_fraction * width / 2
        level = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1).reshape(-1, 4)
        boxes.append(level)
    boxes = torch.cat(boxes)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes.float()


class ProposalGrid(nn.Module):
    """Caches the fixed proposals per input size (they depend on nothing else).

    ``forward(image_size)`` -> (N, 4) xyxy input pixels on ``device``. Part of the detection module, which
    a scripted (TorchScript) model does not run: its forward is left out of the compilation.
    """

    __jit_unused_properties__ = ["num_proposals"]

    def __init__(self, levels: tuple[tuple[float, float], ...] = PAPER_PROPOSAL_LEVELS):
        super().__init__()
        self.levels = tuple(tuple(level) for level in levels)
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    @property
    def num_proposals(self) -> int:
        return sum((round(1 / spacing) + 1) ** 2 for _, spacing in self.levels)

    @torch.jit.unused
    def forward(self, image_size: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
        key = (int(image_size[0]), int(image_size[1]), str(device))
        if key not in self._cache:
            self._cache[key] = make_proposals(key[:2], self.levels).to(device)
        return self._cache[key]
