"""Detection module: proposal features, per-class confidence and box refinement (paper Sec. 3.2).

Shapes for B images of H x W pixels, K classes, N proposals, C class channels, maps h x w = H/4 x W/4:
    ProposalPooler:  features (B, F, h, w), proposals (N, 4) -> pooled (B, N, F, s, s), s = output_size
    ProposalHead:    class features (B, K, C, h, w), saliency logits (B, K, h, w), proposals (N, 4)
                     -> proposal logits (B, K, N) (pre-sigmoid confidence c(n, k)),
                        refined boxes (B, K, N, 4) xyxy input pixels, clipped to the image
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

from .box_coder import BoxCoder, clip_boxes


class ProposalPooler(nn.Module):
    """RoIAlign of the same N boxes on every image of the batch.

    Args:
        output_size: s, the pooled grid is s x s (authors: 5).
        sampling_ratio: sampling points per bin side (authors: 2).

    ``forward(features (B, F, h, w), proposals (N, 4) xyxy input pixels, image_size (H, W))``
    -> (B, N, F, s, s). The scale from input pixels to feature cells is w / W (same on both axes).
    """

    def __init__(self, output_size: int = 5, sampling_ratio: int = 2):
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, features: torch.Tensor, proposals: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        b, f = features.shape[:2]
        n = proposals.shape[0]
        batch_index = torch.arange(b, device=features.device, dtype=proposals.dtype).repeat_interleave(n)
        rois = torch.cat([batch_index[:, None], proposals.repeat(b, 1)], dim=1)
        # roi_align has no bfloat16 kernel on CUDA: pool in float32 whatever the autocast dtype.
        pooled = roi_align(
            features.float(),
            rois.float(),
            output_size=self.output_size,
            spatial_scale=features.shape[-1] / image_size[1],
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        )
        return pooled.view(b, n, f, self.output_size, self.output_size)


class ProposalHead(nn.Module):
    """Per (proposal, class): a confidence logit and a refined box, from the class's pooled features.

    As the authors' implementation: the pooled class features (C channels) are multiplied by the pooled
    sigmoid saliency of the same class, then per class a 3x3 conv C -> ``hidden_channels``, activation,
    global max pooling, a bias-free linear layer to the confidence and a zero-initialised linear layer to
    box deltas (so refinement starts at the proposals). The K class branches run as one grouped conv.

    Args:
        num_classes: K.
        class_channels: C.
        hidden_channels: channels after the 3x3 conv (authors: 64).
        pooler: the proposal pooling (RoIAlign 5x5 by default).
    """

    def __init__(
        self,
        num_classes: int = 14,
        class_channels: int = 128,
        hidden_channels: int = 64,
        leaky_slope: float = 0.1,
        pooler: nn.Module | None = None,
    ):
        super().__init__()
        k = num_classes
        self.num_classes = num_classes
        self.pooler = pooler if pooler is not None else ProposalPooler()
        self.conv = nn.Conv2d(k * class_channels, k * hidden_channels, kernel_size=3, padding=1, groups=k)
        self.activation = nn.LeakyReLU(leaky_slope)
        self.score_weight = nn.Parameter(torch.empty(k, hidden_channels))
        self.delta_weight = nn.Parameter(torch.zeros(k, hidden_channels, 4))
        self.delta_bias = nn.Parameter(torch.zeros(k, 4))
        nn.init.normal_(self.score_weight, std=hidden_channels**-0.5)
        self.box_coder = BoxCoder()

    def forward(
        self,
        class_features: torch.Tensor,
        saliency_logits: torch.Tensor,
        proposals: torch.Tensor,
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, k, c, h, w = class_features.shape
        n = proposals.shape[0]
        pooled = self.pooler(class_features.reshape(b, k * c, h, w), proposals, image_size)  # (B, N, K*C, s, s)
        pooled_saliency = self.pooler(torch.sigmoid(saliency_logits), proposals, image_size)  # (B, N, K, s, s)
        s = pooled.shape[-1]
        gated = pooled.view(b * n, k, c, s, s) * pooled_saliency.view(b * n, k, 1, s, s)
        hidden = self.activation(self.conv(gated.view(b * n, k * c, s, s).to(class_features.dtype)))
        hidden = hidden.amax(dim=(2, 3)).view(b, n, k, -1)  # global max pool -> (B, N, K, hidden)
        logits = torch.einsum("bnkd,kd->bkn", hidden, self.score_weight.to(hidden.dtype))
        deltas = torch.einsum("bnkd,kdo->bkno", hidden, self.delta_weight.to(hidden.dtype))
        deltas = deltas + self.delta_bias[None, :, None, :].to(hidden.dtype)
        refined = clip_boxes(self.box_coder.decode(deltas.float(), proposals[None, None]), image_size)
        return logits, refined
