"""Log-sum-exp pooling of saliency maps to image logits, with learnable sharpness (paper Sec. 3.2)."""

from __future__ import annotations

import torch
from torch import nn


class LSEPooling(nn.Module):
    """LSE(x) = (1 / r) * log( mean_over_pixels exp(r * x) ), with r = r0 + exp(beta).

    Tends to the maximum as r -> inf and to the mean as r -> 0. As in the authors' implementation,
    ``r0 = 0`` and ``beta`` starts at 0 (r = 1); here one learnable ``beta`` per class.

    Input (B, K, h, w) saliency logits; output (B, K) image logits.
    """

    def __init__(self, num_classes: int = 14, r0: float = 0.0, beta_init: float = 0.0):
        super().__init__()
        self.r0 = r0
        self.beta = nn.Parameter(torch.full((num_classes,), float(beta_init)))

    @property
    def sharpness(self) -> torch.Tensor:
        """r (K,)."""
        return self.r0 + torch.exp(self.beta)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        r = self.sharpness.to(maps.dtype)[None, :, None]
        flat = maps.flatten(2)
        peak = flat.amax(dim=-1, keepdim=True).detach()
        # max + log(mean(exp(r (x - max)))) / r written with expm1/log1p: exact at both ends of r, where the
        # plain logsumexp form loses the mean to rounding when r is small.
        spread = torch.log1p(torch.expm1(r * (flat - peak)).mean(dim=-1, keepdim=True)) / r
        return (peak + spread).squeeze(-1)
