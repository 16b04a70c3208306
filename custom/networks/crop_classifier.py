"""Region classification of the crops: a shared ResNet body and one head per class (paper Sec. 3.2, z~)."""

from __future__ import annotations

import torch
from torch import nn

from .backbones import build_resnet_body


class CropClassifier(nn.Module):
    """Crop logits z(k) from the crop of class k.

    One ResNet body (ResNet-34 in the paper) is shared by all classes; each class has its own linear head on
    the 512-d pooled features. All B x K crops go through the body as one batch.

    ``forward(crops (B, K, 3, ch, cw))`` -> crop logits (B, K); ``forward(crops (B, K, S, 3, ch, cw))``, S
    crops per class (the REINFORCE estimator's samples) -> (B, K, S).
    """

    def __init__(self, num_classes: int = 14, body: str = "resnet34"):
        super().__init__()
        self.body = build_resnet_body(body)
        features = self.body.inplanes  # 512 for BasicBlock ResNets
        self.head_weight = nn.Parameter(torch.empty(num_classes, features))
        self.head_bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.normal_(self.head_weight, std=features**-0.5)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        if crops.ndim == 6:  # (B, K, S, 3, ch, cw): class k's head on each of its S crops
            b, k, s = crops.shape[:3]
            features = self.body(crops.flatten(0, 2)).view(b, k, s, -1)
            logits = torch.einsum("bksd,kd->bks", features, self.head_weight.to(features.dtype))
            return logits + self.head_bias.to(features.dtype)[:, None]
        b, k = crops.shape[:2]
        features = self.body(crops.flatten(0, 1)).view(b, k, -1)
        return torch.einsum("bkd,kd->bk", features, self.head_weight.to(features.dtype)) + self.head_bias.to(
            features.dtype
        )
