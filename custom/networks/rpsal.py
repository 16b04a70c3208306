"""RpSalNet: the paper's whole network (Fig. 1), composed of the modules beside this file.

    images (B, 3, H, W) ── DenseNetFPN ── x_FPN (B, Q, H/4, W/4)
        ── SaliencyHead ── class features (B, K, C, H/4, W/4), saliency logits (B, K, H/4, W/4)
        ── LSEPooling ── image logits y (B, K)
        ── ProposalHead on the N fixed proposals ── proposal logits c (B, K, N), refined boxes r (B, K, N, 4)
        ── GumbelProposalSelector ── one-hot selection (B, K, N) ── selected boxes (B, K, 4)
        ── BoxCrop of the input ── crops (B, K, 3, 64, 64) ── CropClassifier ── crop logits z (B, K)
    combined logits = y + z (as the authors' implementation: the crop logit is added to the image logit).

Boxes are xyxy in input-image pixels throughout.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .backbones import load_torchvision_weights
from .crop import BoxCrop
from .crop_classifier import CropClassifier
from .fpn_saliency import DenseNetFPN, SaliencyHead
from .gumbel_selection import GumbelProposalSelector, select_boxes
from .lse_pooling import LSEPooling
from .proposal_head import ProposalHead
from .proposals import ProposalGrid


class RpSalOutput(NamedTuple):
    """Everything RpSalNet computes for B images of H x W pixels, K classes, N proposals.

    image_logits (B, K): LSE-pooled saliency (the classification module's y).
    saliency_logits (B, K, H/4, W/4): saliency maps before the sigmoid (x_S = sigmoid of these).
    proposal_logits (B, K, N): confidence of each proposal for each class, before the sigmoid.
    refined_boxes (B, K, N, 4): refined proposals, xyxy input pixels, clipped to the image.
    selection (B, K, N): one-hot proposal choice per class (straight-through gradient in training).
    selected_boxes (B, K, 4): the chosen refined box per class.
    crop_logits (B, K): the crop classifier's z.
    combined_logits (B, K): y + z.
    The last six are None when the detection module is skipped (stage 1).
    """

    image_logits: torch.Tensor
    saliency_logits: torch.Tensor
    proposal_logits: Optional[torch.Tensor] = None
    refined_boxes: Optional[torch.Tensor] = None
    selection: Optional[torch.Tensor] = None
    selected_boxes: Optional[torch.Tensor] = None
    crop_logits: Optional[torch.Tensor] = None
    combined_logits: Optional[torch.Tensor] = None


class RpSalNet(nn.Module):
    """Region proposals + saliency maps for weakly supervised classification and localisation.

    Args:
        num_classes: K (14 for ChestX-ray14).
        backbone: DenseNet preset of the classification module (``densenet121``; ``densenet_small`` for tests).
        crop_backbone: ResNet preset of the crop classifier (``resnet34``; ``resnet18``/``resnet10``).
        fpn_channels: Q (256). class_channels: C (128). head_channels: proposal head width (64).
        crop_size: side of the crops (64).
        leaky_slope: slope of the LeakyReLU replacing every ReLU of the backbone (0.1).
        shared_input_norm: share the saliency head's first BN-act across classes (see SaliencyHead).
        backbone_weights / crop_weights: optional local torchvision ImageNet state-dict files
            (densenet121 / resnet34); a missing file or mismatched keys is an error.
        temperature: initial Gumbel-Softmax temperature; a buffer, so checkpoints keep the annealed value.

    ``forward(images (B, 3, H, W), with_detection=None)`` -> RpSalOutput. H and W must be multiples of 32.
    ``with_detection=None`` follows the attribute of that name (True unless a training stage turned it off).
    """

    def __init__(
        self,
        num_classes: int = 14,
        backbone: str = "densenet121",
        crop_backbone: str = "resnet34",
        fpn_channels: int = 256,
        class_channels: int = 128,
        head_channels: int = 64,
        crop_size: int = 64,
        leaky_slope: float = 0.1,
        shared_input_norm: bool = False,
        backbone_weights: Optional[str] = None,
        crop_weights: Optional[str] = None,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.fpn = DenseNetFPN(backbone, fpn_channels, leaky_slope)
        self.saliency_head = SaliencyHead(num_classes, fpn_channels, class_channels, leaky_slope, shared_input_norm)
        self.lse_pooling = LSEPooling(num_classes)
        self.proposals = ProposalGrid()
        self.proposal_head = ProposalHead(num_classes, class_channels, head_channels, leaky_slope)
        self.selector = GumbelProposalSelector()
        self.crop = BoxCrop(crop_size)
        self.crop_classifier = CropClassifier(num_classes, crop_backbone)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        # Stage 1 of training needs only the classification module; the training schedule turns this off.
        self.with_detection = True
        if backbone_weights:
            load_torchvision_weights(self.fpn.features, backbone_weights, prefix="features.")
        if crop_weights:
            load_torchvision_weights(self.crop_classifier.body, crop_weights, prefix="", ignore_prefixes=("fc.",))

    @property
    def num_proposals(self) -> int:
        return self.proposals.num_proposals

    def classification_parameters(self) -> list[nn.Parameter]:
        """Parameters of the classification module (backbone, FPN, saliency head, LSE): stage 1."""
        return [*self.fpn.parameters(), *self.saliency_head.parameters(), *self.lse_pooling.parameters()]

    def detection_parameters(self) -> list[nn.Parameter]:
        """Parameters of the detection module (proposal head, crop classifier): stage 2."""
        return [*self.proposal_head.parameters(), *self.crop_classifier.parameters()]

    def forward(self, images: torch.Tensor, with_detection: Optional[bool] = None) -> RpSalOutput:
        if with_detection is None:
            with_detection = self.with_detection
        height, width = images.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"input height and width must be multiples of 32, got {height}x{width}")
        pyramid = self.fpn(images)
        class_features, saliency_logits = self.saliency_head(pyramid)
        image_logits = self.lse_pooling(saliency_logits)
        if not with_detection:
            return RpSalOutput(image_logits, saliency_logits)
        proposals = self.proposals((height, width), images.device)
        proposal_logits, refined_boxes = self.proposal_head(
            class_features, saliency_logits, proposals, (height, width)
        )
        # The temperature stays a device tensor: float() of it would wait for the GPU.
        selection = self.selector(proposal_logits, self.temperature)
        selected_boxes = select_boxes(selection, refined_boxes)
        crop_logits = self.crop_classifier(self.crop(images, selected_boxes))
        combined_logits = image_logits + crop_logits.to(image_logits.dtype)
        return RpSalOutput(
            image_logits,
            saliency_logits,
            proposal_logits,
            refined_boxes,
            selection,
            selected_boxes,
            crop_logits,
            combined_logits,
        )


class RpSalProbabilities(RpSalNet):
    """RpSalNet whose ``forward`` returns a plain tensor: the (B, K) class probabilities.

    Same parameters and state dict as RpSalNet (a checkpoint of one loads into the other), for the places
    that need a tensor output: MONAI ``verify_net_in_out``, TorchScript export, MONAI Label. ``outputs``
    gives the full RpSalOutput for the localisation maps. ``logits`` chooses ``"image"`` (the classification
    module's y, on which the paper reports AUC; the detection module is skipped) or ``"combined"`` (y + z).
    Other arguments as RpSalNet.

    ``forward(images (B, 3, H, W))`` -> probabilities (B, K) in [0, 1].
    """

    def __init__(self, *args, logits: str = "image", **kwargs):
        if logits not in ("image", "combined"):
            raise ValueError(f"logits must be 'image' or 'combined', got {logits!r}")
        super().__init__(*args, **kwargs)
        self.logits = logits

    def outputs(self, images: torch.Tensor, with_detection: Optional[bool] = None) -> RpSalOutput:
        """Everything RpSalNet computes (see RpSalOutput)."""
        return super().forward(images, with_detection)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        output = self.outputs(images, with_detection=self.logits == "combined")
        return torch.sigmoid(output.combined_logits if self.logits == "combined" else output.image_logits)
