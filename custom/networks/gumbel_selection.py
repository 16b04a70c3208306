"""Straight-through Gumbel-Softmax selection of one proposal per class (paper Sec. 3.2, Jang et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def straight_through_gumbel_softmax(
    logits: torch.Tensor, temperature: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One-hot sample over the last dim whose gradient is that of the Gumbel-softmax relaxation.

    Forward: one_hot(argmax(logits + g)), g ~ Gumbel(0, 1). Backward: the gradient of
    softmax((logits + g) / temperature). Input (..., N) -> output (..., N), exactly one 1 per row. The
    temperature may be a 0-dim tensor on the logits' device (no host synchronisation).
    """
    uniform = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
    # Clamping keeps log(-log(u)) finite at u = 0 or 1.
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    soft = F.softmax((logits.float() + gumbel) / temperature, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return (hard - soft.detach() + soft).to(logits.dtype)


class GumbelProposalSelector(nn.Module):
    """Selects one proposal per (image, class) from confidence logits.

    Training: straight-through Gumbel-Softmax at ``temperature`` (annealed by the training schedule).
    Evaluation: the top-1 proposal, no noise (deterministic).

    ``forward(proposal_logits (B, K, N), temperature)`` -> one-hot selection (B, K, N).
    """

    def forward(self, proposal_logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.training:
            return straight_through_gumbel_softmax(proposal_logits, temperature)
        return F.one_hot(proposal_logits.argmax(dim=-1), proposal_logits.shape[-1]).to(proposal_logits.dtype)


def select_boxes(selection: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The selected box of each class: selection (B, K, N) one-hot, boxes (B, K, N, 4) -> (B, K, 4).

    A weighted sum rather than indexing, so the gradient reaches both the selection and the boxes.
    """
    # In float32 at least even under autocast: bfloat16 would round 512-px coordinates to 2 px.
    dtype = torch.promote_types(boxes.dtype, torch.float32)
    with torch.autocast(boxes.device.type, enabled=False):
        return torch.einsum("bkn,bkno->bko", selection.to(dtype), boxes.to(dtype))
