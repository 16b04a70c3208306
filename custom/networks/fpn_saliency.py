"""Classification module, first half: DenseNet feature pyramid and per-class saliency maps (paper Sec. 3.2).

Shapes for an input of B images of H x W pixels (H, W multiples of 32), K classes:
    DenseNetFPN:   (B, 3, H, W)           -> (B, Q, H/4, W/4)         x_FPN, Q = fpn_channels (256)
    SaliencyHead:  (B, Q, H/4, W/4)       -> class features (B, K, C, H/4, W/4), C = class_channels (128),
                                             saliency logits (B, K, H/4, W/4)  x_S before the sigmoid
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_densenet_features
from .per_class_linear import per_class_affine_linear


class DenseNetFPN(nn.Module):
    """Feature pyramid on a DenseNet, output at 1/4 of the input resolution.

    As the authors' implementation: taps the activation inside each transition (before its 1x1 conv and
    pooling: strides 4, 8, 16) and the activation after ``norm5`` (stride 32); 1x1 lateral convs to
    ``fpn_channels``; top-down nearest upsampling and sum; no 3x3 smoothing convs.

    Args:
        backbone: DenseNet preset name (``densenet121`` in the paper, ``densenet_small`` for tests).
        fpn_channels: Q, channels of the output.
        leaky_slope: negative slope replacing every ReLU (paper: 0.1).

    Input (B, 3, H, W) normalised image; output (B, Q, H/4, W/4), stored channels-last.
    """

    def __init__(self, backbone: str = "densenet121", fpn_channels: int = 256, leaky_slope: float = 0.1):
        super().__init__()
        self.features = build_densenet_features(backbone, leaky_slope)
        self.final_activation = nn.LeakyReLU(leaky_slope)
        tap_channels = [self.features.get_submodule(f"transition{i}").norm.num_features for i in (1, 2, 3)]
        tap_channels.append(self.features.norm5.num_features)
        self.lateral = nn.ModuleList(nn.Conv2d(c, fpn_channels, kernel_size=1) for c in tap_channels)
        self.out_channels = fpn_channels

    def taps(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Return the 4 tapped activations, strides 4, 8, 16, 32 (finest first)."""
        taps: List[torch.Tensor] = []
        x = images
        # TorchScript unrolls this loop over the DenseNet's children and resolves hasattr per child (an
        # isinstance test matches only the first of the transitions, each compiled to its own type).
        for layer in self.features:
            if hasattr(layer, "pool") and hasattr(layer, "conv"):  # torchvision's _Transition
                x = layer.relu(layer.norm(x))
                taps.append(x)
                x = layer.pool(layer.conv(x))
            else:
                x = layer(x)
        taps.append(self.final_activation(x))
        return taps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        taps = self.taps(images)
        laterals: List[torch.Tensor] = []
        for index, lateral in enumerate(self.lateral):
            laterals.append(pixel_conv1x1(lateral.weight, lateral.bias, taps[index]))
        pyramid = laterals[-1]
        for index in range(len(laterals) - 2, -1, -1):
            # In place on the lateral's fresh output (its backward does not need it): one allocation less.
            upsampled = F.interpolate(pyramid, size=laterals[index].shape[-2:], mode="nearest")
            pyramid = laterals[index].add_(upsampled)
        return pyramid


