"""Class-balanced binary cross-entropy (paper Eq. 1, 2) and the staged RpSal training loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .networks.gumbel_selection import score_function_surrogate


class ClassBalancedBCE(nn.Module):
    """-betaP(k) y log sigmoid(x) - betaN(k) (1 - y) log(1 - sigmoid(x)), averaged, times ``scale``.

    betaP(k) = 1 - P_k / |D| and betaN(k) = P_k / |D| come from the training labels
    (``custom.data.class_balance``); the authors' implementation multiplies the loss by 10.

    ``forward(logits (B, K), labels (B, K) in {0, 1})`` -> scalar.
    """

    def __init__(self, positive_weights: Sequence[float], negative_weights: Sequence[float], scale: float = 10.0):
        super().__init__()
        positive = torch.as_tensor(positive_weights, dtype=torch.float32)
        negative = torch.as_tensor(negative_weights, dtype=torch.float32)
        if positive.shape != negative.shape or positive.ndim != 1:
            raise ValueError(f"class weights must be two (K,) vectors, got {positive.shape} and {negative.shape}")
        self.register_buffer("positive_weights", positive)
        self.register_buffer("negative_weights", negative)
        self.scale = scale

    def elementwise(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The weighted loss of each element, times ``scale``, unreduced.

        ``logits (B, K, *extra)``, ``labels (B, K)`` (broadcast over the extra dims) -> (B, K, *extra).
        """
        logits = logits.float()
        labels = labels.float()
        extra = (None,) * (logits.ndim - 2)
        labels = labels[(..., *extra)]
        positive = self.positive_weights[(..., *extra)]
        negative = self.negative_weights[(..., *extra)]
        # log sigmoid and log(1 - sigmoid) in their stable forms.
        loss = -(positive * labels * F.logsigmoid(logits) + negative * (1 - labels) * F.logsigmoid(-logits))
        return self.scale * loss

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.elementwise(logits, labels).mean()


class RpSalLoss(nn.Module):
    """The loss of the current training stage, a weighted sum of class-balanced BCE terms.

    ``terms`` maps a stage number to ``{logits field of RpSalOutput: weight}``. The defaults follow the
    authors' implementation: stage 1 trains the image logits y (L_CLS); stages 2 and 3 train the combined
    logits y + z (L_RPN) plus y, weights 1 and 1. The stage is set by the training schedule
    (``custom.handlers.stages.StageSchedule``) through ``set_stage``.

    Fields: ``image_logits``, ``combined_logits``, ``crop_logits`` and ``proposal_image_logits`` (the
    multiple-instance term on the pooled proposal confidences, beyond the paper). When the network sampled S
    proposals per class (``sample_combined_logits``, the ``reinforce`` estimator), the ``combined_logits``
    term is the mean loss over the samples plus the score-function surrogate that trains the confidences
    (``custom.networks.gumbel_selection.score_function_surrogate``); its value is still the loss.

    ``forward(output: RpSalOutput, labels (B, K))`` -> scalar.
    """

    DEFAULT_TERMS = {
        1: {"image_logits": 1.0},
        2: {"combined_logits": 1.0, "image_logits": 1.0},
        3: {"combined_logits": 1.0, "image_logits": 1.0},
    }

    def __init__(
        self,
        positive_weights: Sequence[float],
        negative_weights: Sequence[float],
        scale: float = 10.0,
        terms: Mapping[int, Mapping[str, float]] | None = None,
        stage: int = 1,
    ):
        super().__init__()
        self.bce = ClassBalancedBCE(positive_weights, negative_weights, scale)
        self.terms = {int(k): dict(v) for k, v in (terms or self.DEFAULT_TERMS).items()}
        self.stage = stage

    def set_stage(self, stage: int) -> None:
        if stage not in self.terms:
            raise ValueError(f"no loss terms for stage {stage}; known stages {sorted(self.terms)}")
        self.stage = stage

    def forward(self, output, labels: torch.Tensor) -> torch.Tensor:
        total = None
        for field, weight in self.terms[self.stage].items():
            if not weight:
                continue
            term = weight * self.term(output, field, labels)
            total = term if total is None else total + term
        if total is None:
            raise ValueError(f"stage {self.stage} has no loss term with a non-zero weight")
        return total

    def term(self, output, field: str, labels: torch.Tensor) -> torch.Tensor:
        """One unweighted term of the loss: the class-balanced BCE of ``field`` (see the class docstring)."""
        samples = getattr(output, "sample_combined_logits", None)
        if field == "combined_logits" and samples is not None:
            losses = self.bce.elementwise(samples, labels)  # (B, K, S)
            return losses.mean() + score_function_surrogate(losses, output.sample_log_probs)
        logits = getattr(output, field, None)
        if logits is None:
            raise ValueError(f"stage {self.stage} loss needs {field}, which the network did not compute")
        return self.bce(logits, labels)

    def extra_repr(self) -> str:
        # Part of the run signature the training checkpoint hashes.
        return f"scale={self.bce.scale}, terms={self.terms}"
