"""Class-balanced binary cross-entropy (paper Eq. 1, 2) and the staged RpSal training loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        labels = labels.float()
        # log sigmoid and log(1 - sigmoid) in their stable forms.
        loss = -(
            self.positive_weights * labels * F.logsigmoid(logits)
            + self.negative_weights * (1 - labels) * F.logsigmoid(-logits)
        )
        return self.scale * loss.mean()


class RpSalLoss(nn.Module):
    """The loss of the current training stage, a weighted sum of class-balanced BCE terms.

    ``terms`` maps a stage number to ``{logits field of RpSalOutput: weight}``. The defaults follow the
    authors' implementation: stage 1 trains the image logits y (L_CLS); stages 2 and 3 train the combined
    logits y + z (L_RPN) plus y, weights 1 and 1. The stage is set by the training schedule
    (``custom.handlers.stages.StageSchedule``) through ``set_stage``.

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
            logits = getattr(output, field)
            if logits is None:
                raise ValueError(f"stage {self.stage} loss needs {field}, which the network did not compute")
            term = weight * self.bce(logits, labels)
            total = term if total is None else total + term
        return total