def pixel_conv1x1(weight: torch.Tensor, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv (``weight`` (O, C, 1, 1), ``bias`` (O,)) of x (B, C, h, w) as one matrix product over pixel
    rows, returned channels-last (B, O, h, w).

    The same arithmetic as the conv; reading x's pixel rows is a view in either memory format, and the
    channels-last output is what the saliency head reads without a copy. About 2x faster on the CPU than the
    1x1 conv's own kernel at the finest level.
    """
    b, _, h, w = x.shape
    out_channels = weight.shape[0]
    rows = x.permute(0, 2, 3, 1).flatten(1, 2)  # (B, h*w, C), a view
    out = torch.matmul(rows, weight.reshape(out_channels, -1).t().to(rows.dtype))
    if bias is not None:
        out = out.add_(bias.to(out.dtype))  # in place on the product's fresh output
    return out.view(b, h, w, out_channels).permute(0, 3, 1, 2)


def fold_running_statistics(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    groups: int,
    copies: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm with its running statistics (``running_mean``, ``running_var``, ``eps`` and the affine
    ``weight``, ``bias``, None when not affine), as the affine map of ``per_class_affine_linear``.

    The norm's K*Q channels are ``copies`` repeats of G groups of Q channels (K = copies * G): its input
    would be features x (P, G, Q) repeated ``copies`` times. Returns (centre (G, Q), scale (K, Q),
    shift (K, Q)) with ``norm(input)[:, k*Q + q] == scale[k, q] * (x[:, k % G, q] - centre[k % G, q]) +
    shift[k, q]``. The centre is the mean over copies of the running means (the running mean itself when
    copies = 1), so that subtracting it first keeps the precision of BatchNorm's own (x - mean) when the
    mean is large against the spread.
    """
    k = groups * copies
    channels = running_mean.numel()
    q = channels // k
    if q * k != channels:
        raise ValueError(f"a BatchNorm of {channels} channels cannot be {k} copies of {groups} groups")
    mean, var = running_mean.view(k, q), running_var.view(k, q)
    centre = mean.view(copies, groups, q).mean(dim=0)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = weight.view(k, q) * scale
    shift = bias.view(k, q) if bias is not None else torch.zeros_like(scale)
    if copies > 1:  # copies = 1: running_mean == centre exactly
        shift = shift - (mean - centre.repeat(copies, 1)) * scale
    return centre, scale, shift


def shared_batch_norm(norm: nn.BatchNorm2d, x: torch.Tensor, copies: int) -> torch.Tensor:
    """Batch-normalise x (B, Q, h, w) as ``norm`` (``copies`` * Q channels) would its ``copies``-fold repeat.

    Every copy of a channel has that channel's batch statistics, so one normalisation serves all copies:
    returns (x - mean) / sqrt(var + eps) (B, Q, h, w), without the norm's affine parameters (per copy, applied
    by the caller). The running statistics of all copies are updated as BatchNorm2d.forward does (momentum or
    cumulative average, unbiased variance), each from its own previous value.
    """
    q = x.shape[1]
    if norm.num_features != copies * q:
        raise ValueError(f"{type(norm).__name__}({norm.num_features}) is not {copies} copies of {q} channels")
    if not (norm.training and norm.track_running_stats):
        return F.batch_norm(x, None, None, None, None, True, 0.0, norm.eps)
    norm.num_batches_tracked.add_(1)
    momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    # With momentum 1 the running buffers receive this batch's mean and unbiased variance themselves.
    batch_mean = torch.zeros(q, device=x.device, dtype=norm.running_mean.dtype)
    batch_var = torch.ones(q, device=x.device, dtype=norm.running_var.dtype)
    normalised = F.batch_norm(x, batch_mean, batch_var, None, None, True, 1.0, norm.eps)
    with torch.no_grad():
        norm.running_mean.lerp_(batch_mean.repeat(copies), momentum)
        norm.running_var.lerp_(batch_var.repeat(copies), momentum)
    return normalised


class SaliencyHead(nn.Module):
    """Per-class features and saliency map logits from the pyramid features.

    For each class k, as the authors' implementation: BN-act-conv1x1 Q -> C (class features), then
    BN-act-conv1x1 C -> 1 (saliency logits). The parameters are those of the straightforward version (the
    pyramid repeated K times, ``input_norm`` a BatchNorm over K*Q channels, ``class_conv`` a 1x1 conv with K
    groups, ``class_norm`` over K*C channels, ``saliency_conv`` with K groups; checkpoints keep these keys),
    but each BN-act-conv runs as one tiled ``per_class_affine_linear`` without the K-fold copy: the BNs are
    folded into per-class affine maps (``fold_batch_norm``; in training all K copies of a pyramid channel
    share that channel's batch statistics, as they do in the repeated tensor). Same arithmetic, equal to
    float rounding (tested against the straightforward version).

    With ``shared_input_norm`` the first BN-act is shared by the classes (one BN over Q channels); that makes
    the class features a linear map of one shared tensor, which pooling commutes with (a design change from
    the authors' per-class BN, offered as an option; see the performance notes).

    Input (B, Q, h, w); outputs class features (B, K, C, h, w) and saliency logits (B, K, h, w). The class
    features are stored pixel-major, i.e. a channels-last (B, h, w, K*C) tensor seen as (B, K, C, h, w): the
    layout in which the proposal pooling reads them without a copy.
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
        # Pixels per tile of the per-class branches (None: per_class_linear.default_tile_pixels).
        self.tile_pixels: int | None = None

    def forward(self, pyramid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, q, h, w = pyramid.shape
        k, c = self.num_classes, self.class_channels
        slope = self.activation.negative_slope
        input_norm = self.input_norm
        if self.shared_input_norm or not isinstance(input_norm, nn.BatchNorm2d):
            # The shared BN, or another normalisation (e.g. SyncBatchNorm after convert_sync_batchnorm): the
            # straightforward way, with the pyramid repeated for the latter.
            x = pyramid if self.shared_input_norm else pyramid.repeat(1, k, 1, 1)
            class_features = self.class_conv(self.activation(self.input_norm(x)))
            rows = class_features.permute(0, 2, 3, 1).reshape(b * h * w, k, c)
        else:
            running_mean, running_var = input_norm.running_mean, input_norm.running_var
            centre: Optional[torch.Tensor] = None
            if input_norm.training or running_mean is None or running_var is None:
                pyramid, scale, shift = self._batch_normalised_pyramid(pyramid)
            else:
                centre, scale, shift = fold_running_statistics(
                    running_mean, running_var, input_norm.eps, input_norm.weight, input_norm.bias, 1, k
                )
            pixels = pyramid.permute(0, 2, 3, 1).reshape(b * h * w, 1, q)  # a view when channels-last
            conv = self.class_conv
            conv_bias = conv.bias
            assert conv_bias is not None
            rows = per_class_affine_linear(
                pixels, centre, scale, shift, conv.weight.view(k, c, q), conv_bias.view(k, c), slope,
                self.tile_pixels,
            )  # (B*h*w, K, C)
        class_features = rows.view(b, h, w, k * c).permute(0, 3, 1, 2)  # channels-last (B, K*C, h, w)
        norm, conv = self.class_norm, self.saliency_conv
        running_mean, running_var = norm.running_mean, norm.running_var
        centre: Optional[torch.Tensor] = None
        if not isinstance(norm, nn.BatchNorm2d) or norm.training or running_mean is None or running_var is None:
            # Batch statistics (training): BatchNorm's own kernels, then the per-class dot product.
            normalised = self.class_norm(class_features).permute(0, 2, 3, 1).reshape(b * h * w, k, c)
            scale, shift = torch.ones(k, c, device=rows.device), torch.zeros(k, c, device=rows.device)
        else:
            normalised = rows
            centre, scale, shift = fold_running_statistics(
                running_mean, running_var, norm.eps, norm.weight, norm.bias, k
            )
        saliency_bias = conv.bias
        assert saliency_bias is not None
        saliency = per_class_affine_linear(
            normalised, centre, scale, shift, conv.weight.view(k, 1, c), saliency_bias.view(k, 1), slope,
            self.tile_pixels,
        )  # (B*h*w, K, 1)
        saliency_logits = saliency.view(b, h, w, k).permute(0, 3, 1, 2).contiguous()
        # (B, h, w, K, C) storage seen as (B, K, C, h, w).
        return rows.view(b, h, w, k, c).permute(0, 3, 4, 1, 2), saliency_logits

    @torch.jit.unused
    def _batch_normalised_pyramid(self, pyramid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training: the pyramid normalised with its batch statistics, shared by the K copies of each channel
        (updating the running statistics), and the per-class affine (scale, shift) (K, Q) still to apply."""
        norm = self.input_norm
        k, q = self.num_classes, pyramid.shape[1]
        normalised = shared_batch_norm(norm, pyramid, copies=k)
        scale = norm.weight.view(k, q) if norm.affine else torch.ones(k, q, device=pyramid.device)
        shift = norm.bias.view(k, q) if norm.affine else torch.zeros(k, q, device=pyramid.device)
        return normalised, scale, shift
