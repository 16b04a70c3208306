"""RpSalNet: the paper's whole network (Fig. 1), composed of the modules beside this file.

    images (B, 3, H, W) ── DenseNetFPN ── x_FPN (B, Q, H/4, W/4)
        ── SaliencyHead ── class features (B, K, C, H/4, W/4), saliency logits (B, K, H/4, W/4)
        ── LSEPooling ── image logits y (B, K)
        ── ProposalHead on the N fixed proposals ── proposal logits c (B, K, N), refined boxes r (B, K, N, 4)
        ── GumbelProposalSelector ── one-hot selection (B, K, N) ── selected boxes (B, K, 4)
        ── BoxCrop of the input ── crops (B, K, 3, 64, 64) ── CropClassifier ── crop logits z (B, K)
    combined logits = y + z (as the authors' implementation: the crop logit is added to the image logit).
    Beyond the paper: proposal image logits (B, K), the N confidences of each class LSE-pooled (multiple-
    instance learning); with the ``reinforce`` estimator, S sampled proposals per class are cropped in training.

Boxes are xyxy in input-image pixels throughout.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import load_torchvision_weights
from .crop import BoxCrop
from .crop_classifier import CropClassifier
from .fpn_saliency import DenseNetFPN, SaliencyHead
from .gumbel_selection import (
    ESTIMATORS,
    GumbelProposalSelector,
    gather_boxes,
    proposal_pooling,
    sample_proposals,
    select_boxes,
)
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
    crop_logits (B, K): the crop classifier's z (with S samples: their mean).
    combined_logits (B, K): y + z.
    proposal_image_logits (B, K): the proposal confidences LSE-pooled over N (the MIL logits).
    sample_combined_logits (B, K, S), sample_log_probs (B, K, S): y + z of each of S sampled proposals and the
        sample's log-probability under softmax(c); only in training with the ``reinforce`` estimator.
    All but the first two are None when the detection module is skipped (stage 1).
    """

    image_logits: torch.Tensor
    saliency_logits: torch.Tensor
    proposal_logits: Optional[torch.Tensor] = None
    refined_boxes: Optional[torch.Tensor] = None
    selection: Optional[torch.Tensor] = None
    selected_boxes: Optional[torch.Tensor] = None
    crop_logits: Optional[torch.Tensor] = None
    combined_logits: Optional[torch.Tensor] = None
    proposal_image_logits: Optional[torch.Tensor] = None
    sample_combined_logits: Optional[torch.Tensor] = None
    sample_log_probs: Optional[torch.Tensor] = None


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
        selection_estimator: how training picks the crop and trains the confidences:
            ``straight_through`` (the paper's one-sample straight-through Gumbel-Softmax) or ``reinforce``
            (``num_samples`` samples per class, score-function gradient with a leave-one-out baseline; see
            ``gumbel_selection``). Evaluation always takes the top-1 proposal.
        num_samples: S, crops per class in training with ``reinforce`` (at least 2).
        mil_sharpness: r of the LSE pooling of the proposal confidences to ``proposal_image_logits``.
        shared_proposal_head: one proposal head for all classes (the authors' code) instead of one per class.
        proposal_reduction: ``max`` (the authors'), ``mean`` or ``contrast`` (box mean minus context mean)
            reduction of each proposal's conv features (``ProposalHead``).

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
        selection_estimator: str = "straight_through",
        num_samples: int = 4,
        mil_sharpness: float = 5.0,
        shared_proposal_head: bool = False,
        proposal_reduction: str = "max",
    ):
        super().__init__()
        if selection_estimator not in ESTIMATORS:
            raise ValueError(f"selection_estimator must be one of {ESTIMATORS}, got {selection_estimator!r}")
        if selection_estimator == "reinforce" and num_samples < 2:
            raise ValueError(f"the reinforce estimator needs num_samples >= 2 (leave-one-out), got {num_samples}")
        if mil_sharpness <= 0:
            raise ValueError(f"mil_sharpness must be positive, got {mil_sharpness}")
        self.selection_estimator = selection_estimator
        self.num_samples = int(num_samples)
        self.mil_sharpness = float(mil_sharpness)
        self.num_classes = num_classes
        self.fpn = DenseNetFPN(backbone, fpn_channels, leaky_slope)
        self.saliency_head = SaliencyHead(num_classes, fpn_channels, class_channels, leaky_slope, shared_input_norm)
        self.lse_pooling = LSEPooling(num_classes)
        self.proposals = ProposalGrid()
        self.proposal_head = ProposalHead(
            num_classes, class_channels, head_channels, leaky_slope, shared=shared_proposal_head,
            reduction=proposal_reduction,
        )
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

    def extra_repr(self) -> str:
        # Part of the module's repr, which the training checkpoint's run signature hashes.
        return (
            f"selection_estimator={self.selection_estimator!r}, num_samples={self.num_samples}, "
            f"mil_sharpness={self.mil_sharpness}"
        )

    # Read by Python code only; TorchScript compiles the image-logit path (RpSalProbabilities.forward).
    __jit_unused_properties__ = ["num_proposals"]

    @property
    def num_proposals(self) -> int:
        return self.proposals.num_proposals

    def classification_parameters(self) -> list[nn.Parameter]:
        """Parameters of the classification module (backbone, FPN, saliency head, LSE): stage 1."""
        return [*self.fpn.parameters(), *self.saliency_head.parameters(), *self.lse_pooling.parameters()]

    def detection_parameters(self) -> list[nn.Parameter]:
        """Parameters of the detection module (proposal head, crop classifier): stage 2."""
        return [*self.proposal_head.parameters(), *self.crop_classifier.parameters()]

    def classify(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The classification module (paper Sec. 3.2): class features (B, K, C, h, w), saliency logits
        (B, K, h, w) and image logits y (B, K) of images (B, 3, H, W), H and W multiples of 32."""
        height, width = images.shape[-2], images.shape[-1]
        if height % 32 != 0 or width % 32 != 0:
            raise ValueError(f"input height and width must be multiples of 32, got {height}x{width}")
        pyramid = self.fpn(images)
        class_features, saliency_logits = self.saliency_head(pyramid)
        return class_features, saliency_logits, self.lse_pooling(saliency_logits)

    def forward(self, images: torch.Tensor, with_detection: Optional[bool] = None) -> RpSalOutput:
        if with_detection is None:
            with_detection = self.with_detection
        height, width = images.shape[-2:]
        class_features, saliency_logits, image_logits = self.classify(images)
        if not with_detection:
            return RpSalOutput(image_logits, saliency_logits)
        proposals = self.proposals((height, width), images.device)
        proposal_logits, refined_boxes = self.proposal_head(
            class_features, saliency_logits, proposals, (height, width)
        )
        proposal_image_logits = proposal_pooling(proposal_logits, self.mil_sharpness)
        if self.training and self.selection_estimator == "reinforce":
            return self._sampled_detection(
                images, image_logits, saliency_logits, proposal_logits, refined_boxes, proposal_image_logits
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
            proposal_image_logits,
        )

    def _sampled_detection(
        self, images, image_logits, saliency_logits, proposal_logits, refined_boxes, proposal_image_logits
    ) -> RpSalOutput:
        """Training with the ``reinforce`` estimator: S proposals sampled per class, each cropped and classified.

        The crops are of the sampled refined boxes (B, K, S, 4), so the box deltas learn pathwise; the
        confidences learn from the loss of each sample through ``sample_log_probs`` (``custom.losses``).
        ``selection`` / ``selected_boxes`` report the first sample.
        """
        b, k, n = proposal_logits.shape
        s = self.num_samples
        indices, log_probs = sample_proposals(proposal_logits, s)  # (B, K, S) each
        sample_boxes = gather_boxes(indices, refined_boxes)  # (B, K, S, 4)
        crops = self.crop(images, sample_boxes.reshape(b, k * s, 4))  # (B, K*S, 3, ch, cw)
        sample_crop_logits = self.crop_classifier(crops.view(b, k, s, *crops.shape[2:]))  # (B, K, S)
        sample_combined = image_logits[..., None] + sample_crop_logits.to(image_logits.dtype)
        crop_logits = sample_crop_logits.mean(dim=-1)
        selection = F.one_hot(indices[..., 0], n).to(proposal_logits.dtype)
        return RpSalOutput(
            image_logits,
            saliency_logits,
            proposal_logits,
            refined_boxes,
            selection,
            sample_boxes[:, :, 0],
            crop_logits,
            image_logits + crop_logits.to(image_logits.dtype),
            proposal_image_logits,
            sample_combined,
            log_probs,
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
        if self.logits == "combined":
            return self._combined_probabilities(images)
        # The image logits need the classification module only: the path TorchScript compiles.
        return torch.sigmoid(self.classify(images)[2])

    @torch.jit.unused
    def _combined_probabilities(self, images):  # unannotated: TorchScript reads it as Tensor -> Tensor
        """sigmoid(y + z): the detection module runs too (eager and traced; not in a scripted model)."""
        return torch.sigmoid(self.outputs(images, with_detection=True).combined_logits)
