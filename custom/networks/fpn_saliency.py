"""Classification module, first half: DenseNet feature pyramid and per-class saliency maps (paper Sec. 3.2).

Shapes for an input of B images of H x W pixels (H, W multiples of 32), K classes:
    DenseNetFPN:   (B, 3, H, W)           -> (B, Q, H/4, W/4)         x_FPN, Q = fpn_channels (256)
    SaliencyHead:  (B, Q, H/4, W/4)       -> class features (B, K, C, H/4, W/4), C = class_channels (128),
                                             saliency logits (B, K, H/4, W/4)  x_S before the sigmoid
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_densenet_features


class DenseNetFPN(nn.Module):
    """Feature pyramid on a DenseNet, output at 1/4 of the input resolution.

    As the authors' implementation: taps the activation inside each transition (before its 1x1 conv and
    pooling: strides 4, 8, 16) and the activation after ``norm5`` (stride 32); 1x1 lateral convs to
    ``fpn_channels``; top-down nearest upsampling and sum; no 3x3 smoothing convs.

    Args:
        backbone: DenseNet preset name (``densenet121`` in the paper, ``densenet_small`` for tests).
        fpn_channels: Q, channels of the output.
        leaky_slope: negative slope replacing every ReLU (paper: 0.1).

    Input (B, 3, H, W) normalised image; output (B, Q, H/4, W/4).
    """

    def __init__(self, backbone: str = "densenet121", fpn_channels: int = 256, leaky_slope: float = 0.1):
        super().__init__()
        self.features = build_densenet_features(backbone, leaky_slope)
        self.final_activation = nn.LeakyReLU(leaky_slope)
        tap_channels = [self.features.get_submodule(f"transition{i}").norm.num_features for i in (1, 2, 3)]
        tap_channels.append(self.features.norm5.num_features)
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, kernel_size=1) for c in tap_channels)
        self.out_channels = fpn_channels

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the 4 tapped activations, strides 4, 8, 16, 32 (finest first)."""
        taps = []
        x = images
        for name, layer in self.features.named_children():
            if name.startswith("transition"):
                x = layer.relu(layer.norm(x))
                taps.append(x)
                x = layer.pool(layer.conv(x))
            else:
                x = layer(x)
        taps.append(self.final_activation(x))
        return taps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        taps = self.taps(images)
        pyramid = self.lateral[-1](taps[-1])
        for lateral, tap in zip(reversed(self.lateral[:-1]), reversed(taps[:-1])):
            pyramid = lateral(tap) + F.interpolate(pyramid, size=tap.shape[-2:], mode="nearest")
        return pyramid


class SaliencyHead(nn.Module):
    """Per-class features and saliency map logits from the pyramid features.

    For each class k, as the authors' implementation: BN-act-conv1x1 Q -> C (class features), then
    BN-act-conv1x1 C -> 1 (saliency logits). The K branches run as grouped convolutions, one launch for all
    classes. With ``shared_input_norm`` the first BN-act is shared by the classes (one BN over Q channels);
    that makes the class features a linear map of one shared tensor, which pooling commutes with (a design
    change from the authors' per-class BN, offered for speed; see the performance notes).

    Input (B, Q, h, w); outputs class features (B, K, C, h, w) and saliency logits (B, K, h, w).
    """

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: int = 256,
        class_channels: int = 128,
        leaky_slope: float = 0.1,
        shared_input_norm: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.class_channels = class_channels
        self.shared_input_norm = shared_input_norm
        k = num_classes
        norm_channels = in_channels if shared_input_norm else k * in_channels
        self.input_norm = nn.BatchNorm2d(norm_channels)
        self.class_conv = nn.Conv2d(
            norm_channels, k * class_channels, kernel_size=1, groups=1 if shared_input_norm else k
        )
        self.class_norm = nn.BatchNorm2d(k * class_channels)
        self.saliency_conv = nn.Conv2d(k * class_channels, k, kernel_size=1, groups=k)
        self.activation = nn.LeakyReLU(leaky_slope)

    def forward(self, pyramid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = pyramid.shape
        x = pyramid if self.shared_input_norm else pyramid.repeat(1, self.num_classes, 1, 1)
        class_features = self.class_conv(self.activation(self.input_norm(x)))
        saliency_logits = self.saliency_conv(self.activation(self.class_norm(class_features)))
        return class_features.view(b, self.num_classes, self.class_channels, h, w), saliency_logits
